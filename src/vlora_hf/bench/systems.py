"""Random-weight models for the benchmark and one uniform prefill/decode interface per system.

Every system exposes ``prepare(text_ids, pixel_values) -> inputs`` (untimed: building the id layout),
``prefill(inputs) -> (logits [b, V], state)``, ``decode(tokens [b], state) -> (logits, state)`` and
``cache_bytes(state)``. All four run the same greedy loop (see run.py); the same tower and backbone
weights are copied into every system.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch

from vlora_hf.modeling import CACHE, without_placeholders

from . import flops as F
from .yopo import YopoLlava, YopoReductions

N_PATCH = 576  # 336 / 14 = 24 → 24² patch features
VOCAB = 32064  # LLaVA-1.5: 32000 + padding; image token 32000 lives inside the vocabulary
LLAVA_IMAGE_TOKEN = 32000


@dataclass
class BenchSizes:
    """The paper's geometry scaled in width only (depths, 336-px/14-px tower, 576 patches, vocab kept)."""

    llm_hidden: int = 256
    llm_layers: int = 32
    tower_hidden: int = 64
    tower_layers: int = 24
    image_size: int = 336
    patch_size: int = 14
    gen_dim: int | None = None  # default: scaled like the LLM (1024 at 4096)
    gen_depth: int = 8
    gen_heads: int | None = None  # default: g / 64 (head size 64, like the LLM and the tower; the release: 16 at g=1024)
    rank: int | None = None  # default: 64 scaled, at least 4
    skip_layers: int = 4
    vocab: int = VOCAB
    llm_kv_heads: int | None = None  # default: as many as query heads (Vicuna); fewer for GQA backbones
    intermediate: int | None = None  # default: 11008 scaled

    @classmethod
    def quick(cls) -> "BenchSizes":
        """The `--quick` widths: LLM 128, tower 32."""
        return cls(llm_hidden=128, tower_hidden=32)

    def widened(self, llm_hidden: int) -> "BenchSizes":
        """The same geometry with LLM width `llm_hidden` and a tower a quarter as wide (at least 32), the ratio of
        the defaults."""
        return replace(self, llm_hidden=llm_hidden, tower_hidden=max(32, llm_hidden // 4))

    @property
    def scale(self) -> float:
        return self.llm_hidden / 4096

    def llm_heads(self) -> int:
        return max(1, self.llm_hidden // 64)

    def llm_intermediate(self) -> int:
        return self.intermediate or max(8, int(round(11008 * self.scale / 8)) * 8)

    def tower_heads(self) -> int:
        return max(1, self.tower_hidden // 64)

    def g(self) -> int:
        g = self.gen_dim or max(16, int(1024 * self.scale))
        return int(math.ceil(g / self.gheads(g)) * self.gheads(g))

    def gheads(self, g: int | None = None) -> int:
        return self.gen_heads or max(1, (g or self.gen_dim or max(16, int(1024 * self.scale))) // 64)

    def r(self) -> int:
        return self.rank or max(4, int(round(64 * self.scale)))

    def flops(self, yopo: YopoReductions, text_tokens: int) -> dict:
        """The analytic FLOPs summary of these sizes (`bench.flops.summary`)."""
        return F.summary(vlora_config(self), yopo, text_tokens=text_tokens)

    def describe(self) -> dict:
        d = asdict(self)
        d.update(llm_heads=self.llm_heads(), llm_intermediate=self.llm_intermediate(),
                 tower_heads=self.tower_heads(), gen_dim=self.g(), gen_heads=self.gheads(), rank=self.r(),
                 n_patches=(self.image_size // self.patch_size) ** 2)
        return d


def text_config(s: BenchSizes):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=s.vocab, hidden_size=s.llm_hidden, intermediate_size=s.llm_intermediate(),
        num_hidden_layers=s.llm_layers, num_attention_heads=s.llm_heads(), num_key_value_heads=s.llm_kv_heads or s.llm_heads(),
        max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        tie_word_embeddings=False,
    )


def vision_config(s: BenchSizes):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=s.tower_hidden, intermediate_size=4 * s.tower_hidden, num_hidden_layers=s.tower_layers,
        num_attention_heads=s.tower_heads(), image_size=s.image_size, patch_size=s.patch_size,
        projection_dim=s.tower_hidden, hidden_act="quick_gelu",
    )


def build_llava(s: BenchSizes, dtype=torch.float32, seed: int = 0):
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    cfg = LlavaConfig(
        vision_config=vision_config(s), text_config=text_config(s), image_token_index=LLAVA_IMAGE_TOKEN,
        image_seq_length=(s.image_size // s.patch_size) ** 2, vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )
    cfg._attn_implementation = "sdpa"
    model = LlavaForConditionalGeneration(cfg).to(dtype).eval()
    return model


def build_text_only(s: BenchSizes, llava, dtype=torch.float32):
    from transformers import LlamaForCausalLM

    cfg = text_config(s)
    cfg._attn_implementation = "sdpa"
    m = LlamaForCausalLM(cfg).to(dtype).eval()
    m.model.load_state_dict(llava.model.language_model.state_dict())
    m.lm_head.load_state_dict(llava.lm_head.state_dict())
    return m


def vlora_config(s: BenchSizes):
    """The benchmarked VLoRA model's config: llava's tower and backbone, the generator these sizes give."""
    from vlora_hf import VLoRAConfig

    return VLoRAConfig(
        text_config=text_config(s).to_dict(), vision_config=vision_config(s), vision_feature_layer=-2,
        vision_feature_select_strategy="default", generator_hidden_size=s.g(), generator_depth=s.gen_depth,
        generator_num_heads=s.gheads(), lora_rank=s.r(), target_modules="qkvom", skip_layers=s.skip_layers,
    )


def build_vlora(s: BenchSizes, llava, dtype=torch.float32, seed: int = 1):
    """VLoRAForCausalLM with llava's tower + backbone + LM head; generator random (B non-zero)."""
    from vlora_hf import VLoRAForCausalLM

    torch.manual_seed(seed)
    cfg = vlora_config(s)
    cfg._attn_implementation = "sdpa"
    m = VLoRAForCausalLM(cfg).to(dtype).eval()
    m.model.vision_tower.load_state_dict(llava.model.vision_tower.state_dict())
    m.model.language_model.load_state_dict(llava.model.language_model.state_dict())
    m.lm_head.load_state_dict(llava.lm_head.state_dict())
    with torch.no_grad():  # official B starts at zero; make the image matter so nothing can be skipped
        for name, p in m.model.generator.named_parameters():
            if "lora_B" in name or p.abs().sum() == 0:
                p.normal_(0.0, 0.02)
    return m


# ---------------------------------------------------------------------------------------- cache helpers
def hf_cache_bytes(pkv) -> int:
    total = 0
    layers = getattr(pkv, "layers", None)
    if layers is not None:
        for layer in layers:
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total
    for kv in pkv:  # legacy tuples
        for t in kv:
            total += t.numel() * t.element_size()
    return total


class _Sys:
    name = "?"

    def cache_bytes(self, state) -> int:
        return hf_cache_bytes(state["pkv"])


class TextOnly(_Sys):
    name = "text_only"

    def __init__(self, model):
        self.model = model

    def prepare(self, text_ids, pixel_values):
        return {"input_ids": text_ids}

    @torch.inference_mode()
    def prefill(self, inputs):
        out = self.model(input_ids=inputs["input_ids"], use_cache=True, logits_to_keep=1)
        return out.logits[:, -1], {"pkv": getattr(out, CACHE)}

    @torch.inference_mode()
    def decode(self, tok, state):
        out = self.model(input_ids=tok[:, None], **{CACHE: state["pkv"]}, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1], {"pkv": getattr(out, CACHE)}


def llava_ids(text_ids, n_vis=N_PATCH):
    b = text_ids.shape[0]
    img = torch.full((b, n_vis), LLAVA_IMAGE_TOKEN, dtype=text_ids.dtype, device=text_ids.device)
    return torch.cat([text_ids[:, :1], img, text_ids[:, 1:]], dim=1)


class Llava(_Sys):
    name = "llava"

    def __init__(self, model):
        self.model = model
        self.n_vis = model.config.image_seq_length

    def prepare(self, text_ids, pixel_values):
        return {"input_ids": llava_ids(text_ids, self.n_vis), "pixel_values": pixel_values}

    @torch.inference_mode()
    def prefill(self, inputs):
        out = self.model(**inputs, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1], {"pkv": getattr(out, CACHE)}

    @torch.inference_mode()
    def decode(self, tok, state):
        out = self.model(input_ids=tok[:, None], **{CACHE: state["pkv"]}, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1], {"pkv": getattr(out, CACHE)}


class Yopo(_Sys):
    name = "yopo"

    def __init__(self, llava_model, reductions: YopoReductions):
        self.runner = YopoLlava(llava_model, reductions)
        self.n_vis = llava_model.config.image_seq_length

    def prepare(self, text_ids, pixel_values):
        return {"input_ids": llava_ids(text_ids, self.n_vis), "pixel_values": pixel_values}

    def prefill(self, inputs):
        return self.runner.prefill(inputs["input_ids"], inputs["pixel_values"])

    def decode(self, tok, state):
        return self.runner.decode(tok, state)

    def cache_bytes(self, state):
        return YopoLlava.cache_bytes(state)


class VLoRA(_Sys):
    """VLoRAForCausalLM: tower + generator once at prefill, the perceptual weights reused at every step."""

    name = "vlora"

    def __init__(self, model):
        self.model = model
        self.image_token_id = model.config.image_token_id

    def prepare(self, text_ids, pixel_values):
        b = text_ids.shape[0]
        ph = torch.full((b, 1), self.image_token_id, dtype=text_ids.dtype, device=text_ids.device)
        ids = torch.cat([text_ids[:, :1], ph, text_ids[:, 1:]], dim=1)
        return {"input_ids": ids, "pixel_values": pixel_values}

    @torch.inference_mode()
    def weights(self, pixel_values):
        return self.model.get_image_features(pixel_values=pixel_values)

    @torch.inference_mode()
    def prefill_with(self, inputs, w):
        """Prefill given perceptual weights [b, D], the way `VLoRAForCausalLM.generate` drives the model."""
        ids = inputs["input_ids"]
        rw = self.model.model.row_weights(ids, w)
        ids, mask, pos = without_placeholders(ids, None, self.image_token_id)  # placeholders leave the sequence
        mask = None if bool(mask.all()) else mask
        out = self.model(input_ids=ids, row_perceptual_weights=rw, attention_mask=mask, position_ids=pos,
                         use_cache=True, logits_to_keep=1)
        return out.logits[:, -1], {"pkv": getattr(out, CACHE), "rw": rw, "mask": mask, "pos": pos[:, -1:]}

    def prefill(self, inputs):
        return self.prefill_with(inputs, self.weights(inputs["pixel_values"]))

    @torch.inference_mode()
    def decode(self, tok, state):
        mask = state["mask"]
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(tok.shape[0], 1)], dim=1)
        pos = state["pos"] + 1
        out = self.model(input_ids=tok[:, None], **{CACHE: state["pkv"]}, row_perceptual_weights=state["rw"],
                         attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1], {"pkv": getattr(out, CACHE), "rw": state["rw"], "mask": mask, "pos": pos}
