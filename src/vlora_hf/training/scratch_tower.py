"""A vision tower trained from scratch: its initialisation and a supervised warm start.

The release's tower is a pretrained CLIP. A tower trained from scratch only through the generated weight deltas
learns shape features slowly (the signal reaches it through the generator and the LLM), so two things help:

- initialisation: a fan-in patch projection and fixed 2-D sine/cosine positions (on shapes-vqa, 69 % vs 53 %
  shape accuracy after 400 classifier steps for the patch init alone);
- a warm start: a short supervised pass -- the mean of the tower's features (those the generator reads) -> one
  linear layer -> which answer words (``red``, ``circle``, ``3``, ``squares``, ...) the image's questions have,
  as multi-label targets -- gives the tower features the generator can read from the first VLoRA step. The
  linear head is thrown away. Under a multi-process launch the processes split each batch and average
  gradients (data parallel), so the warm start costs 1/world of its single-process wall time and every process
  ends with the same tower.
"""

import logging
import time

import torch
from transformers import SchedulerType, get_scheduler

logger = logging.getLogger(__name__)


def sincos_2d(grid: int, dim: int, with_cls: bool) -> torch.Tensor:
    """2-D sine/cosine position table [(cls) + grid*grid, dim] (x in the first half, y in the second)."""
    quarter = dim // 4
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    omega = 1.0 / (100 ** (torch.arange(quarter) / max(1, quarter)))
    table = torch.zeros(grid * grid, dim)
    for i, coord in enumerate((xs, ys)):
        angles = coord.flatten()[:, None].float() * omega[None]
        table[:, 2 * i * quarter : (2 * i + 1) * quarter] = angles.sin()
        table[:, (2 * i + 1) * quarter : (2 * i + 2) * quarter] = angles.cos()
    if with_cls:
        table = torch.cat([torch.zeros(1, dim), table])
    return table


@torch.no_grad()
def init_scratch_tower(model, patch_embedding: str | None = None, position_embedding: str | None = None) -> None:
    """patch_embedding "fan_in": normal(0, fan_in^-1/2) patch weights; position_embedding "sincos": `sincos_2d`."""
    emb = getattr(model.model.vision_tower, "vision_model", model.model.vision_tower).embeddings
    if patch_embedding == "fan_in":
        w = emb.patch_embedding.weight
        w.normal_(0.0, w[0].numel() ** -0.5)
    elif patch_embedding is not None:
        raise ValueError(f"scratch_tower.patch_embedding must be 'fan_in', got {patch_embedding!r}")
    if position_embedding == "sincos":
        table = emb.position_embedding.weight
        vc = model.config.vision_config
        grid = vc.image_size // vc.patch_size
        table.copy_(sincos_2d(grid, table.shape[1], with_cls=table.shape[0] == grid * grid + 1))
    elif position_embedding is not None:
        raise ValueError(f"scratch_tower.position_embedding must be 'sincos', got {position_embedding!r}")



# The warm start's settings (scratch_tower.warm_start) with their types; freeze_tower is applied after it.
WARM_START_ARGS = {"steps": int, "learning_rate": float, "batch_size": int, "lr_scheduler_type": str,
                   "warmup_steps": int}


def answer_word_targets(rows, num_images: int) -> tuple[torch.Tensor, list[str]]:
    """rows (image index, question, answer) -> multi-hot [num_images, W] over the answers' words, the words."""
    words = sorted({w for _, _, a in rows for w in a.split()})
    column = {w: j for j, w in enumerate(words)}
    targets = torch.zeros(num_images, len(words))
    for i, _, answer in rows:
        for w in answer.split():
            targets[i, column[w]] = 1.0
    return targets, words


def check_schedule(lr_scheduler_type: str = "constant", warmup_steps: int = 0) -> None:
    """One clear error for an unknown schedule name, or a warm-up the schedule would ignore."""
    names = [t.value for t in SchedulerType]
    if lr_scheduler_type not in names:
        raise ValueError(f"warm_start.lr_scheduler_type must be one of {names}, got {lr_scheduler_type!r}")
    if warmup_steps and lr_scheduler_type == "constant":
        raise ValueError("warm_start: the 'constant' schedule has no warm-up; use 'constant_with_warmup' "
                         f"for warmup_steps={warmup_steps}")


def warm_start_tower(model, images, rows, steps: int, learning_rate: float = 1e-3, batch_size: int = 48,
                     lr_scheduler_type: str = "constant", warmup_steps: int = 0, seed: int = 0) -> float:
    """Train `model`'s vision tower (in place) for `steps` on answer-word targets; returns the last loss.

    images: the preprocessed training images, ``images[str(i)]`` = pixels [3, H, W] of row image index i (a
    `LLaVADataset`'s in-memory ``images``). batch_size is the global batch: with an initialised process group
    each of the `world` processes computes batch_size / world rows of it. lr_scheduler_type is any of
    transformers' schedule names ("constant", "cosine", ...); all but "constant" start with `warmup_steps`
    of linear warm-up."""
    check_schedule(lr_scheduler_type, warmup_steps)
    if steps <= 0:
        return float("nan")
    num_images = len(images)
    targets, words = answer_word_targets(rows, num_images)
    tower = model.model.vision_tower
    param = next(tower.parameters())
    head = torch.nn.Linear(model.config.vision_config.hidden_size, len(words)).to(param.device, param.dtype)
    params = [*tower.parameters(), *head.parameters()]
    rank, world = _process_group()
    if batch_size < world:
        raise ValueError(f"scratch_tower.warm_start.batch_size={batch_size} is the global batch: it must be at "
                         f"least the number of processes ({world})")
    if world > 1:  # identical starting point everywhere (the head is drawn per process)
        for p in params:
            torch.distributed.broadcast(p.data, src=0)
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    scheduler = get_scheduler(lr_scheduler_type, optimizer, num_warmup_steps=warmup_steps, num_training_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    was_training = tower.training
    tower.train()
    start, last = time.time(), float("nan")
    for step in range(steps):
        index = torch.randint(0, num_images, (batch_size,), generator=generator)[rank::world]  # same draw everywhere
        pixels = torch.stack([images[str(i)] for i in index.tolist()]).to(param.device)
        features = model.model.get_vision_features(pixels)  # what the generator reads
        logits = head(features.mean(dim=1))
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets[index].to(logits))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:
            _average_gradients(params, world)
        optimizer.step()
        scheduler.step()
        last = loss.item()
        if (step + 1) % max(1, steps // 5) == 0:
            logger.info(f"tower warm start: step {step + 1}/{steps} loss {last:.4f} {time.time() - start:.0f} s")
    tower.train(was_training)
    return last


def _process_group() -> tuple[int, int]:
    """(rank, world size) of the initialised torch.distributed group, (0, 1) without one."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _average_gradients(params, world: int) -> None:
    grads = [p.grad for p in params if p.grad is not None]  # the same set everywhere (unused: final norm)
    flat = torch.cat([g.reshape(-1) for g in grads])  # one all-reduce per step, not one per tensor
    torch.distributed.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


__all__ = ["WARM_START_ARGS", "answer_word_targets", "check_schedule", "init_scratch_tower", "sincos_2d", "warm_start_tower"]
