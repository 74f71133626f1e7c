"""A Hugging Face checkpoint's own tokenizer (tokenizer.json + tokenizer_config.json) through
transformers, for families with no chat template (Florence-2's BART tokenizer): encode without the
special tokens the family places itself, decode without any special token (the engine's detokenizer)."""

from __future__ import annotations

from pathlib import Path

from llm.loading.errors import ModelDirError


class HFTokenizer:
    def __init__(self, path: str | Path) -> None:
        from transformers import AutoTokenizer  # noqa: PLC0415 - transformers is slow to import

        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise ModelDirError(f"model file not found: {path / 'tokenizer.json'}")
        self.hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.vocab_size = len(self.hf)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self.hf.convert_tokens_to_ids(token) if token in self.hf.get_vocab() else None
