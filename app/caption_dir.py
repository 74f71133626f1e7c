"""`mmserve caption DIR --out captions.jsonl`: caption every image of a folder into a JSONL file.

One line per image, in sorted path order, written and flushed as soon as its batch is captioned:
`{"image": PATH, "caption": TEXT}`, or `{"image": PATH, "error": REASON}` for a file that cannot be
read as an image (the job goes on). PATH is relative to DIR, so the file means the same thing wherever
the job is run from. Rerunning with the same --out resumes: images already in the file (captioned or
not) are not run again, so each image has exactly one line. A previous run killed mid-write leaves at
most a cut-off last line; it is dropped and that image runs again.

Files are images by their extension (the formats the intake accepts); others are counted, not run.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from PIL import Image
from tqdm import tqdm

from vision.intake import ImageError, IntakeLimits, load_image

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".gif"})


class CaptionJobError(Exception):
    """The job cannot start (the output file is not one this job wrote); the message says why."""


class Captioner(Protocol):
    def caption(self, images: list[Image.Image]) -> list[str]: ...


def find_images(folder: Path, recursive: bool) -> tuple[list[str], int]:
    """(image paths relative to `folder`, sorted; how many other files were passed over). Hidden files
    and folders (a leading dot) are skipped, as `ls` does."""
    images, others = [], 0
    for path in folder.rglob("*") if recursive else folder.iterdir():
        relative = path.relative_to(folder)
        if not path.is_file() or any(part.startswith(".") for part in relative.parts):
            continue
        if path.suffix.lower() in IMAGE_SUFFIXES:
            images.append(relative.as_posix())
        else:
            others += 1
    return sorted(images), others


def _recorded_image(line: bytes) -> str | None:
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    if isinstance(entry, dict) and isinstance(entry.get("image"), str) and ("caption" in entry or "error" in entry):
        return entry["image"]
    return None


def read_finished(out: Path) -> set[str]:
    """The images `out` already has a line for. Repairs the one damage a kill can do — a cut-off last
    line is removed, a complete last line missing its newline gets one — and refuses anything else."""
    if not out.exists():
        return set()
    data = out.read_bytes()
    *lines, tail = data.split(b"\n")  # tail: what follows the last newline; b"" when the file ends cleanly
    finished = set()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        image = _recorded_image(line)
        if image is None:
            raise CaptionJobError(f"{out} line {number} is not a caption line; to resume, --out must be a file "
                                  f"this command wrote (move it away to start over)")
        finished.add(image)
    if tail.strip():
        image = _recorded_image(tail)
        with out.open("r+b") as f:
            if image is None:
                f.truncate(len(data) - len(tail))
            else:
                finished.add(image)
                f.seek(0, 2)
                f.write(b"\n")
    return finished


@dataclass
class CaptionJob:
    folder: Path
    out: Path
    images: list[str]  # every image of the folder, relative paths
    todo: list[str]  # those with no line in `out` yet
    not_images: int  # files passed over for their extension

    @classmethod
    def plan(cls, folder: Path, out: Path, recursive: bool = False) -> "CaptionJob":
        if not folder.is_dir():
            raise CaptionJobError(f"{folder}: not a directory")
        images, others = find_images(folder, recursive)
        finished = read_finished(out)
        return cls(folder, out, images, [p for p in images if p not in finished], others)

    def run(self, captioner: Captioner, limits: IntakeLimits, batch_size: int = 16,
            progress: bool = True) -> tuple[int, int]:
        """Caption what is left, `batch_size` images per model call; returns (captioned, unreadable)."""
        captioned = unreadable = 0
        with self.out.open("a", encoding="utf-8") as sink, \
                tqdm(total=len(self.images), initial=len(self.images) - len(self.todo), unit="image",
                     file=sys.stderr, disable=not progress, dynamic_ncols=True) as bar:
            for start in range(0, len(self.todo), batch_size):
                chunk = self.todo[start:start + batch_size]
                records: dict[str, dict] = {}
                readable: list[tuple[str, Image.Image]] = []
                for name in chunk:
                    image, error = self._read(name, limits)
                    if error is None:
                        readable.append((name, image))
                    else:
                        records[name] = {"image": name, "error": error}
                texts = captioner.caption([image for _, image in readable]) if readable else []
                for (name, _), text in zip(readable, texts, strict=True):
                    records[name] = {"image": name, "caption": text}
                for name in chunk:  # in path order, each line on disk before the next is written
                    sink.write(json.dumps(records[name]) + "\n")
                    sink.flush()
                    bar.update(1)
                captioned += len(readable)
                unreadable += len(chunk) - len(readable)
        return captioned, unreadable

    def _read(self, name: str, limits: IntakeLimits) -> tuple[Image.Image | None, str | None]:
        try:
            return load_image((self.folder / name).read_bytes(), limits), None
        except ImageError as e:
            return None, str(e)
        except OSError as e:
            return None, e.strerror or str(e)


def caption_folder(folder: Path, out: Path, load_captioner: Callable[[], Captioner], limits: IntakeLimits, *,
                   recursive: bool = False, batch_size: int = 16, progress: bool = True) -> str:
    """Plan, load the model only if there is work, run; returns the summary line for the user."""
    job = CaptionJob.plan(folder, out, recursive)
    captioned = unreadable = 0
    if job.todo:
        captioned, unreadable = job.run(load_captioner(), limits, batch_size, progress)
    summary = (f"{len(job.images)} images in {folder}: {captioned} captioned, {unreadable} unreadable "
               f"(reasons in {out}), {len(job.images) - len(job.todo)} already done")
    if job.not_images:
        summary += f"; {job.not_images} files without an image extension passed over"
    return summary
