"""shapes-vqa: a tiny, fully synthetic visual question answering set (LLaVA format).

Every image is 64x64 RGB on a solid grey background (all channels equal). Even-indexed images hold one
shape (box side 16-32 px, fully inside) and carry two questions, ``"What color is the shape?"`` and
``"What shape is this?"``; odd-indexed images hold 1-4 shapes of one kind and one colour (box side 10-16 px,
boxes at least 2 px apart) and carry ``"How many shapes are there?"`` and ``"Describe the image."``
(answer ``"<n> <colour> <kind>[s]"``, e.g. ``"1 red circle"``, ``"3 blue squares"``).

Drawing is exact (no anti-aliasing): a pixel (x, y) is painted when its centre (x + .5, y + .5) lies inside
the shape. For a box with top-left corner (x0, y0) and side s:

- square: every pixel of the box;
- circle: ((cx - x0 - s/2)^2 + (cy - y0 - s/2)^2) <= (s/2)^2 (filled disc inscribed in the box);
- triangle: apex at (x0 + s/2, y0), base along the box's bottom edge y0 + s from x0 to x0 + s:
  painted when |cx - (x0 + s/2)| <= (cy - y0) / 2.

Colours: each channel of the nominal RGB is jittered by an integer in [-15, 15] (once per image: all shapes
of a count image share the colour). Background: a grey level drawn uniformly from [40, 215], rejected
(and redrawn) while it is closer than ``MIN_CONTRAST`` = 50 to the jittered colour in every channel, i.e.
``max_c |colour_c - grey| >= 50`` always holds, so every shape is visible against its background.
(Every nominal colour has a channel spread of at least 120, so a valid level always exists.)

Two further families, ``relation`` and ``small``, are drawn by :mod:`vlora_hf.data.shapes_families`.

Deterministic: image ``i`` of split ``train``/``eval`` is drawn from ``random.Random(f"shapes-vqa/{split}/{seed}/{i}")``
(family images from ``f"shapes-vqa/{family}/{split}/{seed}/{i}"``) alone, so ``n`` only decides how many are drawn and the eval split never repeats a training stream.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..atomic import atomic_file, atomic_folder

IMAGE_SIZE = 64
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}
KINDS = ("circle", "square", "triangle")
COLOR_JITTER = 15
GREY_RANGE = (40, 215)
MIN_CONTRAST = 50
SINGLE_SIDE = (16, 32)
COUNT_SIDE = (10, 16)
MAX_COUNT = 4
MIN_GAP = 2

Q_COLOR = "What color is the shape?"
Q_SHAPE = "What shape is this?"
Q_COUNT = "How many shapes are there?"
Q_DESCRIBE = "Describe the image."
QUESTIONS = (Q_COLOR, Q_SHAPE, Q_COUNT, Q_DESCRIBE)
QUESTION_KEYS = {Q_COLOR: "color", Q_SHAPE: "shape", Q_COUNT: "count", Q_DESCRIBE: "describe"}

TRAIN_FILE = "shapes_vqa.json"
EVAL_FILE = "shapes_vqa_eval.json"


@dataclass
class ShapesSample:
    """One drawn image and what is true about it."""

    image: Image.Image
    kind: str  # circle | square | triangle
    color: str  # colour name
    rgb: tuple[int, int, int]  # the jittered colour actually painted
    background: int  # grey level
    boxes: list[tuple[int, int, int]]  # (x0, y0, side) per shape
    single: bool  # True: one-shape image (colour/shape questions); False: count image
    qa: list[tuple[str, str]] = field(default_factory=list)  # (question, answer)

    @property
    def count(self) -> int:
        return len(self.boxes)


def describe(n: int, color: str, kind: str) -> str:
    """`1 red circle`, `3 blue squares`."""
    return f"{n} {color} {kind}{'s' if n > 1 else ''}"


def shape_mask(kind: str, x0: int, y0: int, side: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """Boolean [size, size] mask (row = y) of one shape in the box (x0, y0, side); see the module doc."""
    if kind not in KINDS:
        raise ValueError(f"unknown shape kind {kind!r}; expected one of {KINDS}")
    cy, cx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    inside = (cx >= x0) & (cx <= x0 + side) & (cy >= y0) & (cy <= y0 + side)
    if kind == "square":
        return inside
    if kind == "circle":
        r = side / 2.0
        return inside & ((cx - x0 - r) ** 2 + (cy - y0 - r) ** 2 <= r * r)
    return inside & (np.abs(cx - (x0 + side / 2.0)) <= (cy - y0) / 2.0)


def jitter(rng: random.Random, rgb) -> tuple[int, int, int]:
    return tuple(min(255, max(0, c + rng.randint(-COLOR_JITTER, COLOR_JITTER))) for c in rgb)


def _background(rng: random.Random, rgb) -> int:
    while True:
        level = rng.randint(*GREY_RANGE)
        if max(abs(c - level) for c in rgb) >= MIN_CONTRAST:
            return level


def _render(kind: str, rgb, background: int, boxes, size: int = IMAGE_SIZE) -> Image.Image:
    arr = np.full((size, size, 3), background, dtype=np.uint8)
    for x0, y0, side in boxes:
        arr[shape_mask(kind, x0, y0, side, size)] = rgb
    return Image.fromarray(arr, mode="RGB")


def pick_style(rng: random.Random, kind=None, color=None):
    kind = kind or rng.choice(KINDS)
    color = color or rng.choice(sorted(COLORS))
    if kind not in KINDS:
        raise ValueError(f"unknown shape kind {kind!r}; expected one of {KINDS}")
    if color not in COLORS:
        raise ValueError(f"unknown colour {color!r}; expected one of {sorted(COLORS)}")
    rgb = jitter(rng, COLORS[color])
    return kind, color, rgb, _background(rng, rgb)


def draw_single(rng: random.Random, kind: str | None = None, color: str | None = None) -> ShapesSample:
    """One shape, box side 16-32 px, fully inside the 64x64 image; questions: colour and shape."""
    kind, color, rgb, background = pick_style(rng, kind, color)
    side = rng.randint(*SINGLE_SIDE)
    x0, y0 = rng.randint(0, IMAGE_SIZE - side), rng.randint(0, IMAGE_SIZE - side)
    boxes = [(x0, y0, side)]
    return ShapesSample(
        image=_render(kind, rgb, background, boxes), kind=kind, color=color, rgb=rgb, background=background,
        boxes=boxes, single=True, qa=[(Q_COLOR, color), (Q_SHAPE, kind)],
    )


def boxes_separated(a, b, gap: int = MIN_GAP) -> bool:
    """True when boxes (x0, y0, side) are at least `gap` px apart along x or along y."""
    ax, ay, asz = a
    bx, by, bsz = b
    return bx >= ax + asz + gap or ax >= bx + bsz + gap or by >= ay + asz + gap or ay >= by + bsz + gap


def draw_count(rng: random.Random, n: int | None = None, kind: str | None = None,
               color: str | None = None) -> ShapesSample:
    """1-4 shapes of one kind and colour, box side 10-16 px, boxes >= 2 px apart; questions: count, describe."""
    n = n if n is not None else rng.randint(1, MAX_COUNT)
    if not 1 <= n <= MAX_COUNT:
        raise ValueError(f"draw_count: n must be in 1..{MAX_COUNT}, got {n}")
    kind, color, rgb, background = pick_style(rng, kind, color)
    while True:  # place boxes one by one; restart the whole layout if one does not fit
        boxes: list[tuple[int, int, int]] = []
        for _ in range(n):
            side = rng.randint(*COUNT_SIDE)
            for _try in range(100):
                box = (rng.randint(0, IMAGE_SIZE - side), rng.randint(0, IMAGE_SIZE - side), side)
                if all(boxes_separated(box, other) for other in boxes):
                    boxes.append(box)
                    break
            else:
                break
        if len(boxes) == n:
            break
    return ShapesSample(
        image=_render(kind, rgb, background, boxes), kind=kind, color=color, rgb=rgb, background=background,
        boxes=boxes, single=False, qa=[(Q_COUNT, str(n)), (Q_DESCRIBE, describe(n, color, kind))],
    )


def draw_sample(index: int, seed: int = 0, split: str = "train") -> ShapesSample:
    """Image `index` of a split: even indices are single-shape images, odd ones count images."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    rng = random.Random(f"shapes-vqa/{split}/{seed}/{index}")
    return draw_single(rng) if index % 2 == 0 else draw_count(rng)


def make_samples(n: int, seed: int = 0, split: str = "train") -> list[ShapesSample]:
    """`n` in-memory images (with their question/answer pairs) of a split."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return [draw_sample(i, seed, split) for i in range(n)]


def heldout_samples(n: int, seed: int = 0) -> list[ShapesSample]:
    """Held-out evaluation images: the `eval` split (a separate random stream from every training split)."""
    return make_samples(n, seed, split="eval")


def make_rows(n: int, seed: int = 0, split: str = "train", image_size: int | None = None):
    """-> (images: list of PIL images, rows: [(image index, question, answer)]) -- the trainer's row format.

    `image_size` (optional) resizes every image (nearest neighbour) to image_size x image_size."""
    samples = make_samples(n, seed, split)
    images = [s.image for s in samples]
    if image_size and image_size != IMAGE_SIZE:
        images = [im.resize((image_size, image_size), Image.NEAREST) for im in images]
    rows = [(i, q, a) for i, s in enumerate(samples) for q, a in s.qa]
    return images, rows


def conversation(question: str, answer: str, *more: tuple[str, str]) -> list[dict]:
    """LLaVA turns for one image: the first question carries the `<image>` placeholder; `more` are further
    (question, answer) turns about the same image."""
    turns = [{"from": "human", "value": "<image>\n" + question}, {"from": "gpt", "value": answer}]
    for q, a in more:
        turns += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return turns


def records_for(samples: list[ShapesSample], split: str = "train", image_dir: str = "images") -> list[dict]:
    """LLaVA records for samples whose PNGs are (or will be) at `image_dir/{split}_{i:06d}.png`."""
    records = []
    for i, s in enumerate(samples):
        image = f"{image_dir}/{split}_{i:06d}.png"
        for question, answer in s.qa:
            records.append({"id": f"shapes-{split}-{i:06d}-{QUESTION_KEYS[question]}", "image": image,
                            "conversations": conversation(question, answer)})
    return records


def write_split(out: str | os.PathLike, n: int, seed: int = 0, split: str = "train") -> Path:
    """Write `n` images of `split` under `out/images/` and their records to `out/<json>`; returns the json path.

    The json and every PNG are written to temporary names first and renamed into place.
    """
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    samples = make_samples(n, seed, split)
    for i, s in enumerate(samples):
        with atomic_file(out / "images" / f"{split}_{i:06d}.png") as tmp:
            s.image.save(tmp, format="PNG")
    path = out / (TRAIN_FILE if split == "train" else EVAL_FILE)
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(records_for(samples, split), indent=1))
    return path


def make_dataset(out: str | os.PathLike, n: int, seed: int = 0, eval_n: int = 0,
                 overwrite: bool = False) -> Path:
    """Write shapes-vqa to `out` (built in a temporary sibling folder, then renamed): `n` training images
    (`shapes_vqa.json`) and, when `eval_n` > 0, `eval_n` held-out images (`shapes_vqa_eval.json`).
    Returns the training json's path."""
    out = Path(out)
    if n < 1:
        raise ValueError(f"make-shapes: --n must be >= 1, got {n}")
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"make-shapes: output {out} already exists and is not empty (pass --overwrite)")
    with atomic_folder(out, replace=overwrite) as tmp:
        write_split(tmp, n, seed, "train")
        if eval_n:
            write_split(tmp, eval_n, seed, "eval")
        (tmp / "README.txt").write_text(
            f"shapes-vqa, seed {seed}: {n} training images ({TRAIN_FILE}, {2 * n} records)"
            + (f", {eval_n} held-out images ({EVAL_FILE}, {2 * eval_n} records)" if eval_n else "")
            + ". Drawn by `vlora-hf make-shapes`.\n"
        )
    return out / TRAIN_FILE


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="vlora-hf make-shapes",
        description="Draw the shapes-vqa data set (64x64 PNGs + LLaVA-format json): even images hold one shape "
                    "(colour / shape questions), odd images 1-4 shapes (count / describe questions).",
    )
    p.add_argument("--out", required=True, help="output folder (images/ + shapes_vqa.json)")
    p.add_argument("--n", type=int, required=True, help="number of training images (2 records each)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--eval-n", type=int, default=0,
                   help="also write this many held-out images to shapes_vqa_eval.json (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = p.parse_args(argv)
    try:
        path = make_dataset(args.out, args.n, args.seed, eval_n=args.eval_n, overwrite=args.overwrite)
    except ValueError as e:
        p.error(str(e))
    print(f"wrote {2 * args.n} records over {args.n} images to {path}"
          + (f" and {2 * args.eval_n} held-out records to {Path(args.out) / EVAL_FILE}" if args.eval_n else ""))
    return 0


__all__ = [
    "IMAGE_SIZE", "COLORS", "KINDS", "QUESTIONS", "Q_COLOR", "Q_SHAPE", "Q_COUNT", "Q_DESCRIBE",
    "ShapesSample", "describe", "shape_mask", "draw_single", "draw_count", "draw_sample", "make_samples",
    "heldout_samples", "make_rows", "records_for", "write_split", "make_dataset", "main", "boxes_separated",
    "TRAIN_FILE", "EVAL_FILE", "COLOR_JITTER", "MIN_CONTRAST", "MIN_GAP", "GREY_RANGE", "QUESTION_KEYS",
    "jitter", "pick_style",
]
