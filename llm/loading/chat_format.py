"""How a conversation becomes token ids, one format for captions, questions and multi-turn chat.

    <sot> q1 answer : a1 <eot> <sep> q2 answer : a2 <eot> <sep> q3 answer :

The model continues after the last `answer :` and stops at `<eot>`. A caption is the answer to the
question `describe the image.`. Checkpoints without a chat vocabulary (open_clip's own CoCa models)
use the caption-only format: the prompt is `<sot>` and the continuation is the caption.
"""

from __future__ import annotations

from dataclasses import dataclass

from llm.loading.tokenizers import CoCaTokenizer

CAPTION_QUESTION = "describe the image."


@dataclass(frozen=True)
class Turn:
    question: str
    answer: str | None = None  # None for the turn the model must answer


@dataclass(frozen=True)
class EncodedConversation:
    ids: list[int]
    # 1 where the token is an answer token the model should predict (training only)
    answer_mask: list[int]


class ChatFormat:
    name = "qa-chat"

    def __init__(self, tokenizer: CoCaTokenizer) -> None:
        if tokenizer.sep_id is None:
            raise ValueError("the qa-chat format needs a tokenizer with a turn-separator token")
        self.tok = tokenizer
        self._answer_marker = tokenizer.encode("answer:")

    def encode(self, turns: list[Turn]) -> EncodedConversation:
        ids, mask = [self.tok.sot_id], [0]
        for i, turn in enumerate(turns):
            if i > 0:
                ids.append(self.tok.sep_id)
                mask.append(0)
            prompt = self.tok.encode(turn.question) + self._answer_marker
            ids += prompt
            mask += [0] * len(prompt)
            if turn.answer is not None:
                answer = self.tok.encode(turn.answer) + [self.tok.eot_id]
                ids += answer
                mask += [1] * len(answer)
            elif i != len(turns) - 1:
                raise ValueError("only the last turn may be unanswered")
        return EncodedConversation(ids, mask)

    def prompt(self, turns: list[Turn]) -> list[int]:
        if not turns or turns[-1].answer is not None:
            raise ValueError("the last turn must be a question to answer")
        return self.encode(turns).ids

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return (self.tok.eot_id,)


class CaptionOnlyFormat:
    """open_clip CoCa checkpoints caption from `<sot>` alone and cannot take a question."""

    name = "caption-only"

    def __init__(self, tokenizer: CoCaTokenizer) -> None:
        self.tok = tokenizer

    def prompt(self, turns: list[Turn]) -> list[int]:
        if len(turns) != 1 or turns[0].question.strip().lower() != CAPTION_QUESTION:
            raise ValueError("this model can only caption images; it cannot answer questions")
        return [self.tok.sot_id]

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return (self.tok.eot_id,)
