"""Fused CPU LoRA for vLLM: every slice of a module and every token of a step in two grouped matmuls.

vLLM's `PunicaWrapperCPU` runs, per slice (q, k, v of `qkv_proj`; one for o or `m`), a gather of each token's
factor, an einsum and a copy for the shrink, and the same for the expand: ~50 dispatched torch ops per module and
step. This wrapper keeps, per wrapped module, one fused copy of vLLM's stacked factors

    A: [slots + 1, d_in, K]       every slice's Aᵀ side by side (K = slices · rank, padded to a multiple of 8)
    B: [slots + 1, K, d_out]      block-diagonal: slice s's Bᵀ at rows s·rank.., columns of its output slice

whose last slot is all zero, and per step each token's slot (computed once per step for all modules).

- Prefill (many tokens per request): tokens grouped by slot (one sort per step); a module's LoRA is `x[order]` →
  `grouped_mm(·, A)` → `grouped_mm(·, B)` → `y += ·[unorder]`: five ops, FLOPs only for each token's own slot, no
  per-token copy of the factors.
- Decode (one token per request): each token's fused factors gathered, then one batched matmul for the shrink and
  one for the expand (`grouped_mm` would run one small matmul per slot, each its own parallel region). The block-diagonal B spends (slices − 1)
zero blocks on the expand (~1 % of a receiving layer's FLOPs for q/k/v); the zeros add exactly nothing.

A token without an adapter (vLLM's index -1) lands on the zero slot (Python's index -1 is the last slot), so it
gets the backbone's own output; vLLM's CPU ops would give it the last real slot's adapter.

The fused copy is refreshed only where vLLM rewrote a slot: the slots whose adapter id changed since the module's
last refresh (vLLM writes the factors before it updates the step's mapping), checked against the stacked tensors'
version counters (no op is dispatched for the check).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

ALIGN = 8  # grouped_mm wants 16-byte strides: 8 bf16 / 4 fp32 values


def _padded(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass
class FusedFactors:
    """One module's fused factors and what they were built from."""

    A: torch.Tensor  # [slots + 1, d_in, K]
    B: torch.Tensor  # [slots + 1, K, d_out]
    stacked: tuple  # vLLM's (lora_a_stacked, lora_b_stacked), kept so their ids stay valid
    versions: tuple[int, ...]
    generations: list[int]  # per slot: the wrapper's slot generation this copy holds


def _versions(stacked) -> tuple[int, ...]:
    return tuple(t._version for group in stacked for t in group)


class FusedPunicaWrapperCPU(PunicaWrapperCPU):
    """vLLM's CPU punica wrapper with `add_lora_linear` fused; everything else (embeddings, logits, the metadata)
    is vLLM's own. Falls back to vLLM's path for calls outside its assumptions (tensor-parallel offsets, factor
    dtypes or widths grouped_mm cannot take)."""

    def __init__(self, max_num_batched_tokens: int, max_batches: int, device, **kwargs):
        super().__init__(max_num_batched_tokens, max_batches, device, **kwargs)
        self._fused: dict[int, FusedFactors] = {}
        self._slot_ids: tuple = ()
        self._slot_generation: list[int] = []
        self._order: torch.Tensor | None = None  # tokens sorted by slot (None: already sorted)
        self._unorder: torch.Tensor | None = None  # its inverse permutation
        self._offsets: torch.Tensor | None = None  # [slots + 1] int32 group ends
        self._tokens = -1  # tokens in this step
        self._any_lora = False
        self.fused_calls = 0  # how many module calls took the fused path (tests)

    # ----- per step ---------------------------------------------------------------------------------------
    def update_metadata(self, mapping, lora_index_to_id, max_loras, vocab_size, **kwargs):
        super().update_metadata(mapping, lora_index_to_id, max_loras, vocab_size, **kwargs)
        ids = tuple(lora_index_to_id)
        if len(self._slot_generation) != len(ids):
            self._slot_generation = [0] * len(ids)
            self._slot_ids = (None,) * len(ids)
        for slot, (old, new) in enumerate(zip(self._slot_ids, ids)):
            if old != new:
                self._slot_generation[slot] += 1
        self._slot_ids = ids
        slots = len(ids)
        token_slots = self.token_lora_indices.remainder(slots + 1)  # -1 -> the zero slot `slots`
        counts = torch.bincount(token_slots, minlength=slots + 1)
        self._any_lora = bool(counts[:slots].any())
        self._offsets = counts.cumsum(0).to(torch.int32)
        self._tokens = token_slots.numel()
        self._token_slots = token_slots
        ordered = bool((token_slots[1:] >= token_slots[:-1]).all()) if token_slots.numel() > 1 else True
        self._order = None if ordered else torch.argsort(token_slots, stable=True)
        self._unorder = None if ordered else torch.argsort(self._order)

    # ----- per module -------------------------------------------------------------------------------------
    def _factors(self, lora_a_stacked, lora_b_stacked, output_slices, dtype) -> FusedFactors | None:
        key = id(lora_a_stacked[0])
        entry = self._fused.get(key)
        stacked = (tuple(lora_a_stacked), tuple(lora_b_stacked))
        versions = _versions(stacked)
        if entry is not None and entry.stacked[0][0] is lora_a_stacked[0] and entry.A.dtype == dtype:
            if entry.versions == versions:
                return entry
        else:
            slots, _, rank, d_in = lora_a_stacked[0].shape
            d_out = sum(output_slices)
            if slots != len(self._slot_generation) or d_in % ALIGN or d_out % ALIGN:
                return None
            k = _padded(len(lora_a_stacked) * rank)
            entry = FusedFactors(A=torch.zeros(slots + 1, d_in, k, dtype=dtype),
                                 B=torch.zeros(slots + 1, k, d_out, dtype=dtype), stacked=stacked,
                                 versions=(), generations=[-1] * slots)
            self._fused[key] = entry
        self._refresh(entry, output_slices)
        entry.versions = versions
        return entry

    def _refresh(self, entry: FusedFactors, output_slices) -> None:
        """Copy the slots vLLM rewrote since this copy was made (all of them if none is known to have changed)."""
        dirty = [s for s, g in enumerate(self._slot_generation) if entry.generations[s] != g]
        if not dirty:
            dirty = list(range(len(self._slot_generation)))
        a_stacked, b_stacked = entry.stacked
        rank = a_stacked[0].shape[2]
        index = torch.tensor(dirty)
        with torch.no_grad():  # one copy per slice and factor for all dirty slots
            offset = 0
            for s, (a, b, width) in enumerate(zip(a_stacked, b_stacked, output_slices)):
                entry.A[index, :, s * rank:(s + 1) * rank] = a[index, 0].transpose(1, 2).to(entry.A.dtype)
                entry.B[index, s * rank:(s + 1) * rank, offset:offset + width] = (
                    b[index, 0, :width].transpose(1, 2).to(entry.B.dtype))
                offset += width
        for slot in dirty:
            entry.generations[slot] = self._slot_generation[slot]

    def add_lora_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, *, buffer=None,
                        **kwargs):
        fits = (x.dim() == 2 and y.dim() == 2 and x.size(0) == self._tokens
                and y.size(1) == sum(output_slices) and x.dtype == y.dtype and not kwargs.get("offset_start"))
        factors = self._factors(lora_a_stacked, lora_b_stacked, output_slices, x.dtype) if fits else None
        if factors is None:
            return super().add_lora_linear(y, x, lora_a_stacked, lora_b_stacked, scale, output_slices,
                                           buffer=buffer, **kwargs)
        self.fused_calls += 1
        if not self._any_lora:
            return None
        if not self.is_prefill:  # one token per request: each token's factors gathered, one batched matmul each
            h = torch.bmm(x.unsqueeze(1), factors.A[self._token_slots])
            if scale != 1.0:
                h = h * scale
            y.add_(torch.bmm(h, factors.B[self._token_slots]).squeeze(1))
            return None
        rows = x if self._order is None else x[self._order]
        h = torch._grouped_mm(rows, factors.A, offs=self._offsets)
        if scale != 1.0:
            h = h * scale
        out = torch._grouped_mm(h, factors.B, offs=self._offsets)
        y.add_(out if self._unorder is None else out[self._unorder])  # a gather: index_add_ is a slow scatter here
        return None
