"""`VLoRAEngine`: offline batch inference of a VLoRA checkpoint on vLLM, one LoRA adapter per distinct image.

    engine = VLoRAEngine("path/to/checkpoint")          # vLLM engine options as keywords
    engine.generate([(image, "What color is the shape?"), (None, "Say hello.")], max_tokens=32)

vLLM runs the checkpoint's backbone (exported once into a cache folder); the tower and the generator run here,
batched, and each image's factors become a PEFT adapter in a RAM-backed store. Requests without an image get an
all-zero adapter: on vLLM's CPU backend a request without one, batched with requests that have one, would
otherwise get the adapter of the last slot.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..processing.image_loading_vlora import load_image
from .adapters import AdapterFactory, image_key, write_adapter
from .cpu import cpu_dtype, share_cores
from .export import cached_export
from .platform import request_fused_lora
from .plugin import TOKENIZER_MODE
from .store import NULL_KEY, Adapter, AdapterStore
from .vllm_names import lora_target_modules

CPU_KV_CACHE_BYTES = 1 << 30
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed max_lora_rank values


def lora_rank_slot(rank: int) -> int:
    """The smallest `max_lora_rank` vLLM accepts that holds adapters of `rank`."""
    for slot in LORA_RANKS:
        if slot >= rank:
            return slot
    raise ValueError(f"lora_rank {rank} is larger than vLLM's largest max_lora_rank ({LORA_RANKS[-1]})")


def resolve_model(model) -> Path:
    if model is None:
        from .. import demo_model_path

        return demo_model_path()
    path = Path(model)
    if not (path / "config.json").is_file():
        raise ValueError(f"{model} is not a checkpoint folder (no config.json); download Hub models first")
    return path


def dtype_name(config) -> str:
    """The checkpoint's weights dtype ('float32', 'bfloat16', ...)."""
    return str(config.dtype or "float32").removeprefix("torch.")


def engine_defaults(model_dir, config, max_images_in_flight: int) -> dict:
    """vLLM engine options that serve `model_dir` (its backbone exported once into a cache folder). dtype: the
    checkpoint's on GPUs; on CPUs bf16 where native, else fp32 (cpu.py). Also asks for the fused CPU LoRA platform
    (platform.py) and, on small machines, every core for vLLM's worker, in this process and those vLLM starts."""
    request_fused_lora()
    options = dict(
        model=str(cached_export(model_dir)),
        enable_lora=True,
        max_lora_rank=lora_rank_slot(config.lora_rank),
        max_loras=max_images_in_flight + 1,  # + the null adapter
        lora_target_modules=lora_target_modules(config.target_modules, config.receiving_layers),
        tokenizer_mode=TOKENIZER_MODE,
        dtype=dtype_name(config),
    )
    if not torch.cuda.is_available():
        options["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES  # vLLM's CPU backend otherwise reserves 92 % of RAM
        options["dtype"] = cpu_dtype()  # bf16 where the CPU has it natively (cpu.py)
        share_cores()
    return options


@dataclass
class Prompt:
    """One request, tokenized: the prompt without its placeholder, and its image (None: text only)."""

    token_ids: list[int]
    image: object = None


class ServingCore:
    """What the offline engine and the HTTP server share: the checkpoint's image side, tokenizer and adapters."""

    def __init__(self, model=None, max_images_in_flight: int = 16, adapter_cache_bytes: int | None = None,
                 image_device: str | None = None, image_batch_size: int = 16, adapter_dir=None):
        from .. import VLoRAConfig
        from ..processing import VLoRAProcessor

        if max_images_in_flight < 1:
            raise ValueError(f"max_images_in_flight must be at least 1, got {max_images_in_flight}")
        self.model_dir = resolve_model(model)
        self.config = VLoRAConfig.from_pretrained(self.model_dir)
        self.processor = VLoRAProcessor.from_pretrained(self.model_dir)
        self.image_token_id = int(self.config.image_token_id)
        self.max_images_in_flight = max_images_in_flight
        device = image_device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.float32 if device == "cpu" else getattr(torch, dtype_name(self.config))
        self.factory = AdapterFactory(self.model_dir, device=device, dtype=dtype, batch_size=image_batch_size)
        null = self.factory.null_tensors()
        self.store = AdapterStore(adapter_cache_bytes or 1 << 40, root=adapter_dir, on_evict=self._forget)
        self.null_adapter = self.store.put(NULL_KEY, lambda d: write_adapter(d, null, self.factory.adapter_config),
                                           0)  # pinned for good
        self.adapter_bytes = self.null_adapter.nbytes  # every adapter of a checkpoint has the same size
        needed = (max_images_in_flight + 1) * self.adapter_bytes
        if adapter_cache_bytes is None:
            self.store.max_bytes = max(4 * needed, 64 << 20)
        elif adapter_cache_bytes < needed:
            self.store.close()
            raise ValueError(
                f"adapter_cache_bytes={adapter_cache_bytes} cannot hold {max_images_in_flight} images in flight plus "
                f"the null adapter ({self.adapter_bytes} bytes each): give at least {needed}"
            )

    def _forget(self, adapter: Adapter) -> None:
        """Hook for subclasses: an adapter left the store."""

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.config)

    def engine_kwargs(self, **user) -> dict:
        """vLLM engine options for this checkpoint; the caller's options win."""
        return {**engine_defaults(self.model_dir, self.config, self.max_images_in_flight), **user}

    # ----- prompts ----------------------------------------------------------------------------------------
    def tokenize(self, image, prompt) -> Prompt:
        """(image or None, question string or chat messages) -> the prompt vLLM runs. The image may be anything
        the processor reads (PIL, path, bytes, array; URLs under its remote-image policy)."""
        image = None if image is None else load_image(image)
        if isinstance(prompt, str):
            content = [{"type": "text", "text": prompt}]
            messages = [{"role": "user", "content": ([{"type": "image"}] if image is not None else []) + content}]
        elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
            messages = list(prompt)
        else:
            raise ValueError(f"a prompt must be a string or a non-empty list of chat messages, got {prompt!r}")
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = self.processor.tokenizer(text)["input_ids"]
        placeholders = ids.count(self.image_token_id)
        if placeholders != (image is not None):
            raise ValueError(
                f"a request with {'an image' if image is not None else 'no image'} needs "
                f"{int(image is not None)} {self.processor.image_token} placeholder(s) in its prompt, found "
                f"{placeholders} (VLoRA takes one image per sequence)"
            )
        return Prompt([t for t in ids if t != self.image_token_id], image)

    # ----- adapters ---------------------------------------------------------------------------------------
    def adapters_for(self, images) -> list[Adapter]:
        """One pinned adapter per PIL image (release each); new distinct images go through the tower together."""
        keys = [image_key(im) for im in images]
        pinned = []
        try:
            found = {}
            for k in dict.fromkeys(keys):
                found[k] = self.store.acquire(k)
                if found[k] is not None:
                    pinned.append(found[k])
            new = [k for k, a in found.items() if a is None]
            if new:
                weights = self.factory.perceptual_weights([images[keys.index(k)] for k in new])
                for k, w in zip(new, weights):
                    tensors = self.factory.tensors(w)
                    found[k] = self.store.put(
                        k, lambda d, t=tensors: write_adapter(d, t, self.factory.adapter_config), self.adapter_bytes)
                    pinned.append(found[k])
            for k in dict.fromkeys(keys):  # one pin per request, not per distinct image
                for _ in range(keys.count(k) - 1):
                    pinned.append(self.store.acquire(k))
        except BaseException:
            for adapter in pinned:
                self.store.release(adapter)
            raise
        return [found[k] for k in keys]

    def close(self) -> None:
        self.store.close()


class VLoRAEngine(ServingCore):
    """Offline batch inference on vLLM. `VLoRAEngine(model, **vllm_kwargs)`; `model` defaults to the demo model.

    Options of ours: `max_images_in_flight` (distinct images pinned at once, default 16; vLLM's `max_loras` is
    one more, for the null adapter), `adapter_cache_bytes`, `adapter_dir`, `image_device`, `image_batch_size`. Every other
    keyword goes to `vllm.LLM` (e.g. `tensor_parallel_size`, `dtype`, `max_model_len`, `enforce_eager`).
    """

    def __init__(self, model=None, *, max_images_in_flight: int = 16, adapter_cache_bytes: int | None = None,
                 image_device: str | None = None, image_batch_size: int = 16, adapter_dir=None, **vllm_kwargs):
        super().__init__(model, max_images_in_flight, adapter_cache_bytes, image_device, image_batch_size, adapter_dir)
        request_fused_lora()  # before vLLM resolves its platform (importing vllm.LLM does)
        from vllm import LLM

        self.llm = LLM(**self.engine_kwargs(**vllm_kwargs))

    def generate_outputs(self, requests, sampling_params=None, use_tqdm: bool = False, **sampling):
        """[(image or None, prompt or messages), ...] -> vLLM `RequestOutput`s, in order.

        Distinct images are pinned at most `max_images_in_flight` at a time, so a store smaller than the whole
        batch still answers it (in rounds)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.lora.request import LoRARequest

        if sampling_params is None:
            sampling_params = SamplingParams(**{"temperature": 0.0, "max_tokens": 64, **sampling})
        elif sampling:
            raise ValueError("pass either sampling_params or sampling keywords, not both")
        prompts = [self.tokenize(image, prompt) for image, prompt in requests]
        outputs = [None] * len(prompts)
        for chunk in self._rounds(prompts):
            images = [prompts[i].image for i in chunk if prompts[i].image is not None]
            adapters = iter(self.adapters_for(images))
            used = [next(adapters) if prompts[i].image is not None else self.null_adapter for i in chunk]
            try:
                results = self.llm.generate(
                    [TokensPrompt(prompt_token_ids=prompts[i].token_ids) for i in chunk], sampling_params,
                    lora_request=[LoRARequest(a.name, a.int_id, str(a.path)) for a in used], use_tqdm=use_tqdm,
                )
            finally:
                for a in used:
                    if a is not self.null_adapter:
                        self.store.release(a)
            for i, result in zip(chunk, results):
                outputs[i] = result
        return outputs

    def generate(self, requests, sampling_params=None, **sampling) -> list[str]:
        """[(image or None, prompt or messages), ...] -> one answer per request (greedy, 64 tokens by default)."""
        return [out.outputs[0].text.strip() for out in self.generate_outputs(requests, sampling_params, **sampling)]

    def _rounds(self, prompts: list[Prompt]) -> list[list[int]]:
        """Request indices in rounds of at most `max_images_in_flight` distinct images each."""
        rounds, current, seen = [], [], set()
        for i, p in enumerate(prompts):
            key = None if p.image is None else image_key(p.image)
            if key is not None and key not in seen and len(seen) == self.max_images_in_flight:
                rounds.append(current)
                current, seen = [], set()
            if key is not None:
                seen.add(key)
            current.append(i)
        return rounds + [current] if current else rounds
