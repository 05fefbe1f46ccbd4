"""Step time and time to first token of the two trained systems measured in one process, alternating between
them, so that both see the same machine load (on a shared machine, times taken in separate runs are not
comparable; the ratio of interleaved ones is)."""

import statistics
import time

import torch

from ..data import shapes_families
from ..data.llava import LLaVACollator
from ..data.shapes_dataset import shapes_dataset
from ..training.llava_baseline import ExpandImageTokens, image_tokens, is_llava
from .cost import _prompt


def _batch(model, processor, images, rows):
    dataset = shapes_dataset(images, rows, processor)
    collate = LLaVACollator(processor.tokenizer.pad_token_id)
    if is_llava(model):
        collate = ExpandImageTokens(collate, processor.image_token_id, image_tokens(model))
    return collate([dataset[i] for i in range(len(dataset))])


def _train_step(model, optimizer, batch) -> float:
    start = time.perf_counter()
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def measure(systems: dict, batch_size: int = 48, steps: int = 12, questions: int = 12) -> dict:
    """systems: {name: (model, processor)} -> {name: {"step_seconds", "ttft_ms"}} (medians, interleaved)."""
    images, rows = shapes_families.make_family_rows(batch_size // 2, {"relation": batch_size // 8, "small": batch_size // 8})
    rows = rows[:batch_size]
    batches = {n: _batch(m, p, images, rows) for n, (m, p) in systems.items()}
    optimizers = {n: torch.optim.AdamW(m.parameters(), lr=0.0) for n, (m, _) in systems.items()}  # lr 0: no change
    step_times = {n: [] for n in systems}
    for _ in range(steps + 1):  # the first round warms up
        for n, (m, _) in systems.items():
            m.train()
            step_times[n].append(_train_step(m, optimizers[n], batches[n]))
    ttft = {n: [] for n in systems}
    with torch.inference_mode():
        for i, q, _ in rows[:: max(1, len(rows) // questions)][:questions]:
            for n, (m, p) in systems.items():
                m.eval()
                enc = _prompt(m, p, images[i], q)
                best = float("inf")
                for _ in range(3):
                    start = time.perf_counter()
                    m.generate(**enc, max_new_tokens=1, do_sample=False, pad_token_id=p.tokenizer.pad_token_id)
                    best = min(best, time.perf_counter() - start)
                ttft[n].append(best)
    return {n: {"step_seconds": statistics.median(step_times[n][1:]), "ttft_ms": 1000 * statistics.median(ttft[n]),
                "batch_size": len(rows), "steps": steps, "questions": len(ttft[n])} for n in systems}


def untrained(flags: list[str], tokenizer_images: int = 2000):
    """(model, processor) built as `vlora-hf train FLAGS` builds them, before any training (no tower warm start;
    the tokenizer from the first `tokenizer_images` training images): for timing a system whose trained folder is
    gone, since a step's and a first token's time do not depend on the weights' values."""
    from ..data.shapes_dataset import training_rows
    from ..training.arguments import parse_args
    from ..training.llava_baseline import build_llava
    from ..training.model_builder import build_model_and_processor

    model_args, data_args = parse_args(flags)[:2]
    _, rows = training_rows(min(tokenizer_images, data_args.num_images), data_args.shapes_seed, data_args.image_size,
                            data_args.question_weights, data_args.shapes_families)
    build = build_llava if model_args.architecture == "llava" else build_model_and_processor
    return build(model_args, rows)


__all__ = ["measure", "untrained"]
