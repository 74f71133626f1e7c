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

from llm.grammar.spec import Vocabulary
from llm.loading.errors import ModelDirError

TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "tokenizer_config.json")


def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: the printable character that stands for each byte in a token's
    string ("Ġ" for a space), mapped back to the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


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

    def vocabulary(self) -> Vocabulary | None:
        """Each token's bytes in `decode`'s text, for a byte-level BPE (Llama 3's kind: every token string
        is written in the byte-level alphabet); None for another kind of tokenizer. Special tokens
        (skipped by `decode`) spell nothing; other added tokens spell their text."""
        alphabet = byte_level_alphabet()
        added = self.hf.added_tokens_decoder
        surfaces: list[bytes | None] = []
        for i, token in enumerate(self.hf.convert_ids_to_tokens(list(range(self.vocab_size)))):
            if i in added:
                surfaces.append(None if added[i].special else added[i].content.encode())
            elif token is None or any(c not in alphabet for c in token):
                return None
            else:
                surfaces.append(bytes(alphabet[c] for c in token))
        return Vocabulary(tuple(surfaces))

    def token_id(self, token: str) -> int | None:
        return self.hf.convert_tokens_to_ids(token) if token in self.hf.get_vocab() else None

    def render(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """transformers' message dicts (content a string or a list of {"type": "text"|"image"} parts; an
        assistant's `tool_calls`, a "tool" message's result) and the tools offered (OpenAI's tool objects)
        -> the prompt ids, the assistant's header added."""
        return list(self.hf.apply_chat_template(messages, tools=tools or None, chat_template=self.template,
                                                add_generation_prompt=True, tokenize=True, return_dict=False,
                                                sanitize_control_tokens=True))
