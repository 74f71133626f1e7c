"""Tests of the independent demo-world renderer itself (tests/independent_world.py)."""

import numpy as np
import pytest

from tests import independent_world as iw
from tests.independent_world import Obj, Scene


def two_object_scene(b_cx: float, b_cy: float) -> Scene:
    # A large blue square at (40, 60) and a small yellow triangle elsewhere.
    a = Obj("square", "blue", "large", 40.0, 60.0, 44)
    b = Obj("triangle", "yellow", "small", b_cx, b_cy, 20)
    return Scene("gray", [b, a])  # listed out of order on purpose


def test_caption_left_of_puts_left_object_first():
    scene = two_object_scene(100.0, 70.0)  # |dx| = 60 >= |dy| = 10
    assert iw.caption(scene) == "a large blue square left of a small yellow triangle"


def test_caption_above_puts_upper_object_first():
    scene = two_object_scene(50.0, 110.0)  # |dx| = 10 < |dy| = 50; triangle is lower
    assert iw.caption(scene) == "a large blue square above a small yellow triangle"


def test_caption_tie_counts_as_left_of():
    scene = two_object_scene(10.0, 90.0)  # |dx| = |dy| = 30; triangle is left
    assert iw.caption(scene) == "a small yellow triangle left of a large blue square"


def test_one_object_caption_questions_and_label():
    scene = Scene("black", [Obj("circle", "red", "small", 64.0, 64.0, 20)])
    assert iw.caption(scene) == "a small red circle"
    qa = dict(iw.questions(scene))
    assert qa["how many objects are there?"] == "one"
    assert qa["what color is the circle?"] == "red"
    assert qa["what shape is the red object?"] == "circle"
    assert qa["what size is the circle?"] == "small"
    assert qa["is there a circle?"] == "yes"
    assert qa["is there a square?"] == "no"
    assert qa["is there a red object?"] == "yes"
    assert qa["is there a green object?"] == "no"
    assert qa["describe the image."] == "a small red circle"
    assert "what color is the square?" not in qa
    assert iw.zero_shot_label(scene) == "a red circle"


def test_questions_skip_ambiguous_and_label_rules():
    # Two red objects: "what shape is the red object?" must not be asked.
    a = Obj("circle", "red", "large", 30.0, 64.0, 40)
    b = Obj("square", "red", "small", 100.0, 64.0, 20)
    scene = Scene("white", [a, b])
    qa = dict(iw.questions(scene))
    assert "what shape is the red object?" not in qa
    assert qa["how many objects are there?"] == "two"
    assert qa["what size is the square?"] == "small"
    assert iw.zero_shot_label(scene) == "a red circle"  # the large one
    b.size_class, b.side = "large", 40
    assert iw.zero_shot_label(scene) is None  # same size class: no answer
    for question, answer in iw.questions(scene):
        assert question == question.lower() and "  " not in question
        assert question.endswith("?") or question == "describe the image."
        assert answer == answer.lower() and not answer.endswith(".")


def test_labels_order():
    assert len(iw.LABELS) == 12
    assert iw.LABELS[:4] == ["a red circle", "a red square", "a red triangle", "a green circle"]
    assert iw.LABELS[-1] == "a yellow triangle"


@pytest.mark.parametrize("shape", iw.SHAPES)
def test_render_centre_has_object_colour_and_corners_background(shape):
    obj = Obj(shape, "green", "large", 64.0, 64.0, 48, rgb=(50, 170, 70))
    image = iw.render(Scene("white", [obj]))
    assert image.mode == "RGB" and image.size == (128, 128)
    pixels = np.asarray(image).astype(int)
    assert np.abs(pixels[64, 64] - (50, 170, 70)).max() <= 2
    for y, x in [(0, 0), (0, 127), (127, 0), (127, 127)]:
        assert tuple(pixels[y, x]) == (255, 255, 255)


def test_render_antialiases_edges():
    # A circle with a fractional centre must produce blended edge pixels.
    obj = Obj("circle", "red", "large", 63.3, 64.7, 45, rgb=(220, 40, 40))
    pixels = np.asarray(iw.render(Scene("black", [obj]))).astype(int)
    reds = set(pixels[..., 0].ravel().tolist())
    assert any(0 < r < 220 for r in reds)


def test_triangle_points_up():
    obj = Obj("triangle", "blue", "large", 64.0, 64.0, 48, rgb=(40, 80, 220))
    pixels = np.asarray(iw.render(Scene("black", [obj])))
    covered = (pixels[..., 2] > 110).sum(axis=1)  # covered width per row
    top, bottom = 64 - 24, 64 + 23
    assert covered[top + 2] < covered[64] < covered[bottom - 1]
    assert covered[bottom - 1] >= 44


def test_sampled_scenes_obey_world_rules():
    rng = np.random.default_rng(0)
    counts = {1: 0, 2: 0}
    for _ in range(500):
        scene = iw.sample_scene(rng)
        assert scene.background in iw.BACKGROUNDS
        objs = scene.objects
        counts[len(objs)] += 1
        for obj in objs:
            lo, hi = iw.SIZE_RANGES[obj.size_class]
            assert isinstance(obj.side, int) and lo <= obj.side <= hi
            x0, y0, x1, y1 = obj.box()
            assert 0 <= x0 and 0 <= y0 and x1 <= 128 and y1 <= 128
            base = np.array(iw.COLOURS[obj.colour])
            assert np.abs(np.array(obj.rgb) - base).max() <= 20
        if len(objs) == 2:
            a, b = objs
            assert (a.shape, a.colour) != (b.shape, b.colour)
            assert iw.boxes_apart(a, b)
    assert counts[1] > 150 and counts[2] > 150


def test_pixels_outside_boxes_are_background():
    rng = np.random.default_rng(1)
    for _ in range(20):
        scene = iw.sample_scene(rng)
        pixels = np.asarray(iw.render(scene))
        outside = np.ones((128, 128), dtype=bool)
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.box()
            # Pixel i spans [i, i + 1]; mark every pixel touching the box.
            outside[int(np.floor(y0)) : int(np.ceil(y1)), int(np.floor(x0)) : int(np.ceil(x1))] = False
        assert (pixels[outside] == iw.BACKGROUNDS[scene.background]).all()


def test_make_eval_set_is_deterministic():
    first = iw.make_eval_set(5, seed=123)
    second = iw.make_eval_set(5, seed=123)
    other = iw.make_eval_set(5, seed=124)
    assert [s for _, s in first] == [s for _, s in second]
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for (a, _), (b, _) in zip(first, second))
    assert [s for _, s in first] != [s for _, s in other]
