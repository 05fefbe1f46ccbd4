"""Build the model and processor a run starts from, from `ModelArguments`: one of our checkpoints, a
transformers text model plus a vision tower (their weights copied in unchanged), or configs (random weights,
with a tokenizer trained on the run's own text)."""

import torch
from transformers import AutoConfig, AutoTokenizer

from ..dtypes import DTYPES
from ..modeling import VLoRAConfig, VLoRAForCausalLM
from ..processing import VLoRAImageProcessor, VLoRAProcessor
from ..processing.chat_templates import BACKBONE, CHAT_TEMPLATES
from .arguments import ModelArguments
from .bpe_tokenizer import build_tokenizer, template_phrases, tokenizer_corpus
from .scratch_tower import init_scratch_tower


def resolve_chat_template(name_or_template: str | None) -> str | None:
    """A template name (vicuna_v1, plain) or a jinja string -> the jinja string (None stays None)."""
    if name_or_template is None or name_or_template in CHAT_TEMPLATES:
        return CHAT_TEMPLATES.get(name_or_template)
    if "{" not in name_or_template:
        raise ValueError(f"chat_template {name_or_template!r} is neither a known name {sorted(CHAT_TEMPLATES)} "
                         "nor jinja")
    return name_or_template


def build_processor(tokenizer, image_processor, chat_template: str | None = None) -> VLoRAProcessor:
    """chat_template "backbone": the tokenizer's own template, which the processor adapts itself."""
    template = chat_template if chat_template == BACKBONE else resolve_chat_template(chat_template)
    return VLoRAProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=template)


def _as_config(d: dict, default_type: str):
    d = dict(d)
    return AutoConfig.for_model(d.pop("model_type", default_type), **d)


def from_checkpoint(args: ModelArguments):
    model = VLoRAForCausalLM.from_pretrained(args.checkpoint, dtype=DTYPES.get(args.dtype))
    if args.tokenizer is None:
        processor = VLoRAProcessor.from_pretrained(args.checkpoint)
        if args.chat_template:
            processor.chat_template = resolve_chat_template(args.chat_template)
    else:
        processor = build_processor(AutoTokenizer.from_pretrained(args.tokenizer),
                                    VLoRAImageProcessor.from_pretrained(args.checkpoint), args.chat_template)
    return model, processor


def from_pretrained_parts(args: ModelArguments):
    """A VLoRA model around a transformers causal LM and a CLIP / SigLIP tower, their weights unchanged."""
    tower_config = AutoConfig.from_pretrained(args.vision_tower)
    tower_config = getattr(tower_config, "vision_config", None) or tower_config  # a full CLIP / SigLIP folder
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.text_model)
    image_processor = VLoRAImageProcessor.from_vision_config(tower_config, args.vision_tower,
                                                             **(args.image_processor or {}))
    processor = build_processor(tokenizer, image_processor, args.chat_template)
    vlora = {"image_token_id": processor.image_token_id, **(args.vlora or {})}
    model = VLoRAForCausalLM.from_text_and_vision_pretrained(args.text_model, args.vision_tower,
                                                             dtype=DTYPES.get(args.dtype), **vlora)
    return model, processor


def scratch_tokenizer(args: ModelArguments, rows, multi_turn: bool = False):
    """A byte-level BPE tokenizer trained on the run's conversations as the chat template renders them."""
    template = resolve_chat_template(args.chat_template or "vicuna_v1")
    build = args.tokenizer_build
    phrases = template_phrases(template, follow_up=multi_turn) if build.get("template_tokens") else ()
    return build_tokenizer(tokenizer_corpus(template, rows), vocab_size=int(build.get("vocab_size", 512)),
                           chat_template=template, added_phrases=phrases)


def configs_tokenizer(args: ModelArguments, rows=None, multi_turn: bool = False):
    """A model from configs: the tokenizer folder, or one built on the rows; -> (tokenizer, text config dict
    with the tokenizer's vocabulary size and special ids)."""
    if args.tokenizer:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    elif args.tokenizer_build is not None:
        tokenizer = scratch_tokenizer(args, rows, multi_turn)
    else:
        raise ValueError("a model from configs needs tokenizer (a folder) or tokenizer_build")
    text_config = {"vocab_size": len(tokenizer), **{f"{name}_token_id": getattr(tokenizer, f"{name}_token_id")
                                                    for name in ("bos", "eos", "pad")}, **args.text_config}
    return tokenizer, text_config


def from_configs(args: ModelArguments, rows=None, multi_turn: bool = False):
    """Random weights (stage scratch). rows: the (image, question, answer) rows a built tokenizer learns from."""
    tokenizer, text_config = configs_tokenizer(args, rows, multi_turn)
    vision_config = _as_config(args.vision_config, "clip_vision_model")
    image_processor = VLoRAImageProcessor.from_vision_config(vision_config, **(args.image_processor or {}))
    processor = build_processor(tokenizer, image_processor, args.chat_template)
    vlora = {"image_token_id": processor.image_token_id, **(args.vlora or {})}
    config = VLoRAConfig(text_config=_as_config(text_config, "llama"), vision_config=vision_config, **vlora)
    vocab = config.text_config.vocab_size
    # The placeholder alone may lie past the embeddings (it is never embedded); no other token may.
    if vocab < len(tokenizer) and processor.image_token_id < vocab:
        raise ValueError(f"text_config.vocab_size={vocab} is smaller than the tokenizer ({len(tokenizer)} tokens)")
    model = VLoRAForCausalLM(config)
    if args.init_lora_B_std:
        # B = 0 (the release's init) keeps a pretrained LLM unchanged at the start; from scratch, a small random
        # B lets the image reach the loss (and A its gradient) from the first step.
        with torch.no_grad():
            for b in model.model.generator.lora_B.values():
                b.normal_(0.0, float(args.init_lora_B_std))
    tower_init = {k: v for k, v in (args.scratch_tower or {}).items() if k != "warm_start"}
    init_scratch_tower(model, **tower_init)
    return model, processor


def build_model_and_processor(args: ModelArguments, rows_for_tokenizer=None, multi_turn: bool = False):
    """-> (VLoRAForCausalLM, VLoRAProcessor) from the one model source `args` names."""
    if args.checkpoint:
        return from_checkpoint(args)
    if args.text_model:
        return from_pretrained_parts(args)
    return from_configs(args, rows_for_tokenizer, multi_turn)


__all__ = ["build_model_and_processor", "build_processor", "resolve_chat_template"]
