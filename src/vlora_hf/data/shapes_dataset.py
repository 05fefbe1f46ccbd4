"""shapes-vqa drawn in memory -> a training dataset: question weights, multi-turn grouping, a pixel bank.

Rows are (image index, question, answer) triples (`shapes.make_rows`). Every image is preprocessed once into a
pixel bank and the conversations refer to it by index, so a 60000-image set costs one pass of the image
processor.
"""

import random

import torch

from . import shapes, shapes_families
from .llava import LLaVADataset, chat_template_of


def preprocess_bank(images, image_processor, chunk: int = 256) -> torch.Tensor:
    """A list of images -> pixel values [N, 3, H, W] (in chunks, to bound memory)."""
    parts = [image_processor(images[start : start + chunk], return_tensors="pt")["pixel_values"]
             for start in range(0, len(images), chunk)]
    return torch.cat(parts) if parts else torch.empty(0)


def weight_rows(rows, weights: dict, seed: int = 0) -> list:
    """Repeat or thin rows per question: weight w keeps int(w) copies of each row plus one more with probability
    frac(w) (seeded), e.g. {"What color is the shape?": 0.25, "What shape is this?": 2} spends the steps on
    what is hard to learn. Questions not named keep weight 1."""
    questions = {q for _, q, _ in rows}
    unknown = sorted(set(weights) - questions)
    if unknown:
        raise ValueError(f"question_weights names question(s) {unknown} that the data does not ask; "
                         f"questions: {sorted(questions)}")
    bad = {q: w for q, w in weights.items() if not isinstance(w, (int, float)) or w < 0}
    if bad:
        raise ValueError(f"question_weights must be numbers >= 0, got {bad}")
    rng = random.Random(f"question_weights/{seed}")
    out = []
    for row in rows:
        w = float(weights.get(row[1], 1))
        out += [row] * (int(w) + (1 if rng.random() < w - int(w) else 0))
    return out


def training_rows(num_images: int, seed: int = 0, image_size: int | None = None, question_weights=None,
                  families: dict | None = None):
    """-> (PIL images, rows) of the training split (with `families`' images after the classic ones), with
    `question_weights` applied."""
    images, rows = shapes_families.make_family_rows(num_images, families, seed=seed, image_size=image_size)
    if question_weights:
        rows = weight_rows(rows, question_weights, seed=seed)
    return images, rows


def heldout_rows(n: int, seed: int = 0, image_size: int | None = None, families: dict | None = None,
                 num_images: int = 1):
    """-> (PIL images, rows) of the eval split: `n` classic images and the families in their training proportion
    to `num_images` (at least one image each)."""
    scaled = {f: max(1, round(n * count / max(1, num_images))) for f, count in (families or {}).items() if count}
    return shapes_families.make_family_rows(n, scaled, seed=seed, split="eval", image_size=image_size)


def group_turns(rows, seed: int = 0) -> list[tuple[int, list[tuple[str, str]]]]:
    """rows -> multi-turn records (image index, [(question, answer), ...]): each image's questions in one record,
    in a seeded random order (so every question is also asked first, as at inference); a question that
    `weight_rows` repeated goes to a further record of the same image."""
    rng = random.Random(f"multi_turn/{seed}")
    by_image: dict[int, list[list[tuple[str, str]]]] = {}
    for i, q, a in rows:
        rounds = by_image.setdefault(i, [])
        k = next((k for k, turns in enumerate(rounds) if all(q != t[0] for t in turns)), len(rounds))
        if k == len(rounds):
            rounds.append([])
        rounds[k].append((q, a))
    records = []
    for i, rounds in by_image.items():
        for turns in rounds:
            rng.shuffle(turns)
            records.append((i, turns))
    return records


def shapes_dataset(images, rows, processor, multi_turn: bool = False, seed: int = 0, **kwargs) -> LLaVADataset:
    """shapes-vqa rows -> a `LLaVADataset` over a pixel bank (each image preprocessed once).

    One record per row, or with `multi_turn` one conversation per image (`group_turns`): the tower and the
    generator then run once for all of an image's questions, as with LLaVA's multi-turn instruction data.
    kwargs go to `LLaVADataset` (the chat template defaults to the processor's)."""
    grouped = group_turns(rows, seed) if multi_turn else [(i, [(q, a)]) for i, q, a in rows]
    records = [{"id": f"shapes-{k}", "image": str(i), "conversations": shapes.conversation(*turns[0], *turns[1:])}
               for k, (i, turns) in enumerate(grouped)]
    bank = preprocess_bank(images, processor.image_processor)
    kwargs.setdefault("chat_template", chat_template_of(processor))
    kwargs.setdefault("image_token_id", processor.image_token_id)
    return LLaVADataset(records, processor.tokenizer, image_processor=processor.image_processor,
                        images={str(i): px for i, px in enumerate(bank)}, **kwargs)


__all__ = ["group_turns", "heldout_rows", "preprocess_bank", "shapes_dataset", "training_rows", "weight_rows"]
