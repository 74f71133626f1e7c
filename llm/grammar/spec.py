"""What a constrained request asks for, and what a model's vocabulary is made of. Plain data, no torch:
`SamplingParams` carries a `GrammarSpec`, the families declare a `Vocabulary`.

A grammar is one of five kinds, each kept as canonical text so that the same constraint always makes
the same cache key:

    json_schema  the schema as JSON (keys sorted)        json_object  any JSON object ("{}" as source)
    regex        a regular expression                   choice       a JSON list of the allowed strings
    lark         a Lark grammar (llguidance's dialect: `%json {...}` embeds a schema)

The vocabulary gives each token's exact bytes in the output text. A tokenizer's own token strings are
not that: a word-level tokenizer decodes ["red", "circle"] as "red circle" (spaces between words), a
byte-level BPE writes a space as "Ġ". The family says what its tokens spell; the grammar library only
ever sees bytes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Literal

GrammarKind = Literal["json_schema", "json_object", "regex", "choice", "lark"]
KINDS: tuple[str, ...] = ("json_schema", "json_object", "regex", "choice", "lark")
# JSON is written without free whitespace, with ", " and ": " (as json.dumps and the chat templates write
# it): free whitespace would let a model spend its whole budget on spaces. (llguidance's option names.)
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", "lenient": False}
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties")
_SUBSCHEMAS = ("items", "additionalItems", "additionalProperties")


class GrammarError(ValueError):
    """A grammar that cannot constrain this model: invalid, using an unsupported keyword (the message
    names it), or not expressible in the model's vocabulary. The HTTP layer answers it with a 400."""


class VocabularyError(GrammarError):
    """A valid grammar that the model's vocabulary cannot write (the model's limit, not the request's)."""


@dataclass(frozen=True, slots=True)
class GrammarSpec:
    kind: GrammarKind
    source: str  # canonical text (see the module docstring)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise GrammarError(f"unknown grammar kind {self.kind!r}; known: {', '.join(KINDS)}")

    @classmethod
    def json_schema(cls, schema: dict) -> "GrammarSpec":
        return cls("json_schema", json.dumps(schema, sort_keys=True, separators=(",", ":")))

    @classmethod
    def json_object(cls) -> "GrammarSpec":
        return cls("json_object", "{}")

    @classmethod
    def regex(cls, pattern: str) -> "GrammarSpec":
        return cls("regex", pattern)

    @classmethod
    def choice(cls, options: list[str]) -> "GrammarSpec":
        return cls("choice", json.dumps(list(options), separators=(",", ":")))

    @classmethod
    def lark(cls, grammar: str) -> "GrammarSpec":
        return cls("lark", grammar)

    def describe(self) -> str:
        """A short name for messages: "json_schema", "choice of 3", ..."""
        return f"choice of {len(json.loads(self.source))}" if self.kind == "choice" else self.kind


def closed_schema(schema):
    """The schema with every object that lists `properties` and says nothing of more properties closed
    (additionalProperties false), as OpenAI's strict schemas are. That only narrows what may be written,
    so an output still validates against the schema as sent, and a model cannot wander into keys nobody
    asked for."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if "properties" in out and "additionalProperties" not in out and "patternProperties" not in out:
        out["additionalProperties"] = False
    for key in _SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [closed_schema(s) for s in out[key]]
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {k: closed_schema(s) for k, s in out[key].items()}
    for key in _SUBSCHEMAS:
        if isinstance(out.get(key), dict):
            out[key] = closed_schema(out[key])
    return out


def json_rule(schema: dict) -> str:
    """A JSON schema as a rule's body in a `lark` grammar (`%json {...}`), in JSON_STYLE."""
    return "%json " + json.dumps({**schema, "x-guidance": {**schema.get("x-guidance", {}), **JSON_STYLE}})


@dataclass(frozen=True, slots=True)
class Vocabulary:
    """A model's tokens as the grammar library sees them.

    `surfaces[i]`: the bytes token i adds to the output text; None for a control token (never allowed
    under a grammar). `drops_leading_space`: the text is the surfaces joined with one leading space
    dropped (a word-level tokenizer whose words are " red", " circle"), so a grammar may be preceded by
    one space. Logits rows past the surfaces (a model may have more rows than its tokenizer has tokens)
    are never allowed."""

    surfaces: tuple[bytes | None, ...]
    drops_leading_space: bool = False
    digest: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "surfaces", tuple(self.surfaces))
        h = hashlib.sha256(b"lead" if self.drops_leading_space else b"exact")
        for s in self.surfaces:
            h.update(b"\x00" if s is None else len(s).to_bytes(4, "little") + s)
        object.__setattr__(self, "digest", h.hexdigest()[:16])

    @property
    def control_ids(self) -> list[int]:
        return [i for i, s in enumerate(self.surfaces) if s is None]
