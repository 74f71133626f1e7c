"""A seeded renderer of the demo world, and the captions, questions and answers it implies.

The spec is ../shared/DEMO_WORLD.md. Rendering varies its anti-aliasing on purpose (plain, 2x or 4x
supersampled) so that a model trained on it does not overfit to one rasteriser.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

CANVAS = 128
BACKGROUNDS = {"black": (0, 0, 0), "white": (255, 255, 255), "gray": (128, 128, 128)}
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": (16, 28), "large": (40, 56)}
COLOUR_JITTER = 20
MIN_GAP = 4
LABELS = tuple(f"a {colour} {shape}" for colour in COLOURS for shape in SHAPES)
CAPTION_QUESTION = "describe the image."


@dataclass(frozen=True)
class Shape:
    shape: str
    colour: str
    size: str  # "small" | "large"
    side: int  # bounding-box side in pixels
    x: float  # bounding-box left edge
    y: float  # bounding-box top edge
    rgb: tuple[int, int, int]

    @property
    def cx(self) -> float:
        return self.x + self.side / 2

    @property
    def cy(self) -> float:
        return self.y + self.side / 2

    @property
    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape}"

    @property
    def label(self) -> str:
        return f"a {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[Shape, ...]
    antialias: int = 1  # supersampling factor used when rendering


def _boxes_apart(a: Shape, b: Shape) -> bool:
    gap_x = max(b.x - (a.x + a.side), a.x - (b.x + b.side))
    gap_y = max(b.y - (a.y + a.side), a.y - (b.y + b.side))
    return max(gap_x, gap_y) >= MIN_GAP


def sample_scene(rng: random.Random) -> Scene:
    background = rng.choice(list(BACKGROUNDS))
    n_objects = rng.choice((1, 2))
    while True:
        objects: list[Shape] = []
        for _ in range(n_objects):
            shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
            size = rng.choice(list(SIZES))
            side = rng.randint(*SIZES[size])
            x, y = rng.uniform(0, CANVAS - side), rng.uniform(0, CANVAS - side)
            rgb = tuple(min(255, max(0, c + rng.randint(-COLOUR_JITTER, COLOUR_JITTER))) for c in COLOURS[colour])
            objects.append(Shape(shape, colour, size, side, x, y, rgb))
        if n_objects == 2:
            a, b = objects
            if (a.shape, a.colour) == (b.shape, b.colour) or not _boxes_apart(a, b):
                continue
        return Scene(background, tuple(objects), antialias=rng.choice((1, 2, 4)))


def render(scene: Scene) -> Image.Image:
    scale = scene.antialias
    image = Image.new("RGB", (CANVAS * scale, CANVAS * scale), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        x0, y0 = obj.x * scale, obj.y * scale
        x1, y1 = (obj.x + obj.side) * scale - 1, (obj.y + obj.side) * scale - 1
        if obj.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=obj.rgb)
        elif obj.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=obj.rgb)
        else:
            draw.polygon(((x0 + x1) / 2, y0, x1, y1, x0, y1), fill=obj.rgb)
    if scale > 1:
        image = image.resize((CANVAS, CANVAS), Image.Resampling.BOX)
    return image


def caption(scene: Scene) -> str:
    if len(scene.objects) == 1:
        return scene.objects[0].phrase
    a, b = scene.objects
    if abs(a.cx - b.cx) >= abs(a.cy - b.cy):
        first, second = (a, b) if a.cx <= b.cx else (b, a)
        return f"{first.phrase} left of {second.phrase}"
    first, second = (a, b) if a.cy <= b.cy else (b, a)
    return f"{first.phrase} above {second.phrase}"


def zero_shot_label(scene: Scene) -> str | None:
    if len(scene.objects) == 1:
        return scene.objects[0].label
    a, b = scene.objects
    if a.size == b.size:
        return None
    return (a if a.size == "large" else b).label


def questions(scene: Scene) -> list[tuple[str, str]]:
    """Every (question, answer) pair the spec defines for this scene."""
    objs = scene.objects
    pairs = [("how many objects are there?", "one" if len(objs) == 1 else "two")]
    for shape in SHAPES:
        having = [o for o in objs if o.shape == shape]
        if len(having) == 1:
            pairs.append((f"what color is the {shape}?", having[0].colour))
            pairs.append((f"what size is the {shape}?", having[0].size))
        pairs.append((f"is there a {shape}?", "yes" if having else "no"))
    for colour in COLOURS:
        having = [o for o in objs if o.colour == colour]
        if len(having) == 1:
            pairs.append((f"what shape is the {colour} object?", having[0].shape))
        pairs.append((f"is there a {colour} object?", "yes" if having else "no"))
    pairs.append((CAPTION_QUESTION, caption(scene)))
    return pairs


def question_kind(question: str) -> str:
    """A coarse family name, used to balance training over question types."""
    if question == CAPTION_QUESTION:
        return "caption"
    return " ".join(question.split()[:2])


def vocabulary() -> list[str]:
    """Every word the world's questions, answers and labels use (punctuation split off)."""
    words = {"answer", ":", "?", ".", "left", "of", "above", "one", "two", "yes", "no", "a"}
    words |= set(COLOURS) | set(SHAPES) | set(SIZES)
    for text in ("how many objects are there", "what color is the", "what size is the",
                 "what shape is the object", "is there a", "describe the image"):
        words |= set(text.split())
    return sorted(words)
