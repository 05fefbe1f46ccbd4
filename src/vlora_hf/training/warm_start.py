"""Warm start of a scratch vision tower: predict each image's answer words from the image alone.

Why: the release's tower is a pretrained CLIP; a tower trained from scratch only through the generated
weight deltas learns shape features slowly (the signal reaches it through the generator and the LLM). A
short supervised pass first -- mean of the tower's features (those the generator reads) -> one linear layer -> which answer words
(``red``, ``circle``, ``3``, ``squares``, ...) the image's questions have, as multi-label targets -- gives
the tower features the generator can read from the first VLoRA step. The linear head is thrown away.
"""

from __future__ import annotations

import time

import torch


def answer_word_targets(rows, num_images: int) -> tuple[torch.Tensor, list[str]]:
    """rows (image index, question, answer) -> multi-hot [num_images, W] over the answers' words, the words."""
    words = sorted({w for _, _, a in rows for w in a.split()})
    column = {w: j for j, w in enumerate(words)}
    targets = torch.zeros(num_images, len(words))
    for i, _, answer in rows:
        for w in answer.split():
            targets[i, column[w]] = 1.0
    return targets, words


def warm_start_tower(model, images, rows, steps: int, learning_rate: float = 1e-3, batch_size: int = 48,
                     seed: int = 0, log=print) -> float:
    """Train `model`'s vision tower (in place) for `steps` on answer-word targets; returns the last loss.

    images: the preprocessed training images, ``images[str(i)]`` = pixels [3, H, W] of row image index i (a
    `LLaVADataset`'s in-memory ``images``)."""
    if steps <= 0:
        return float("nan")
    num_images = len(images)
    targets, words = answer_word_targets(rows, num_images)
    tower = model.model.vision_tower
    param = next(tower.parameters())
    head = torch.nn.Linear(model.config.vision_config.hidden_size, len(words)).to(param.device, param.dtype)
    optimizer = torch.optim.AdamW([*tower.parameters(), *head.parameters()], lr=learning_rate, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    was_training = tower.training
    tower.train()
    start, last = time.time(), float("nan")
    for step in range(steps):
        index = torch.randint(0, num_images, (batch_size,), generator=generator)
        pixels = torch.stack([images[str(i)] for i in index.tolist()]).to(param.device)
        features = model.model.get_vision_features(pixels)  # what the generator reads
        logits = head(features.mean(dim=1))
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets[index].to(logits))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        last = loss.item()
        if (step + 1) % max(1, steps // 5) == 0:
            log(f"tower warm start: step {step + 1}/{steps} loss {last:.4f} {time.time() - start:.0f} s")
    tower.train(was_training)
    return last


__all__ = ["answer_word_targets", "warm_start_tower"]
