"""Tokenizers behind one small interface: a word-level HF `tokenizers` model (the demo checkpoint),
open_clip's BPE tokenizer (real CoCa checkpoints, vocabulary shipped inside open_clip), or a Hugging
Face checkpoint's own tokenizer (llm/loading/chat_template.py)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, normalizers, pre_tokenizers

from llm.grammar.spec import Vocabulary

PAD, SOT, EOT, SEP, UNK = "<pad>", "<sot>", "<eot>", "<sep>", "<unk>"
SPECIAL_TOKENS = (PAD, SOT, EOT, SEP, UNK)  # ids 0..4 in this order
_SPACE_BEFORE_PUNCT = re.compile(r" ([?.,:!;])")


class TextTokenizer(Protocol):
    """What the engine's detokenizer and the token counts need."""

    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class CoCaTokenizer(TextTokenizer, Protocol):
    """CoCa's prompt format and text tower also need its special ids."""

    pad_id: int
    sot_id: int
    eot_id: int
    sep_id: int | None

    def vocabulary(self) -> Vocabulary | None:
        """Each token's surface form in `decode`'s text (llm/grammar), or None when it has none to give."""


@dataclass
class WordTokenizer:
    """Word-level tokenizer: lower-cased words and single punctuation marks."""

    hf: HFTokenizer

    def __post_init__(self) -> None:
        self.vocab_size = self.hf.get_vocab_size()
        self.pad_id, self.sot_id, self.eot_id, self.sep_id, self.unk_id = (
            self.hf.token_to_id(t) for t in SPECIAL_TOKENS)
        self._special_ids = {self.pad_id, self.sot_id, self.eot_id, self.sep_id}

    @classmethod
    def build(cls, words: list[str]) -> "WordTokenizer":
        vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *words])}
        hf = HFTokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
        hf.normalizer = normalizers.Lowercase()
        hf.pre_tokenizer = pre_tokenizers.Whitespace()
        return cls(hf)

    @classmethod
    def from_file(cls, path: str | Path) -> "WordTokenizer":
        return cls(HFTokenizer.from_file(str(path)))

    def save(self, path: str | Path) -> None:
        self.hf.save(str(path))

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        words = [self.hf.id_to_token(i) for i in ids if i not in self._special_ids]
        return _SPACE_BEFORE_PUNCT.sub(r"\1", " ".join(w for w in words if w is not None))

    def vocabulary(self) -> Vocabulary:
        """What each token spells in `decode`'s text: words joined by spaces, no space before the
        punctuation `_SPACE_BEFORE_PUNCT` names; so " red", "?", and the first word's space dropped.
        The special tokens and <unk> spell nothing a grammar may ask for."""
        surfaces: list[bytes | None] = []
        for i in range(self.vocab_size):
            word = self.hf.id_to_token(i)
            if i in self._special_ids or i == self.unk_id or word is None:
                surfaces.append(None)
            else:
                surfaces.append((word if _SPACE_BEFORE_PUNCT.fullmatch(" " + word) else " " + word).encode())
        return Vocabulary(tuple(surfaces), drops_leading_space=True)


class OpenClipBPETokenizer:
    """open_clip's CLIP BPE tokenizer; its vocabulary file ships inside the open_clip package."""

    def __init__(self) -> None:
        from open_clip.tokenizer import SimpleTokenizer

        self._tok = SimpleTokenizer()
        self.vocab_size = len(self._tok.encoder)
        self.sot_id = self._tok.sot_token_id
        self.eot_id = self._tok.eot_token_id
        self.pad_id = 0
        self.sep_id = None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text)

    def decode(self, ids: list[int]) -> str:
        ids = [i for i in ids if i not in (self.sot_id, self.eot_id, self.pad_id)]
        return self._tok.decode(ids).strip()

    def vocabulary(self) -> None:
        """None: `decode` strips the text and open_clip's checkpoints only caption, so no grammar is offered."""
        return None
