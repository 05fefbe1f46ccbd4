"""Exact-match evaluation of a VLoRA model on (image, question, answer) rows, per question."""

from collections import OrderedDict

import torch

from ..answering import answer_questions


def normalize_answer(text: str) -> str:
    return " ".join(text.strip().split())


def exact_match(model, processor, images, rows, max_new_tokens: int = 32, batch_size: int = 64) -> dict:
    """rows: (image index, question, answer); images: PIL images or preprocessed pixels [N, 3, H, W].

    -> {"per_question": {q: accuracy}, "counts": {q: n}, "overall": accuracy,
        "errors": [(index, question, expected, got), ...] (the first 20), "answers": [got, ...] (row order)}."""
    was_training = model.training
    model.eval()
    try:
        if isinstance(images, torch.Tensor):
            row_images = images[torch.tensor([r[0] for r in rows])]
        else:
            row_images = [images[r[0]] for r in rows]
        got = answer_questions(model, processor, row_images, [r[1] for r in rows], max_new_tokens=max_new_tokens,
                               batch_size=batch_size)
    finally:
        model.train(was_training)
    correct: dict[str, list[int]] = OrderedDict()
    errors = []
    for (index, question, answer), pred in zip(rows, got):
        ok = normalize_answer(pred) == normalize_answer(answer)
        correct.setdefault(question, []).append(int(ok))
        if not ok and len(errors) < 20:
            errors.append((index, question, answer, pred))
    total = sum(map(len, correct.values()))
    return {"per_question": {q: sum(v) / len(v) for q, v in correct.items()},
            "counts": {q: len(v) for q, v in correct.items()},
            "overall": sum(map(sum, correct.values())) / max(1, total), "errors": errors, "answers": got}


__all__ = ["exact_match", "normalize_answer"]
