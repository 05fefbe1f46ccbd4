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

from .configuration_vlora import VLoRAConfig

_ACTIVE_DELTAS: contextvars.ContextVar[LowRankDeltas | None] = contextvars.ContextVar("vlora_deltas", default=None)


@dataclass(frozen=True)
class LowRankDeltas:
    """The factors of one forward call: A per row, B shared by all rows.

    A[target][slot]: [batch, d_in, r] (zeros for rows without an image).
    Bt[target]: [num_slots, r, d_out], B already scaled by alpha / r and transposed, made once per call so the
    hooks (one per layer and target, run at every decode step) do nothing but the two matmuls.
    """

    A: dict[str, tuple[torch.Tensor, ...]]
    Bt: dict[str, torch.Tensor]

    @classmethod
    def build(cls, A: dict[str, torch.Tensor], B: dict[str, torch.Tensor], dtype: torch.dtype) -> LowRankDeltas:
        """A [batch, num_slots, d_in, r] per row and scaled B [num_slots, d_out, r] per target, in the backbone's
        dtype. A is unbound into its slots once here: indexing a slot in every hook would make the backward pass
        build a zero-filled gradient of the whole A per (layer, target)."""
        return cls(
            A={t: a.to(dtype).unbind(1) for t, a in A.items()},
            Bt={t: b.to(dtype).transpose(1, 2).contiguous() for t, b in B.items()},
        )


def add_low_rank_delta(out: torch.Tensor, x: torch.Tensor, A: torch.Tensor, Bt: torch.Tensor) -> torch.Tensor:
    """out + (x @ A) @ Bt: x [b, s, d_in], A [b, d_in, r] (each row its own), Bt [r, d_out] shared."""
    if A.dtype != x.dtype:  # e.g. under autocast
        A, Bt = A.to(x.dtype), Bt.to(x.dtype)
    xa = torch.bmm(x, A)
    return torch.baddbmm(out.to(xa.dtype), xa, Bt.expand(x.shape[0], -1, -1))


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
        A = deltas.A[target][slot]
        if A.shape[0] != x.shape[0]:
            raise ValueError(f"perceptual weights cover {A.shape[0]} rows but the batch has {x.shape[0]}")
        return add_low_rank_delta(output, x, A, deltas.Bt[target][slot])

    return add_delta


def attach_delta_hooks(language_model: nn.Module, config: VLoRAConfig) -> list:
    """Register one forward hook per (receiving layer, target); returns the handles."""
    layers, paths = language_model.layers, config.module_paths
    handles = []
    for slot, layer_idx in enumerate(config.receiving_layers):
        for target in config.target_modules:
            try:
                module = layers[layer_idx].get_submodule(paths[target])
            except AttributeError as err:
                raise ValueError(
                    f"target {target!r} needs `{paths[target]}` in each decoder layer, which "
                    f"{type(language_model).__name__} lacks (set target_module_paths in the config)"
                ) from err
            handles.append(module.register_forward_hook(_make_hook(target, slot)))
    return handles
