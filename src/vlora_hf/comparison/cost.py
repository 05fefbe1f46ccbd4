"""What one question costs each system: analytic training FLOPs per sample, measured time to first token and
KV-cache bytes (plus, for VLoRA, the per-image low-rank weights that generation keeps beside the cache)."""

import statistics
import time

import torch

from .. import flops
from ..answering import user_message
from ..bench.systems import hf_cache_bytes
from ..training.llava_baseline import is_llava

TRAIN_FACTOR = 3  # forward + backward (twice the forward's matmuls), every part trains in stage scratch


def forward_flops(config, text_tokens: int) -> dict[str, int]:
    """One training row's forward, from the VLoRA run's config (both systems share its tower and backbone).

    VLoRA: tower, generator, the text through the decoder with the low-rank branches, logits on every text
    position. LLaVA: tower, projector, the patch tokens and the text through the decoder, logits on every
    position (the Trainer's forward computes them all)."""
    patches = config.num_visual_positions
    hidden, vocab = config.text_config.hidden_size, config.text_config.vocab_size
    tower = flops.tower(config)
    vlora = (tower + flops.vlora_visual(config, text_tokens) + flops.prefill(config, text_tokens)
             + flops.linear(text_tokens, hidden, vocab))
    llava = (tower + flops.projector(config, patches) + flops.prefill(config, text_tokens + patches)
             + flops.linear(text_tokens + patches, hidden, vocab))
    return {"vlora": vlora, "llava": llava}


def training_flops_per_sample(config, text_tokens: int) -> dict[str, int]:
    return {k: TRAIN_FACTOR * v for k, v in forward_flops(config, text_tokens).items()}


def _prompt(model, processor, image, question: str) -> dict:
    text = processor.apply_chat_template(user_message(question), add_generation_prompt=True, tokenize=False)
    enc = processor(images=[image], text=[text], return_tensors="pt")
    return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "pixel_values")}


@torch.inference_mode()
def inference_cost(model, processor, images, questions, repeats: int = 3) -> dict:
    """Median time to first token (one question at a time: image encoding, prefill, first token), KV-cache
    bytes after the prompt, prompt tokens, and VLoRA's per-image weight bytes, over the given questions."""
    model.eval()
    ttft, kv, tokens, state = [], [], [], []
    for image, question in zip(images, questions):
        enc = _prompt(model, processor, image, question)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model.generate(**enc, max_new_tokens=1, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
            times.append(time.perf_counter() - start)
        ttft.append(min(times))
        out = model(**enc, use_cache=True)
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        kv.append(hf_cache_bytes(cache))
        tokens.append(int(enc["input_ids"].shape[1]))
        if not is_llava(model):
            weights = model.model.get_image_features(pixel_values=enc["pixel_values"])
            state.append(weights.numel() * weights.element_size())
    return {"ttft_ms": 1000 * statistics.median(ttft), "kv_cache_bytes": statistics.mean(kv),
            "prompt_tokens": statistics.mean(tokens),
            "image_weights_bytes": statistics.mean(state) if state else 0}


__all__ = ["forward_flops", "inference_cost", "training_flops_per_sample"]
