"""The arguments of `vlora-hf train`: four dataclasses read by transformers' `HfArgumentParser`.

A recipe (a flat YAML or JSON mapping, e.g. recipes/demo.yaml) and the command line fill the same fields: the
recipe's keys become the parser's defaults and flags override them (`--learning_rate 1e-3` or
`--learning-rate 1e-3`). A key no dataclass has is an error, so a typo never trains something else silently.
Mapping-valued fields (`text_config`, `vlora`, ...) take JSON or YAML text on the command line.
`vlora-hf train --help` lists every field, transformers' `TrainingArguments` included.
"""

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from transformers import HfArgumentParser, TrainingArguments
from transformers.trainer_utils import SchedulerType

from ..data.shapes_families import FAMILY_DRAWERS
from ..dtypes import DTYPES
from .llm_lora import check_llm_lora
from .scratch_tower import WARM_START_ARGS, check_schedule
from .stages import STAGES

SCRATCH_TOWER_KEYS = {"patch_embedding", "position_embedding", "warm_start"}
WARM_START_KEYS = {*WARM_START_ARGS, "freeze_tower"}
TOKENIZER_BUILD_KEYS = {"vocab_size", "template_tokens"}


def _mapping(value, name: str) -> dict | None:
    """A mapping field given as a dict (recipe) or as JSON / YAML text (command line)."""
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ValueError(f"--{name}: not valid JSON or YAML: {err}") from err
    if value is not None and not isinstance(value, dict):
        raise ValueError(f"{name} must be a mapping, got {value!r}")
    return value


def _check_keys(value: dict | None, allowed: set, name: str) -> None:
    unknown = sorted(set(value or {}) - allowed)
    if unknown:
        raise ValueError(f"{name}: unknown key(s) {unknown}; expected {sorted(allowed)}")


@dataclass
class ModelArguments:
    """Where the model starts (exactly one source) and how its tokenizer and image processor are made."""

    architecture: Literal["vlora", "llava"] = field(default="vlora", metadata={
        "help": "vlora, or llava: transformers' LlavaForConditionalGeneration (2-layer MLP projector, patch tokens) "
                "from the same configs, as a baseline."})
    checkpoint: str | None = field(default=None, metadata={"help": "One of our checkpoints (folder or Hub id)."})
    text_model: str | None = field(default=None, metadata={"help": "A transformers causal-LM folder (with "
                                                                   "--vision_tower)."})
    vision_tower: str | None = field(default=None, metadata={"help": "A CLIP / SigLIP vision tower folder."})
    text_config: dict | str | None = field(default=None, metadata={
        "help": "Random init (stage scratch): the decoder's config, e.g. {model_type: llama, hidden_size: 128}."})
    vision_config: dict | str | None = field(default=None, metadata={
        "help": "Random init (stage scratch): the tower's config, e.g. {model_type: clip_vision_model, ...}."})
    vlora: dict | str | None = field(default=None, metadata={
        "help": "VLoRAConfig keyword arguments (lora_rank, target_modules, skip_layers, generator_*, ...)."})
    dtype: Literal[tuple(DTYPES)] | None = field(default=None, metadata={
        "help": "Load pretrained parts in this precision (default: as saved)."})
    init_lora_B_std: float | None = field(default=None, metadata={
        "help": "Random init: draw the generator's static B factors from normal(0, std) instead of zeros, so the "
                "image reaches the loss from the first step."})
    scratch_tower: dict | str | None = field(default=None, metadata={
        "help": "A tower trained from scratch: {patch_embedding: fan_in, position_embedding: sincos, warm_start: "
                "{steps, learning_rate, batch_size, lr_scheduler_type, warmup_steps, freeze_tower}}."})
    llm_lora: dict | str | None = field(default=None, metadata={
        "help": "Stage finetune: a LoRA on the LLM instead of full fine-tuning, {r, alpha, target_modules, dropout}; "
                "merged into the weights before export."})
    tokenizer: str | None = field(default=None, metadata={
        "help": "Tokenizer folder (default: the checkpoint's or the text model's)."})
    tokenizer_build: dict | str | None = field(default=None, metadata={
        "help": "Random init: train a byte-level BPE tokenizer on the training conversations, {vocab_size, "
                "template_tokens}; template_tokens makes the chat template's fixed text one token each."})
    chat_template: str | None = field(default=None, metadata={
        "help": "vicuna_v1 (default for new processors), plain, or a jinja template."})
    image_processor: dict | str | None = field(default=None, metadata={
        "help": "VLoRAImageProcessor keyword arguments (image_mean, image_std, size, ...)."})

    def __post_init__(self):
        for name in ("text_config", "vision_config", "vlora", "scratch_tower", "llm_lora", "tokenizer_build",
                     "image_processor"):
            setattr(self, name, _mapping(getattr(self, name), name))
        sources = [bool(self.checkpoint), bool(self.text_model or self.vision_tower), bool(self.text_config)]
        if sum(sources) != 1:
            raise ValueError("give exactly one model source: checkpoint (one of ours), text_model + vision_tower "
                             "(transformers folders), or text_config + vision_config (random init)")
        if sources[1] and not (self.text_model and self.vision_tower):
            raise ValueError("text_model and vision_tower go together (a text model folder and a vision tower folder)")
        if sources[2] and not self.vision_config:
            raise ValueError("text_config (random init) needs vision_config as well")
        if self.tokenizer_build and self.tokenizer:
            raise ValueError("give tokenizer (a folder) or tokenizer_build, not both")
        _check_keys(self.tokenizer_build, TOKENIZER_BUILD_KEYS, "tokenizer_build")
        _check_keys(self.scratch_tower, SCRATCH_TOWER_KEYS, "scratch_tower")
        warm = self.warm_start
        _check_keys(warm, WARM_START_KEYS, "scratch_tower.warm_start")
        if warm is not None:
            if "steps" not in warm:
                raise ValueError("scratch_tower.warm_start needs steps")
            check_schedule(warm.get("lr_scheduler_type", "constant"), int(warm.get("warmup_steps", 0)))

    @property
    def warm_start(self) -> dict | None:
        return (self.scratch_tower or {}).get("warm_start")


@dataclass
class DataArguments:
    """What the model trains on: shapes-vqa drawn in memory, or LLaVA-format conversations on disk."""

    dataset: Literal["shapes", "llava"] = field(default="shapes", metadata={"help": "Training data."})
    num_images: int = field(default=1000, metadata={"help": "shapes: training images to draw (2 questions each)."})
    shapes_seed: int = field(default=0, metadata={"help": "shapes: the drawing seed of the training images."})
    image_size: int | None = field(default=None, metadata={"help": "shapes: resize the 64 px images to this."})
    question_weights: dict | str | None = field(default=None, metadata={
        "help": "shapes: {question: weight}; a weight repeats (> 1) or thins (< 1) that question's rows."})
    shapes_families: dict | str | None = field(default=None, metadata={
        "help": "shapes: further image families and their image counts, e.g. {relation: 20000, small: 20000} "
                "(drawn after the classic images; the held-out split gets the same proportions)."})
    multi_turn: bool = field(default=False, metadata={
        "help": "shapes: one conversation per image holding all its questions (LLaVA-instruct style)."})
    data_path: str | None = field(default=None, metadata={"help": "llava: the conversations json / jsonl."})
    image_folder: str | None = field(default=None, metadata={"help": "llava: the folder image paths are relative to."})
    data_mode: Literal["vicuna_v1", "plain"] = field(default="vicuna_v1", metadata={
        "help": "vicuna_v1: instruction tuning in the chat template; plain: caption pre-training."})
    max_length: int | None = field(default=None, metadata={"help": "Truncate longer rows (default: the tokenizer's)."})
    precompute_image_features: bool = field(default=False, metadata={
        "help": "Frozen tower: run it once per image and train on its features."})
    feature_cache: str | None = field(default=None, metadata={"help": "With precompute: cache file of the features."})

    def __post_init__(self):
        self.question_weights = _mapping(self.question_weights, "question_weights")
        self.shapes_families = _mapping(self.shapes_families, "shapes_families")
        for family, count in (self.shapes_families or {}).items():
            if family not in FAMILY_DRAWERS or not isinstance(count, int) or count < 0:
                raise ValueError(f"shapes_families: {family}: {count!r}; expected families {sorted(FAMILY_DRAWERS)} "
                                 "with image counts >= 0")
        if self.dataset == "llava" and not self.data_path:
            raise ValueError("dataset llava needs data_path (the conversations json)")
        if self.multi_turn and self.dataset != "shapes":
            raise ValueError("multi_turn groups shapes-vqa questions per image; llava records carry their own turns")


@dataclass
class HeldoutArguments:
    """Exact match on held-out shapes-vqa images after training (reported in the model card)."""

    heldout_images: int = field(default=0, metadata={"help": "Held-out images to evaluate on (0: no evaluation)."})
    heldout_seed: int = field(default=0, metadata={"help": "Drawing seed of the held-out split."})
    heldout_batch_size: int = field(default=64, metadata={"help": "Questions per generate call."})
    heldout_max_new_tokens: int = field(default=32, metadata={"help": "Answer length limit."})
    heldout_min_accuracy: float | None = field(default=None, metadata={
        "help": "Fail the run when a question type scores below this."})


@dataclass
class VLoRATrainingArguments(TrainingArguments):
    """transformers' TrainingArguments plus the stage and the export; defaults that suit VLoRA runs.

    `output_dir` keeps its transformers meaning (Trainer checkpoints and logs); the trained model, with its
    processor and a model card, is exported to `export_dir`."""

    stage: Literal["pretrain", "finetune", "scratch"] = field(default="finetune", metadata={
        "help": "What trains: " + "; ".join(f"{s}: {', '.join(k for k, on in p.items() if on)}"
                                           for s, p in STAGES.items())})
    export_dir: str | None = field(default=None, metadata={
        "help": "The trained model in our format, with processor and model card (default: OUTPUT_DIR/final)."})
    torch_threads: int | None = field(default=None, metadata={"help": "torch.set_num_threads for CPU runs."})
    card_model_id: str | None = field(default=None, metadata={"help": "Hub id the model card names."})
    card_tags: list[str] = field(default_factory=list, metadata={"help": "Extra model card tags."})
    card_notes: list[str] = field(default_factory=list, metadata={"help": "Extra model card lines."})
    # Defaults that differ from transformers'.
    output_dir: str | None = field(default="runs/vlora", metadata={"help": "Trainer checkpoints and logs."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs (used when max_steps <= 0).",
                                                           "aliases": ["--epochs"]})
    learning_rate: float = field(default=2e-4, metadata={"help": "Peak learning rate (AdamW)."})
    lr_scheduler_type: SchedulerType | str = field(default="cosine", metadata={"help": "The learning rate schedule."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Trainer checkpoints kept."})
    bf16: bool | None = field(default=None, metadata={
        "help": "bf16 mixed precision (default: on where the accelerator supports it)."})
    disable_tqdm: bool | None = field(default=True, metadata={"help": "The progress callback logs instead."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep pixel_values / image_features."})
    ddp_find_unused_parameters: bool | None = field(default=False, metadata={
        "help": "Every trainable parameter gets a gradient (stages freeze what the loss never reaches)."})

    def __post_init__(self):
        accelerator = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
        if not accelerator:
            # Several launched CPU processes then form one gloo group, and pinning memory has no device to serve.
            self.use_cpu = True
            self.dataloader_pin_memory = False
        if self.bf16 is None:
            self.bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        if self.export_dir is None:
            self.export_dir = str(Path(self.output_dir) / "final")
        super().__post_init__()


ARGUMENT_CLASSES = (ModelArguments, DataArguments, HeldoutArguments, VLoRATrainingArguments)


def check_arguments(model_args: ModelArguments, data_args: DataArguments, training_args) -> None:
    """The checks that span two dataclasses (each dataclass checks its own fields)."""
    stage = training_args.stage
    if model_args.text_config and stage != "scratch":
        raise ValueError(f"a randomly initialised model (text_config) only makes sense with stage scratch, not {stage!r}")
    warm = model_args.warm_start
    if warm and (stage != "scratch" or data_args.dataset != "shapes"):
        raise ValueError("scratch_tower.warm_start trains a scratch tower on shapes-vqa's answers: it needs stage "
                         f"scratch and dataset shapes (got {stage!r}, {data_args.dataset!r})")
    tower_trains = STAGES[stage]["vision_tower"] and not (warm or {}).get("freeze_tower")
    if data_args.precompute_image_features and tower_trains:
        raise ValueError("precompute_image_features needs a frozen tower (stage pretrain or finetune, or "
                         "scratch_tower.warm_start.freeze_tower)")
    if model_args.architecture == "llava" and (stage != "scratch" or data_args.precompute_image_features):
        raise ValueError("architecture llava is a baseline trained from configs: it needs stage scratch and no "
                         "precompute_image_features")
    if model_args.llm_lora is not None:
        check_llm_lora(model_args.llm_lora, stage)


def load_recipe(path) -> dict:
    """A flat YAML / JSON mapping of field names to values."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"recipe file not found: {path}")
    kind = "JSON" if path.suffix == ".json" else "YAML"
    try:
        text = path.read_text(encoding="utf-8")
        recipe = json.loads(text) if kind == "JSON" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ValueError(f"recipe {path} is not valid {kind}: {err}") from err
    if not isinstance(recipe or {}, dict):
        raise ValueError(f"recipe {path} must hold a mapping of argument names, got {type(recipe).__name__}")
    return recipe or {}


def build_parser() -> HfArgumentParser:
    parser = HfArgumentParser(ARGUMENT_CLASSES, prog="vlora-hf train", allow_abbrev=False,
                              description="Train a VLoRA model (stage pretrain / finetune / scratch) with "
                                          "transformers.Trainer. Flags override the recipe's values.")
    parser.add_argument("--recipe", help="a flat YAML or JSON file of argument values (see recipes/demo.yaml)")
    parser.add_argument("--print-recipe", action="store_true",
                        help="print the resolved arguments that differ from the defaults, as a recipe, and exit")
    return parser


def field_names() -> set[str]:
    return {f.name for cls in ARGUMENT_CLASSES for f in dataclasses.fields(cls) if f.init}


def parse_args(argv: list[str] | None = None):
    """argv -> (ModelArguments, DataArguments, HeldoutArguments, VLoRATrainingArguments, recipe, print_recipe).

    `recipe` is the flat mapping of values that differ from the defaults (what `--print-recipe` prints).
    ValueError for a bad recipe or bad values; argparse exits (status 2) on an unknown flag."""
    parser = build_parser()
    defaults = vars(parser.parse_args([]))
    given, _ = parser.parse_known_args(argv)
    if given.recipe:
        recipe = load_recipe(given.recipe)
        unknown = sorted(set(recipe) - field_names())
        if unknown:
            raise ValueError(f"recipe {given.recipe}: unknown key(s) {unknown} (see `vlora-hf train --help`)")
        for action in parser._actions:  # argparse checks the choices of flags, not of defaults
            if action.choices and action.dest in recipe and recipe[action.dest] not in action.choices:
                raise ValueError(f"recipe {given.recipe}: {action.dest}={recipe[action.dest]!r} is not one of "
                                 f"{list(action.choices)}")
        parser.set_defaults(**recipe)
    namespace = vars(parser.parse_args(argv))
    resolved = {k: v for k, v in namespace.items() if k in field_names() and v != defaults[k]}
    outputs = []
    for cls in ARGUMENT_CLASSES:
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        outputs.append(cls(**{k: v for k, v in namespace.items() if k in names}))
    check_arguments(outputs[0], outputs[1], outputs[3])
    return (*outputs, resolved, namespace["print_recipe"])


def recipe_yaml(recipe: dict[str, Any]) -> str:
    return yaml.safe_dump({k: (v.value if hasattr(v, "value") else v) for k, v in recipe.items()}, sort_keys=False)


__all__ = ["ARGUMENT_CLASSES", "DataArguments", "HeldoutArguments", "ModelArguments",
           "VLoRATrainingArguments", "build_parser", "check_arguments", "load_recipe", "parse_args", "recipe_yaml"]
