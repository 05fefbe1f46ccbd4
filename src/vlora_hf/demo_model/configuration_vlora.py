"""VLoRA configuration: a text backbone, a vision tower and the perceptual weights generator between them.

The config is the single source of truth for every shape in the model: which layers and projections receive
low-rank deltas, their input/output widths, the generator's query count and head width.
"""

from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig

# Targets the release knows (q, k, v, o, m) and our generalisation to the single MLP projections.
ALL_TARGETS = ("q", "k", "v", "o", "m", "gate", "up", "down")
# Module paths of each target inside one decoder layer of a Llama-style backbone.
LLAMA_TARGET_PATHS = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "m": "mlp",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
# Target module paths per backbone `model_type`. A backbone listed here needs no code and no config to be a VLoRA
# backbone; any other one is supported by giving `target_module_paths` (its layers' names) in the config.
BACKBONE_TARGET_PATHS = {
    t: LLAMA_TARGET_PATHS
    for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo2", "granite", "smollm3")
}
SELECT_STRATEGIES = ("default", "full")  # "default" drops the CLS token (the release's "patch")
TOWERS_WITH_CLS = {"clip_vision_model", "clip"}


def parse_targets(targets) -> list[str]:
    """'qkvom' (the release's string) or a list of names -> a list of target names, order kept."""
    if isinstance(targets, str):
        names = [targets] if targets in ALL_TARGETS and len(targets) > 1 else list(targets)
    else:
        names = list(targets)
    unknown = [t for t in names if t not in ALL_TARGETS]
    if unknown or not names or len(set(names)) != len(names):
        raise ValueError(
            f"target_modules={targets!r} is invalid: expected distinct names from {ALL_TARGETS} "
            f"(or a string of the letters q, k, v, o, m as in the release)"
        )
    return names


def _sub_config(value, default_type: str) -> PretrainedConfig:
    if value is None:
        return AutoConfig.for_model(default_type)
    if isinstance(value, dict):
        value = dict(value)
        return AutoConfig.for_model(value.pop("model_type", default_type), **value)
    return value


class VLoRAConfig(PretrainedConfig):
    """Configuration of a VLoRA model.

    Args:
        text_config: config of the decoder backbone (Llama, Qwen2, Mistral, ...); dict or `PretrainedConfig`.
        vision_config: config of the vision tower (CLIP or SigLIP vision); dict or `PretrainedConfig`.
        vision_feature_layer: index into the tower's `hidden_states` (release: -2).
        vision_feature_select_strategy: "default" drops the CLS token, "full" keeps every position.
        generator_hidden_size / generator_depth / generator_num_heads / generator_mlp_ratio: width, number of
            decoder blocks, attention heads and FFN ratio of the perceptual weights generator (release: 16 heads, 4).
        num_visual_positions: visual feature positions P (size of `pos_embed`); derived from the tower if None.
        separate_generators: one generator per target type (release `weights_sep`) or one shared by all types.
        lora_rank / lora_alpha: rank r of the deltas and their scale alpha / r (alpha defaults to r).
        target_modules: "qkvom"-style string or a list of q, k, v, o, m, gate, up, down.
        skip_layers: layer i receives deltas iff (i + 1) % skip_layers == 0 (release rule).
        target_layers: explicit list of 0-based layers instead of `skip_layers`.
        target_module_paths: {target: module path inside a decoder layer}, for a backbone whose `model_type` is not
            in `BACKBONE_TARGET_PATHS` or whose layers name their projections differently (merged over the
            backbone's own map, if it has one).
        image_token_id: the `<image>` placeholder id (default: the text vocab size, just past the vocabulary).
        image_aspect_ratio: "pad" (the release's square padding with the mean colour) or "resize"-less default.
        default_prompt: question used when a pipeline receives an image without text.
    """

    model_type = "vlora"
    sub_configs = {"text_config": AutoConfig, "vision_config": AutoConfig}

    def __init__(
        self,
        text_config=None,
        vision_config=None,
        vision_feature_layer: int = -2,
        vision_feature_select_strategy: str = "default",
        generator_hidden_size: int = 512,
        generator_depth: int = 2,
        generator_num_heads: int = 16,
        generator_mlp_ratio: int = 4,
        num_visual_positions: int | None = None,
        separate_generators: bool = True,
        lora_rank: int = 64,
        lora_alpha: float | None = None,
        target_modules="qkvom",
        skip_layers: int = 4,
        target_layers: list[int] | None = None,
        target_module_paths: dict[str, str] | None = None,
        image_token_id: int | None = None,
        image_aspect_ratio: str = "pad",
        default_prompt: str = "Describe the image.",
        **kwargs,
    ):
        self.text_config = _sub_config(text_config, "llama")
        self.vision_config = _sub_config(vision_config, "clip_vision_model")
        self.vision_feature_layer = vision_feature_layer
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.generator_hidden_size = generator_hidden_size
        self.generator_depth = generator_depth
        self.generator_num_heads = generator_num_heads
        self.generator_mlp_ratio = generator_mlp_ratio
        self.num_visual_positions = num_visual_positions
        self.separate_generators = separate_generators
        self.lora_rank = lora_rank
        self.lora_alpha = lora_rank if lora_alpha is None else lora_alpha
        self.target_modules = parse_targets(target_modules)
        self.skip_layers = skip_layers
        self.target_layers = None if target_layers is None else [int(i) for i in target_layers]
        self.target_module_paths = None if target_module_paths is None else dict(target_module_paths)
        self.image_token_id = self.text_config.vocab_size if image_token_id is None else image_token_id
        self.image_aspect_ratio = image_aspect_ratio
        self.default_prompt = default_prompt
        kwargs.setdefault("tie_word_embeddings", getattr(self.text_config, "tie_word_embeddings", False))
        super().__init__(**kwargs)
        if self.num_visual_positions is None:
            self.num_visual_positions = self.expected_visual_positions()
        self.validate()

    # ----- derived shapes -------------------------------------------------------------------------------
    def expected_visual_positions(self) -> int:
        """Feature positions the tower yields after the selection strategy."""
        vc = self.vision_config
        patches = (vc.image_size // vc.patch_size) ** 2
        has_cls = vc.model_type in TOWERS_WITH_CLS
        return patches + int(has_cls and self.vision_feature_select_strategy == "full")

    @property
    def receiving_layers(self) -> list[int]:
        """0-based decoder layers that receive deltas; slot j of the generator serves receiving_layers[j]."""
        if self.target_layers is not None:
            return sorted(self.target_layers)
        n = self.text_config.num_hidden_layers
        return [i for i in range(n) if (i + 1) % self.skip_layers == 0]

    def target_shape(self, target: str) -> tuple[int, int]:
        """(input width, output width) of one target projection in the backbone."""
        tc = self.text_config
        h = tc.hidden_size
        head_dim = getattr(tc, "head_dim", None) or h // tc.num_attention_heads
        q_width = tc.num_attention_heads * head_dim
        kv_width = (getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads) * head_dim
        inter = tc.intermediate_size
        return {
            "q": (h, q_width),
            "k": (h, kv_width),
            "v": (h, kv_width),
            "o": (q_width, h),
            "m": (h, h),
            "gate": (h, inter),
            "up": (h, inter),
            "down": (inter, h),
        }[target]

    def validate(self) -> None:
        """Raise one clear ValueError for combinations the model cannot be built from."""
        g, heads = self.generator_hidden_size, self.generator_num_heads
        if g <= 0 or heads <= 0 or g % heads:
            raise ValueError(f"generator_hidden_size={g} must be a positive multiple of generator_num_heads={heads}")
        if self.lora_rank <= 0:
            raise ValueError(f"lora_rank must be positive, got {self.lora_rank}")
        if self.vision_feature_select_strategy not in SELECT_STRATEGIES:
            raise ValueError(
                f"vision_feature_select_strategy={self.vision_feature_select_strategy!r}: expected one of "
                f"{SELECT_STRATEGIES}"
            )
        if self.vision_feature_select_strategy == "default" and self.vision_config.model_type not in TOWERS_WITH_CLS:
            raise ValueError(
                f"vision_feature_select_strategy='default' drops a CLS token, but a {self.vision_config.model_type} "
                "tower has none: use 'full'"
            )
        expected = self.expected_visual_positions()
        if self.num_visual_positions != expected:
            raise ValueError(
                f"num_visual_positions={self.num_visual_positions}, but the tower yields {expected} feature "
                f"positions ({self.vision_config.image_size}px images, {self.vision_config.patch_size}px patches, "
                f"strategy {self.vision_feature_select_strategy!r})"
            )
        n_layers = self.text_config.num_hidden_layers
        if self.target_layers is not None:
            bad = [i for i in self.target_layers if not 0 <= i < n_layers]
            if bad or len(set(self.target_layers)) != len(self.target_layers) or not self.target_layers:
                raise ValueError(
                    f"target_layers={self.target_layers} must be distinct indices in [0, {n_layers}) "
                    f"(the backbone has {n_layers} layers)"
                )
        elif not 1 <= self.skip_layers <= n_layers:
            raise ValueError(f"skip_layers={self.skip_layers} must be in [1, {n_layers}] for a {n_layers}-layer backbone")
        unknown = sorted(set(self.target_module_paths or {}) - set(ALL_TARGETS))
        if unknown:
            raise ValueError(f"target_module_paths names unknown targets {unknown}; targets are {list(ALL_TARGETS)}")
        model_type = self.text_config.model_type
        missing = [t for t in self.target_modules if t not in self.module_paths]
        if missing:
            raise ValueError(
                f"text backbone {model_type!r} has no known module path for target(s) {missing}: give "
                f"target_module_paths, e.g. {{'q': 'self_attn.q_proj', ...}} (known backbones: "
                f"{sorted(BACKBONE_TARGET_PATHS)})"
            )
        if not self.separate_generators:
            widths = {self.target_shape(t)[0] for t in self.target_modules}
            if len(widths) > 1:
                raise ValueError(
                    f"separate_generators=False shares one weights head, so all targets need the same input "
                    f"width; {self.target_modules} have widths {sorted(widths)}"
                )

    @property
    def module_paths(self) -> dict[str, str]:
        """{target: module path inside one decoder layer}: the backbone's map, then the config's override."""
        return {**BACKBONE_TARGET_PATHS.get(self.text_config.model_type, {}), **(self.target_module_paths or {})}

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_rank
