"""The example images shipped in `vlora_hf/examples/` (drawn with the shapes-vqa code) and their answers.

`python -m vlora_hf.data.example_images` redraws them. Drawing is deterministic, so tests can check the demo
model's answers against `EXAMPLES` without storing anything else.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from ..atomic import atomic_file
from . import shapes

# file name -> (drawing: ("count", n, colour, kind) | ("single", colour, kind), rng seed, {question: answer})
EXAMPLES = {
    "shapes_0.png": (("count", 3, "blue", "triangle"), "example-0",
                     {"Describe the image.": "3 blue triangles", "How many shapes are there?": "3"}),
    "shapes_1.png": (("single", "red", "circle"), "example-1",
                     {"What color is the shape?": "red", "What shape is this?": "circle"}),
    "shapes_2.png": (("count", 2, "green", "square"), "example-2",
                     {"Describe the image.": "2 green squares", "How many shapes are there?": "2"}),
    "shapes_3.png": (("single", "yellow", "triangle"), "example-3",
                     {"What color is the shape?": "yellow", "What shape is this?": "triangle"}),
}


def examples_dir() -> Path:
    return Path(__file__).resolve().parents[1] / "examples"


def draw_example(name: str) -> shapes.ShapesSample:
    spec, seed, _ = EXAMPLES[name]
    rng = random.Random(seed)
    if spec[0] == "count":
        sample = shapes.draw_count(rng, n=spec[1], color=spec[2], kind=spec[3])
    else:
        sample = shapes.draw_single(rng, color=spec[1], kind=spec[2])
    return sample


def write_examples(folder=None) -> list[Path]:
    folder = Path(folder) if folder is not None else examples_dir()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in EXAMPLES:
        target = folder / name
        with atomic_file(target) as tmp:
            draw_example(name).image.save(tmp, format="PNG")
        paths.append(target)
    return paths


if __name__ == "__main__":
    for p in write_examples(sys.argv[1] if len(sys.argv) > 1 else None):
        print(p)
