"""Which image tokens each position of a sequence cross-attends to: plain bookkeeping, no torch.

A request's images are laid end to end, in prompt order, as one run of image tokens (their K/V sit
together in the image K/V pool). A decoder family says, for a prompt and the images' lengths, which
of those tokens each position sees (`CrossPlan`); the model runner turns that into attention masks.

    CoCa:    every position sees every token of its one image.
    Mllama:  positions before the first <|image|> see every token of every image (padding tiles
             included; transformers' all-zero row, see llm/models/mllama.py), positions from an <|image|> on
             see the real tiles of that image (or of a run of adjacent <|image|> tokens) until the
             next <|image|> (transformers' `get_cross_attention_token_mask`).

The plan is piecewise constant over positions: pieces start at `starts`, the last one runs on through
every generated token.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

KeyRanges = tuple[tuple[int, int], ...]  # half-open [lo, hi) ranges of the request's image tokens


@dataclass(frozen=True, slots=True)
class ImageSpan:
    """One image of a request, as its tokens sit in the request's run: `length` tokens, of which the
    first `attended` are real (Mllama pads an image to its maximum tile count; the rest are padding)."""

    length: int
    attended: int


@dataclass(frozen=True, slots=True)
class CrossPlan:
    starts: tuple[int, ...]  # ascending, starts[0] == 0
    keys: tuple[KeyRanges, ...]  # per piece; () = no image token at all (no cross-attention)
    visible_from: int  # first position that sees an image (Mllama gates its cross MLP before it)
    num_keys: int  # the request's image tokens in all

    def __post_init__(self) -> None:
        if not self.starts or self.starts[0] != 0 or list(self.starts) != sorted(set(self.starts)):
            raise ValueError(f"plan pieces must start at 0 and ascend, got {self.starts}")
        if len(self.keys) != len(self.starts):
            raise ValueError("one key set per piece")
        for ranges in self.keys:
            if any(not 0 <= lo < hi <= self.num_keys for lo, hi in ranges):
                raise ValueError(f"key ranges {ranges} outside the request's {self.num_keys} image tokens")

    @classmethod
    def everything(cls, num_keys: int) -> "CrossPlan":
        """Every position sees every image token (CoCa)."""
        return cls((0,), (((0, num_keys),) if num_keys else (),), 0, num_keys)

    @property
    def has_image(self) -> bool:
        return self.num_keys > 0

    def keys_at(self, position: int) -> KeyRanges:
        return self.keys[bisect.bisect_right(self.starts, position) - 1]

    def sees_all(self, start: int, end: int) -> bool:
        """True when every position in [start, end) sees every image token (no mask needed)."""
        first = bisect.bisect_right(self.starts, start) - 1
        last = bisect.bisect_right(self.starts, end - 1) - 1
        full = ((0, self.num_keys),)
        return all(self.keys[i] == full for i in range(first, last + 1))


def image_token_plan(prompt_ids: list[int], image_token_id: int, images: list[ImageSpan],
                     never: int) -> CrossPlan:
    """The plan of a family whose prompts mark each image with one `image_token_id` token, in the
    order of `images` (Mllama). As transformers' `get_cross_attention_token_mask`: image i is seen
    from its token up to the next image's token (the last one to the end, generated tokens included);
    an image whose token is directly followed by the next one's is seen as long as that next one is.
    Text before the first image token sees every token of every image. `never`: the `visible_from`
    when no position sees an image (the context length)."""
    offsets = [0]
    for span in images:
        offsets.append(offsets[-1] + span.length)
    num_keys = offsets[-1]
    marks = [i for i, t in enumerate(prompt_ids) if t == image_token_id]
    if not images:
        return CrossPlan((0,), ((),), never, 0)
    if not marks:  # images but no image token: no position is at or after an image
        return CrossPlan((0,), (((0, num_keys),),), never, num_keys)
    if len(marks) != len(images):
        raise ValueError(f"the prompt has {len(marks)} image tokens for {len(images)} images")
    ends = marks[1:] + [len(prompt_ids) + never]  # the last image: to the end, generated tokens too
    for i in range(len(marks) - 2, -1, -1):
        if marks[i + 1] == marks[i] + 1:
            ends[i] = ends[i + 1]
    bounds = sorted({0, *marks})
    starts, keys = [], []
    for position in bounds:
        seen = [i for i in range(len(images)) if marks[i] <= position < ends[i]]
        ranges = (tuple((offsets[i], offsets[i] + images[i].attended) for i in seen) if position >= marks[0]
                  else ((0, num_keys),))
        if keys and keys[-1] == ranges:
            continue
        starts.append(position)
        keys.append(ranges)
    return CrossPlan(tuple(starts), tuple(keys), marks[0], num_keys)
