"""Analytic FLOPs (multiply-add = 2 FLOPs) for the benchmarked systems.

Conventions, used everywhere in this file:
- a linear layer on ``n`` rows from ``i`` to ``o`` features costs ``2·n·i·o`` (biases, norms, activations,
  softmax and RoPE are ignored: they are O(n·width), negligible next to the matmuls);
- attention of one query over ``c`` keys costs ``4·c·(heads·head_dim)`` (``QKᵀ`` plus ``softmax·V``);
- a causal sequence attends token ``p`` (0-based) to ``p + 1`` keys.

"Visual compute" follows the seed paper: the FLOPs spent on the visual positions inside the LLM (LLaVA:
576 tokens through every layer), or, for VLoRA, the perceptual-weights generator plus the low-rank branches
the image adds to the text tokens. The vision tower is the same for every system and reported apart.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

# Figures reported by the seed paper (VLoRA, Ma et al. 2024) for LLaVA-1.5-7B and for YOPO on it.
PAPER_LLAVA_7B_VISUAL_TFLOPS = 7.63
PAPER_YOPO_7B_VISUAL_TFLOPS = 0.92


@dataclass
class LLMGeom:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


@dataclass
class TowerGeom:
    hidden: int
    intermediate: int
    layers: int
    image_size: int = 336
    patch_size: int = 14

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class GenGeom:
    dim: int  # g
    depth: int  # decoder blocks per generator
    visual_dim: int  # Dv (tower width)
    positions: int  # P
    rank: int
    types: int  # 5 for "qkvom"
    target_layers: int  # LLM layers that receive weights (k)
    separate: bool = True
    mlp_ratio: int = 4


@dataclass
class YopoGeom:
    keep_layers: int  # visual tokens take part in layers [0, keep_layers)
    head_fraction: float = 0.5  # query heads computed for visual queries
    ffn_fraction: float = 0.5  # FFN channels used for visual positions
    window: int = 64  # visual queries attend to the text before the image + their own block of `window`


def linear(n: int, i: int, o: int) -> int:
    return 2 * n * i * o


def attn(c: int, width: int) -> int:
    return 4 * c * width


def _causal_ctx(start: int, n: int) -> int:
    """Sum of context lengths for n causal queries at positions start..start+n-1."""
    return n * start + n * (n + 1) // 2


def llm_token_proj(g: LLMGeom, head_fraction: float = 1.0, ffn_fraction: float = 1.0) -> int:
    """Projection + MLP FLOPs of one token in one decoder layer (no attention scores)."""
    h, d = g.hidden, g.head_dim
    q_w = int(round(g.heads * head_fraction)) * d
    kv_w = g.kv_heads * d
    inter = int(round(g.intermediate * ffn_fraction))
    return linear(1, h, q_w) + 2 * linear(1, h, kv_w) + linear(1, q_w, h) + 3 * linear(1, h, inter)


def llava_visual(g: LLMGeom, n_visual: int = 576, n_before: int = 1) -> int:
    """FLOPs of the visual positions in the LLM (all layers): projections, MLP, causal attention."""
    per_layer = n_visual * llm_token_proj(g) + attn(_causal_ctx(n_before, n_visual), g.hidden)
    return g.layers * per_layer


def llava_projector(dv: int, h: int, n_visual: int = 576) -> int:
    return linear(n_visual, dv, h) + linear(n_visual, h, h)


def prefill(g: LLMGeom, n_tokens: int, logits_rows: int = 1) -> int:
    """A plain causal prefill of n_tokens, with the LM head on `logits_rows` rows."""
    per_layer = n_tokens * llm_token_proj(g) + attn(_causal_ctx(0, n_tokens), g.hidden)
    return g.layers * per_layer + linear(logits_rows, g.hidden, g.vocab)


def decode_token(g: LLMGeom, context: int) -> int:
    """One decode step (one token) with `context` keys (including itself)."""
    return g.layers * (llm_token_proj(g) + attn(context, g.hidden)) + linear(1, g.hidden, g.vocab)


def tower(t: TowerGeom) -> int:
    n = t.patches + 1
    per_layer = 4 * linear(n, t.hidden, t.hidden) + 2 * linear(n, t.hidden, t.intermediate) + attn(n * n, t.hidden)
    return linear(t.patches, 3 * t.patch_size**2, t.hidden) + t.layers * per_layer


def generator(gg: GenGeom, llm_hidden: int) -> int:
    """Perceptual-weights generator for one image (DESIGN.md §1.2-1.4)."""
    g, k, p = gg.dim, gg.target_layers, gg.positions
    n_gen = gg.types if gg.separate else 1
    k_q = k if gg.separate else k * gg.types
    flops = linear(p, gg.visual_dim, g)  # visual_proj, shared
    block = (
        linear(k_q, g, 3 * g) + attn(k_q * k_q, g) + linear(k_q, g, g)  # self-attention
        + linear(k_q, g, g) + linear(p, g, 2 * g) + attn(k_q * p, g) + linear(k_q, g, g)  # cross-attention
        + linear(k_q, g, gg.mlp_ratio * g) + linear(k_q, gg.mlp_ratio * g, g)  # FFN
    )
    head = linear(k_q, g, llm_hidden * gg.rank)
    return flops + n_gen * (gg.depth * block + head)


def lowrank_per_token(gg: GenGeom, llm_hidden: int) -> int:
    """Extra FLOPs of the image's low-rank branches for one text token (x@A then @Bᵀ, h→r→h)."""
    return gg.target_layers * gg.types * (linear(1, llm_hidden, gg.rank) + linear(1, gg.rank, llm_hidden))


def yopo_visual(g: LLMGeom, y: YopoGeom, n_visual: int = 576, n_before: int = 1) -> int:
    """FLOPs of the visual positions under YOPO-style reductions (as implemented in yopo.py)."""
    kept_heads = int(round(g.heads * y.head_fraction))
    win = min(y.window, n_visual)
    n_blocks = -(-n_visual // win)
    ctx = 0
    for b in range(n_blocks):
        nb = min(win, n_visual - b * win)
        ctx += _causal_ctx(n_before, nb)
    per_layer = n_visual * llm_token_proj(g, y.head_fraction, y.ffn_fraction) + attn(ctx, kept_heads * g.head_dim)
    return min(y.keep_layers, g.layers) * per_layer


def summary(g: LLMGeom, t: TowerGeom, gg: GenGeom, y: YopoGeom, text_tokens: int = 64, dv: int | None = None) -> dict:
    """FLOPs of one configuration: visual compute per system and whole prefill at `text_tokens`."""
    n_vis = t.patches
    dv = dv or t.hidden
    T = text_tokens
    vis_llava = llava_visual(g, n_vis) + llava_projector(dv, g.hidden, n_vis)
    gen = generator(gg, g.hidden)
    lr = lowrank_per_token(gg, g.hidden) * T
    vis_yopo = yopo_visual(g, y, n_vis) + llava_projector(dv, g.hidden, n_vis)
    text_only = prefill(g, T)
    # text tokens after the image additionally attend to the 576 visual keys (LLaVA: all layers; YOPO: < K)
    text_to_vis = attn(n_vis * (T - 1), g.hidden)
    return {
        "geometry": {"llm": asdict(g), "tower": asdict(t), "generator": asdict(gg), "yopo": asdict(y)},
        "tower_gflops": tower(t) / 1e9,
        "visual_gflops": {
            "llava": vis_llava / 1e9,
            "yopo": vis_yopo / 1e9,
            "vlora": (gen + lr) / 1e9,
            "vlora_generator": gen / 1e9,
            "vlora_lowrank_text": lr / 1e9,
        },
        f"prefill_gflops_t{T}": {
            "text_only": text_only / 1e9,
            "llava": (text_only + vis_llava + g.layers * text_to_vis) / 1e9,
            "yopo": (text_only + vis_yopo + min(y.keep_layers, g.layers) * text_to_vis) / 1e9,
            "vlora": (text_only + gen + lr) / 1e9,
        },
    }


def paper_7b() -> dict:
    """The paper's setting: Vicuna-7B + CLIP ViT-L/14-336, rank 64, every 4th layer, qkvom, g=1024, depth 8."""
    g = LLMGeom(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32000)
    t = TowerGeom(hidden=1024, intermediate=4096, layers=24)
    gg = GenGeom(dim=1024, depth=8, visual_dim=1024, positions=576, rank=64, types=5, target_layers=8)
    y = YopoGeom(keep_layers=8)
    s = summary(g, t, gg, y, text_tokens=64)
    s["paper_reported_visual_tflops"] = {"llava": PAPER_LLAVA_7B_VISUAL_TFLOPS, "yopo": PAPER_YOPO_7B_VISUAL_TFLOPS}
    return s
