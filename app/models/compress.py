"""`mmserve quantize`: a checkpoint directory in, a smaller one out, which serves like any other.

    compress_checkpoint(IN_DIR, OUT_DIR, Compression(QuantScheme("int4", 64), PruneSpec(0.25, 0.25)),
                        calibration_dir=DIR)

1. the input is loaded as the server would load it (either family; a pruned, unquantized output of this
   command is a valid input, an already-quantized one is refused);
2. calibration batches (pruning and GPTQ need them): every image of DIR under each prompt of
   DIR/prompts.txt (one a line; none: the family's caption prompt), continued by the model's own greedy
   answer, so the statistics are those of what the model really reads and writes;
3. pruning (llm/quant/prune.py), then quantization (llm/quant), of the decoder only: the vision tower
   and the contrastive text tower stay as they are;
4. the output directory: the input's files, config.json with the decoder record, and the decoder in
   decoder.safetensors (llm/loading/decoder_checkpoint.py). The families read it back (app/models/families).

Every check on the arguments runs before any work, so a bad one costs a second, not a calibration pass.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from app.models.families import FamilyModel, detect_family, load_family_model
from app.models.oneshot import question_about
from llm.engine import ImageInput, tensor_digest
from llm.generate import generate_greedy
from llm.loading.chat_format import CAPTION_QUESTION
from llm.loading.coca_checkpoint import MMSERVE_CONFIG, read_coca_dir
from llm.loading.decoder_checkpoint import RECORD_KEY, DecoderRecord, read_record, save_decoder
from llm.loading.errors import ModelDirError
from llm.loading.hf import SHARD_INDEX, load_tensors, read_config
from llm.params import SamplingParams
from llm.quant import CalibrationBatch, QuantScheme, is_quantized, quantize_model, quantized_bytes
from llm.quant.prune import PruneSpec, config_changes, importance, prune
from vision.encoders.mllama import VISION_PREFIXES
from vision.intake import ImageError, IntakeLimits, load_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
PROMPTS_FILE = "prompts.txt"
CALIBRATION_NEW_TOKENS = 24


def _no_progress(items: Iterable, **_) -> Iterable:
    return items


@dataclass(frozen=True, slots=True)
class Compression:
    weights: QuantScheme | None = None
    prune: PruneSpec | None = None
    max_calibration_images: int = 128

    def __post_init__(self) -> None:
        if self.weights is None and self.prune is None:
            raise ValueError("nothing to do: give --weights int8|int4, --prune heads=SHARE,mlp=SHARE, or both")

    @property
    def needs_calibration(self) -> bool:
        return self.prune is not None or (self.weights is not None and self.weights.needs_calibration)


@dataclass(frozen=True, slots=True)
class CompressionReport:
    family: str
    record: DecoderRecord
    bytes_before: int  # weight bytes a decode step reads (llm.quant.quantized_bytes)
    bytes_after: int
    calibration_sequences: int


def _check_paths(in_dir: Path, out_dir: Path) -> tuple[str, DecoderRecord | None]:
    """-> the input's family and its decoder record (a pruned input has one)."""
    family = detect_family(in_dir)
    record = read_record(read_config(in_dir), str(in_dir / "config.json")) if (in_dir / "config.json").is_file() else None
    if record is not None and record.quantization is not None:
        raise ModelDirError(f"{in_dir} is already quantized ({record.label}): quantize the original checkpoint")
    if out_dir.resolve() == in_dir.resolve():
        raise ModelDirError(f"the output directory is the input directory ({in_dir}): name a new one")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ModelDirError(f"{out_dir} exists and is not an empty directory")
    return family, record


def calibration_files(directory: Path, limit: int) -> tuple[list[Path], list[str]]:
    if not directory.is_dir():
        raise ModelDirError(f"calibration directory not found: {directory}")
    images = sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if not images:
        raise ModelDirError(f"{directory} holds no images ({', '.join(IMAGE_SUFFIXES)}) to calibrate on")
    prompts_file = directory / PROMPTS_FILE
    prompts = [line.strip() for line in prompts_file.read_text().splitlines() if line.strip()] \
        if prompts_file.is_file() else []
    return images, prompts


def calibration_batches(model: FamilyModel, images: list[Path], prompts: list[str],
                        progress: Callable[..., Iterable] = _no_progress) -> list[CalibrationBatch]:
    """Each image under each prompt (none: a caption request) continued by the model's greedy answer;
    sequences of one length and one image size share a batch."""
    questions = prompts or [CAPTION_QUESTION if model.capabilities.questions else ""]
    pictures = []
    for path in images:
        try:
            pictures.append(load_image(path.read_bytes(), IntakeLimits()))
        except ImageError as e:
            raise ModelDirError(f"calibration image {path}: {e}") from None
    features = [f for start in progress(range(0, len(pictures), 16), desc="encoding calibration images", unit="batch")
                for f in model.encoder.encode(pictures[start:start + 16])]
    params = SamplingParams(max_tokens=CALIBRATION_NEW_TOKENS, stop_token_ids=model.stop_ids)
    groups: dict[tuple, list[tuple[list[int], torch.Tensor, int | None]]] = {}
    for question in progress(questions, desc="calibration answers", unit="prompt"):
        prompt = model.chat_prompt(question_about(question))
        inputs = [ImageInput(tensor_digest(f.tokens), f.tokens, f.attended_tokens) for f in features]
        for f, new in zip(features, generate_greedy(model.decoder, inputs, [prompt] * len(features), params)):
            ids = prompt + new
            groups.setdefault((len(ids), tuple(f.tokens.shape)), []).append((ids, f.tokens, f.attended_tokens))
    batches = []
    for rows in groups.values():
        for start in range(0, len(rows), 32):
            chunk = rows[start:start + 32]
            attended = tuple(a for _, _, a in chunk)
            batches.append(CalibrationBatch(torch.stack([t for _, t, _ in chunk]), torch.tensor([i for i, _, _ in chunk]),
                                            None if all(a is None for a in attended) else attended))
    return batches


def compress_checkpoint(in_dir: str | Path, out_dir: str | Path, compression: Compression,
                        calibration_dir: str | Path | None = None,
                        progress: Callable[..., Iterable] = _no_progress) -> CompressionReport:
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    family, prior = _check_paths(in_dir, out_dir)
    if compression.needs_calibration and calibration_dir is None:
        needs = "--prune" if compression.prune is not None else f"--method {compression.weights.method}"
        raise ValueError(f"{needs} needs calibration images: --calibration DIR")
    files = calibration_files(Path(calibration_dir), compression.max_calibration_images) \
        if compression.needs_calibration else None
    model = load_family_model(in_dir, family)
    decoder = model.decoder
    if is_quantized(decoder):  # (a record-less quantized checkpoint cannot exist; kept as the invariant)
        raise ModelDirError(f"{in_dir} is already quantized: quantize the original checkpoint")
    if compression.weights is not None and compression.prune is None:
        for name, m in decoder.named_modules():  # the group size against every layer, before any work
            if isinstance(m, torch.nn.Linear):
                compression.weights.check_layer(name, m.in_features)
    before = quantized_bytes(decoder)
    calibration = calibration_batches(model, *files, progress=progress) if files else None
    changes = dict(prior.config) if prior else {}
    pruning = prior.pruning if prior else None
    if compression.prune is not None:
        pruned = prune(decoder, compression.prune, importance(decoder, calibration))
        changes |= config_changes(decoder.cfg, pruned.cfg)
        pruning, decoder = compression.prune.to_json(), pruned
    if compression.weights is not None:
        decoder = quantize_model(decoder, compression.weights, calibration=calibration, progress=progress)
    record = DecoderRecord(config=changes, quantization=compression.weights, pruning=pruning)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        WRITERS[family](in_dir, out_dir, record)
        save_decoder(decoder, out_dir, record)
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)  # no half-written checkpoint that looks servable
        raise
    return CompressionReport(family, record, before, quantized_bytes(decoder),
                             sum(len(b.ids) for b in calibration or []))


def _write_coca(in_dir: Path, out_dir: Path, record: DecoderRecord) -> None:
    """The mmserve format whatever the input's (an open_clip directory too): config.json with the
    record, model.safetensors without open_clip's multimodal decoder (the record's file replaces it)."""
    from safetensors.torch import save_file  # noqa: PLC0415

    ckpt = read_coca_dir(in_dir)
    config = ckpt.spec.to_json() | {RECORD_KEY: record.to_json()}
    save_file({k: v.contiguous() for k, v in ckpt.state.items() if not k.startswith("text_decoder.")},
              str(out_dir / "model.safetensors"))
    (out_dir / MMSERVE_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "labels.json").write_text(json.dumps(list(ckpt.spec.labels), indent=2) + "\n")
    if (in_dir / "tokenizer.json").is_file():
        shutil.copy2(in_dir / "tokenizer.json", out_dir / "tokenizer.json")


def _write_mllama(in_dir: Path, out_dir: Path, record: DecoderRecord) -> None:
    """The hub's layout minus the language model: every other file as it was, config.json with the
    record, the vision tower and projector in model.safetensors."""
    from safetensors.torch import save_file  # noqa: PLC0415

    for path in in_dir.iterdir():
        if path.is_file() and path.suffix != ".safetensors" and path.name not in (SHARD_INDEX, "config.json"):
            shutil.copy2(path, out_dir / path.name)
    config = read_config(in_dir) | {RECORD_KEY: record.to_json()}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    vision = {k: v.contiguous() for k, v in load_tensors(in_dir, VISION_PREFIXES).items()}
    save_file(vision, str(out_dir / "model.safetensors"))


WRITERS = {"coca": _write_coca, "mllama": _write_mllama}
