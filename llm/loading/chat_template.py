"""A Hugging Face checkpoint's own tokenizer and chat template, as transformers applies them.

The template is read from wherever transformers keeps it: `chat_template.jinja` (transformers 5's
file), `chat_template.json` (the processor's), or `tokenizer_config.json`'s `chat_template`. It is
rendered by transformers' own `apply_chat_template` (the same Jinja environment and globals), so the
prompt ids are the ones `MllamaProcessor.apply_chat_template` builds, token for token. One difference,
on purpose: control tokens that appear in the messages' text (a user typing "<|eot_id|>") are encoded
as plain text (`sanitize_control_tokens`), so only the template writes them.
Everything is read from local files (`local_files_only`); nothing reaches a hub.
"""

from __future__ import annotations

import json
from pathlib import Path

from llm.loading.errors import ModelDirError

TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "tokenizer_config.json")


def read_chat_template(path: Path) -> str:
    for name in TEMPLATE_FILES:
        file = path / name
        if not file.is_file():
            continue
        if name.endswith(".jinja"):
            return file.read_text()
        template = json.loads(file.read_text()).get("chat_template")
        if isinstance(template, list):  # several named templates: the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template:
            return template
    raise ModelDirError(f"no chat template in {path}: none of {', '.join(TEMPLATE_FILES)} holds one")


class HFChatTokenizer:
    """encode / decode (the engine's detokenizer) and `render` (messages -> prompt ids)."""

    def __init__(self, path: str | Path) -> None:
        from transformers import AutoTokenizer  # noqa: PLC0415 - transformers is slow to import

        path = Path(path)
        if not (path / "tokenizer.json").is_file() and not (path / "tokenizer.model").is_file():
            raise ModelDirError(f"model file not found: {path / 'tokenizer.json'}")
        self.template = read_chat_template(path)
        self.hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.vocab_size = len(self.hf)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self.hf.convert_tokens_to_ids(token) if token in self.hf.get_vocab() else None

    def render(self, messages: list[dict]) -> list[int]:
        """transformers' message dicts (content a string or a list of {"type": "text"|"image"} parts) ->
        the prompt ids, the assistant's header added."""
        return list(self.hf.apply_chat_template(messages, chat_template=self.template, add_generation_prompt=True,
                                                tokenize=True, return_dict=False, sanitize_control_tokens=True))
