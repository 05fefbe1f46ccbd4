"""Exact-match evaluation of a VLoRA model on (image, question, answer) rows, per question."""

from __future__ import annotations

from collections import OrderedDict

import torch

from .data import user_message


def normalize_answer(text: str) -> str:
    return " ".join(text.strip().split())


@torch.no_grad()
def answer_questions(model, processor, images, questions, max_new_tokens: int = 32, batch_size: int = 64,
                     generation_kwargs: dict | None = None) -> list[str]:
    """Greedy answers, one per (image, question) pair, batched with left padding."""
    if len(images) != len(questions):
        raise ValueError(f"got {len(images)} images but {len(questions)} questions")
    device = next(model.parameters()).device
    tokenizer = processor.tokenizer
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=tokenizer.eos_token_id)
    kwargs.update(generation_kwargs or {})
    answers: list[str] = []
    prompts = {}
    for start in range(0, len(images), batch_size):
        qs = questions[start : start + batch_size]
        texts = []
        for q in qs:
            if q not in prompts:
                prompts[q] = processor.apply_chat_template(user_message(q), add_generation_prompt=True, tokenize=False)
            texts.append(prompts[q])
        batch_images = images[start : start + batch_size]
        if isinstance(batch_images, torch.Tensor):  # preprocessed pixels
            enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
            enc["pixel_values"] = batch_images
        else:
            enc = processor(images=list(batch_images), text=texts, return_tensors="pt", padding=True,
                            padding_side="left")
        enc = {k: v.to(device) for k, v in enc.items()}
        enc["pixel_values"] = enc["pixel_values"].to(next(model.parameters()).dtype)
        out = model.generate(**enc, **kwargs)
        answers += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return [normalize_answer(a) for a in answers]


def exact_match(model, processor, images, rows, **kwargs) -> dict:
    """rows: (image index, question, answer). -> {"per_question": {q: acc}, "counts": {q: n}, "overall": acc,
    "errors": [(index, question, expected, got), ...] (at most 20)}."""
    was_training = model.training
    model.eval()
    try:
        if isinstance(images, torch.Tensor):
            batch_images = images[torch.tensor([r[0] for r in rows])]
        else:
            batch_images = [images[r[0]] for r in rows]
        got = answer_questions(model, processor, batch_images, [r[1] for r in rows], **kwargs)
    finally:
        model.train(was_training)
    correct: dict[str, list[int]] = OrderedDict()
    errors = []
    for (index, question, answer), pred in zip(rows, got):
        ok = pred == normalize_answer(answer)
        correct.setdefault(question, []).append(int(ok))
        if not ok and len(errors) < 20:
            errors.append((index, question, answer, pred))
    per_question = {q: sum(v) / len(v) for q, v in correct.items()}
    total = sum(sum(v) for v in correct.values()) / max(1, sum(len(v) for v in correct.values()))
    return {"per_question": per_question, "counts": {q: len(v) for q, v in correct.items()}, "overall": total,
            "errors": errors}


__all__ = ["answer_questions", "exact_match", "normalize_answer"]
