"""The further shapes-vqa families (relation, small) follow their spec: answers re-derived from the pixels alone."""

import re
from collections import Counter

import numpy as np
import pytest

from test_shapes import NOMINAL, components
from vlora_hf.data import shapes, shapes_families

N = 150


def colour_blobs(sample):
    """{painted rgb: boolean mask} of every non-background colour, after checking the background is one grey."""
    arr = np.asarray(sample.image)
    assert arr.shape == (64, 64, 3) and arr.dtype == np.uint8
    painted = ~np.all(arr == sample.background, axis=-1)
    colours = {tuple(int(c) for c in px) for px in arr[painted]}
    return {rgb: np.all(arr == np.array(rgb, dtype=np.uint8), axis=-1) for rgb in colours}


def colour_name(rgb) -> str:
    """Nearest nominal colour; jitter (<= 15 per channel) keeps it well inside its own cell."""
    name = min(NOMINAL, key=lambda c: sum(abs(a - b) for a, b in zip(rgb, NOMINAL[c])))
    assert all(abs(a - b) <= 15 for a, b in zip(rgb, NOMINAL[name]))
    return name


def kind_of(mask) -> str:
    """Kind from how much of its bounding box a shape fills: square 1, disc ~pi/4, triangle ~1/2."""
    ys, xs = np.nonzero(mask)
    fill = mask.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
    return "square" if fill > 0.95 else "circle" if fill > 0.68 else "triangle"


def extent(mask):
    ys, xs = np.nonzero(mask)
    return xs.min(), xs.max(), ys.min(), ys.max()


def first_of(a, b, axis: str, gap: int = 0) -> bool:
    """a wholly left of (x) / above (y) b, with `gap` clear pixels between them."""
    ax0, ax1, ay0, ay1 = extent(a)
    bx0, bx1, by0, by1 = extent(b)
    return (ax1 + gap < bx0) if axis == "x" else (ay1 + gap < by0)


RELATION = {"left of": ("x", True), "right of": ("x", False), "above": ("y", True), "below": ("y", False)}


def holds(a, b, relation: str) -> bool:
    axis, first = RELATION[relation]
    return first_of(a, b, axis) if first else first_of(b, a, axis)


@pytest.mark.parametrize("split", ["train", "eval"])
def test_relation_answers_follow_from_the_pixels(split):
    answers = Counter()
    for i in range(N):
        s = shapes_families.draw_family("relation", i, seed=3, split=split)
        blobs = colour_blobs(s)
        assert len(blobs) == 2  # two shapes, two different colours
        named = {colour_name(rgb): mask for rgb, mask in blobs.items()}
        assert len(named) == 2
        kinds = {kind_of(mask): colour for colour, mask in named.items()}
        assert len(kinds) == 2  # different kinds
        for rgb in blobs:  # visible against the background
            assert max(abs(c - s.background) for c in rgb) >= shapes.MIN_CONTRAST
        (a, ma), (b, mb) = named.items()
        # separated along one axis by >= the gap, so exactly one relation pair is asked about
        assert any(first_of(m1, m2, ax, gap=shapes_families.RELATION_GAP - 1)
                   for m1, m2 in ((ma, mb), (mb, ma)) for ax in "xy")

        (q1, a1), (q2, a2) = s.qa
        m = re.fullmatch(r"What color is the shape (left of|right of|above|below) the (circle|square|triangle)\?", q1)
        reference = kinds[m.group(2)]
        other = next(c for c in named if c != reference)
        assert holds(named[other], named[reference], m.group(1))
        assert a1 == other

        m = re.fullmatch(r"Is the (\w+) shape (left of|right of|above|below) the (\w+) shape\?", q2)
        assert {m.group(1), m.group(3)} == set(named)
        assert a2 == ("yes" if holds(named[m.group(1)], named[m.group(3)], m.group(2)) else "no")
        answers[a2] += 1
        assert shapes_families.question_family(q1) == "relation_color" and shapes_families.question_family(q2) == "relation_yesno"
    assert min(answers.values()) > 0.35 * N  # both answers are common


def test_small_answers_follow_from_the_pixels():
    counts = Counter()
    for i in range(N):
        s = shapes_families.draw_family("small", i, seed=1)
        blobs = colour_blobs(s)
        assert len(blobs) == 1
        (rgb, mask), = blobs.items()
        parts = components(mask)
        (_, n), (_, kind) = s.qa
        assert int(n) == len(parts)
        counts[int(n)] += 1
        for ys, xs in parts:  # every blob is small, and exactly the answer's kind drawn in its box
            assert np.ptp(ys) < 7 and np.ptp(xs) < 7
            box = next(b for *_, b in s.shapes if b[0] <= xs.min() and b[1] <= ys.min()
                       and xs.max() < b[0] + b[2] and ys.max() < b[1] + b[2])
            blob = np.zeros_like(mask)
            blob[ys, xs] = True
            matches = [k for k in shapes.KINDS if np.array_equal(shapes.shape_mask(k, *box), blob)]
            assert matches == [kind]
    assert set(counts) == set(range(1, 7))


def test_families_are_deterministic_and_leave_the_classic_split_alone():
    images, rows = shapes.make_rows(6, seed=2)
    mixed_images, mixed_rows = shapes_families.make_family_rows(6, {"relation": 3, "small": 2}, seed=2)
    assert mixed_rows[: len(rows)] == rows
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, mixed_images))
    assert len(mixed_images) == 11 and len(mixed_rows) == 22
    again = shapes_families.make_family_rows(6, {"relation": 3, "small": 2}, seed=2)
    assert again[1] == mixed_rows
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(again[0], mixed_images))
    eval_rel = shapes_families.draw_family("relation", 0, seed=2, split="eval")
    assert not np.array_equal(np.asarray(eval_rel.image), np.asarray(mixed_images[6]))
    assert {shapes_families.question_family(q) for _, q, _ in mixed_rows} == {
        "color", "shape", "count", "describe", "relation_color", "relation_yesno", "small_count", "small_shape"}
    with pytest.raises(ValueError, match="unknown shapes-vqa family 'spiral'"):
        shapes_families.draw_family("spiral", 0)


def test_training_reads_the_families_and_refuses_unknown_ones(tmp_path):
    from test_training import tiny_args

    data_args = tiny_args(tmp_path, "--shapes_families", "{relation: 3, small: 2}")[1]
    assert data_args.shapes_families == {"relation": 3, "small": 2}
    with pytest.raises(ValueError, match="shapes_families: spiral"):
        tiny_args(tmp_path, "--shapes_families", "{spiral: 3}")
