"""`vlora-hf train`: train a VLoRA model with transformers' Trainer (accelerate underneath).

Stages (`--stage`): pretrain trains the generator alone, finetune the generator and the LLM (the release's two
stages), scratch everything from random weights (the shipped demo model). The model starts from one of our
checkpoints, from a transformers text model plus a vision tower, or from configs; the result is exported with
its processor and a model card to `export_dir`. Arguments: `training/arguments.py`; `--help` lists them all.

  vlora-hf train --recipe recipes/demo.yaml
  vlora-hf train --stage pretrain --text_model LLM_DIR --vision_tower CLIP_DIR --dataset llava \\
      --data_path chat.json --image_folder images/ --output_dir runs/stage1 --num_train_epochs 1
  accelerate launch --config_file recipes/accelerate/ddp.yaml -m vlora_hf.training.train --recipe R.yaml
"""

import json
import logging
import math
import os
import random
import sys
import time

import torch
from transformers import Trainer, set_seed
from transformers.trainer_callback import PrinterCallback
from transformers.trainer_utils import get_last_checkpoint

from ..data.llava import LLaVACollator, LLaVADataset, chat_template_of, vision_feature_encoder
from ..data.llava_format import conversation_rows
from ..data.shapes_dataset import heldout_rows, preprocess_bank, shapes_dataset, training_rows
from .arguments import parse_args, recipe_yaml
from .callbacks import ProgressCallback, setup_logging
from .evaluate import exact_match
from .llm_lora import apply_llm_lora, merge_llm_lora
from .llava_baseline import (ExpandImageTokens, TowerView, apply_llava_stage, build_llava, export_llava, image_tokens,
                             is_llava)
from .model_builder import build_model_and_processor
from .scratch_tower import WARM_START_ARGS, warm_start_tower
from .stages import apply_stage

logger = logging.getLogger("vlora_hf.training")  # not __name__: it is "__main__" under `python -m`


def training_data(data_args, processor, images=None, rows=None):
    """-> (dataset, collator): shapes-vqa rows over a pixel bank, or a LLaVA json on disk."""
    common = {"mode": data_args.data_mode, "model_max_length": data_args.max_length,
              "image_token_id": processor.image_token_id,
              "chat_template": chat_template_of(processor) if data_args.data_mode == "vicuna_v1" else None}
    if data_args.dataset == "shapes":
        dataset = shapes_dataset(images, rows, processor, multi_turn=data_args.multi_turn,
                                 seed=data_args.shapes_seed, **common)
    else:
        dataset = LLaVADataset(data_args.data_path, processor.tokenizer, image_folder=data_args.image_folder,
                               image_processor=processor.image_processor, **common)
    return dataset, LLaVACollator(processor.tokenizer.pad_token_id)


def prepare_model_and_data(model_args, data_args, training_args):
    """Model, processor, dataset and collator, with the stage applied -> (..., trainable counts)."""
    images = rows = None
    if data_args.dataset == "shapes":
        images, rows = training_rows(data_args.num_images, data_args.shapes_seed, data_args.image_size,
                                     data_args.question_weights, data_args.shapes_families)
        text_rows = rows
    else:
        text_rows = conversation_rows(data_args.data_path) if model_args.tokenizer_build else []
    llava = model_args.architecture == "llava"
    build = build_llava if llava else build_model_and_processor
    model, processor = build(model_args, text_rows, data_args.multi_turn)
    dataset, collator = training_data(data_args, processor, images, rows)
    if llava:
        collator = ExpandImageTokens(collator, processor.image_token_id, image_tokens(model))
    warm = model_args.warm_start
    if warm:
        from accelerate import PartialState

        PartialState()  # joins the launch's process group now, so the processes split the warm start
        settings = {k: WARM_START_ARGS[k](v) for k, v in warm.items() if k in WARM_START_ARGS}
        warm_start_tower(TowerView(model) if llava else model, dataset.images, rows, seed=training_args.seed,
                         **settings)
    stage = apply_llava_stage if llava else apply_stage
    counts = stage(model, training_args.stage, freeze_tower=bool((warm or {}).get("freeze_tower")))
    if model_args.llm_lora:
        counts["language_model"] = apply_llm_lora(model, **model_args.llm_lora)
    logger.info(f"stage {training_args.stage}: trainable parameters {counts} of "
                f"{sum(p.numel() for p in model.parameters()):,}")
    if data_args.precompute_image_features:
        n = dataset.precompute_image_features(vision_feature_encoder(model), cache_file=data_args.feature_cache)
        logger.info(f"precomputed tower features for {n} images")
    logger.info(f"data: {data_args.dataset}, {len(dataset)} training rows")
    return model, processor, dataset, collator, counts


def resume_checkpoint(training_args) -> str | None:
    """resume_from_checkpoint "auto": the newest checkpoint in output_dir (none: a fresh start)."""
    resume = training_args.resume_from_checkpoint
    if resume != "auto":
        return resume
    newest = get_last_checkpoint(training_args.output_dir) if os.path.isdir(training_args.output_dir) else None
    if newest is None:
        logger.info(f"resume_from_checkpoint auto: no checkpoint in {training_args.output_dir}; starting fresh")
    return newest


def evaluate_heldout(model, processor, data_args, heldout_args) -> dict:
    """Exact match per question on held-out shapes-vqa images (the eval split, never drawn for training)."""
    images, rows = heldout_rows(heldout_args.heldout_images, heldout_args.heldout_seed, data_args.image_size,
                                data_args.shapes_families, data_args.num_images)
    bank = images if is_llava(model) else preprocess_bank(images, processor.image_processor)  # LLaVA: the processor
    results = exact_match(model, processor, bank, rows,  # expands each <image> to its patch tokens
                          max_new_tokens=heldout_args.heldout_max_new_tokens,
                          batch_size=heldout_args.heldout_batch_size)
    for question, accuracy in results["per_question"].items():
        logger.info(f"{question!r}: {100 * accuracy:.1f} % exact match ({results['counts'][question]} held-out "
                    "questions)")
    return {k: results[k] for k in ("per_question", "counts", "overall")}


def card_notes(training_args, data_args, summary: dict) -> list[str]:
    processes, threads = int(summary["world_size"]), torch.get_num_threads()
    where = (f"{processes} process{'es' if processes > 1 else ''} ({'DDP, ' if processes > 1 else ''}"
             f"{threads} CPU thread{'s' if threads > 1 else ''} each)")
    notes = [f"Trained with `vlora-hf train` (stage `{training_args.stage}`): {summary['steps']} optimizer steps, "
             f"{summary['train_seconds'] / 60:.1f} min of training ({summary['total_seconds'] / 60:.1f} min in all, "
             f"data and evaluation included) on {where}, seed {training_args.seed}."]
    if data_args.dataset == "shapes":
        notes.append(f"Data: shapes-vqa, {data_args.num_images} generated training images "
                     f"(seed {data_args.shapes_seed}).")
    if "eval" in summary:
        ev = summary["eval"]
        notes.append(f"Held-out exact match ({sum(ev['counts'].values())} questions on images the model never saw): "
                     + "; ".join(f"{q} {100 * acc:.1f} %" for q, acc in ev["per_question"].items()) + ".")
    return notes + list(training_args.card_notes)


def export(model, processor, training_args, data_args, summary: dict) -> None:
    """The trained model in our format, with its processor, a model card and training_summary.json."""
    from ..conversion import export_folder

    if is_llava(model):
        return export_llava(model, processor, training_args.export_dir, _jsonable(summary))
    model.config.use_cache = True  # the Trainer turns the cache off for training; generation wants it
    export_folder(model, processor, training_args.export_dir, force=True, model_id=training_args.card_model_id,
                  tags=training_args.card_tags or None, notes=card_notes(training_args, data_args, summary),
                  extra_files={"training_summary.json": json.dumps(_jsonable(summary), indent=2) + "\n"})


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return round(obj, 6) if math.isfinite(obj) else None
    return obj


def run(model_args, data_args, heldout_args, training_args, callbacks=()) -> dict:
    """Train, then (main process) evaluate on held-out images and export; -> the training summary.
    `callbacks`: further TrainerCallbacks (e.g. evaluation along training)."""
    if training_args.torch_threads:
        torch.set_num_threads(training_args.torch_threads)
    set_seed(training_args.seed)
    random.seed(training_args.seed)
    start = time.time()
    model, processor, dataset, collator, counts = prepare_model_and_data(model_args, data_args, training_args)
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset, data_collator=collator,
                      processing_class=processor, callbacks=[ProgressCallback(), *callbacks])
    trainer.remove_callback(PrinterCallback)
    train_start = time.time()
    output = trainer.train(resume_from_checkpoint=resume_checkpoint(training_args))
    summary = {"world_size": training_args.world_size, "steps": output.global_step,
               "train_seconds": time.time() - train_start, "training_loss": output.training_loss,
               "trainable": counts}
    logger.info(f"trained {output.global_step} steps in {summary['train_seconds']:.0f} s; "
                f"final loss {output.training_loss:.4f}")
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        model = trainer.accelerator.unwrap_model(trainer.model)
        if heldout_args.heldout_images:
            summary["eval"] = evaluate_heldout(model, processor, data_args, heldout_args)
        summary["total_seconds"] = time.time() - start
        if model_args.llm_lora:
            merge_llm_lora(model)  # the export is a plain VLoRA checkpoint
        export(model, processor, training_args, data_args, summary)
        logger.info(f"saved to {training_args.export_dir} (total {summary['total_seconds']:.0f} s)")
        floor = heldout_args.heldout_min_accuracy
        if "eval" in summary and floor is not None and min(summary["eval"]["per_question"].values()) < floor:
            raise SystemExit(f"held-out accuracy {min(summary['eval']['per_question'].values()):.3f} is below "
                             f"heldout_min_accuracy={floor}")
    trainer.accelerator.wait_for_everyone()
    return summary


def main(argv: list[str] | None = None) -> int:
    try:
        model_args, data_args, heldout_args, training_args, recipe, print_recipe = parse_args(argv)
    except ValueError as err:
        print(f"vlora-hf train: error: {err}", file=sys.stderr)
        return 2
    if print_recipe:
        print(recipe_yaml(recipe), end="")
        return 0
    setup_logging(training_args)
    try:
        run(model_args, data_args, heldout_args, training_args)
    except ValueError as err:
        print(f"vlora-hf train: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
