"""The demo task's accuracy for any decoder put in the demo model's place: captions and each question
family, exact match, on images of the independent renderer (tests/independent_world.py), as
tests/test_demo_accuracy.py scores the bundled model.

    python -m bench.demo_accuracy DIR [--images 200]      # a checkpoint directory (quantized, pruned, ...)

Used by bench.quant for the quality retained by every scheme against fp32 on the same images.
"""

from __future__ import annotations

import argparse
import copy
import json

import torch

from app.models.families.coca import CoCaModel
from llm.loading.chat_format import CAPTION_QUESTION, Turn
from tests import independent_world as iw


class EvalSet:
    """Images encoded once (the vision tower is the same for every decoder compared), every question."""

    def __init__(self, model: CoCaModel, n: int = 200, seed: int = 2026) -> None:
        items = iw.make_eval_set(n, seed=seed)
        self.features = model.encode_images([image for image, _ in items])
        self.items = []  # (feature index, turns, expected, family)
        for k, (_, scene) in enumerate(items):
            self.items.append((k, [Turn(CAPTION_QUESTION)], iw.caption(scene), "caption"))
            for question, answer in iw.questions(scene):
                if question != CAPTION_QUESTION:
                    self.items.append((k, [Turn(question)], answer, " ".join(question.split()[:2])))


def accuracy(model: CoCaModel, decoder: torch.nn.Module, evalset: EvalSet, batch: int = 256) -> dict[str, float]:
    """Exact match per family ("caption", "what color", ...) and "answers" (every non-caption question),
    with `decoder` in the model's place."""
    runtime = copy.copy(model)
    runtime.decoder = decoder
    hits: dict[str, list[bool]] = {}
    for start in range(0, len(evalset.items), batch):
        chunk = evalset.items[start:start + batch]
        feats = [evalset.features[k] for k, _, _, _ in chunk]
        prompts = [runtime.prompt_ids(turns) for _, turns, _, _ in chunk]
        for (_, _, expected, family), c in zip(chunk, runtime.complete(feats, prompts)):
            hits.setdefault(family, []).append(c.text == expected)
            if family != "caption":
                hits.setdefault("answers", []).append(c.text == expected)
    return {k: sum(v) / len(v) for k, v in sorted(hits.items())}


def retained(scores: dict[str, float], reference: dict[str, float]) -> float:
    """The worst family's accuracy as a share of fp32's on it (captions included): one bad family is
    not hidden by the others."""
    return min(scores[k] / reference[k] for k in reference if reference[k] > 0)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.demo_accuracy")
    parser.add_argument("dir")
    parser.add_argument("--images", type=int, default=200)
    args = parser.parse_args()
    model = CoCaModel.from_dir(args.dir)
    print(json.dumps({k: round(v, 4) for k, v in accuracy(model, model.decoder, EvalSet(model, args.images)).items()}))


if __name__ == "__main__":
    main()
