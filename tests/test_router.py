"""The staged router's decisions on images of the independent renderer (tests/independent_world.py),
with the bundled demo model's contrastive towers and the real all-MiniLM-L6-v2."""

from __future__ import annotations

import pytest
from PIL import Image

from app.routing.intent import IntentClassifier
from app.models.contrastive import ZeroShot
from app.routing.staged import ModelRules, StagedRouter
from app.settings import Settings
from llm.loading.chat_format import Turn
from tests import independent_world as iw


def scene_image(background: str, *objects: tuple[str, str, str, float, float, int]) -> Image.Image:
    """objects: (shape, colour, size class, centre x, centre y, side)."""
    return iw.render(iw.Scene(background, [iw.Obj(s, c, z, x, y, side) for s, c, z, x, y, side in objects]))


RED_CIRCLE = scene_image("white", ("circle", "red", "large", 64, 64, 48))
GREEN_TRIANGLE = scene_image("black", ("triangle", "green", "large", 60, 70, 50))
# A large blue square and a small yellow circle: the zero-shot label is the large one's.
SQUARE_AND_CIRCLE = scene_image("gray", ("square", "blue", "large", 40, 40, 50), ("circle", "yellow", "small", 100, 100, 20))
# Two large objects: the spec gives no zero-shot answer, and the towers are unsure.
TWO_LARGE = scene_image("black", ("square", "red", "large", 30, 30, 50), ("circle", "blue", "large", 96, 96, 52))


@pytest.fixture(scope="module")
def intents() -> IntentClassifier:
    return IntentClassifier.load()


@pytest.fixture(scope="module")
def router(demo_runtime, intents) -> StagedRouter:
    return StagedRouter.build(Settings(), demo_runtime, SERVED, intents=intents)


SERVED = ["mmserve-demo"]


def features(runtime, image):
    """What the router reads: the zero-shot model's features of the conversation's images."""
    return runtime.encode_images([image])


@pytest.mark.parametrize("prompt", ["what shape is the red object?", "what is this?", "which shape is it?",
                                    "can you tell me what this red thing is?"])
def test_confident_identification_is_answered_by_stage1_as_the_decoder_would(demo_runtime, router, prompt):
    decision = router.decide(features(demo_runtime, RED_CIRCLE), prompt)
    assert decision.route == "stage1", decision.reason
    assert decision.finished and decision.answer == "circle"
    assert (decision.intent, decision.label) == ("identification", "a red circle")
    assert decision.label_confidence >= 0.9 and decision.model == "mmserve-demo"  # whose towers answered
    # The phrasing is the decoder's own: its answer to the world's identification question.
    assert demo_runtime.answer(RED_CIRCLE, [Turn("what shape is the red object?")]).text == decision.answer


def test_two_objects_stage1_names_the_large_one_only_when_asked_about_it(demo_runtime, router):
    feats = features(demo_runtime, SQUARE_AND_CIRCLE)
    about_large = router.decide(feats, "what shape is the blue object?")
    assert (about_large.route, about_large.answer) == ("stage1", "square")
    about_small = router.decide(feats, "what shape is the yellow object?")
    assert about_small.route == "decoder:mmserve-demo" and about_small.answer is None
    assert "yellow" in about_small.reason
    # the decoder, not stage 1, knows the small one
    assert demo_runtime.answer(SQUARE_AND_CIRCLE, [Turn("what shape is the yellow object?")]).text == "circle"


@pytest.mark.parametrize("prompt", ["what shape is the small object?", "what is the object on the left?",
                                    "what shapes are these?", "what is the red circle?"])
def test_identification_the_label_does_not_determine_goes_to_the_decoder(demo_runtime, router, prompt):
    decision = router.decide(features(demo_runtime, RED_CIRCLE), prompt)
    assert decision.route == "decoder:mmserve-demo", decision
    assert decision.model == "mmserve-demo" and not decision.finished


def test_low_zero_shot_confidence_goes_to_the_decoder(demo_runtime, router):
    for image in (TWO_LARGE, Image.new("RGB", (128, 128), (128, 128, 128))):
        decision = router.decide(features(demo_runtime, image), "what is this?")
        assert decision.intent == "identification"
        assert decision.label_confidence < 0.9
        assert decision.route == "decoder:mmserve-demo" and "confidence" in decision.reason


def test_a_threshold_setting_moves_the_boundary(demo_runtime, intents):
    feats = features(demo_runtime, TWO_LARGE)
    lenient = StagedRouter.build(Settings(router_zero_shot_threshold=0.3), demo_runtime, SERVED, intents=intents)
    decision = lenient.decide(feats, "what is this?")
    assert decision.route == "stage1" and decision.answer == decision.label.split()[-1]


@pytest.mark.parametrize("prompt", ["how many objects are there?", "what color is the circle?",
                                    "is there a red object?", "describe the image.", "write a poem about rain"])
def test_other_intents_go_to_the_decoder(demo_runtime, router, prompt):
    decision = router.decide(features(demo_runtime, RED_CIRCLE), prompt)
    assert decision.route == "decoder:mmserve-demo" and decision.answer is None
    assert decision.intent != "identification"


def test_a_policy_label_refuses_whatever_is_asked(demo_runtime, intents):
    settings = Settings(router_policy_labels="a green triangle, a purple star", router_policy_message="not this one")
    router = StagedRouter.build(settings, demo_runtime, SERVED, intents=intents)
    refused = router.decide(features(demo_runtime, GREEN_TRIANGLE), "how many objects are there?")
    assert (refused.route, refused.answer, refused.label) == ("policy", "not this one", "a green triangle")
    assert refused.finished and "a green triangle" in refused.reason
    # a policy label is never a stage-1 answer, and other images pass
    assert router.decide(features(demo_runtime, RED_CIRCLE), "what is this?").route == "stage1"
    assert router.decide(features(demo_runtime, GREEN_TRIANGLE), "what is this?").route == "policy"


def test_the_router_off_still_enforces_policy(demo_runtime):
    settings = Settings(router_enabled=False, router_policy_labels="a green triangle")
    router = StagedRouter.build(settings, demo_runtime, SERVED)  # off: MiniLM is not even loaded
    assert router.intents is None
    assert router.decide(features(demo_runtime, RED_CIRCLE), "what is this?").route == "decoder:mmserve-demo"
    assert router.decide(features(demo_runtime, GREEN_TRIANGLE), "what is this?").route == "policy"


def test_the_decision_records_what_it_saw(demo_runtime, router):
    decision = router.decide(features(demo_runtime, RED_CIRCLE), "what shape is the red object?")
    record = decision.record()
    assert record["route"] == "stage1" and record["intent"] == "identification"
    assert 0.9 <= record["label_confidence"] <= 1.0 and record["intent_similarity"] > 0


def test_several_images_get_no_stage1_answer_but_each_meets_the_policy(demo_runtime, intents):
    settings = Settings(router_policy_labels="a green triangle")
    router = StagedRouter.build(settings, demo_runtime, SERVED, intents=intents)
    two = features(demo_runtime, RED_CIRCLE) + features(demo_runtime, RED_CIRCLE)
    assert router.decide(two, "what is this?").route == "decoder:mmserve-demo"
    mixed = features(demo_runtime, RED_CIRCLE) + features(demo_runtime, GREEN_TRIANGLE)
    assert router.decide(mixed, "what is this?").route == "policy"
    assert router.decide([], "what is this?").route == "decoder:mmserve-demo"  # a text-only request


def test_a_request_naming_another_model_gets_no_stage1_answer(demo_runtime, router):
    decision = router.decide(features(demo_runtime, RED_CIRCLE), "what is this?", ["mmserve-demo"], stage1=False)
    assert decision.route == "decoder:mmserve-demo" and "stage 1 does not answer" in decision.reason


def test_zero_shot_with_cached_latents_equals_scoring_the_labels_each_time(demo_runtime):
    labels = list(demo_runtime.loaded.spec.labels)
    cached = ZeroShot(demo_runtime.contrastive, labels)
    for image in (RED_CIRCLE, TWO_LARGE):
        (feats,) = features(demo_runtime, image)
        expected = cached.classify(feats, labels)  # latents computed for this call
        got = cached.classify(feats)
        assert [name for name, _ in got] == [name for name, _ in expected]
        assert [p for _, p in got] == pytest.approx([p for _, p in expected], abs=1e-6)


def test_model_rules_pick_small_or_large():
    settings = Settings(router_small_model="small-vlm", router_large_model="large-vlm",
                        router_large_intents="description,other", router_large_prompt_words=8)
    rules = ModelRules(settings, ["small-vlm", "large-vlm"])
    assert rules.choose("counting", "how many objects are there?")[0] == "small-vlm"
    assert rules.choose("description", "describe the image.")[0] == "large-vlm"
    assert rules.choose("attribute", "what colour is the big round thing in the upper left corner?")[0] == "large-vlm"
    one = ModelRules(settings, ["only-model"])
    assert {one.choose(i, p)[0] for i, p in [("counting", "x"), ("description", "x"), ("other", "a " * 20)]} \
        == {"only-model"}
    with pytest.raises(ValueError, match="router_large_model='large-vlm'"):
        ModelRules(settings, ["small-vlm", "medium-vlm"])


def test_model_rules_only_choose_a_model_that_can_take_the_request():
    settings = Settings(router_small_model="small-vlm", router_large_model="large-vlm",
                        router_large_intents="description")
    rules = ModelRules(settings, ["small-vlm", "large-vlm", "captioner"])
    model, why = rules.choose("description", "describe the image.", ["small-vlm", "captioner"])
    assert model == "small-vlm" and "large-vlm cannot take this request" in why
    assert rules.choose("counting", "how many?", ["captioner"])[0] == "captioner"
    with pytest.raises(ValueError, match="no served model"):
        rules.choose("counting", "how many?", [])


def test_unknown_intents_in_settings_fail_at_start(demo_runtime, intents):
    with pytest.raises(ValueError, match="captioning"):
        StagedRouter.build(Settings(router_large_intents="captioning"), demo_runtime, SERVED, intents=intents)


def test_router_settings_from_the_environment():
    settings = Settings.from_env({"MMSERVE_ROUTER_ENABLED": "false", "MMSERVE_ROUTER_ZERO_SHOT_THRESHOLD": "0.75",
                                  "MMSERVE_ROUTER_POLICY_LABELS": "a red circle"})
    assert settings.router_enabled is False and settings.router_zero_shot_threshold == 0.75
    assert Settings.from_env({"MMSERVE_ROUTER_ENABLED": "1"}).router_enabled is True
    with pytest.raises(ValueError, match="MMSERVE_ROUTER_ENABLED"):
        Settings.from_env({"MMSERVE_ROUTER_ENABLED": "perhaps"})
    with pytest.raises(ValueError, match="router_zero_shot_threshold"):
        Settings(router_zero_shot_threshold=1.5)
