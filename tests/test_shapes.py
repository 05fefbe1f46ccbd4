"""shapes-vqa follows its spec: pixels, geometry, spacing, answers, determinism, files."""

import json
import random
from collections import deque

import numpy as np
import pytest
from PIL import Image

from vlora_hf.data import shapes

NOMINAL = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (235, 210, 40), "purple": (140, 60, 180), "orange": (245, 140, 30),
}


def components(mask):
    """4-connected components of a boolean mask -> list of (ys, xs) arrays (independent of the drawing code)."""
    seen = np.zeros_like(mask, dtype=bool)
    out = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        q, pix = deque([(y0, x0)]), []
        seen[y0, x0] = True
        while q:
            y, x = q.popleft()
            pix.append((y, x))
            for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                yy, xx = y + dy, x + dx
                if 0 <= yy < mask.shape[0] and 0 <= xx < mask.shape[1] and mask[yy, xx] and not seen[yy, xx]:
                    seen[yy, xx] = True
                    q.append((yy, xx))
        out.append((np.array([p[0] for p in pix]), np.array([p[1] for p in pix])))
    return out


def split_pixels(sample):
    """-> (array, painted mask): the background is the colour of the top-left... checked by uniformity below."""
    arr = np.asarray(sample.image)
    assert arr.shape == (64, 64, 3) and arr.dtype == np.uint8
    grey = np.all(arr == sample.background, axis=-1)
    return arr, ~grey


def check_common(sample):
    arr, painted = split_pixels(sample)
    # background: one grey level, all channels equal, everywhere that is not the shape colour
    assert 0 <= sample.background <= 255
    assert np.all(np.all(arr[~painted] == sample.background, axis=-1))
    # shape pixels: exactly the (single) jittered colour, within +-15 of the nominal colour
    assert painted.any()
    assert np.all(arr[painted] == np.array(sample.rgb, dtype=np.uint8))
    nominal = np.array(NOMINAL[sample.color])
    assert np.all(np.abs(np.array(sample.rgb) - nominal) <= 15)
    # visible: some channel differs from the grey level by >= 50
    assert max(abs(c - sample.background) for c in sample.rgb) >= 50
    return arr, painted


def check_shape_geometry(kind, ys, xs, box):
    """Pixel checks of one shape's pixels against its box (x0, y0, side), derived from the image alone."""
    x0, y0, s = box
    assert xs.min() >= x0 and xs.max() <= x0 + s - 1 and ys.min() >= y0 and ys.max() <= y0 + s - 1
    rows = {y: xs[ys == y] for y in np.unique(ys)}
    if kind == "square":
        assert len(xs) == s * s
        assert (xs.min(), xs.max(), ys.min(), ys.max()) == (x0, x0 + s - 1, y0, y0 + s - 1)
    elif kind == "circle":
        # fills its box to within a pixel on every side, symmetric, corners empty, area ~ pi/4 s^2
        assert xs.min() <= x0 + 1 and xs.max() >= x0 + s - 2 and ys.min() <= y0 + 1 and ys.max() >= y0 + s - 2
        assert abs(xs.mean() + 0.5 - (x0 + s / 2)) < 0.5 and abs(ys.mean() + 0.5 - (y0 + s / 2)) < 0.5
        assert not any((x, y) in set(zip(xs, ys)) for x, y in ((x0, y0), (x0 + s - 1, y0), (x0, y0 + s - 1)))
        assert abs(len(xs) - np.pi / 4 * s * s) < 0.12 * s * s
    else:  # triangle: apex at the top centre, base along the bottom edge, widening downwards
        top, bottom = ys.min(), ys.max()
        assert top <= y0 + 1 and bottom == y0 + s - 1
        apex = rows[top]
        assert len(apex) <= 2 and abs(apex.mean() + 0.5 - (x0 + s / 2)) <= 0.5
        base = rows[bottom]
        assert base.min() <= x0 + 1 and base.max() >= x0 + s - 2
        widths = [len(rows[y]) for y in sorted(rows)]
        assert widths == sorted(widths)
        assert all(len(r) == r.max() - r.min() + 1 for r in rows.values())  # each row one run
        assert abs(len(xs) - s * s / 2) < 0.15 * s * s


@pytest.mark.parametrize("kind", shapes.KINDS)
def test_single_shape_images_follow_the_spec(kind):
    rng = random.Random(123)
    for _ in range(15):
        s = shapes.draw_single(rng, kind=kind)
        arr, painted = check_common(s)
        (box,) = s.boxes
        x0, y0, side = box
        assert 16 <= side <= 32 and 0 <= x0 <= 64 - side and 0 <= y0 <= 64 - side
        (comp,) = components(painted)
        check_shape_geometry(kind, comp[0], comp[1], box)
        assert s.qa == [("What color is the shape?", s.color), ("What shape is this?", kind)]


def test_count_images_follow_the_spec():
    rng = random.Random(7)
    seen_n = set()
    for _ in range(40):
        s = shapes.draw_count(rng)
        arr, painted = check_common(s)
        n = len(s.boxes)
        seen_n.add(n)
        assert 1 <= n <= 4
        comps = components(painted)
        assert len(comps) == n  # as many separate blobs as shapes
        for a in range(n):
            xa, ya, sa = s.boxes[a]
            assert 10 <= sa <= 16 and 0 <= xa <= 64 - sa and 0 <= ya <= 64 - sa
            for b in range(a + 1, n):  # >= 2 px of gap along x or y
                xb, yb, sb = s.boxes[b]
                gap_x = max(xb - (xa + sa), xa - (xb + sb))
                gap_y = max(yb - (ya + sa), ya - (yb + sb))
                assert max(gap_x, gap_y) >= 2
        for ys, xs in comps:  # each blob is one shape of the image's kind inside one box
            box = next(b for b in s.boxes if b[0] <= xs.min() and xs.max() < b[0] + b[2]
                       and b[1] <= ys.min() and ys.max() < b[1] + b[2])
            check_shape_geometry(s.kind, ys, xs, box)
        word = s.kind + ("s" if n > 1 else "")
        assert s.qa == [("How many shapes are there?", str(n)), ("Describe the image.", f"{n} {s.color} {word}")]
    assert seen_n == {1, 2, 3, 4}


def test_answer_strings():
    assert shapes.describe(1, "red", "circle") == "1 red circle"
    assert shapes.describe(3, "blue", "square") == "3 blue squares"
    assert shapes.describe(2, "orange", "triangle") == "2 orange triangles"
    s = shapes.draw_count(random.Random(0), n=4, kind="triangle", color="purple")
    assert s.qa[1] == ("Describe the image.", "4 purple triangles") and s.qa[0][1] == "4"
    with pytest.raises(ValueError, match="n must be"):
        shapes.draw_count(random.Random(0), n=5)
    with pytest.raises(ValueError, match="colour"):
        shapes.draw_single(random.Random(0), color="pink")


def test_deterministic_balanced_and_heldout_differs():
    a = shapes.make_samples(24, seed=3)
    b = shapes.make_samples(12, seed=3)
    assert [x.image.tobytes() for x in a[:12]] == [x.image.tobytes() for x in b]
    assert [x.qa for x in a[:12]] == [x.qa for x in b]
    c = shapes.make_samples(12, seed=4)
    assert [x.image.tobytes() for x in c] != [x.image.tobytes() for x in b]
    ev = shapes.heldout_samples(12, seed=3)
    assert {x.image.tobytes() for x in ev}.isdisjoint({x.image.tobytes() for x in a})
    assert [x.single for x in a] == [i % 2 == 0 for i in range(24)]
    many = shapes.make_samples(120, seed=0)
    assert {x.color for x in many} == set(NOMINAL) and {x.kind for x in many} == set(shapes.KINDS)


def test_make_shapes_cli_writes_llava_records(tmp_path):
    out = tmp_path / "shapes"
    assert shapes.main(["--out", str(out), "--n", "4", "--seed", "5", "--eval-n", "2"]) == 0
    records = json.loads((out / "shapes_vqa.json").read_text())
    samples = shapes.make_samples(4, seed=5)
    assert len(records) == 8
    assert records[0] == {
        "id": "shapes-train-000000-color", "image": "images/train_000000.png",
        "conversations": [{"from": "human", "value": "<image>\nWhat color is the shape?"},
                          {"from": "gpt", "value": samples[0].color}],
    }
    assert records[3]["conversations"] == [{"from": "human", "value": "<image>\nDescribe the image."},
                                           {"from": "gpt", "value": samples[1].qa[1][1]}]
    assert [r["conversations"][0]["value"].split("\n")[1] for r in records] == [
        "What color is the shape?", "What shape is this?", "How many shapes are there?", "Describe the image."] * 2
    for r in records:
        img = Image.open(out / r["image"])
        assert img.mode == "RGB" and img.size == (64, 64)
    i3 = np.asarray(Image.open(out / "images/train_000003.png"))
    assert np.array_equal(i3, np.asarray(samples[3].image))
    ev = json.loads((out / "shapes_vqa_eval.json").read_text())
    assert len(ev) == 4 and ev[0]["image"] == "images/eval_000000.png"
    assert np.array_equal(np.asarray(Image.open(out / ev[0]["image"])), np.asarray(shapes.heldout_samples(1, 5)[0].image))
    assert not [p for p in tmp_path.iterdir() if p.name != "shapes"]  # temp folder renamed away
    with pytest.raises(SystemExit):  # refuses to overwrite without --overwrite
        shapes.main(["--out", str(out), "--n", "2"])
    assert shapes.main(["--out", str(out), "--n", "2", "--overwrite"]) == 0
    assert len(json.loads((out / "shapes_vqa.json").read_text())) == 4


def test_make_rows_for_the_trainer():
    images, rows = shapes.make_rows(4, seed=2)
    samples = shapes.make_samples(4, seed=2)
    assert rows == [(i, q, a) for i, s in enumerate(samples) for q, a in s.qa] and len(rows) == 8
    assert images[1].tobytes() == samples[1].image.tobytes()
    big, _ = shapes.make_rows(2, seed=2, image_size=128)
    assert big[0].size == (128, 128)
    assert np.array_equal(np.asarray(big[0])[::2, ::2], np.asarray(samples[0].image))
    from vlora_hf.data import LLaVACollator, make_dataset  # lazy package exports

    assert callable(make_dataset) and callable(LLaVACollator)
