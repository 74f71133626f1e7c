"""`mmserve caption DIR|PARQUET --ray --out captions.jsonl|.parquet`: the local folder job (app/caption_dir.py)
on Ray Data. Same plan, same lines, same resume; the work spread over the cluster:

    paths -> read + decode + check (Ray tasks, `map_batches` of a function)
          -> encode + decode (an actor pool of `Captioner`s, each loading the model once)
          -> the driver writes each line as its row arrives (streaming, in input order), with a progress bar.

An unreadable image gets the same `{"image", "error"}` reason line as the local job. Resume: the JSONL
output is read back as the local job does (a cut-off last line dropped); a .parquet output is written at
the end from its JSONL journal (`OUT.partial.jsonl`), which is what a crash leaves and a rerun resumes.
A PARQUET input holds one row per image: a `path` (string) and an `image` (bytes) column.

Ray is optional: import this module only after app.cli's require_ray() said yes.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import ray
from PIL import Image
from tqdm import tqdm

from app.caption_dir import CaptionJob, CaptionJobError, read_finished
from app.settings import Settings
from vision.intake import ImageError, IntakeLimits, load_image


def _decode(batch: dict[str, np.ndarray], folder: str | None, limits: IntakeLimits) -> dict[str, list]:
    """A Ray task: bytes (read here from the folder, or the parquet's column) -> RGB pixels or a reason."""
    pixels, errors = [], []
    for i, name in enumerate(batch["image_path"]):
        try:
            data = (Path(folder) / name).read_bytes() if folder is not None else bytes(batch["image"][i])
            pixels.append(np.asarray(load_image(data, limits), dtype=np.uint8))
            errors.append("")
        except ImageError as e:
            pixels.append(np.zeros((1, 1, 3), np.uint8))
            errors.append(str(e))
        except OSError as e:
            pixels.append(np.zeros((1, 1, 3), np.uint8))
            errors.append(e.strerror or str(e))
    return {"image_path": list(batch["image_path"]), "pixels": pixels, "error": errors}


class Captioner:
    """One actor of the pool: loads the model once, captions the readable images of each batch."""

    def __init__(self, settings: Settings) -> None:
        import torch

        from app.cli import _load_one

        if settings.threads:
            torch.set_num_threads(settings.threads)
        self.model = _load_one(settings)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        readable = [i for i, error in enumerate(batch["error"]) if not error]
        texts = self.model.caption([Image.fromarray(np.asarray(batch["pixels"][i], np.uint8)) for i in readable])
        captions = [""] * len(batch["image_path"])
        for i, text in zip(readable, texts, strict=True):
            captions[i] = text
        return {"image_path": list(batch["image_path"]), "caption": captions, "error": list(batch["error"])}


def _records(rows: Iterator[dict]) -> Iterator[dict]:
    for row in rows:
        yield ({"image": row["image_path"], "error": row["error"]} if row["error"]
               else {"image": row["image_path"], "caption": row["caption"]})


def caption_on_ray(source: Path, out: Path, settings: Settings, *, actors: int = 1, batch_size: int = 16,
                   recursive: bool = False, progress: bool = True) -> str:
    journal = out.with_name(out.name + ".partial.jsonl") if out.suffix == ".parquet" else out
    if source.is_dir():
        job = CaptionJob.plan(source, journal, recursive)
        images, todo, folder, table = job.images, job.todo, str(source), None
    elif source.suffix == ".parquet" and source.is_file():
        import pyarrow.parquet as pq

        table = pq.read_table(source, columns=["path", "image"])
        images = [str(p) for p in table.column("path").to_pylist()]
        finished = read_finished(journal)
        todo, folder = [p for p in images if p not in finished], None
    else:
        raise CaptionJobError(f"{source}: not a directory or a .parquet file")
    captioned = unreadable = 0
    if todo:
        if table is not None:
            keep = set(todo)
            rows = [{"image_path": p, "image": b} for p, b in zip(images, table.column("image").to_pylist())
                    if p in keep]
        else:
            rows = [{"image_path": p} for p in todo]
        ray.data.DataContext.get_current().execution_options.preserve_order = True  # lines in input order
        ds = (ray.data.from_items(rows)
              .map_batches(_decode, fn_kwargs={"folder": folder, "limits": settings.intake_limits},
                           batch_size=batch_size)
              .map_batches(Captioner, fn_constructor_kwargs={"settings": settings}, batch_size=batch_size,
                           concurrency=actors, num_cpus=max(settings.ray_replica_cpus, 0.1)))
        with journal.open("a", encoding="utf-8") as sink, \
                tqdm(total=len(images), initial=len(images) - len(todo), unit="image", file=sys.stderr,
                     disable=not progress, dynamic_ncols=True) as bar:
            for record in _records(ds.iter_rows()):
                sink.write(json.dumps(record) + "\n")
                sink.flush()
                bar.update(1)
                captioned += "caption" in record
                unreadable += "error" in record
    if journal is not out:
        _write_parquet(journal, out, images)
    return (f"{len(images)} images in {source}: {captioned} captioned, {unreadable} unreadable (reasons in {out}), "
            f"{len(images) - len(todo)} already done (Ray Data, {actors} captioning actor(s))")


def _write_parquet(journal: Path, out: Path, order: list[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    lines = {r["image"]: r for r in (json.loads(line) for line in journal.read_text().splitlines() if line.strip())}
    records = [lines[name] for name in order if name in lines]
    pq.write_table(pa.table({"image": [r["image"] for r in records],
                             "caption": [r.get("caption") for r in records],
                             "error": [r.get("error") for r in records]}), out)
