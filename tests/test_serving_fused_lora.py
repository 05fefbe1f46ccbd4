"""The fused CPU LoRA wrapper against vLLM's own `PunicaWrapperCPU` (real vLLM objects, random factors), and the
platform plugin's activation and refusal through vLLM's own platform resolution. The served answers through the
fused path are checked in test_serving.py (a real engine against `generate`)."""

from __future__ import annotations

import logging

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed here: the serving tests run in .venv-serve "
                                   "(`make serving-setup`, or `make test`, which sets it up)")

from vlora_hf.serving import platform as plat  # noqa: E402

# vLLM's LoRA modules resolve vLLM's platform when imported (here: at collection, for the whole pytest process):
# ask for the fused one first, as `VLoRAEngine` does, so the engines the serving tests start get it.
plat.request_fused_lora()

from vllm.lora.layers.utils import LoRAMapping  # noqa: E402
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU  # noqa: E402

from vlora_hf.serving.fused_lora import FusedPunicaWrapperCPU  # noqa: E402

SLOTS, RANK, D_IN = 4, 8, 32
SLICES = (64, 16, 16)  # q, k, v of a GQA qkv_proj
IDS = [5, 7, None, 9]  # vLLM's slot -> adapter id (slot 2 free)


def stacked(slices, d_in=D_IN, dtype=torch.float32, seed=0):
    """vLLM's layout: per slice A [slots, 1, rank, d_in] and B [slots, 1, out, rank]; free slots are zero."""
    g = torch.Generator().manual_seed(seed)
    a = tuple(torch.randn(SLOTS, 1, RANK, d_in, generator=g).to(dtype) for _ in slices)
    b = tuple(torch.randn(SLOTS, 1, n, RANK, generator=g).to(dtype) for n in slices)
    for t in a + b:
        t[2] = 0
    return a, b


def mapping(lora_ids, lengths, prefill):
    tokens = [i for i, n in zip(lora_ids, lengths) for _ in range(n)]
    return LoRAMapping(tokens, tokens if not prefill else lora_ids, is_prefill=prefill)


def run(wrapper_cls, m, a, b, x, y, slices, ids=IDS):
    wrapper = wrapper_cls(64, 16, "cpu")
    wrapper.update_metadata(m, list(ids), SLOTS + 1, 1000)
    out = y.clone()
    wrapper.add_lora_linear(out, x, a, b, 1.0, slices)
    return out, wrapper


def by_hand(x, y, a, b, slots, slices):
    """Each token's own slot, every slice, in float64 (slot None: nothing added)."""
    out = y.double().clone()
    for t, slot in enumerate(slots):
        if slot is None:
            continue
        offset = 0
        for s, width in enumerate(slices):
            out[t, offset:offset + width] += (x[t].double() @ a[s][slot, 0].double().T) @ b[s][slot, 0].double().T
            offset += width
    return out


LORA_IDS, LENGTHS = [7, 0, 5, 9, 7], [3, 2, 4, 1, 2]  # 0: a request without an adapter
SLOT_OF = {5: 0, 7: 1, 9: 3, 0: None}


@pytest.mark.parametrize("prefill", [True, False])
@pytest.mark.parametrize("slices", [SLICES, (32,)])
def test_fused_equals_vllm_wrapper(prefill, slices):
    lengths = LENGTHS if prefill else [1] * len(LORA_IDS)
    a, b = stacked(slices)
    tokens = sum(lengths)
    x, y = torch.randn(tokens, D_IN), torch.randn(tokens, sum(slices))
    m = mapping(LORA_IDS, lengths, prefill)
    ours, wrapper = run(FusedPunicaWrapperCPU, m, a, b, x, y, slices)
    theirs, _ = run(PunicaWrapperCPU, m, a, b, x, y, slices)
    assert wrapper.fused_calls == 1
    slots = [SLOT_OF[i] for i, n in zip(LORA_IDS, lengths) for _ in range(n)]
    want = by_hand(x, y, a, b, slots, slices)
    assert torch.allclose(ours.double(), want, atol=1e-4, rtol=1e-5)
    has = torch.tensor([s is not None for s in slots])
    assert torch.allclose(ours[has], theirs[has], atol=1e-4, rtol=1e-5)  # vLLM's own, where it is right
    assert torch.equal(ours[~has], y[~has])  # no adapter: the backbone's output, exactly
    assert not torch.allclose(theirs[~has], y[~has])  # vLLM's CPU ops give those tokens the last slot's adapter


def test_rewritten_slot_is_picked_up():
    a, b = stacked(SLICES)
    x, y = torch.randn(4, D_IN), torch.randn(4, sum(SLICES))
    wrapper = FusedPunicaWrapperCPU(64, 16, "cpu")
    m = mapping([5, 7, 9, 5], [1] * 4, False)
    wrapper.update_metadata(m, IDS, SLOTS + 1, 1000)
    first = y.clone()
    wrapper.add_lora_linear(first, x, a, b, 1.0, SLICES)
    # vLLM evicts adapter 7 from slot 1 and writes adapter 11 there (set_lora copies into the stacked views)
    new_a, new_b = stacked(SLICES, seed=1)
    for s in range(len(SLICES)):
        a[s][1].copy_(new_a[s][1])
        b[s][1].copy_(new_b[s][1])
    ids = [5, 11, None, 9]
    wrapper.update_metadata(mapping([5, 11, 9, 5], [1] * 4, False), ids, SLOTS + 1, 1000)
    second = y.clone()
    wrapper.add_lora_linear(second, x, a, b, 1.0, SLICES)
    want = by_hand(x, y, a, b, [0, 1, 3, 0], SLICES)
    assert torch.allclose(second.double(), want, atol=1e-4, rtol=1e-5)
    assert not torch.allclose(first[1], second[1]) and torch.equal(first[0], second[0])
    # written without a change of id (vLLM's reset_lora / set_lora in place): the version counters notice
    for s in range(len(SLICES)):
        a[s][0].mul_(2)
    wrapper.update_metadata(mapping([5, 11, 9, 5], [1] * 4, False), ids, SLOTS + 1, 1000)
    third = y.clone()
    wrapper.add_lora_linear(third, x, a, b, 1.0, SLICES)
    assert torch.allclose(third.double(), by_hand(x, y, a, b, [0, 1, 3, 0], SLICES), atol=1e-4, rtol=1e-5)


def test_bfloat16_within_its_rounding():
    a, b = stacked(SLICES, dtype=torch.bfloat16)
    x, y = torch.randn(6, D_IN).bfloat16(), torch.randn(6, sum(SLICES)).bfloat16()
    m = mapping([5, 7, 9, 0, 5, 7], [1] * 6, False)
    ours, wrapper = run(FusedPunicaWrapperCPU, m, a, b, x, y, SLICES)
    want = by_hand(x, y, a, b, [0, 1, 3, None, 0, 1], SLICES)
    assert wrapper.fused_calls == 1
    theirs, _ = run(PunicaWrapperCPU, m, a, b, x, y, SLICES)
    has = torch.tensor([True, True, True, False, True, True])
    err = lambda got: float((got[has].double() - want[has]).abs().max() / want.abs().max())  # noqa: E731
    assert err(ours) < 1e-2 and err(ours) < 4 * err(theirs) + 1e-3  # bf16 rounding, as vLLM's own path
    assert torch.equal(ours[~has], y[~has])


def test_unaligned_width_falls_back_to_vllms_path():
    slices = (20,)  # not a multiple of 8: grouped_mm cannot take it
    a, b = stacked(slices, d_in=12)
    x, y = torch.randn(3, 12), torch.randn(3, 20)
    m = mapping([5, 7, 9], [1] * 3, False)
    ours, wrapper = run(FusedPunicaWrapperCPU, m, a, b, x, y, slices)
    theirs, _ = run(PunicaWrapperCPU, m, a, b, x, y, slices)
    assert wrapper.fused_calls == 0 and torch.equal(ours, theirs)


def test_platform_resolution(monkeypatch):
    """vLLM's own resolution: our CPU platform only when asked for; vLLM's CpuPlatform otherwise."""
    from vllm.platforms import resolve_current_platform_cls_qualname

    monkeypatch.delenv("VLLM_TARGET_DEVICE", raising=False)
    monkeypatch.delenv(plat.ENV, raising=False)
    assert resolve_current_platform_cls_qualname() == plat.VLLM_CPU_PLATFORM
    monkeypatch.setenv(plat.ENV, "1")
    assert resolve_current_platform_cls_qualname() == plat.PLATFORM
    cls = plat.VLoRACpuPlatform
    assert cls.get_punica_wrapper() == plat.WRAPPER and cls().is_cpu()
    from vllm.platforms.cpu import CpuPlatform

    assert issubclass(cls, CpuPlatform)
    monkeypatch.setenv(plat.ENV, "0")
    assert resolve_current_platform_cls_qualname() == plat.VLLM_CPU_PLATFORM


def test_refusal_names_the_reason(monkeypatch, caplog):
    assert plat.refusal(plat.TESTED_VLLM, plat.VLLM_CPU_PLATFORM) is None
    assert "not vllm.platforms.cpu.CpuPlatform" in plat.refusal(plat.TESTED_VLLM, "vllm.platforms.cuda.CudaPlatform")
    assert "not a CPU one" in plat.refusal(plat.TESTED_VLLM, None)
    import vllm.version

    monkeypatch.setenv(plat.ENV, "1")
    monkeypatch.setattr(vllm.version, "__version__", "0.33.0")
    with caplog.at_level(logging.WARNING, logger=plat.__name__):
        assert plat.activate() is None
    assert [r.getMessage() for r in caplog.records] == [
        "VLoRA fused CPU LoRA not activated (vLLM 0.33.0 is installed, the fused wrapper is tested on 0.32.0 only): "
        "vLLM's own platform and LoRA wrapper are used"]
