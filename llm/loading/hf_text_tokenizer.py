"""A Hugging Face checkpoint's own tokenizer with no chat template (caption models: BLIP,
VisionEncoderDecoder): encode without special tokens, decode without them, as transformers'
`batch_decode(..., skip_special_tokens=True)` does. Local files only."""

from __future__ import annotations

from pathlib import Path

from llm.loading.errors import ModelDirError


class HFTextTokenizer:
    def __init__(self, path: str | Path) -> None:
        from transformers import AutoTokenizer  # noqa: PLC0415 - transformers is slow to import

        path = Path(path)
        if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
            raise ModelDirError(f"model file not found: {path / 'tokenizer.json'}")
        self.hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.vocab_size = len(self.hf)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self.hf.convert_tokens_to_ids(token) if token in self.hf.get_vocab() else None
