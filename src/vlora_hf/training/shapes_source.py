"""shapes-vqa as training rows: drawn in memory by `vlora_hf.data.shapes` (no files needed)."""

from __future__ import annotations


def make_rows(num_images: int, seed: int = 0, split: str = "train", image_size=None):
    """-> (PIL images, [(image index, question, answer)]) for `num_images` images of a shapes-vqa split."""
    from ..data import shapes

    if image_size not in (None, shapes.IMAGE_SIZE):
        raise ValueError(f"shapes-vqa images are {shapes.IMAGE_SIZE}px; data.image_size={image_size} is not supported "
                         "(resize happens in the image processor)")
    samples = shapes.make_samples(int(num_images), seed=int(seed), split=split)
    images = [s.image for s in samples]
    rows = [(i, q, a) for i, s in enumerate(samples) for q, a in s.qa]
    return images, rows


def heldout_rows(num_images: int, seed: int = 0):
    return make_rows(num_images, seed=seed, split="eval")


__all__ = ["make_rows", "heldout_rows"]
