"""Held-out exact match per question family, measured every N optimizer steps while a run trains.

The clock that stamps each point counts training only: evaluation time is taken out, so accuracy can be
plotted against the time the optimizer actually spent.
"""

import time

import torch
from transformers import TrainerCallback

from ..data.shapes_families import question_family
from ..data.shapes_dataset import preprocess_bank
from ..training.evaluate import exact_match
from ..training.llava_baseline import is_llava


def family_scores(results: dict) -> dict[str, float]:
    """exact_match's per-question accuracies -> per-family accuracies (question-count weighted)."""
    hits: dict[str, float] = {}
    totals: dict[str, int] = {}
    for question, accuracy in results["per_question"].items():
        family, n = question_family(question), results["counts"][question]
        hits[family] = hits.get(family, 0.0) + accuracy * n
        totals[family] = totals.get(family, 0) + n
    return {f: hits[f] / totals[f] for f in hits}


class HeldoutSet:
    """The held-out images and rows, preprocessed once for VLoRA (LLaVA's processor expands `<image>` itself,
    so it takes the PIL images)."""

    def __init__(self, images, rows, max_new_tokens: int = 12, batch_size: int = 100):
        self.images, self.rows = images, rows
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self._bank = None

    def score(self, model, processor) -> dict:
        if is_llava(model):
            images = self.images
        else:
            if self._bank is None:
                self._bank = preprocess_bank(self.images, processor.image_processor)
            images = self._bank
        results = exact_match(model, processor, images, self.rows, max_new_tokens=self.max_new_tokens,
                              batch_size=self.batch_size)
        per_family = family_scores(results)
        return {"per_family": per_family, "overall": results["overall"], "errors": results["errors"][:5]}


class EvalAlongTraining(TrainerCallback):
    """Scores the model on `heldout` at step 0, every `every` steps and at the last step; `points` holds
    {"step", "train_seconds", "per_family", "overall"}. `setup_seconds`: from `start` (a time.time() stamp
    taken before the run built its model) to the first step -- model, data and tower warm start."""

    def __init__(self, heldout: HeldoutSet, every: int, start: float | None = None, log=print):
        self.heldout, self.every, self.log = heldout, max(1, int(every)), log
        self.start = start if start is not None else time.time()
        self.points: list[dict] = []
        self.setup_seconds = 0.0
        self._train_clock = 0.0
        self._since = 0.0

    def _point(self, state, model, processor):
        self._train_clock += time.time() - self._since
        with torch.no_grad():
            scored = self.heldout.score(model, processor)
        point = {"step": state.global_step, "train_seconds": self._train_clock, **scored}
        self.points.append(point)
        self.log(f"step {state.global_step}: held-out {100 * point['overall']:.1f} % "
                 + " ".join(f"{f} {100 * a:.0f}" for f, a in point["per_family"].items())
                 + f" ({self._train_clock:.0f} s of training)")
        self._since = time.time()

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        self.setup_seconds = time.time() - self.start
        self._since = time.time()
        if state.is_world_process_zero:
            self._point(state, model, processing_class)

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if state.is_world_process_zero and (state.global_step % self.every == 0 or state.global_step == state.max_steps):
            self._point(state, model, processing_class)

    @property
    def train_seconds(self) -> float:
        return self.points[-1]["train_seconds"] if self.points else 0.0


__all__ = ["EvalAlongTraining", "HeldoutSet", "family_scores"]
