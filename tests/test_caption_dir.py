"""`mmserve caption DIR --out FILE`: a folder captioned into JSONL, resumable, unreadable files reported."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from app.cli import main
from demo import world

MMSERVE = str(Path(sys.executable).parent / "mmserve")
SCENES = {name: world.sample_scene(random.Random(seed)) for name, seed in
          (("a.png", 1), ("b.jpg", 2), ("sub/c.png", 3), ("d.webp", 4))}


@pytest.fixture()
def folder(tmp_path):
    d = tmp_path / "photos"
    for name, scene in SCENES.items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        world.render(scene).save(d / name, **({"quality": 95} if name.endswith(".jpg") else {}))
    (d / "broken.png").write_bytes(b"this is not a png")
    (d / "cut.png").write_bytes((d / "a.png").read_bytes()[:200])  # a download that stopped early
    (d / "notes.txt").write_text("not an image, and not named like one")
    (d / ".thumbnail.png").write_bytes((d / "a.png").read_bytes())  # hidden: passed over
    return d


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_a_folder_is_captioned_in_path_order_with_reasons_for_unreadable_files(folder, tmp_path):
    out = tmp_path / "captions.jsonl"
    r = subprocess.run([MMSERVE, "caption", str(folder), "--out", str(out), "--recursive", "--batch-size", "2"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = records(out)
    assert [line["image"] for line in lines] == ["a.png", "b.jpg", "broken.png", "cut.png", "d.webp", "sub/c.png"]
    by_image = {line["image"]: line for line in lines}
    for name, scene in SCENES.items():
        assert by_image[name] == {"image": name, "caption": world.caption(scene)}
    assert "not an image" in by_image["broken.png"]["error"] and "caption" not in by_image["broken.png"]
    assert "truncated or corrupt" in by_image["cut.png"]["error"]
    assert "6/6" in r.stderr  # the progress bar, on stderr
    assert "4 captioned, 2 unreadable" in r.stderr and "1 files without an image extension" in r.stderr
    assert r.stdout == ""


def test_a_rerun_resumes_after_a_kill_and_never_captions_an_image_twice(folder, tmp_path, capsys):
    out = tmp_path / "captions.jsonl"
    # What a run killed while writing its second line leaves behind. The first line's caption is not what
    # the model says, so a rerun that captioned a.png again would show.
    out.write_text(json.dumps({"image": "a.png", "caption": "from the first run"}) + "\n" + '{"image": "b.jp')
    assert main(["caption", str(folder), "--out", str(out)]) == 0  # not recursive: sub/c.png is not included
    lines = records(out)
    assert [line["image"] for line in lines] == ["a.png", "b.jpg", "broken.png", "cut.png", "d.webp"]
    assert lines[0]["caption"] == "from the first run"
    assert lines[1]["caption"] == world.caption(SCENES["b.jpg"])
    err = capsys.readouterr().err
    assert "2 captioned, 2 unreadable" in err and "1 already done" in err

    # Everything is done now: nothing runs, so the model is not even loaded (this one does not exist).
    before = out.read_bytes()
    assert main(["caption", str(folder), "--out", str(out), "--model", str(tmp_path / "no-model")]) == 0
    assert out.read_bytes() == before and "5 already done" in capsys.readouterr().err

    # With --recursive the subfolder's image is the only new line.
    assert main(["caption", str(folder), "--out", str(out), "-r"]) == 0
    assert [line["image"] for line in records(out)][len(lines):] == ["sub/c.png"]


def test_a_complete_last_line_without_its_newline_is_kept(folder, tmp_path, capsys):
    out = tmp_path / "captions.jsonl"
    out.write_text(json.dumps({"image": "a.png", "caption": "kept"}))
    assert main(["caption", str(folder), "--out", str(out)]) == 0
    lines = records(out)
    assert lines[0] == {"image": "a.png", "caption": "kept"} and len(lines) == 5
    assert len({line["image"] for line in lines}) == 5


def test_an_output_file_this_command_did_not_write_is_refused(folder, tmp_path, capsys):
    out = tmp_path / "captions.jsonl"
    out.write_text("name,caption\na.png,hello\n")
    assert main(["caption", str(folder), "--out", str(out)]) == 2
    assert "line 1 is not a caption line" in capsys.readouterr().err
    assert out.read_text() == "name,caption\na.png,hello\n"


def test_out_needs_one_directory(folder, tmp_path, capsys):
    assert main(["caption", str(folder / "a.png"), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "--out captions one directory" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_images_without_out_still_print_as_before(folder, capsys):
    assert main(["caption", str(folder / "a.png"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"image": str(folder / "a.png"),
                                                  "caption": world.caption(SCENES["a.png"])}
