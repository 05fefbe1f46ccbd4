"""`vlora-hf train`: recipes, stages, a few steps that lower the loss, a frozen pretrain stage, 2-process DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import yaml

from vlora_hf.training.arguments import parse_args
from vlora_hf.training.model_builder import build_model_and_processor
from vlora_hf.training.stages import apply_stage
from vlora_hf.training.train import main, run

REPO = Path(__file__).resolve().parents[1]

# A tiny scratch recipe: 64 px shapes images seen through a 2-layer tower with 16 px patches; 24 images give 48
# rows, so one epoch of batch 8 is 6 steps.
TINY = {
    "stage": "scratch",
    "seed": 0,
    "text_config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 64,
                    "tie_word_embeddings": True},
    "vision_config": {"model_type": "clip_vision_model", "hidden_size": 16, "intermediate_size": 32,
                      "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 32, "patch_size": 16},
    "vlora": {"generator_hidden_size": 16, "generator_depth": 1, "generator_num_heads": 4, "lora_rank": 4,
              "skip_layers": 1, "vision_feature_layer": -1},
    "tokenizer_build": {"vocab_size": 300, "template_tokens": True},
    "chat_template": "vicuna_v1",
    "image_processor": {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},
    "dataset": "shapes", "num_images": 24,
    "per_device_train_batch_size": 8, "learning_rate": 3e-3, "lr_scheduler_type": "constant", "logging_steps": 4,
    "save_strategy": "no", "torch_threads": 2,
}
FROM_CHECKPOINT = {"text_config": None, "vision_config": None, "tokenizer_build": None}


def tiny_recipe(tmp_path, **overrides) -> dict:
    """TINY with Trainer files under tmp_path/run and the export in tmp_path/out."""
    return {**TINY, "output_dir": str(tmp_path / "run"), "export_dir": str(tmp_path / "out"), **overrides}


def write_recipe(tmp_path, recipe: dict) -> Path:
    path = Path(tempfile.mkstemp(suffix=".yaml", dir=tmp_path)[1])
    path.write_text(yaml.safe_dump(recipe))
    return path


def tiny_args(tmp_path, *flags, **overrides):
    """(model, data, heldout, training) arguments of the tiny recipe, parsed as `vlora-hf train` parses them."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = write_recipe(tmp_path, tiny_recipe(tmp_path, **overrides))
    return parse_args(["--recipe", str(path), *flags])[:4]


def fixed_batch(processor, n: int = 8):
    """Shapes rows the tiny runs train on, tokenised and batched."""
    from vlora_hf.data.llava import LLaVACollator
    from vlora_hf.data.shapes import make_rows
    from vlora_hf.data.shapes_dataset import shapes_dataset

    images, rows = make_rows(n // 2)
    dataset = shapes_dataset(images, rows, processor)
    return LLaVACollator(processor.tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])


def batch_loss(model, batch) -> float:
    model.eval()
    with torch.no_grad():
        return float(model(**batch).loss)


def load(folder):
    from vlora_hf import VLoRAForCausalLM
    from vlora_hf.processing import VLoRAProcessor

    return VLoRAForCausalLM.from_pretrained(folder).eval(), VLoRAProcessor.from_pretrained(folder)


# ----------------------------------------------------------------------------------------------------------------
# recipes


def test_recipe_and_flags_fill_the_same_fields(tmp_path):
    """A recipe's keys are the parser's defaults; flags (either spelling) override them; JSON recipes too."""
    path = write_recipe(tmp_path, {**tiny_recipe(tmp_path), "max_steps": 7, "learning_rate": 0.5})
    model_args, data_args, heldout_args, training_args, recipe, _ = parse_args(
        ["--recipe", str(path), "--learning-rate", "0.01", "--vlora", '{"lora_rank": 16}', "--max_steps", "9",
         "--num_images", "30"])
    assert training_args.learning_rate == 0.01 and training_args.max_steps == 9
    assert training_args.per_device_train_batch_size == 8 and training_args.stage == "scratch"
    assert model_args.vlora == {"lora_rank": 16}  # a mapping flag replaces the recipe's mapping
    assert model_args.text_config["hidden_size"] == 32 and data_args.num_images == 30
    assert heldout_args.heldout_images == 0
    assert training_args.export_dir == str(tmp_path / "out") and training_args.output_dir == str(tmp_path / "run")
    assert training_args.remove_unused_columns is False and training_args.use_cpu is True
    assert recipe["learning_rate"] == 0.01 and "per_device_train_batch_size" not in recipe  # the default is 8
    jpath = tmp_path / "r.json"
    jpath.write_text(json.dumps(tiny_recipe(tmp_path)))
    assert parse_args(["--recipe", str(jpath)])[0].vision_config["patch_size"] == 16


def test_print_recipe_round_trips(tmp_path, capsys):
    """--print-recipe prints the values that differ from the defaults; run as a recipe, it gives the same run."""
    path = write_recipe(tmp_path, tiny_recipe(tmp_path))
    assert main(["--recipe", str(path), "--epochs", "2", "--print-recipe"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["num_train_epochs"] == 2.0 and printed["text_config"] == TINY["text_config"]
    again = write_recipe(tmp_path, printed)
    assert parse_args(["--recipe", str(again)])[4] == printed


def test_demo_recipe_describes_the_shipped_model():
    """recipes/demo.yaml parses, and the model it builds has the shipped demo model's configuration."""
    model_args, data_args, heldout_args, training_args, _, _ = parse_args(["--recipe",
                                                                           str(REPO / "recipes" / "demo.yaml")])
    assert (training_args.stage, training_args.seed, training_args.max_steps) == ("scratch", 1, 5000)
    assert (training_args.per_device_train_batch_size, training_args.learning_rate) == (48, 1e-3)
    assert (training_args.warmup_steps, training_args.lr_scheduler_type.value) == (50, "cosine")
    assert training_args.export_dir == "src/vlora_hf/demo_model" and training_args.torch_threads == 1
    assert model_args.warm_start == {"steps": 10000, "learning_rate": 1e-3, "batch_size": 48}
    assert (data_args.num_images, data_args.shapes_seed, heldout_args.heldout_images) == (60000, 0, 2000)
    shipped = json.loads((REPO / "src" / "vlora_hf" / "demo_model" / "config.json").read_text())
    for key, value in model_args.vlora.items():
        assert shipped[key] == (list(value) if key == "target_modules" else value), key
    for section in ("text_config", "vision_config"):
        for key, value in getattr(model_args, section).items():
            assert shipped[section][key] == value, (section, key)


@pytest.mark.parametrize(
    "recipe, message",
    [
        ({"stage": "warmup"}, r"stage='warmup' is not one of \['pretrain', 'finetune', 'scratch'\]"),
        ({"text_config": None, "vision_config": None}, "exactly one model source"),
        ({"checkpoint": "x", "text_model": "y", "vision_tower": "z"}, "exactly one model source"),
        ({"text_config": None, "text_model": "y"}, "go together"),
        ({"stage": "pretrain"}, "only makes sense with stage scratch"),
        ({"learning_rat": 0.1}, r"unknown key\(s\) \['learning_rat'\]"),
        ({"tokenizer": "t"}, "not both"),
        ({"dataset": "llava"}, "needs data_path"),
        ({"precompute_image_features": True}, "needs a frozen tower"),
        ({"dataset": "llava", "data_path": "x.json", "multi_turn": True}, "multi_turn groups shapes-vqa"),
        ({"scratch_tower": {"warm_start": {"step": 3}}}, r"unknown key\(s\) \['step'\]"),
        ({"scratch_tower": {"warm_start": {"steps": 3, "lr_scheduler_type": "cosin"}}},
         "lr_scheduler_type must be one of"),
        ({"scratch_tower": {"warm_start": {"steps": 3, "warmup_steps": 2}}}, "use 'constant_with_warmup'"),
        ({"scratch_tower": {"warm_start": {"steps": 3}}, "dataset": "llava", "data_path": "x.json"},
         "needs stage scratch"),
        ({"llm_lora": {"r": 8}}, "target_modules required"),
        ({"llm_lora": {"r": 8, "target_modules": ["q_proj"]}}, "use stage finetune"),
    ],
)
def test_bad_recipes_raise_one_clear_error(tmp_path, capsys, recipe, message):
    """Each mistake is reported by `vlora-hf train` in one line, before any work (exit status 2)."""
    import re

    path = write_recipe(tmp_path, tiny_recipe(tmp_path, **recipe))
    try:
        status = main(["--recipe", str(path)])
    except SystemExit as exit:  # argparse rejects a bad choice itself
        status = exit.code
    assert status == 2
    assert re.search(message, capsys.readouterr().err)


def test_cli_reports_bad_recipe_files_and_flags(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("stage: [unclosed\n")
    assert main(["--recipe", str(path)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert main(["--recipe", str(tmp_path / "missing.yaml")]) == 2
    assert "recipe file not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit:
        main(["--recipe", str(write_recipe(tmp_path, tiny_recipe(tmp_path))), "--learning-rat", "1"])
    assert exit.value.code == 2 and "unrecognized arguments: --learning-rat" in capsys.readouterr().err


def test_stages_freeze_the_right_parts(tmp_path):
    model, _ = build_model_and_processor(tiny_args(tmp_path)[0])

    def trainable(module):
        return {p.requires_grad for p in module.parameters()}

    apply_stage(model, "pretrain")
    assert trainable(model.model.generator) == {True}
    assert trainable(model.model.language_model) == {False}
    assert trainable(model.model.vision_tower) == {False}
    assert trainable(model.lm_head) == {False}
    apply_stage(model, "finetune")
    assert trainable(model.model.generator) == {True}
    assert trainable(model.model.language_model) == {True}
    assert trainable(model.model.vision_tower) == {False}
    apply_stage(model, "scratch")
    assert trainable(model.model.generator) == trainable(model.model.language_model) == {True}
    # The tower trains, except what the features never pass through (here: its final norm).
    frozen = {n for n, p in model.model.vision_tower.named_parameters() if not p.requires_grad}
    assert frozen == {"post_layernorm.weight", "post_layernorm.bias"}


# ----------------------------------------------------------------------------------------------------------------
# training runs


@pytest.mark.slow
def test_scratch_epochs_lower_the_loss_and_save_a_loadable_checkpoint(tmp_path):
    """Two epochs (max_steps left at its default) are 2 x 6 steps; the export loads and has learned."""
    args = tiny_args(tmp_path, "--epochs", "2", "--activation_checkpointing", "true")
    from transformers import set_seed

    set_seed(0)
    model0, processor0 = build_model_and_processor(args[0], rows_for_tokenizer=_rows(args))
    batch = fixed_batch(processor0)
    before = batch_loss(model0, batch)

    summary = run(*args)
    assert summary["steps"] == 12
    out = tmp_path / "out"
    for name in ("config.json", "model.safetensors", "README.md", "tokenizer.json", "preprocessor_config.json",
                 "training_summary.json"):
        assert (out / name).is_file(), name
    model1, processor1 = load(out)
    assert processor1.tokenizer.get_vocab() == processor0.tokenizer.get_vocab()
    after = batch_loss(model1, fixed_batch(processor1))

    assert after < 0.85 * before, (before, after)
    assert "Trained with `vlora-hf train` (stage `scratch`)" in (out / "README.md").read_text()


def _rows(args):
    from vlora_hf.data.shapes_dataset import training_rows

    return training_rows(args[1].num_images, args[1].shapes_seed)[1]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """One of our checkpoints (random tiny model, non-zero B so images matter) with its processor."""
    from transformers import set_seed

    from vlora_hf.conversion.export import export_folder

    tmp = tmp_path_factory.mktemp("ckpt")
    args = tiny_args(tmp)
    set_seed(0)
    model, processor = build_model_and_processor(args[0], rows_for_tokenizer=_rows(args))
    with torch.no_grad():
        for b in model.model.generator.lora_B.values():
            b.normal_(0, 0.5)
    export_folder(model, processor, tmp / "ckpt")
    return tmp / "ckpt"


def _part_states(model):
    return {
        "language_model": {k: v.clone() for k, v in model.model.language_model.state_dict().items()},
        "lm_head": model.lm_head.weight.detach().clone(),
        "vision_tower": {k: v.clone() for k, v in model.model.vision_tower.state_dict().items()},
        "generator": {k: v.clone() for k, v in model.model.generator.state_dict().items()},
    }


@pytest.mark.slow
@pytest.mark.parametrize("precompute", [False, True])
def test_pretrain_stage_leaves_llm_and_tower_bit_identical(tmp_path, tiny_checkpoint, precompute):
    before, _ = load(tiny_checkpoint)
    states = _part_states(before)
    args = tiny_args(tmp_path, stage="pretrain", checkpoint=str(tiny_checkpoint), max_steps=4,
                     precompute_image_features=precompute, **FROM_CHECKPOINT)
    summary = run(*args)
    assert summary["trainable"]["language_model"] == 0 and summary["trainable"]["vision_tower"] == 0
    after, _ = load(tmp_path / "out")
    new = _part_states(after)
    for part in ("language_model", "vision_tower"):
        assert new[part].keys() == states[part].keys()
        for key in states[part]:
            assert torch.equal(new[part][key], states[part][key]), (part, key)
    assert torch.equal(new["lm_head"], states["lm_head"])
    changed = [k for k in states["generator"] if not torch.equal(new["generator"][k], states["generator"][k])]
    assert len(changed) > len(states["generator"]) // 2, changed


@pytest.mark.slow
def test_resume_continues_from_the_newest_checkpoint(tmp_path):
    run(*tiny_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2))
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    summary = run(*tiny_args(tmp_path, "--resume_from_checkpoint", "auto", max_steps=6, save_strategy="steps",
                             save_steps=2))
    assert summary["steps"] == 6
    state = json.loads((tmp_path / "run" / "checkpoint-6" / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if "loss" in e][:1] == [4]  # first log after the resumed step 4


@pytest.mark.slow
def test_two_process_cpu_accelerate_run(tmp_path):
    """`accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml` (2 CPU processes, gloo): a few DDP
    steps, then a loadable checkpoint saved once."""
    path = write_recipe(tmp_path, tiny_recipe(tmp_path, max_steps=3, per_device_train_batch_size=4,
                                              torch_threads=1))
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "recipes" / "accelerate" / "cpu_2proc.yaml"), "--main_process_port", "0",
           "-m", "vlora_hf.training.train", "--recipe", str(path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "training_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3
    assert proc.stdout.count("[vlora-hf train] saved to") == 1  # only the main process saves
    from transformers import set_seed

    args = tiny_args(tmp_path / "init")  # the same model and tokenizer, before training
    set_seed(0)
    model0, processor0 = build_model_and_processor(args[0], rows_for_tokenizer=_rows(args))
    model, processor = load(tmp_path / "out")
    assert processor.tokenizer.get_vocab() == processor0.tokenizer.get_vocab()
    assert batch_loss(model, fixed_batch(processor)) < batch_loss(model0, fixed_batch(processor0))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fsdp", "deepspeed"])
def test_sharded_configs_train_a_vlora_model(tmp_path, mode):
    """recipes/accelerate/fsdp.yaml and deepspeed_zero2.yaml, read the way accelerate and transformers.Trainer read
    them (tests/sharded_worker.py, 2 CPU processes, gloo): one finetune step on two half-batches gives the loss
    and, gathered from the processes, the updated weights of the same step taken in one process; FSDP makes
    every unsplittable class of the model a unit."""
    from tiny import tiny_model

    if mode == "deepspeed":
        pytest.importorskip("deepspeed")
    model = tiny_model(seed=0).train()
    apply_stage(model, "finetune")
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 90, (4, 10), generator=gen)
    ids[:, 1] = model.config.image_token_id
    batch = {"input_ids": ids, "pixel_values": torch.randn(4, 3, 28, 28, generator=gen), "labels": ids.clone()}
    torch.save(batch, tmp_path / "batch.pt")
    config = {"fsdp": "fsdp.yaml", "deepspeed": "deepspeed_zero2.yaml"}[mode]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TMPDIR=str(tmp_path))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests" / "sharded_worker.py"), mode, str(REPO / "recipes" / "accelerate" / config),
           str(tmp_path / "batch.pt"), str(tmp_path / "out.pt")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    if mode == "fsdp":  # Embedding + Linear: the tied embedding and head, one unit
        assert got["units"] == ["CLIPEncoderLayer", "CLIPVisionEmbeddings", "Embedding", "Linear",
                                "LlamaDecoderLayer", "VLoRAForCausalLM", "WeightsDecoder"]

    first = model(**{k: v[:2] for k, v in batch.items()}).loss
    (first / 2 + model(**{k: v[2:] for k, v in batch.items()}).loss / 2).backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    assert torch.allclose(got["loss"], first.detach(), rtol=1e-6, atol=0)
    expected = model.state_dict()
    assert sorted(got["state"]) == sorted(expected)
    for name, value in expected.items():
        torch.testing.assert_close(got["state"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    initial = tiny_model(seed=0).state_dict()
    assert not torch.equal(expected["model.generator.lora_B.q"], initial["model.generator.lora_B.q"])


@pytest.mark.slow
def test_finetune_on_llava_json_trains_llm_keeps_tower(tmp_path, tiny_checkpoint):
    """dataset llava (the data module's LLaVADataset/collator), stage finetune, precomputed tower features."""
    from vlora_hf.data import shapes

    data = shapes.make_dataset(tmp_path / "shapes", n=8, seed=1)
    before, _ = load(tiny_checkpoint)
    states = _part_states(before)
    args = tiny_args(tmp_path, stage="finetune", checkpoint=str(tiny_checkpoint), max_steps=3, dataset="llava",
                     data_path=str(data), image_folder=str(data.parent), precompute_image_features=True,
                     **FROM_CHECKPOINT)
    summary = run(*args)
    assert summary["steps"] == 3 and summary["trainable"]["vision_tower"] == 0
    after, _ = load(tmp_path / "out")
    new = _part_states(after)
    assert all(torch.equal(new["vision_tower"][k], v) for k, v in states["vision_tower"].items())
    assert not all(torch.equal(new["language_model"][k], v) for k, v in states["language_model"].items())


@pytest.mark.slow
def test_pretrain_from_text_model_and_vision_tower_folders(tmp_path):
    """Init from a transformers causal-LM folder + a CLIP vision folder: their weights land unchanged and stay
    frozen through stage pretrain."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    from vlora_hf.data.shapes import make_rows
    from vlora_hf.training.bpe_tokenizer import build_tokenizer

    _, rows = make_rows(20)
    tok = build_tokenizer([f"{q} {a}" for _, q, a in rows], vocab_size=300)
    torch.manual_seed(1)
    llm = LlamaForCausalLM(LlamaConfig(**{**TINY["text_config"], "vocab_size": len(tok),
                                          "tie_word_embeddings": False, "bos_token_id": tok.bos_token_id,
                                          "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}))
    llm.save_pretrained(tmp_path / "llm")
    tok.save_pretrained(tmp_path / "llm")
    vc = {k: v for k, v in TINY["vision_config"].items() if k != "model_type"}
    tower = CLIPVisionModel(CLIPVisionConfig(**vc))
    tower.save_pretrained(tmp_path / "clip")
    summary = run(*tiny_args(tmp_path, stage="pretrain", text_model=str(tmp_path / "llm"),
                             vision_tower=str(tmp_path / "clip"), max_steps=2, **FROM_CHECKPOINT))
    assert summary["trainable"]["language_model"] == 0
    model, processor = load(tmp_path / "out")
    assert processor.image_token_id == model.config.image_token_id == tok.convert_tokens_to_ids("<image>")
    for k, v in llm.model.state_dict().items():
        assert torch.equal(model.model.language_model.state_dict()[k], v), k
    assert torch.equal(model.lm_head.weight, llm.lm_head.weight)
    for k, v in tower.state_dict().items():
        assert torch.equal(model.model.vision_tower.state_dict()[k], v), k


def test_scratch_tower_initialisation(tmp_path):
    from vlora_hf.training.scratch_tower import sincos_2d

    args = tiny_args(tmp_path, scratch_tower={"patch_embedding": "fan_in", "position_embedding": "sincos"})
    model, _ = build_model_and_processor(args[0])
    emb = model.model.vision_tower.embeddings
    assert torch.equal(emb.position_embedding.weight, sincos_2d(2, 16, with_cls=True))
    assert abs(float(emb.patch_embedding.weight.detach().std()) - (3 * 16 * 16) ** -0.5) < 0.01
    bad = tiny_args(tmp_path, scratch_tower={"position_embedding": "rope"})[0]
    with pytest.raises(ValueError, match="must be 'sincos'"):
        build_model_and_processor(bad)


def test_answer_word_targets_and_question_weights():
    from vlora_hf.data.shapes_dataset import weight_rows
    from vlora_hf.training.scratch_tower import answer_word_targets

    rows = [(0, "What color is the shape?", "red"), (0, "What shape is this?", "circle"),
            (1, "How many shapes are there?", "3"), (1, "Describe the image.", "3 blue squares")]
    targets, words = answer_word_targets(rows, 3)
    assert words == ["3", "blue", "circle", "red", "squares"]
    assert targets.tolist() == [[0, 0, 1, 1, 0], [1, 1, 0, 0, 1], [0, 0, 0, 0, 0]]

    many = rows * 500
    weighted = weight_rows(many, {"What color is the shape?": 0.25, "What shape is this?": 2})
    per_q = {q: sum(r[1] == q for r in weighted) for _, q, _ in rows}
    assert per_q["What shape is this?"] == 1000 and per_q["How many shapes are there?"] == 500
    assert 90 <= per_q["What color is the shape?"] <= 160  # ~125, seeded
    assert weight_rows(many, {"What color is the shape?": 0.25}) == weight_rows(
        many, {"What color is the shape?": 0.25})
    with pytest.raises(ValueError, match="names question.*'Why\\?'"):
        weight_rows(rows, {"Why?": 2})
    with pytest.raises(ValueError, match="numbers >= 0"):
        weight_rows(rows, {"Describe the image.": -1})


def test_multi_turn_records(tmp_path):
    """data.multi_turn: one conversation per image with its questions in a seeded random order (a question the
    weights repeat opens a further record); its first turn tokenises exactly as the one-question record, and the
    loss covers both answers."""
    from vlora_hf.data.shapes import make_rows
    from vlora_hf.data.shapes_dataset import group_turns, shapes_dataset

    C, S, N, D = ("What color is the shape?", "What shape is this?", "How many shapes are there?",
                  "Describe the image.")
    rows = [(0, C, "red"), (0, S, "circle"), (1, N, "3"), (1, D, "3 blue squares"), (1, N, "3")]
    records = group_turns(rows, seed=0)
    assert sorted((i, sorted(turns)) for i, turns in records) == [
        (0, [(C, "red"), (S, "circle")]), (1, [(D, "3 blue squares"), (N, "3")]), (1, [(N, "3")])]
    many = [(i, q, a) for i in range(200) for q, a in ((C, "red"), (S, "circle"))]
    firsts = sum(turns[0][0] == C for _, turns in group_turns(many, seed=0))
    assert 70 <= firsts <= 130 and group_turns(many, seed=0) == group_turns(many, seed=0)

    images, rows = make_rows(4)  # with multi_turn, the tokenizer gets a follow-up "USER: " token
    _, processor = build_model_and_processor(tiny_args(tmp_path)[0], rows_for_tokenizer=rows, multi_turn=True)
    single = shapes_dataset(images, rows, processor)
    multi = shapes_dataset(images, rows, processor, multi_turn=True)
    assert len(single) == 8 and len(multi) == 4
    tok = processor.tokenizer
    for k, (i, turns) in enumerate(group_turns(rows, seed=0)):
        first = single[rows.index((i, *turns[0]))]
        n = len(first["input_ids"])
        assert torch.equal(multi[k]["input_ids"][:n], first["input_ids"])
        assert torch.equal(multi[k]["labels"][:n], first["labels"])
        answers = tok.decode(multi[k]["labels"][multi[k]["labels"] != -100])
        assert answers == "".join(f" {a}</s>" for _, a in turns)
        assert tok.convert_ids_to_tokens(int(multi[k]["input_ids"][n])) == "USER: "


WARM_START_SCRIPT = """
import os, sys, torch
from vlora_hf.data.shapes_dataset import shapes_dataset, training_rows
from vlora_hf.training.arguments import parse_args
from vlora_hf.training.model_builder import build_model_and_processor
from vlora_hf.training.scratch_tower import warm_start_tower

torch.set_num_threads(1)
if "WORLD_SIZE" in os.environ:
    torch.distributed.init_process_group("gloo")
model_args, data_args, *_ = parse_args(["--recipe", sys.argv[1]])
images, rows = training_rows(data_args.num_images, data_args.shapes_seed)
torch.manual_seed(0)
model, processor = build_model_and_processor(model_args, rows_for_tokenizer=rows)
dataset = shapes_dataset(images, rows, processor)
warm_start_tower(model, dataset.images, rows, steps=3, learning_rate=3e-3, batch_size=8)
rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
torch.save(model.model.vision_tower.state_dict(), sys.argv[2] + f".{rank}")
"""


@pytest.mark.slow
def test_warm_start_splits_batches_across_processes(tmp_path):
    """Two gloo processes with half the batch each end with the tower one process trains on the whole batch."""
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(tiny_recipe(tmp_path, num_images=12)))
    (tmp_path / "ws.py").write_text(WARM_START_SCRIPT)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    args = [str(tmp_path / "ws.py"), str(tmp_path / "r.yaml")]
    for cmd in ([sys.executable, *args, str(tmp_path / "one")],
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                 *args, str(tmp_path / "two")]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    one, two, other = (torch.load(tmp_path / name) for name in ("one.0", "two.0", "two.1"))
    for key, value in one.items():
        if key.endswith("k_proj.bias"):  # softmax ignores it: its gradient is rounding noise that Adam scales up
            continue
        assert torch.allclose(two[key], value, atol=1e-6), key
        assert torch.equal(two[key], other[key]), key


@pytest.mark.slow
def test_frozen_warm_started_tower_trains_on_precomputed_features(tmp_path):
    """freeze_tower: VLoRA training keeps the tower as the warm start left it and may precompute its features;
    the saved tower equals that of a run whose VLoRA steps have learning rate 0, while the rest trained."""
    warm = {"steps": 4, "learning_rate": 3e-3, "batch_size": 8}
    summary = run(*tiny_args(tmp_path / "a", scratch_tower={"warm_start": {**warm, "freeze_tower": True}},
                             precompute_image_features=True, max_steps=12))
    run(*tiny_args(tmp_path / "b", scratch_tower={"warm_start": warm}, learning_rate=0.0, max_steps=12))
    assert summary["trainable"]["vision_tower"] == 0
    # The Trainer turns the cache off for training; the saved model generates with it.
    assert json.loads((tmp_path / "a" / "out" / "config.json").read_text())["use_cache"] is True
    a, b = _part_states(load(tmp_path / "a" / "out")[0]), _part_states(load(tmp_path / "b" / "out")[0])
    assert all(torch.equal(a["vision_tower"][k], v) for k, v in b["vision_tower"].items())
    assert not any(torch.equal(a["generator"][k], v) for k, v in b["generator"].items() if k.endswith("weight"))


@pytest.mark.slow
def test_tower_warm_start_trains_only_the_tower(tmp_path):
    """The warm start lowers its answer-word loss and touches the tower alone."""
    from vlora_hf.data.shapes_dataset import shapes_dataset, training_rows
    from vlora_hf.training.scratch_tower import warm_start_tower

    images, rows = training_rows(12)
    torch.manual_seed(0)
    model, processor = build_model_and_processor(tiny_args(tmp_path)[0], rows_for_tokenizer=rows)
    dataset = shapes_dataset(images, rows, processor)
    before = _part_states(model)
    # The schedule reaches the optimizer: the first step of a linear warm-up has learning rate 0.
    warm_start_tower(model, dataset.images, rows, steps=1, learning_rate=3e-3, batch_size=12,
                     lr_scheduler_type="constant_with_warmup", warmup_steps=2)
    assert all(torch.equal(v, before["vision_tower"][k]) for k, v in _part_states(model)["vision_tower"].items())
    first = warm_start_tower(model, dataset.images, rows, steps=1, learning_rate=3e-3, batch_size=12)
    last = warm_start_tower(model, dataset.images, rows, steps=60, learning_rate=3e-3, batch_size=12)
    assert last < 0.7 * first, (first, last)
    after = _part_states(model)
    assert not all(torch.equal(after["vision_tower"][k], v) for k, v in before["vision_tower"].items())
    for part in ("language_model", "generator"):
        assert all(torch.equal(after[part][k], v) for k, v in before[part].items()), part
    assert torch.equal(after["lm_head"], before["lm_head"])
