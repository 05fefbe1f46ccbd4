"""Analytic FLOPs of a VLoRA model and of an input-space (LLaVA-style) model on the same backbone, from one
`VLoRAConfig`: every projection's width comes from `config.target_shape`, so GQA, MLP widths and per-target
generator heads are counted as the model builds them. The model card and the benchmark both report these.

Conventions:
- a linear layer on ``n`` rows from ``i`` to ``o`` features costs ``2·n·i·o`` (biases, norms, activations,
  softmax and RoPE are ignored: they are O(n·width), negligible next to the matmuls);
- attention of one query over ``c`` keys costs ``4·c·width`` (``QKᵀ`` plus ``softmax·V``), width = the query
  projection's output;
- a causal sequence attends token ``p`` (0-based) to ``p + 1`` keys.
"""


def linear(n: int, i: int, o: int) -> int:
    return 2 * n * i * o


def attention(keys: int, width: int) -> int:
    return 4 * keys * width


def causal_keys(start: int, n: int) -> int:
    """Keys summed over n causal queries at positions start .. start + n - 1."""
    return n * start + n * (n + 1) // 2


def attention_width(config) -> int:
    return config.target_shape("q")[1]


def decoder_token(config, head_fraction: float = 1.0, ffn_fraction: float = 1.0) -> int:
    """Projections + MLP of one token in one decoder layer (no attention scores). The fractions keep that share
    of the query heads and MLP channels (YOPO-style reductions)."""
    hidden, q_width = config.target_shape("q")
    kv_width = config.target_shape("k")[1]
    heads = config.text_config.num_attention_heads
    q_width = int(round(heads * head_fraction)) * (q_width // heads)
    inter = int(round(config.target_shape("up")[1] * ffn_fraction))
    return (linear(1, hidden, q_width) + 2 * linear(1, hidden, kv_width) + linear(1, q_width, hidden)
            + 2 * linear(1, hidden, inter) + linear(1, inter, hidden))


def prefill(config, n_tokens: int, start: int = 0, logits_rows: int = 0) -> int:
    """n_tokens through every decoder layer at positions start.., with the LM head on `logits_rows` rows."""
    tc = config.text_config
    per_layer = n_tokens * decoder_token(config) + attention(causal_keys(start, n_tokens), attention_width(config))
    return tc.num_hidden_layers * per_layer + linear(logits_rows, tc.hidden_size, tc.vocab_size)


def decode_token(config, context: int) -> int:
    """One generated token attending to `context` keys (itself included), LM head included."""
    tc = config.text_config
    per_layer = decoder_token(config) + attention(context, attention_width(config))
    return tc.num_hidden_layers * per_layer + linear(1, tc.hidden_size, tc.vocab_size)


def image_key_attention(config, n_text: int, n_visual: int, layers: int | None = None) -> int:
    """What `n_text` tokens pay to attend to `n_visual` visual keys as well (input-space models)."""
    layers = config.text_config.num_hidden_layers if layers is None else layers
    return layers * attention(n_text * n_visual, attention_width(config))


def projector(config, n_visual: int) -> int:
    """LLaVA-1.5's two-layer MLP projector from the tower width to the LLM width."""
    hidden = config.text_config.hidden_size
    return linear(n_visual, config.vision_config.hidden_size, hidden) + linear(n_visual, hidden, hidden)


def tower(config) -> int:
    """One image through the ViT (patch embedding + every encoder layer over patches and CLS)."""
    vc = config.vision_config
    patches = (vc.image_size // vc.patch_size) ** 2
    n = patches + 1
    per_layer = (4 * linear(n, vc.hidden_size, vc.hidden_size) + 2 * linear(n, vc.hidden_size, vc.intermediate_size)
                 + attention(n * n, vc.hidden_size))
    return linear(patches, 3 * vc.patch_size**2, vc.hidden_size) + vc.num_hidden_layers * per_layer


def generator(config) -> int:
    """One image's features (after the tower) through the perceptual weights generator: a shared visual
    projection, then per generator `generator_depth` blocks (self-attention over the layer slots,
    cross-attention to the visual positions, MLP) and a head that emits each slot's low-rank factor."""
    g, ratio, rank = config.generator_hidden_size, config.generator_mlp_ratio, config.lora_rank
    positions, slots = config.num_visual_positions, len(config.receiving_layers)
    targets = list(config.target_modules)
    if config.separate_generators:
        decoders = [(slots, config.target_shape(t)[0] * rank) for t in targets]
    else:
        decoders = [(slots * len(targets), config.target_shape(targets[0])[0] * rank)]
    total = linear(positions, config.vision_config.hidden_size, g)
    for n, out in decoders:
        block = (linear(n, g, 3 * g) + attention(n * n, g) + linear(n, g, g)  # self-attention
                 + linear(n, g, g) + linear(positions, g, 2 * g) + attention(n * positions, g) + linear(n, g, g)
                 + linear(n, g, ratio * g) + linear(n, ratio * g, g))  # cross-attention, then the MLP
        total += config.generator_depth * block + linear(n, g, out)
    return total


def lowrank_per_token(config) -> int:
    """What the image's low-rank branches add to one text token: (x @ A) @ Bᵀ per target and receiving layer."""
    per_layer = sum(2 * config.lora_rank * sum(config.target_shape(t)) for t in config.target_modules)
    return len(config.receiving_layers) * per_layer


def vlora_visual(config, n_text: int) -> int:
    """VLoRA's image-dependent compute on the LLM side: the generator once, the low-rank branches per token."""
    return generator(config) + n_text * lowrank_per_token(config)


def llava_visual(config, n_visual: int, n_before: int = 1) -> int:
    """The visual tokens of an input-space model through the LLM (after `n_before` text tokens) + projector."""
    return prefill(config, n_visual, start=n_before) + projector(config, n_visual)


__all__ = ["attention", "causal_keys", "decode_token", "decoder_token", "generator", "image_key_attention",
           "linear", "llava_visual", "lowrank_per_token", "prefill", "projector", "tower", "vlora_visual"]
