"""shapes-vqa's further families: spatial relations between two shapes, and fine detail.

Two families beside the classic four of :mod:`vlora_hf.data.shapes`, each its own image stream
(``make_family_rows``; the classic images and questions are unchanged, so existing splits and ids stay as they
were):

- ``relation``: two shapes of different kinds and different colours (box side 12-20 px), placed so that one
  lies wholly left of the other (a gap of at least ``RELATION_GAP`` = 4 px between their boxes along x) or
  wholly above it (the same along y); which axis is drawn uniformly. Two questions: the colour of the shape on
  one side of the other, named by kind (``"What color is the shape left of the circle?"`` -> ``"red"``), and
  a yes/no relation between the two colours (``"Is the red shape above the blue shape?"`` -> ``"yes"``/``"no"``,
  each answer with probability 1/2). Both ask only along the drawn axis, so the answer is never ambiguous.
  The colour question's answer is always the shape not named (kind-colour binding, no positions needed);
  the yes/no question needs the geometry.
- ``small``: 1-6 small shapes of one kind and colour (box side 4-7 px, boxes at least 2 px apart), a test of
  fine detail below the tower's 8 px patch: ``"How many small shapes are there?"`` -> ``"5"`` and
  ``"What shape are the small shapes?"`` -> ``"triangle"``.

Every shape of these families keeps the classic colour, jitter and contrast rules (the background contrasts with
every colour in the image).

Image ``i`` of family ``f`` is drawn from ``random.Random(f"shapes-vqa/{f}/{split}/{seed}/{i}")`` alone.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from .shapes import (COLORS, GREY_RANGE, IMAGE_SIZE, KINDS, MIN_CONTRAST, QUESTION_KEYS, boxes_separated, jitter,
                     make_rows, pick_style, shape_mask)

RELATION_SIDE = (12, 20)
RELATION_GAP = 4
SMALL_SIDE = (4, 7)
SMALL_MAX_COUNT = 6
Q_SMALL_COUNT = "How many small shapes are there?"
Q_SMALL_SHAPE = "What shape are the small shapes?"
RELATIONS = {"x": ("left of", "right of"), "y": ("above", "below")}  # (first, second) along the axis


@dataclass
class FamilySample:
    """One image of a further family: every shape as (kind, colour name, painted rgb, (x0, y0, side))."""

    image: Image.Image
    family: str
    shapes: list[tuple[str, str, tuple[int, int, int], tuple[int, int, int]]]
    background: int
    qa: list[tuple[str, str]] = field(default_factory=list)


def _background_for(rng: random.Random, colours) -> int:
    while True:
        level = rng.randint(*GREY_RANGE)
        if all(max(abs(c - level) for c in rgb) >= MIN_CONTRAST for rgb in colours):
            return level


def _render_shapes(shapes_, background: int, size: int = IMAGE_SIZE) -> Image.Image:
    arr = np.full((size, size, 3), background, dtype=np.uint8)
    for kind, _, rgb, (x0, y0, side) in shapes_:
        arr[shape_mask(kind, x0, y0, side, size)] = rgb
    return Image.fromarray(arr, mode="RGB")


def draw_relation(rng: random.Random) -> FamilySample:
    """Two shapes (different kinds, different colours), the first wholly left of / above the second."""
    kinds = rng.sample(KINDS, 2)
    colours = rng.sample(sorted(COLORS), 2)
    rgbs = [jitter(rng, COLORS[c]) for c in colours]
    background = _background_for(rng, rgbs)
    axis = rng.choice("xy")
    sides = [rng.randint(*RELATION_SIDE) for _ in range(2)]
    first = rng.randint(0, IMAGE_SIZE - sides[0] - sides[1] - RELATION_GAP)  # along the axis
    second = rng.randint(first + sides[0] + RELATION_GAP, IMAGE_SIZE - sides[1])
    across = [rng.randint(0, IMAGE_SIZE - s) for s in sides]
    boxes = [(first, across[0], sides[0]), (second, across[1], sides[1])] if axis == "x" else \
            [(across[0], first, sides[0]), (across[1], second, sides[1])]
    shapes_ = [(k, c, rgb, box) for k, c, rgb, box in zip(kinds, colours, rgbs, boxes)]
    before, after = RELATIONS[axis]
    if rng.random() < 0.5:  # ask for the first shape, named by where it is relative to the second
        colour_qa = (f"What color is the shape {before} the {kinds[1]}?", colours[0])
    else:
        colour_qa = (f"What color is the shape {after} the {kinds[0]}?", colours[1])
    if rng.random() < 0.5:
        yes_no = (f"Is the {colours[0]} shape {before} the {colours[1]} shape?", "yes")
    else:
        yes_no = (f"Is the {colours[1]} shape {before} the {colours[0]} shape?", "no")
    return FamilySample(image=_render_shapes(shapes_, background), family="relation", shapes=shapes_,
                        background=background, qa=[colour_qa, yes_no])


def draw_small(rng: random.Random, n: int | None = None) -> FamilySample:
    """1-6 small shapes of one kind and colour (box side 4-7 px, >= 2 px apart): count and kind."""
    n = n if n is not None else rng.randint(1, SMALL_MAX_COUNT)
    if not 1 <= n <= SMALL_MAX_COUNT:
        raise ValueError(f"draw_small: n must be in 1..{SMALL_MAX_COUNT}, got {n}")
    kind, color, rgb, background = pick_style(rng)
    boxes: list[tuple[int, int, int]] = []
    while len(boxes) < n:  # small boxes always fit; draw until each lands clear of the others
        side = rng.randint(*SMALL_SIDE)
        box = (rng.randint(0, IMAGE_SIZE - side), rng.randint(0, IMAGE_SIZE - side), side)
        if all(boxes_separated(box, other) for other in boxes):
            boxes.append(box)
    shapes_ = [(kind, color, rgb, box) for box in boxes]
    return FamilySample(image=_render_shapes(shapes_, background), family="small", shapes=shapes_,
                        background=background, qa=[(Q_SMALL_COUNT, str(n)), (Q_SMALL_SHAPE, kind)])


FAMILY_DRAWERS = {"relation": draw_relation, "small": draw_small}


def draw_family(family: str, index: int, seed: int = 0, split: str = "train") -> FamilySample:
    if family not in FAMILY_DRAWERS:
        raise ValueError(f"unknown shapes-vqa family {family!r}; expected one of {sorted(FAMILY_DRAWERS)}")
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    return FAMILY_DRAWERS[family](random.Random(f"shapes-vqa/{family}/{split}/{seed}/{index}"))


def question_family(question: str) -> str:
    """The family a question belongs to, for per-family scores: color, shape, count, describe (the classic
    four), relation_color, relation_yesno, small_count, small_shape."""
    if question in QUESTION_KEYS:
        return QUESTION_KEYS[question]
    if question == Q_SMALL_COUNT:
        return "small_count"
    if question == Q_SMALL_SHAPE:
        return "small_shape"
    if question.startswith("What color is the shape "):
        return "relation_color"
    if question.startswith("Is the "):
        return "relation_yesno"
    raise ValueError(f"not a shapes-vqa question: {question!r}")


def make_family_rows(n: int, families: dict | None = None, seed: int = 0, split: str = "train",
                     image_size: int | None = None):
    """`make_rows(n)` followed by `families[f]` images of each further family (indices after the classic ones)
    -> (images, rows). The classic images and their rows are exactly `make_rows`'s."""
    images, rows = make_rows(n, seed, split, image_size)
    for family, count in (families or {}).items():
        for k in range(int(count)):
            sample = draw_family(family, k, seed, split)
            image = sample.image
            if image_size and image_size != IMAGE_SIZE:
                image = image.resize((image_size, image_size), Image.NEAREST)
            rows += [(len(images), q, a) for q, a in sample.qa]
            images.append(image)
    return images, rows


__all__ = [
    "FamilySample", "FAMILY_DRAWERS", "Q_SMALL_COUNT", "Q_SMALL_SHAPE", "RELATION_GAP", "draw_family", "draw_relation",
    "draw_small", "make_family_rows", "question_family",
]
