"""The bundled demo model against DEMO_WORLD.md's targets, on 200 images of an independent renderer
(tests/independent_world.py: numpy rasterisation, 4x supersampling, its own placement code)."""

from __future__ import annotations

import random
import re

import pytest
import torch

from llm.loading.chat_format import CAPTION_QUESTION, Turn
from tests import independent_world as iw

N_IMAGES = 200


@pytest.fixture(scope="module")
def eval_set(demo_runtime):
    items = iw.make_eval_set(N_IMAGES, seed=2026)
    features = demo_runtime.encode_images([image for image, _ in items])
    return [(scene, feats) for (_, scene), feats in zip(items, features)]


def answer_all(runtime, features, conversations, batch=256):
    answers = []
    for start in range(0, len(conversations), batch):
        chunk = conversations[start:start + batch]
        prompts = [runtime.prompt_ids(turns) for turns in chunk]
        answers += [c.text for c in runtime.complete(features[start:start + batch], prompts)]
    return answers


def test_caption_exact_match(demo_runtime, eval_set):
    feats = [f for _, f in eval_set]
    captions = answer_all(demo_runtime, feats, [[Turn(CAPTION_QUESTION)]] * len(eval_set))
    expected = [iw.caption(scene) for scene, _ in eval_set]
    accuracy = sum(c == e for c, e in zip(captions, expected)) / len(expected)
    print(f"caption exact match: {accuracy:.3f}")
    assert accuracy >= 0.90


def single_questions(eval_set):
    """Every non-caption question of every image, one turn each: (features, conversations, answers)."""
    feats, convs, expected = [], [], []
    for scene, f in eval_set:
        for question, answer in iw.questions(scene):
            if question != CAPTION_QUESTION:
                feats.append(f)
                convs.append([Turn(question)])
                expected.append(answer)
    return feats, convs, expected


def test_question_answers_exact_match(demo_runtime, eval_set):
    feats, convs, expected = single_questions(eval_set)
    answers = answer_all(demo_runtime, feats, convs)
    accuracy = sum(a == e for a, e in zip(answers, expected)) / len(expected)
    print(f"answers exact match: {accuracy:.3f} over {len(expected)} questions")
    assert accuracy >= 0.95


def family(question: str) -> str:
    """The spec's template of a question, e.g. `what color is the {shape}?`."""
    question = re.sub(rf"\b({'|'.join(iw.SHAPES)})\b", "{shape}", question)
    return re.sub(rf"\b({'|'.join(iw.COLOURS)})\b", "{colour}", question)


def family_accuracy(convs, answers, expected) -> dict[str, float]:
    by_family: dict[str, list[bool]] = {}
    for conv, a, e in zip(convs, answers, expected):
        by_family.setdefault(family(conv[0].question), []).append(a == e)
    return {k: sum(v) / len(v) for k, v in by_family.items()}


BINDING_DEFECT = pytest.mark.xfail(
    strict=True, raises=AssertionError, reason="known defect of the bundled model: on two-object scenes it "
    "answers 'what color is the {shape}?' ~59-65% and 'what size is the {shape}?' ~71-75% right, naming the "
    "other object's colour; growing a mixer block on it with frozen conv stages (train-demo --freeze cnn,text, "
    "700 steps) did not change that: a from-scratch run with the mixer is the next try (issue 13, part 0)")


@pytest.mark.parametrize("n_objects", [1, pytest.param(2, marks=BINDING_DEFECT)])
def test_every_question_family_holds_on_its_own(demo_runtime, eval_set, n_objects):
    """Yes/no questions are most of the pool, and one-object images most of the easy cases: each family
    must hold on its own on each object count, or a model that cannot look an object up by its shape
    among two hides behind them."""
    scenes = [(scene, f) for scene, f in eval_set if len(scene.objects) == n_objects]
    feats, convs, expected = single_questions(scenes)
    accuracy = family_accuracy(convs, answer_all(demo_runtime, feats, convs), expected)
    print(f"per family, {n_objects}-object images:", {k: round(v, 3) for k, v in accuracy.items()})
    assert len(scenes) >= 80 and len(accuracy) == 6  # DEMO_WORLD.md's six questions
    assert min(accuracy.values()) >= 0.90, accuracy


def test_zero_shot_top1(demo_runtime, eval_set):
    latents = demo_runtime.label_latents(list(iw.LABELS))
    correct = total = 0
    for scene, f in eval_set:
        label = iw.zero_shot_label(scene)
        if label is None:
            continue
        image = torch.nn.functional.normalize(f.pooled, dim=-1)
        correct += iw.LABELS[int((latents @ image).argmax())] == label
        total += 1
    print(f"zero-shot top-1: {correct / total:.3f} over {total} images")
    assert total >= 100 and correct / total >= 0.95


def test_three_turn_conversations_answer_each_turn(demo_runtime, eval_set):
    """Each answer depends only on the image and the last question, whatever came before."""
    rng = random.Random(7)
    feats, histories, expected = [], [], []
    for scene, f in eval_set[:100]:
        pairs = rng.sample(iw.questions(scene), 3)
        feats.append(f)
        histories.append(pairs)
        expected.append([a for _, a in pairs])
    answers: list[list[str]] = [[] for _ in histories]
    for turn in range(3):
        convs = [[Turn(q, a) for (q, _), a in zip(h[:turn], answers[i])] + [Turn(h[turn][0])]
                 for i, h in enumerate(histories)]
        for i, a in enumerate(answer_all(demo_runtime, feats, convs)):
            answers[i].append(a)
    per_turn = [sum(answers[i][t] == expected[i][t] for i in range(len(histories))) / len(histories)
                for t in range(3)]
    print(f"multi-turn accuracy per turn: {per_turn}")
    assert min(per_turn) >= 0.9
