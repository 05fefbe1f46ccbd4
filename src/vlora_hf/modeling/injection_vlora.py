"""Per-image low-rank deltas around the projections of a plain transformers backbone.

The backbone's modules and state-dict keys stay untouched: a forward hook on each target module adds
`(x @ A) @ Bᵀ`, with `A` chosen per batch row. The factors of the current call live in a `ContextVar`, not on
any module, so threads sharing one model never see each other's images, and gradient checkpointing restores the
same factors when it recomputes a layer (see `checkpoint_context`).
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass

import torch
from torch import nn

from .configuration_vlora import TARGET_MODULES, VLoRAConfig

_ACTIVE_DELTAS: contextvars.ContextVar[LowRankDeltas | None] = contextvars.ContextVar("vlora_deltas", default=None)


@dataclass(frozen=True)
class LowRankDeltas:
    """The factors of one forward call: A per row, B shared by all rows.

    A[target]: [batch, num_slots, d_in, r] (zeros for rows without an image); B[target]: [num_slots, d_out, r].
    """

    A: dict[str, torch.Tensor]
    B: dict[str, torch.Tensor]


def low_rank_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """x [b, s, d_in], A [b, d_in, r], B [d_out, r] -> (x @ A) @ Bᵀ [b, s, d_out]; each row its own A."""
    return torch.bmm(x, A.to(x.dtype)) @ B.to(x.dtype).t()


@contextlib.contextmanager
def deltas_applied(deltas: LowRankDeltas | None):
    """Make `deltas` the ones every hooked projection adds, for the duration of the block."""
    token = _ACTIVE_DELTAS.set(deltas)
    try:
        yield
    finally:
        _ACTIVE_DELTAS.reset(token)


def checkpoint_context():
    """`context_fn` for torch.utils.checkpoint: the recompute sees the deltas the forward saw."""
    captured = _ACTIVE_DELTAS.get()
    return contextlib.nullcontext(), deltas_applied(captured)


def _make_hook(target: str, slot: int):
    def add_delta(module: nn.Module, args: tuple, output: torch.Tensor):
        deltas = _ACTIVE_DELTAS.get()
        if deltas is None:
            return None
        x = args[0]
        A = deltas.A[target][:, slot]
        if A.shape[0] != x.shape[0]:
            raise ValueError(f"perceptual weights cover {A.shape[0]} rows but the batch has {x.shape[0]}")
        return output + low_rank_delta(x, A, deltas.B[target][slot])

    return add_delta


def attach_delta_hooks(language_model: nn.Module, config: VLoRAConfig) -> list:
    """Register one forward hook per (receiving layer, target); returns the handles."""
    layers = language_model.layers
    handles = []
    for slot, layer_idx in enumerate(config.receiving_layers):
        for target in config.target_modules:
            try:
                module = layers[layer_idx].get_submodule(TARGET_MODULES[target])
            except AttributeError as err:
                raise ValueError(
                    f"target {target!r} needs `{TARGET_MODULES[target]}` in each decoder layer, which "
                    f"{type(language_model).__name__} lacks"
                ) from err
            handles.append(module.register_forward_hook(_make_hook(target, slot)))
    return handles
