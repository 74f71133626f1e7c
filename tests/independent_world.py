"""An independent renderer of the demo world in /work/shared/DEMO_WORLD.md.

It deliberately shares no code with the project's own renderer: shapes are
rasterised with numpy masks on a 4x supersampled grid and box-downsampled, and
objects are placed at float positions, so edges, positions and jitter differ
from a plain PIL drawer. It is used to check that a trained model generalises to
a renderer it never saw.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

CANVAS = 128
SUPERSAMPLE = 4  # sub-samples per pixel along each axis
MIN_GAP = 4  # bounding boxes must be at least this far apart on x or y
JITTER = 20  # each colour channel is jittered uniformly by up to +/- this

BACKGROUNDS = {"black": (0, 0, 0), "white": (255, 255, 255), "gray": (128, 128, 128)}
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
}
SHAPES = ("circle", "square", "triangle")
SIZE_RANGES = {"small": (16, 28), "large": (40, 56)}  # inclusive, in pixels

# The 12 zero-shot labels: colour-major, shape-minor.
LABELS: list[str] = [f"a {c} {s}" for c in COLOURS for s in SHAPES]


@dataclass
class Obj:
    shape: str
    colour: str
    size_class: str
    cx: float  # centre of the bounding box, in pixel coordinates
    cy: float
    side: int  # side of the (square) bounding box, in pixels
    rgb: tuple[int, int, int] | None = None  # jittered colour; None = base colour

    def box(self) -> tuple[float, float, float, float]:
        half = self.side / 2
        return self.cx - half, self.cy - half, self.cx + half, self.cy + half

    def fill(self) -> tuple[int, int, int]:
        return self.rgb if self.rgb is not None else COLOURS[self.colour]


@dataclass
class Scene:
    background: str
    objects: list[Obj] = field(default_factory=list)


# ---------------------------------------------------------------- sampling


def boxes_apart(a: Obj, b: Obj, gap: float = MIN_GAP) -> bool:
    """True when the boxes are disjoint with at least `gap` px between them on x or y."""
    ax0, ay0, ax1, ay1 = a.box()
    bx0, by0, bx1, by1 = b.box()
    x_gap = max(bx0 - ax1, ax0 - bx1)
    y_gap = max(by0 - ay1, ay0 - by1)
    return max(x_gap, y_gap) >= gap


def _jitter(rng: np.random.Generator, colour: str) -> tuple[int, int, int]:
    base = np.array(COLOURS[colour])
    shifted = base + rng.integers(-JITTER, JITTER + 1, size=3)
    return tuple(int(v) for v in np.clip(shifted, 0, 255))


def _random_centre(rng: np.random.Generator, side: int) -> tuple[float, float]:
    # Float centre anywhere that keeps the whole box on the canvas.
    half = side / 2
    cx, cy = rng.uniform(half, CANVAS - half, size=2)
    return float(cx), float(cy)


def sample_scene(rng: np.random.Generator) -> Scene:
    background = str(rng.choice(list(BACKGROUNDS)))
    count = 1 if rng.random() < 0.5 else 2
    kinds: list[tuple[str, str]] = []
    while len(kinds) < count:
        kind = (str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS))))
        if kind not in kinds:  # two objects never share both shape and colour
            kinds.append(kind)
    objects = []
    for shape, colour in kinds:
        size_class = str(rng.choice(list(SIZE_RANGES)))
        lo, hi = SIZE_RANGES[size_class]
        side = int(rng.integers(lo, hi + 1))
        objects.append(Obj(shape, colour, size_class, 0.0, 0.0, side, _jitter(rng, colour)))
    # Rejection-sample positions; a bad first placement (e.g. two large objects
    # with the first in the middle) can leave no room, so re-place everything.
    while True:
        for obj in objects:
            obj.cx, obj.cy = _random_centre(rng, obj.side)
        if all(boxes_apart(a, b) for i, a in enumerate(objects) for b in objects[i + 1 :]):
            return Scene(background, objects)


# ---------------------------------------------------------------- rendering


def _sample_grid() -> tuple[np.ndarray, np.ndarray]:
    # Coordinates of the sub-sample centres, in pixel units.
    coords = (np.arange(CANVAS * SUPERSAMPLE) + 0.5) / SUPERSAMPLE
    return np.meshgrid(coords, coords)  # xs vary along columns, ys along rows


def shape_mask(obj: Obj, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    half = obj.side / 2
    dx, dy = xs - obj.cx, ys - obj.cy
    if obj.shape == "circle":
        return dx * dx + dy * dy <= half * half
    if obj.shape == "square":
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if obj.shape == "triangle":
        # Apex at top centre, base along the bottom of the box: the half-width
        # grows linearly from 0 at the top to `half` at the bottom, so the two
        # slanted edges plus the base are three half-plane tests.
        depth = dy + half  # distance below the top edge
        return (dx <= depth / 2) & (-dx <= depth / 2) & (dy <= half)
    raise ValueError(f"unknown shape {obj.shape!r}")


def render(scene: Scene) -> Image.Image:
    xs, ys = _sample_grid()
    size = CANVAS * SUPERSAMPLE
    canvas = np.empty((size, size, 3), dtype=np.float64)
    canvas[:] = BACKGROUNDS[scene.background]
    for obj in scene.objects:
        canvas[shape_mask(obj, xs, ys)] = obj.fill()
    # Box-filter downsample: each output pixel is the mean of its sub-samples,
    # which yields anti-aliased edges.
    pixels = canvas.reshape(CANVAS, SUPERSAMPLE, CANVAS, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")


# ---------------------------------------------------------------- language


def describe(obj: Obj) -> str:
    return f"a {obj.size_class} {obj.colour} {obj.shape}"


def caption(scene: Scene) -> str:
    if len(scene.objects) == 1:
        return describe(scene.objects[0])
    a, b = scene.objects
    if abs(a.cx - b.cx) >= abs(a.cy - b.cy):
        first, second = (a, b) if a.cx <= b.cx else (b, a)
        return f"{describe(first)} left of {describe(second)}"
    first, second = (a, b) if a.cy <= b.cy else (b, a)  # image y grows downwards
    return f"{describe(first)} above {describe(second)}"


def questions(scene: Scene) -> list[tuple[str, str]]:
    objs = scene.objects
    qa = [("how many objects are there?", "one" if len(objs) == 1 else "two")]
    # Same order as the spec's table; the "the ..." questions only make sense
    # when exactly one object matches.
    unique_by_shape = {s: [o for o in objs if o.shape == s] for s in SHAPES}
    unique_by_shape = {s: m[0] for s, m in unique_by_shape.items() if len(m) == 1}
    unique_by_colour = {c: [o for o in objs if o.colour == c] for c in COLOURS}
    unique_by_colour = {c: m[0] for c, m in unique_by_colour.items() if len(m) == 1}
    for shape, obj in unique_by_shape.items():
        qa.append((f"what color is the {shape}?", obj.colour))
    for colour, obj in unique_by_colour.items():
        qa.append((f"what shape is the {colour} object?", obj.shape))
    for shape, obj in unique_by_shape.items():
        qa.append((f"what size is the {shape}?", obj.size_class))
    for shape in SHAPES:
        qa.append((f"is there a {shape}?", "yes" if any(o.shape == shape for o in objs) else "no"))
    for colour in COLOURS:
        present = any(o.colour == colour for o in objs)
        qa.append((f"is there a {colour} object?", "yes" if present else "no"))
    qa.append(("describe the image.", caption(scene)))
    return qa


def zero_shot_label(scene: Scene) -> str | None:
    objs = scene.objects
    if len(objs) == 1:
        target = objs[0]
    else:
        large = [o for o in objs if o.size_class == "large"]
        if len(large) != 1:  # both small or both large: no zero-shot answer
            return None
        target = large[0]
    return f"a {target.colour} {target.shape}"


def make_eval_set(n: int, seed: int) -> list[tuple[Image.Image, Scene]]:
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng) for _ in range(n)]
    return [(render(s), s) for s in scenes]
