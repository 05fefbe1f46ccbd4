"""Training recipes: a nested dict (YAML or JSON file, then command-line overrides) with defaults.

A recipe has these sections (every key optional; see `DEFAULTS` and recipes/demo.yaml):

    stage: pretrain | finetune | scratch      # what trains (see STAGES)
    seed: 0
    output_dir: PATH                          # the final, loadable checkpoint (our format + processor + card)
    model:      {checkpoint | text_model + vision_tower | text_config + vision_config, vlora: {...}}
    tokenizer:  {path | build: {vocab_size}, chat_template}
    image_processor: {...}                    # VLoRAImageProcessor kwargs (size, crop_size, image_mean, ...)
    data:       {dataset: shapes | llava, ...}
    training:   {...}                          # transformers.TrainingArguments kwargs (+ run_dir, resume)
    eval:       {shapes: {num_images, seed}, batch_size, max_new_tokens, min_accuracy}
    card:       {...}                          # extra text for the model card
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import yaml

# stage -> which parts of the model train (release: stage 1 = generator only, stage 2 = generator + LLM).
STAGES = {
    "pretrain": {"vision_tower": False, "generator": True, "language_model": False},
    "finetune": {"vision_tower": False, "generator": True, "language_model": True},
    "scratch": {"vision_tower": True, "generator": True, "language_model": True},
}

DEFAULTS: dict[str, Any] = {
    "stage": "finetune",
    "seed": 0,
    "output_dir": "runs/vlora/final",
    "model": {
        "checkpoint": None,  # one of our checkpoint folders (or a Hub id)
        "text_model": None,  # a transformers causal-LM folder (Llama-style)
        "vision_tower": None,  # a CLIP / SigLIP vision folder
        "text_config": None,  # dicts: random init (scratch)
        "vision_config": None,
        "vlora": {},  # VLoRAConfig kwargs (generator_hidden_size, lora_rank, target_modules, skip_layers, ...)
        "dtype": None,  # load dtype for pretrained parts (float32 default)
        "init_lora_B_std": None,  # random init: normal(0, std) for the static B factors instead of zeros
        "init_vision": None,  # scratch ViT tower: {patch_embedding: fan_in, position_embedding: sincos,
        #                       warm_start: {steps, learning_rate, batch_size, lr_scheduler_type, warmup_steps,
        #                                    freeze_tower}}
    },
    "tokenizer": {
        "path": None,  # default: the text model's / checkpoint's tokenizer
        "build": None,  # {vocab_size: N, template_tokens: bool}: a byte-level BPE tokenizer trained on the
        #                 rendered training conversations; template_tokens: the template's fixed text (system
        #                 sentence + "USER: ", " ASSISTANT:") becomes one added token each
        "chat_template": None,  # vicuna_v1 (default) | plain | a jinja string
    },
    "image_processor": {},
    "data": {
        "dataset": "shapes",
        "num_images": 1000,
        "seed": 0,
        "image_size": None,
        "question_weights": None,  # shapes: {question: weight} repeats (w > 1) or thins (w < 1) that question's rows
        "multi_turn": False,  # shapes: one conversation per image holding all its questions (LLaVA-instruct style)
        "path": None,  # llava: the conversation json
        "image_folder": None,  # llava: image root
        "max_length": None,
        "mode": None,  # llava: vicuna_v1 (instruction tuning, default) or plain (caption pre-training)
        "feature_cache": None,  # llava + precompute: cache file for the tower features
        "precompute_image_features": False,  # frozen tower: run it once per image, train on the features
    },
    "training": {
        "run_dir": None,  # Trainer checkpoints and logs (default: <output_dir>.run)
        "resume": None,  # a checkpoint-N folder, or "auto" for the newest in run_dir
        "max_steps": 100,
        "num_train_epochs": 1,
        "per_device_train_batch_size": 8,
        "gradient_accumulation_steps": 1,
        "learning_rate": 2e-4,
        "weight_decay": 0.0,
        "warmup_steps": 0,
        "lr_scheduler_type": "cosine",
        "max_grad_norm": 1.0,
        "logging_steps": 10,
        "save_strategy": "steps",
        "save_steps": 500,
        "save_total_limit": 2,
        "gradient_checkpointing": False,
        "bf16": "auto",  # auto: on where the accelerator supports it (never on CPU)
        "dataloader_num_workers": 0,
        "torch_threads": None,  # torch.set_num_threads for CPU runs
        "llm_lora": None,  # {r, alpha, target_modules, dropout}: LoRA on the language model instead of full finetune
        "disable_tqdm": True,
    },
    "eval": {
        "shapes": None,  # {num_images, seed}: held-out shapes-vqa images, exact match per question
        "batch_size": 64,
        "max_new_tokens": 32,
        "min_accuracy": None,  # fail the run if any question type scores below this
    },
    "card": {},
}


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and out[key] is not None:
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_recipe_file(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"recipe file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ValueError(f"recipe {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {err}") from err
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"recipe {path} must hold a mapping at the top level, got {type(data).__name__}")
    return data


def set_dotted(recipe: dict, dotted: str, value) -> None:
    """`training.learning_rate` = value (creating sections as needed)."""
    keys = dotted.split(".")
    node = recipe
    for key in keys[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[keys[-1]] = value


def parse_set(item: str) -> tuple[str, Any]:
    """`a.b=VALUE` with VALUE parsed as YAML (numbers, booleans, lists, null)."""
    if "=" not in item:
        raise ValueError(f"--set expects KEY=VALUE (e.g. training.learning_rate=1e-3), got {item!r}")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def validate(recipe: dict) -> dict:
    unknown = sorted(set(recipe) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown recipe section(s) {unknown}; expected {sorted(DEFAULTS)}")
    if recipe["stage"] not in STAGES:
        raise ValueError(f"stage must be one of {sorted(STAGES)}, got {recipe['stage']!r}")
    m = recipe["model"]
    sources = [bool(m.get("checkpoint")), bool(m.get("text_model") or m.get("vision_tower")), bool(m.get("text_config"))]
    if sum(sources) != 1:
        raise ValueError(
            "model: give exactly one initialisation: `checkpoint` (one of our checkpoints), `text_model` + "
            "`vision_tower` (transformers folders), or `text_config` + `vision_config` (random init)"
        )
    if sources[1] and not (m.get("text_model") and m.get("vision_tower")):
        raise ValueError("model: `text_model` and `vision_tower` go together (a text model folder and a vision tower folder)")
    if sources[2] and recipe["stage"] != "scratch":
        raise ValueError(
            f"model: a randomly initialised model (text_config) only makes sense with stage 'scratch', "
            f"not {recipe['stage']!r}"
        )
    warm = (m.get("init_vision") or {}).get("warm_start")
    if warm:
        if recipe["stage"] != "scratch" or recipe["data"]["dataset"] != "shapes":
            raise ValueError("model.init_vision.warm_start trains a scratch tower on shapes-vqa's answers: it needs "
                             f"stage scratch and data.dataset shapes (got {recipe['stage']!r}, "
                             f"{recipe['data']['dataset']!r})")
        from .warm_start import WARM_START_ARGS, check_schedule

        keys = {*WARM_START_ARGS, "freeze_tower"}  # freeze_tower: applied after the warm start, by the trainer
        if set(warm) - keys or "steps" not in warm:
            raise ValueError(f"model.init_vision.warm_start takes steps (required) and "
                             f"{sorted(keys - {'steps'})}; got {sorted(warm)}")
        check_schedule(**{k: WARM_START_ARGS[k](warm[k]) for k in ("lr_scheduler_type", "warmup_steps") if k in warm})
    tower_trains = STAGES[recipe["stage"]]["vision_tower"] and not (warm or {}).get("freeze_tower")
    if recipe["data"].get("precompute_image_features") and tower_trains:
        raise ValueError("data.precompute_image_features needs a frozen tower (stage pretrain or finetune, or "
                         "model.init_vision.warm_start.freeze_tower)")
    if recipe["data"].get("multi_turn") and recipe["data"]["dataset"] != "shapes":
        raise ValueError("data.multi_turn groups shapes-vqa questions per image; llava records carry their own turns")
    if recipe["training"].get("llm_lora"):
        from .llm_lora import check_llm_lora

        check_llm_lora(recipe["training"]["llm_lora"], recipe["stage"])
    build = recipe["tokenizer"].get("build")
    if build and recipe["tokenizer"].get("path"):
        raise ValueError("tokenizer: give `path` or `build`, not both")
    if build and set(build) - {"vocab_size", "template_tokens"}:
        raise ValueError(f"tokenizer.build: unknown key(s) {sorted(set(build) - {'vocab_size', 'template_tokens'})}; "
                         "expected vocab_size, template_tokens")
    return recipe


def resolve_recipe(path=None, overrides: dict | None = None, sets: list[str] | None = None) -> dict:
    """DEFAULTS <- recipe file <- explicit overrides (dotted keys) <- --set items; validated."""
    recipe = copy.deepcopy(DEFAULTS)
    if path is not None:
        recipe = deep_merge(recipe, load_recipe_file(path))
    for key, value in (overrides or {}).items():
        set_dotted(recipe, key, value)
    for item in sets or []:
        key, value = parse_set(item)
        set_dotted(recipe, key, value)
    return validate(recipe)


__all__ = ["DEFAULTS", "STAGES", "resolve_recipe", "deep_merge", "load_recipe_file", "parse_set", "set_dotted"]
