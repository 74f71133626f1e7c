"""A compressed decoder inside a checkpoint directory: what `mmserve quantize` writes beside the rest.

    config.json  {..., "mmserve_decoder": {"file": "decoder.safetensors", "config": {"heads": 3, ...},
                                           "quantization": {"weights": "int4", "group_size": 64, ...} | null,
                                           "pruning": {"heads": 0.25, "mlp": 0.25} | null}}
    decoder.safetensors   our decoder's own state dict (llm/models), quantized layers as llm/quant stores them

The record says what the file holds: the decoder config fields that differ from what the family's own
config implies (pruned head and MLP counts), the weight scheme and the pruning that made them. Every
family reads the rest of its directory as usual and takes its decoder from here when the record is
present (app/models/families). The record is data, validated on reading: a directory with a malformed
one is a `ModelDirError` naming it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from torch import nn

from llm.loading.errors import ModelDirError
from llm.quant.model import load_quantized, save_quantized
from llm.quant.scheme import QuantScheme

RECORD_KEY = "mmserve_decoder"
DECODER_FILE = "decoder.safetensors"


@dataclass(frozen=True)
class DecoderRecord:
    config: dict = field(default_factory=dict)  # decoder-config fields that differ from the family's config
    quantization: QuantScheme | None = None
    pruning: dict | None = None  # {"heads": share dropped, "mlp": share dropped}
    file: str = DECODER_FILE

    def to_json(self) -> dict:
        return {"file": self.file, "config": self.config, "pruning": self.pruning,
                "quantization": json.loads(self.quantization.to_json()) if self.quantization else None}

    @classmethod
    def from_json(cls, data: dict, where: str) -> "DecoderRecord":
        try:
            scheme = data.get("quantization")
            return cls(config=dict(data.get("config") or {}), pruning=data.get("pruning"),
                       quantization=QuantScheme.from_json(json.dumps(scheme)) if scheme else None,
                       file=str(data.get("file", DECODER_FILE)))
        except (AttributeError, TypeError, ValueError) as e:
            raise ModelDirError(f"{where}: malformed {RECORD_KEY} record: {e}") from None

    @property
    def label(self) -> str:
        """What was done, for messages: "w4a16-g64, pruned heads 25% mlp 25%"."""
        parts = [self.quantization.name] if self.quantization else []
        if self.pruning:
            parts.append("pruned " + " ".join(f"{k} {v:.0%}" for k, v in self.pruning.items()))
        return ", ".join(parts) or "dense"


def read_record(config: dict, where: str) -> DecoderRecord | None:
    """The record in a checkpoint's config dict (None: the family's own weights hold the decoder)."""
    data = config.get(RECORD_KEY)
    return None if data is None else DecoderRecord.from_json(data, where)


def configured(cfg, record: DecoderRecord):
    """The family's decoder config with the record's fields (a frozen dataclass: `replace`)."""
    try:
        return replace(cfg, **record.config)
    except TypeError as e:
        raise ModelDirError(f"{RECORD_KEY} config {record.config}: {e}") from None


def save_decoder(decoder: nn.Module, directory: str | Path, record: DecoderRecord) -> None:
    """The decoder's weights into `directory / record.file`, quantized or dense."""
    path = Path(directory) / record.file
    if record.quantization is not None:
        save_quantized(decoder, path, record.quantization)
        return
    from safetensors.torch import save_file  # noqa: PLC0415

    save_file({k: v.detach().contiguous() for k, v in decoder.state_dict().items()}, str(path))


def load_decoder(empty: nn.Module, directory: str | Path, record: DecoderRecord) -> nn.Module:
    """`empty`: the decoder built from `configured(...)`'s config (meta tensors are fine) -> the loaded
    decoder in eval mode (quantized: bf16 with int8/int4 layers; dense: the file's dtype)."""
    path = Path(directory) / record.file
    if not path.is_file():
        raise ModelDirError(f"model file not found: {path} (named by config.json's {RECORD_KEY})")
    if record.quantization is not None:
        model, scheme = load_quantized(empty, path)
        if scheme != record.quantization:
            raise ModelDirError(f"{path} holds {scheme.name} weights, config.json says {record.quantization.name}")
        return model
    from safetensors.torch import load_file  # noqa: PLC0415

    state = load_file(str(path))
    try:
        empty.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise ModelDirError(f"{path} does not fit the decoder config.json describes: {str(e).splitlines()[0]}") from None
    return empty.eval()
