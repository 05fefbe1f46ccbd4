"""Analytic FLOPs of the benchmarked systems: LLaVA, YOPO-style reductions and VLoRA on one backbone.

The VLoRA and LLaVA counts come from `vlora_hf.flops` (driven by the VLoRA config, as in the model card); this
module adds the YOPO-style reductions and the summary the benchmark reports. "Visual compute" follows the seed
paper: the FLOPs spent on the visual positions inside the LLM (LLaVA: 576 tokens through every layer), or, for
VLoRA, the perceptual-weights generator plus the low-rank branches the image adds to the text tokens. The
vision tower is the same for every system and reported apart.
"""

from dataclasses import asdict

from .. import flops as F
from .yopo import YopoReductions

# Figures reported by the seed paper (VLoRA, Ma et al. 2024) for LLaVA-1.5-7B and for YOPO on it.
PAPER_LLAVA_7B_VISUAL_TFLOPS = 7.63
PAPER_YOPO_7B_VISUAL_TFLOPS = 0.92


def yopo_visual(config, y: YopoReductions, n_visual: int = 576, n_before: int = 1) -> int:
    """FLOPs of the visual positions under YOPO-style reductions (as implemented in yopo.py)."""
    heads = config.text_config.num_attention_heads
    kept_width = int(round(heads * y.head_fraction)) * (F.attention_width(config) // heads)
    win = min(y.window, n_visual)
    keys = sum(F.causal_keys(n_before, min(win, n_visual - start)) for start in range(0, n_visual, win))
    per_layer = n_visual * F.decoder_token(config, y.head_fraction, y.ffn_fraction) + F.attention(keys, kept_width)
    return min(y.keep_layers, config.text_config.num_hidden_layers) * per_layer + F.projector(config, n_visual)


def summary(config, y: YopoReductions, text_tokens: int = 64) -> dict:
    """Visual compute per system and the whole prefill of `text_tokens` text tokens with one image after the
    first of them (GFLOPs)."""
    vc, tc = config.vision_config, config.text_config
    n_vis, T = (vc.image_size // vc.patch_size) ** 2, text_tokens
    gen, lowrank = F.generator(config), T * F.lowrank_per_token(config)
    llava, yopo = F.llava_visual(config, n_vis), yopo_visual(config, y, n_vis)
    text_only = F.prefill(config, T, logits_rows=1)
    layers = tc.num_hidden_layers
    return {
        "geometry": {"llm_hidden": tc.hidden_size, "llm_layers": layers, "tower_hidden": vc.hidden_size,
                     "visual_positions": n_vis, "generator_hidden_size": config.generator_hidden_size,
                     "generator_depth": config.generator_depth, "lora_rank": config.lora_rank,
                     "target_modules": list(config.target_modules),
                     "receiving_layers": list(config.receiving_layers), "yopo": asdict(y)},
        "tower_gflops": F.tower(config) / 1e9,
        "visual_gflops": {"llava": llava / 1e9, "yopo": yopo / 1e9, "vlora": (gen + lowrank) / 1e9,
                          "vlora_generator": gen / 1e9, "vlora_lowrank_text": lowrank / 1e9},
        f"prefill_gflops_t{T}": {
            "text_only": text_only / 1e9,
            "llava": (text_only + llava + F.image_key_attention(config, T - 1, n_vis)) / 1e9,
            "yopo": (text_only + yopo + F.image_key_attention(config, T - 1, n_vis, min(y.keep_layers, layers))) / 1e9,
            "vlora": (text_only + gen + lowrank) / 1e9,
        },
    }


def paper_7b_config():
    """The paper's setting: Vicuna-7B + CLIP ViT-L/14-336, rank 64, every 4th layer, qkvom, g=1024, depth 8."""
    from transformers import CLIPVisionConfig, LlamaConfig

    from ..modeling import VLoRAConfig

    return VLoRAConfig(
        text_config=LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=32),
        vision_config=CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                       num_attention_heads=16, image_size=336, patch_size=14),
        generator_hidden_size=1024, generator_depth=8, generator_num_heads=16, lora_rank=64, skip_layers=4,
        target_modules="qkvom")


def paper_7b() -> dict:
    s = summary(paper_7b_config(), YopoReductions(keep_layers=8), text_tokens=64)
    s["paper_reported_visual_tflops"] = {"llava": PAPER_LLAVA_7B_VISUAL_TFLOPS, "yopo": PAPER_YOPO_7B_VISUAL_TFLOPS}
    return s
