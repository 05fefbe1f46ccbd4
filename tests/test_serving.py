"""VLoRA on vLLM, offline: a real vLLM engine (CPU) on the shipped demo model against `VLoRAForCausalLM.generate`.

Runs in the serving venv (`make serving-setup`; `make test` runs it there). One small engine serves every test.
"""

from __future__ import annotations

import os

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="vLLM is not installed here: the serving tests run in .venv-serve "
                                          "(`make serving-setup`, or `make test`, which sets it up)")

from PIL import Image  # noqa: E402

from vlora_hf import VLoRAForCausalLM, demo_model_path  # noqa: E402
from vlora_hf.data.shapes import heldout_samples  # noqa: E402
from vlora_hf.processing import VLoRAProcessor  # noqa: E402
from vlora_hf.serving.adapters import AdapterFactory, image_key, write_adapter  # noqa: E402
from vlora_hf.answering import user_message  # noqa: E402

MAX_TOKENS = 16
IN_FLIGHT = 4


def reference_generate():
    """-> tokens(image or None, question): `VLoRAForCausalLM.generate`'s greedy new tokens for one request (one
    row, no padding), the demo model in fp32."""
    model = VLoRAForCausalLM.from_pretrained(demo_model_path(), dtype=torch.float32).eval()
    processor = VLoRAProcessor.from_pretrained(demo_model_path())
    tok = processor.tokenizer

    def tokens(image, question, max_new_tokens=MAX_TOKENS):
        messages = user_message(question) if image is not None else [{"role": "user", "content": question}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        enc = processor(images=None if image is None else [image], text=[text], return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        return out[0, enc["input_ids"].shape[1]:].tolist()

    return tokens


@pytest.fixture(scope="module")
def reference():
    return reference_generate()


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    saved = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process: one import, less RAM
    from vlora_hf.serving import VLoRAEngine

    factory = AdapterFactory(demo_model_path())
    folder = tmp_path_factory.mktemp("adapter")
    write_adapter(folder, factory.null_tensors(), factory.adapter_config)
    adapter = sum(f.stat().st_size for f in folder.iterdir())
    # Room for the images in flight plus the null adapter, and no more: every new image evicts an old one.
    eng = VLoRAEngine(demo_model_path(), max_images_in_flight=IN_FLIGHT, adapter_cache_bytes=(IN_FLIGHT + 1) * adapter,
                      max_loras=IN_FLIGHT, enforce_eager=True, kv_cache_memory_bytes=64 << 20, max_num_seqs=32,
                      dtype="float32")  # exactness in fp32 (the CPU default may be bf16)
    yield eng
    eng.close()
    if saved is None:
        os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING")
    else:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = saved


def _heldout(n):
    return [(s.image, q) for s in heldout_samples(n) for q, _ in s.qa]


def _vllm_tokens(engine, requests):
    return [list(out.outputs[0].token_ids) for out in engine.generate_outputs(requests, max_tokens=MAX_TOKENS)]


def test_image_answers_equal_generate(engine, reference):
    requests = _heldout(10)  # 20 questions about 10 held-out images, batched in rounds of IN_FLIGHT images
    got = _vllm_tokens(engine, requests)
    want = [reference(image, q) for image, q in requests]
    assert got == want
    assert len({tuple(t) for t in got}) > 3  # the images matter: not one answer for all


def test_lora_wraps_only_the_receiving_modules(engine):
    """vLLM wraps LoRA around the receiving layers' target modules alone (by default it would wrap every linear,
    the embedding and the LM head, and run the LoRA ops of all of them at every step)."""
    from vlora_hf.serving.vllm_names import lora_target_modules

    runner = engine.llm.llm_engine.model_executor.driver_worker.worker.model_runner
    wrapped = sorted(runner.lora_manager._adapter_manager.modules)
    assert wrapped == lora_target_modules(engine.config.target_modules, engine.config.receiving_layers)


def test_lora_runs_through_the_fused_wrapper(engine):
    """`VLoRAEngine` asks for the fused CPU LoRA platform (platform.py); every answer in this file went through it."""
    from vlora_hf.serving.fused_lora import FusedPunicaWrapperCPU

    runner = engine.llm.llm_engine.model_executor.driver_worker.worker.model_runner
    wrapper = runner.lora_manager._adapter_manager.punica_wrapper_mapping
    wrapper = next(iter(wrapper.values()))
    assert type(wrapper) is FusedPunicaWrapperCPU
    calls = wrapper.fused_calls
    _vllm_tokens(engine, _heldout(1))
    assert wrapper.fused_calls > calls


def test_text_only_requests_beside_image_requests(engine, reference):
    """A request without an image gets the backbone's own answer, also beside image requests. With every LoRA slot
    taken (IN_FLIGHT images, max_loras=IN_FLIGHT), a request without an adapter would get the last slot's adapter
    on vLLM's CPU backend (measured: 2 of these 2 text-only answers change); the null adapter prevents it."""
    images = [s.image for s in heldout_samples(IN_FLIGHT)]
    requests = [(images[0], "What color is the shape?"), (None, "What color is the shape?"),
                (images[1], "How many shapes are there?"), (None, "Describe the image."),
                *[(image, "What shape is this?") for image in images[2:]]]
    got = _vllm_tokens(engine, requests)
    want = [reference(image, q) for image, q in requests]
    assert got == want
    assert _vllm_tokens(engine, [requests[1], requests[3]]) == [got[1], got[3]]
    assert got[1] != reference(images[0], "What color is the shape?")  # text-only really differs from with-image


def test_same_image_twice_uses_one_adapter(engine, reference):
    image = heldout_samples(21)[20].image
    copy = Image.frombytes(image.mode, image.size, image.tobytes())  # another object, same pixels
    writes = engine.store.writes
    got = _vllm_tokens(engine, [(image, "What color is the shape?"), (copy, "What shape is this?")])
    assert engine.store.writes == writes + 1
    assert image_key(copy) in engine.store
    assert got == [reference(image, "What color is the shape?"), reference(image, "What shape is this?")]


def test_eviction_under_a_tiny_cap_keeps_answers_right(engine, reference):
    samples = heldout_samples(32)[22:32]  # 10 new images through a store holding 4 (+ the null adapter)
    requests = [(s.image, s.qa[0][0]) for s in samples]
    writes = engine.store.writes
    got = _vllm_tokens(engine, requests)
    assert engine.store.writes == writes + len(samples)
    assert len(engine.store) == IN_FLIGHT + 1
    assert engine.store.nbytes <= engine.store.max_bytes
    assert sorted(p.name for p in engine.store.root.iterdir()) == sorted(
        a.path.name for a in engine.store._entries.values())  # evicted adapters leave no files
    evicted_again = _vllm_tokens(engine, requests[:2])  # their adapters were evicted: written afresh
    assert engine.store.writes == writes + len(samples) + 2
    want = [reference(image, q) for image, q in requests]
    assert got == want and evicted_again == want[:2]
