"""The `mmserve` command line, run as a user runs it (a subprocess of the installed console script)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from demo.samples.make_samples import SAMPLE_SCENE
from demo import world
from tests import independent_world as iw

MMSERVE = [shutil.which("mmserve") or str(Path(sys.executable).parent / "mmserve")]


def run(*args, timeout=120):
    return subprocess.run([*MMSERVE, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    world.render(SAMPLE_SCENE).save(d / "sample.png")
    scene = iw.Scene("black", [iw.Obj("square", "red", "small", 40.0, 60.0, 24)])
    iw.render(scene).save(d / "square.jpg", quality=95)
    (d / "notes.txt").write_text("not an image")
    return d


def test_caption_json_lines(images):
    r = run("caption", str(images / "sample.png"), str(images / "square.jpg"), "--json")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert lines == [
        {"image": str(images / "sample.png"), "caption": world.caption(SAMPLE_SCENE)},
        {"image": str(images / "square.jpg"), "caption": "a small red square"},
    ]


def test_ask_json(images):
    r = run("ask", str(images / "sample.png"), "what shape is the blue object?", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"image": str(images / "sample.png"),
                                    "question": "what shape is the blue object?", "answer": "square"}


def test_ask_plain(images):
    r = run("ask", str(images / "square.jpg"), "how many objects are there?")
    assert r.returncode == 0 and r.stdout.strip() == "one"


@pytest.mark.parametrize("name,needle", [("notes.txt", "not an image"), ("missing.png", "no such file")])
def test_bad_image_one_line_error_and_nonzero_exit(images, name, needle):
    r = run("caption", str(images / name))
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mmserve: error:") and needle in lines[0], r.stderr


def test_caption_keeps_going_past_a_bad_image(images):
    r = run("caption", str(images / "notes.txt"), str(images / "sample.png"))
    assert r.returncode == 1
    assert r.stdout.strip() == f"{images / 'sample.png'}: {world.caption(SAMPLE_SCENE)}"


def test_unknown_model_directory(images, tmp_path):
    r = run("caption", str(images / "sample.png"), "--model", str(tmp_path / "nowhere"))
    assert r.returncode != 0
    assert r.stderr.strip() == f"mmserve: error: model directory not found: {tmp_path / 'nowhere'}"


def test_bad_setting_from_environment(images):
    r = subprocess.run([*MMSERVE, "caption", str(images / "sample.png")], capture_output=True, text=True,
                       env={"PATH": "", "MMSERVE_MAX_IMAGE_BYTES": "lots"}, timeout=120)
    assert r.returncode != 0 and "MMSERVE_MAX_IMAGE_BYTES" in r.stderr
