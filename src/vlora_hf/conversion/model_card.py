"""The README.md model card of an exported / converted folder (huggingface_hub ModelCard + ModelCardData).

Everything in the card is computed from the config: the architecture in numbers and an analytic comparison of
the LLM-side compute with an input-space (LLaVA-style) model that feeds 576 visual tokens to the same backbone
(`vlora_hf.flops`: a multiply-add counts 2; norms, activations, softmax and RoPE are ignored).
"""

from __future__ import annotations

from huggingface_hub import ModelCard, ModelCardData

from .. import flops as F

PAPER_TITLE = "Visual Perception by Large Language Model's Weights"
ARXIV_ID = "2405.20339"
CITATION = """@inproceedings{ma2024vlora,
  title     = {Visual Perception by Large Language Model's Weights},
  author    = {Ma, Feipeng and Xue, Hongwei and Wang, Guangting and Zhou, Yizhou and Rao, Fengyun and
               Yan, Shilin and Zhang, Yueyi and Wu, Siying and Shou, Mike Zheng and Sun, Xiaoyan},
  booktitle = {Advances in Neural Information Processing Systems (NeurIPS)},
  year      = {2024},
  eprint    = {2405.20339},
  archivePrefix = {arXiv}
}"""
DEFAULT_TAGS = ["vlora", "vision-language", "multimodal", "image-text-to-text", "custom_code", "perceptual-weights"]
LLAVA_VISUAL_TOKENS = 576
PROMPT_TOKENS = 64


# ----- numbers -----------------------------------------------------------------------------------------------
def generator_parameters(config) -> int:
    """Parameters of the perceptual weights generator (built on the meta device: no memory)."""
    import torch

    from vlora_hf.modeling import PerceptualWeightsGenerator

    with torch.device("meta"):
        generator = PerceptualWeightsGenerator(config)
    return sum(p.numel() for p in generator.parameters())


def compute_rows(config, prompt_tokens: int = PROMPT_TOKENS, visual_tokens: int = LLAVA_VISUAL_TOKENS) -> list:
    """(quantity, VLoRA, input-space model) rows; FLOPs as ints, the rest as ints too."""
    vlora_visual = F.vlora_visual(config, prompt_tokens)
    # the input-space model's visual tokens, and the prompt attending to them as well
    llava_visual = F.llava_visual(config, visual_tokens) + F.image_key_attention(config, prompt_tokens, visual_tokens)
    text = F.prefill(config, prompt_tokens)
    return [
        ("Visual tokens in the LLM sequence", 0, visual_tokens),
        (f"Sequence length of a {prompt_tokens}-token prompt with one image", prompt_tokens,
         prompt_tokens + visual_tokens),
        ("Visual FLOPs (image-dependent compute on the LLM side)", vlora_visual, llava_visual),
        (f"LLM prefill FLOPs, {prompt_tokens}-token prompt + image", text + vlora_visual, text + llava_visual),
        ("Extra FLOPs per generated token due to the image", F.lowrank_per_token(config),
         F.image_key_attention(config, 1, visual_tokens)),
        ("KV-cache entries per layer for the image", 0, visual_tokens),
    ]


def human_flops(n: int) -> str:
    for unit, scale in (("TFLOPs", 1e12), ("GFLOPs", 1e9), ("MFLOPs", 1e6), ("kFLOPs", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} FLOPs"


def human_count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


# ----- the card ----------------------------------------------------------------------------------------------
def usage_snippet(model_id: str, has_tokenizer: bool = True) -> str:
    processor_line = (
        "processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=True)"
        if has_tokenizer
        else "# This folder ships no tokenizer: re-run the conversion with `--tokenizer` (Vicuna's) first.\n"
        "processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=True)"
    )
    return f"""```python
import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoProcessor

model_id = "{model_id}"
model = AutoModelForCausalLM.from_pretrained(model_id, trust_remote_code=True, dtype="auto").eval()
{processor_line}

messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "What is in the picture?"}}]}}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
image = Image.new("RGB", (336, 336), "red")  # or Image.open("photo.jpg")
inputs = processor(images=image, text=prompt, return_tensors="pt")
with torch.no_grad():
    out = model.generate(**inputs, max_new_tokens=32, do_sample=False)
print(processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0])
```"""


def build_model_card(
    config,
    *,
    model_id: str,
    base_model: str | list[str] | None = None,
    license: str = "apache-2.0",
    tags: list[str] | None = None,
    source: str | None = None,
    has_tokenizer: bool = True,
    num_parameters: int | None = None,
    notes: list[str] | None = None,
) -> ModelCard:
    """A ModelCard whose metadata and text are computed from `config` (a VLoRAConfig).

    Long (85 lines) because most of it is the card's text, kept in reading order."""
    tc, vc = config.text_config, config.vision_config
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        license=license,
        base_model=base_model,
        tags=list(dict.fromkeys([*DEFAULT_TAGS, *(tags or [])])),
    )
    layers = config.receiving_layers
    gen_params = generator_parameters(config)
    d_weights = sum(len(layers) * config.target_shape(t)[0] * config.lora_rank for t in config.target_modules)
    arch = [
        ("Language model", f"{tc.model_type}, {tc.num_hidden_layers} layers, hidden {tc.hidden_size}, "
                           f"{tc.num_attention_heads} heads ({getattr(tc, 'num_key_value_heads', None) or tc.num_attention_heads} KV), vocab {tc.vocab_size}"),
        ("Vision tower", f"{vc.model_type}, {vc.num_hidden_layers} layers, hidden {vc.hidden_size}, "
                         f"{vc.image_size}px images, patch {vc.patch_size}; features from layer "
                         f"{config.vision_feature_layer} ({config.vision_feature_select_strategy})"),
        ("Visual positions read by the generator", str(config.num_visual_positions)),
        ("Low-rank targets", ", ".join(config.target_modules)),
        ("Rank r / alpha (scale alpha/r)", f"{config.lora_rank} / {config.lora_alpha:g} ({config.lora_scale:g})"),
        ("Layers receiving perceptual weights", f"{len(layers)} of {tc.num_hidden_layers}: {layers}"),
        ("Generator", f"{'one per target' if config.separate_generators else 'one shared'}, "
                      f"{config.generator_depth} decoder blocks, width {config.generator_hidden_size}, "
                      f"{config.generator_num_heads} heads"),
        ("Generator parameters", f"{gen_params:,} ({human_count(gen_params)})"),
        ("Perceptual weights per image (A factors)", f"{d_weights:,} values"),
        ("Image placeholder id", str(config.image_token_id)),
    ]
    if num_parameters is not None:
        arch.append(("Total parameters", f"{num_parameters:,} ({human_count(num_parameters)})"))
    arch_table = "\n".join(["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in arch]])
    rows = compute_rows(config)
    fmt = lambda x, q: human_flops(x) if "FLOPs" in q else f"{x:,}"  # noqa: E731
    compute_table = "\n".join(
        ["| | VLoRA (this model) | Input-space model (LLaVA-style, 576 visual tokens) |", "|---|---|---|",
         *[f"| {q} | {fmt(a, q)} | {fmt(b, q)} |" for q, a, b in rows]]
    )
    source_text = f"\n\n{source}" if source else ""
    notes_text = "".join(f"\n- {n}" for n in (notes or []))
    body = f"""# VLoRA: {model_id}

A VLoRA vision-language model ([{PAPER_TITLE}](https://arxiv.org/abs/{ARXIV_ID}), NeurIPS 2024) packaged for
Hugging Face transformers with remote code (`trust_remote_code=True`; no extra package needed). Instead of
feeding visual tokens to the LLM, a perceptual weights generator turns the image into low-rank deltas
`B·Aᵀ` that are added to the LLM's projections while it reads the text.{source_text}

## Usage

{usage_snippet(model_id, has_tokenizer)}

One `<image>` placeholder per image; rows of a batch may hold different images or none (text only).

## Architecture

{arch_table}

## Compute on the LLM side

Analytic FLOPs (a multiply-add counts 2) for a {PROMPT_TOKENS}-token prompt with one image, against an input-space
model with the same backbone that puts {LLAVA_VISUAL_TOKENS} visual tokens into the sequence. The vision tower is the
same for both and not counted.

{compute_table}
{notes_text}

## Citation

```bibtex
{CITATION}
```
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def check_card(path) -> ModelCard:
    """Parse a README.md and check the metadata a Hub model page needs; ValueError naming what is wrong."""
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} is missing: a Hub folder needs a README.md model card")
    card = ModelCard.load(path)
    data = card.data.to_dict()
    problems = []
    if data.get("library_name") != "transformers":
        problems.append(f"library_name is {data.get('library_name')!r}, expected 'transformers'")
    if data.get("pipeline_tag") != "image-text-to-text":
        problems.append(f"pipeline_tag is {data.get('pipeline_tag')!r}, expected 'image-text-to-text'")
    if not data.get("license"):
        problems.append("license is missing")
    tags = data.get("tags")
    if tags is not None and not (isinstance(tags, list) and all(isinstance(t, str) for t in tags)):
        problems.append(f"tags must be a list of strings, got {tags!r}")
    base = data.get("base_model")
    if base is not None:
        for b in [base] if isinstance(base, str) else base:
            if not isinstance(b, str) or b.count("/") != 1 or b.startswith(("/", ".")):
                problems.append(f"base_model {b!r} is not a Hub repo id like 'owner/name'")
    if problems:
        raise ValueError(f"invalid model card metadata in {path}: " + "; ".join(problems))
    return card
