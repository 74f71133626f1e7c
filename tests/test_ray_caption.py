"""`mmserve caption DIR --ray` on a local Ray cluster (marked `ray`; skipped without Ray): the same lines as
the local folder job on the same folder (captions and unreadable-image reasons), a resume after a crash
that left some lines and a cut-off one, and a .parquet output."""

from __future__ import annotations

import json
import random

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[ray]'")

from app.caption_dir import caption_folder  # noqa: E402
from app.cli import _load_one  # noqa: E402
from app.settings import Settings  # noqa: E402
from demo import world  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def folder_and_local(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    for i in range(10):
        world.render(world.sample_scene(random.Random(i))).save(folder / f"scene-{i:02d}.png")
    (folder / "broken.png").write_bytes(b"not a png at all")
    (folder / "notes.txt").write_text("not an image")
    settings = Settings(threads=1)
    local = folder.parent / "local.jsonl"
    caption_folder(folder, local, lambda: _load_one(settings), settings.intake_limits, batch_size=4, progress=False)
    return folder, local.read_text().splitlines(), settings


@pytest.fixture(scope="module")
def cluster():
    from app.scale.ray_caption import caption_on_ray

    from app.scale.local_ray import start_ray

    start_ray(num_cpus=2)
    try:
        yield caption_on_ray
    finally:
        ray.shutdown()


def test_ray_data_writes_the_local_jobs_lines_and_resumes(folder_and_local, cluster, tmp_path):
    folder, local, settings = folder_and_local
    assert any('"error"' in line and "broken.png" in line for line in local)
    out = tmp_path / "captions.jsonl"
    summary = cluster(folder, out, settings, actors=2, batch_size=4, progress=False)
    assert out.read_text().splitlines() == local, summary
    assert "10 captioned, 1 unreadable" in summary

    resumed = tmp_path / "resumed.jsonl"
    resumed.write_text("\n".join(local[:4]) + "\n" + local[4][:15])  # a crash: 4 lines and a cut-off fifth
    summary = cluster(folder, resumed, settings, actors=1, batch_size=4, progress=False)
    assert resumed.read_text().splitlines() == local and "4 already done" in summary


def test_parquet_in_and_out(folder_and_local, cluster, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder, local, settings = folder_and_local
    names = sorted(p.name for p in folder.iterdir() if p.suffix == ".png")
    source = tmp_path / "images.parquet"
    pq.write_table(pa.table({"path": names, "image": [(folder / n).read_bytes() for n in names]}), source)
    out = tmp_path / "captions.parquet"
    cluster(source, out, settings, actors=1, batch_size=8, progress=False)
    table = pq.read_table(out).to_pylist()
    expected = [json.loads(line) for line in local]
    assert [{k: v for k, v in row.items() if v is not None} for row in table] == expected
