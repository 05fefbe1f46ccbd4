"""Official checkpoint conversion (parity with the release fixture through remote code), export, model card."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import FIXTURE, HIDE_PACKAGE, PYTHON, hidden_package_env, needs_fixture, tiny_model

from vlora_hf.conversion.convert_official import main as convert_main

CKPT = FIXTURE / "official_checkpoint"
TOWER = FIXTURE / "vision_tower"


def hub_tensors(folder):
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(path))
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("conv") / "vlora-tiny"
    assert convert_main(["--checkpoint", str(CKPT), "--output", str(out), "--base-model", "feipengma/VLoRA-7b-v1"]) == 0
    return out


PARITY = HIDE_PACKAGE + """
import sys, torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoModelForCausalLM
out, fixture = sys.argv[1], sys.argv[2]
ref = load_file(fixture + '/reference.safetensors')
model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
assert 'vlora_hf' not in type(model).__module__, type(model).__module__
ph = ref['input_ids'] == -200
ids = ref['input_ids'].masked_fill(ph, model.config.image_token_id)
mask = (~ph).long()
pos = torch.arange(20).expand(3, 20)
with torch.no_grad():
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, pixel_values=ref['pixel_values'][:2]).logits
    alone = model(input_ids=ids[:1], attention_mask=mask[:1], position_ids=pos[:1],
                  pixel_values=ref['pixel_values'][1:2]).logits
processor = AutoImageProcessor.from_pretrained(out, trust_remote_code=True)
assert 'vlora_hf' not in type(processor).__module__
px = processor([Image.open(f'{fixture}/images/image{i}.png') for i in range(3)], return_tensors='pt')['pixel_values']
print('LOGITS', (logits - ref['logits']).abs()[~ph].max().item())
print('ROW0_IMAGE1', (alone - ref['logits_row0_with_image1']).abs()[~ph[:1]].max().item())
print('PIXELS', (px - ref['pixel_values']).abs().max().item())
"""


def run_hidden(script: str, *args) -> str:
    result = subprocess.run([PYTHON, "-c", script, *map(str, args)], capture_output=True, text=True,
                            env=hidden_package_env(), cwd="/", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def parity(folder) -> dict:
    stdout = run_hidden(PARITY, folder, FIXTURE)
    return {k: float(v) for k, v in re.findall(r"^(LOGITS|ROW0_IMAGE1|PIXELS) (\S+)$", stdout, re.M)}


# ----- parity ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
@needs_fixture
def test_converted_folder_reproduces_the_release_through_remote_code(converted):
    diffs = parity(converted)
    print(f"max abs diff vs release: {diffs}")
    assert diffs["LOGITS"] < 1e-4
    assert diffs["ROW0_IMAGE1"] < 1e-4
    assert diffs["PIXELS"] < 1e-4


@needs_fixture
def test_converted_config_and_files(converted):
    config = json.loads((converted / "config.json").read_text())
    assert config["model_type"] == "vlora"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_vlora.VLoRAForCausalLM"
    assert config["auto_map"]["AutoConfig"] == "configuration_vlora.VLoRAConfig"
    expect = {"generator_hidden_size": 32, "generator_depth": 2, "generator_num_heads": 16, "num_visual_positions": 16,
              "lora_rank": 8, "lora_alpha": 16, "target_modules": ["q", "k", "v", "o", "m"], "skip_layers": 2,
              "separate_generators": True, "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
              "image_aspect_ratio": "pad", "image_token_id": 320, "dtype": "float32"}
    assert {k: config[k] for k in expect} == expect
    assert config["text_config"]["hidden_size"] == 64 and config["vision_config"]["hidden_size"] == 32
    for name in ("modeling_vlora.py", "configuration_vlora.py", "generator_vlora.py", "injection_vlora.py",
                 "image_processing_vlora.py", "preprocessor_config.json", "generation_config.json", "README.md",
                 "model.safetensors"):
        assert (converted / name).is_file(), name
    assert json.loads((converted / "preprocessor_config.json").read_text())["image_aspect_ratio"] == "pad"
    gen = json.loads((converted / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (1, 2, 0)
    # Bs [1, T*k, h*r] -> lora_B.{t} [k, h, r], t in vlora_type order
    ours, release = hub_tensors(converted), load_file(CKPT / "model.safetensors")
    bs = release["model.mm_projector.Bs"].reshape(5, 2, 64, 8)
    for i, t in enumerate("qkvom"):
        assert torch.equal(ours[f"model.generator.lora_B.{t}"], bs[i])
    assert torch.equal(ours["model.generator.decoders.3.blocks.1.linear2.weight"],
                       release["model.mm_projector.gen.3.decoders.1.linear2.weight"])
    assert torch.equal(ours["model.vision_tower.encoder.layers.2.mlp.fc1.weight"],
                       release["model.vision_tower.vision_tower.vision_model.encoder.layers.2.mlp.fc1.weight"])
    assert len(ours) == len(release) - 4 - 1 + 5  # rotary buffers dropped, Bs split in five


@needs_fixture
def test_sharded_bin_copy_converts_to_the_same_weights(converted, tmp_path, capsys):
    """A sharded PyTorch .bin checkpoint without the tower inside (tower from --vision-tower) gives the same result;
    the output is sharded too."""
    release = load_file(CKPT / "model.safetensors")
    ckpt = tmp_path / "bin_ckpt"
    ckpt.mkdir()
    shutil.copy(CKPT / "config.json", ckpt)
    shutil.copy(CKPT / "generation_config.json", ckpt)
    names = sorted(k for k in release if not k.startswith("model.vision_tower."))
    shards = [names[i::3] for i in range(3)]
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"pytorch_model-{i + 1:05d}-of-00003.bin"
        torch.save({k: release[k] for k in shard}, ckpt / fname)
        weight_map.update({k: fname for k in shard})
    (ckpt / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    out = tmp_path / "out"
    rc = convert_main(["--checkpoint", str(ckpt), "--output", str(out), "--vision-tower", str(TOWER),
                       "--max-shard-size", "400KB"])
    assert rc == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "55 vision tower tensors taken from" in printed
    assert "ignored 4 rotary buffers" in printed and "model.layers.3.self_attn.rotary_emb.inv_freq" in printed
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (out / "model.safetensors").exists()
    a, b = hub_tensors(converted), hub_tensors(out)
    assert a.keys() == b.keys() and set(index["weight_map"]) == set(a)
    assert all(torch.equal(a[k], b[k]) for k in a)


@needs_fixture
def test_dtype_option(tmp_path):
    out = tmp_path / "bf16"
    assert convert_main(["--checkpoint", str(CKPT), "--output", str(out), "--dtype", "bfloat16"]) == 0
    tensors = hub_tensors(out)
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


# ----- key accounting ---------------------------------------------------------------------------------------------
def tampered(tmp_path, drop=(), add=None, replace=None):
    ckpt = tmp_path / "tampered"
    ckpt.mkdir()
    shutil.copy(CKPT / "config.json", ckpt)
    state = load_file(CKPT / "model.safetensors")
    for k in drop:
        del state[k]
    state.update(add or {})
    state.update(replace or {})
    save_file(state, str(ckpt / "model.safetensors"))
    return ckpt


@needs_fixture
def test_key_accounting_names_unused_and_unset_tensors(tmp_path, capsys):
    ckpt = tampered(tmp_path, drop=["model.layers.2.mlp.up_proj.weight", "model.mm_projector.gen.1.queries"],
                    add={"model.mm_projector.extra_scale": torch.ones(3), "mystery.weight": torch.ones(2)})
    out = tmp_path / "out"
    assert convert_main(["--checkpoint", str(ckpt), "--output", str(out), "--vision-tower", str(TOWER)]) == 2
    err = capsys.readouterr().err
    assert "key accounting failed" in err
    assert "2 release tensors not used by the conversion: ['model.mm_projector.extra_scale', 'mystery.weight']" in err
    assert ("2 of our tensors left unset: ['model.generator.decoders.1.queries', "
            "'model.language_model.layers.2.mlp.up_proj.weight']") in err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["tampered"]  # no temp folder left behind


@needs_fixture
def test_shape_mismatch_and_bad_bs_are_reported(tmp_path, capsys):
    ckpt = tampered(tmp_path, replace={"model.norm.weight": torch.ones(65)})
    assert convert_main(["--checkpoint", str(ckpt), "--output", str(tmp_path / "o"), "--vision-tower", str(TOWER)]) == 2
    assert "model.norm.weight [65] -> model.language_model.norm.weight [64]" in capsys.readouterr().err
    shutil.rmtree(ckpt)
    ckpt = tampered(tmp_path, replace={"model.mm_projector.Bs": torch.zeros(1, 8, 512)})
    assert convert_main(["--checkpoint", str(ckpt), "--output", str(tmp_path / "o"), "--vision-tower", str(TOWER)]) == 2
    assert "model.mm_projector.Bs has shape [1, 8, 512], expected [1, 5*2, 64*8]" in capsys.readouterr().err


@needs_fixture
def test_release_config_disagreements_are_reported(tmp_path, capsys):
    ckpt = tmp_path / "cfg"
    ckpt.mkdir()
    config = json.loads((CKPT / "config.json").read_text())
    (ckpt / "model.safetensors").symlink_to(CKPT / "model.safetensors")
    tower = ["--vision-tower", str(TOWER)]
    for change, extra, needle in (
        ({"vlora_llm_depth": 5}, tower, "vlora_llm_depth=5 disagrees with the LLM (4)"),
        ({"mm_projector_type": "mlp2x_gelu"}, tower, "mm_projector_type is 'mlp2x_gelu', expected 'vlora'"),
        ({"mm_vision_tower": "nowhere/tower"}, [], "`hf download nowhere/tower --local-dir DIR`) and pass --vision-tower DIR"),
    ):
        (ckpt / "config.json").write_text(json.dumps({**config, **change}))
        assert convert_main(["--checkpoint", str(ckpt), "--output", str(tmp_path / "o"), *extra]) == 2
        assert needle in capsys.readouterr().err


# ----- atomic output ---------------------------------------------------------------------------------------------
@needs_fixture
def test_non_empty_output_needs_force_and_failures_leave_it_intact(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    assert convert_main(["--checkpoint", str(CKPT), "--output", str(out)]) == 2
    assert "is not empty: pass --force" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    # a failing conversion with --force keeps the old folder and leaves no temp folder
    bad = tampered(tmp_path, drop=["lm_head.weight"])
    assert convert_main(["--checkpoint", str(bad), "--output", str(out), "--force",
                         "--vision-tower", str(TOWER)]) == 2
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "tampered"]
    assert convert_main(["--checkpoint", str(CKPT), "--output", str(out), "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "tampered"]
    assert convert_main(["--checkpoint", str(CKPT), "--output", str(tmp_path / "empty_ok")]) == 0


# ----- model card ------------------------------------------------------------------------------------------------
@needs_fixture
def test_card_parses_back_with_its_metadata(converted):
    from huggingface_hub import ModelCard

    from vlora_hf import VLoRAConfig
    from vlora_hf.conversion.model_card import generator_parameters

    card = ModelCard.load(converted / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "image-text-to-text"
    assert data["base_model"] == "feipengma/VLoRA-7b-v1"
    assert data["license"] == "other"
    assert "vlora" in data["tags"]
    text = card.text
    assert "trust_remote_code=True" in text and "AutoModelForCausalLM" in text
    assert "arxiv.org/abs/2405.20339" in text and "NeurIPS" in text and "Ma, Feipeng" in text
    assert "| Rank r / alpha (scale alpha/r) | 8 / 16 (2) |" in text
    assert "| Layers receiving perceptual weights | 2 of 4: [1, 3] |" in text
    assert "| Low-rank targets | q, k, v, o, m |" in text
    config = VLoRAConfig.from_pretrained(converted)
    n = generator_parameters(config)
    from vlora_hf import VLoRAForCausalLM

    model = VLoRAForCausalLM.from_pretrained(converted)
    assert n == sum(p.numel() for p in model.model.generator.parameters())
    assert f"| Generator parameters | {n:,} " in text
    assert "| Visual tokens in the LLM sequence | 0 | 576 |" in text


def test_compute_table_for_the_7b_release_config():
    """The numbers for feipengma/VLoRA-7b-v1's shape (Vicuna-7B, CLIP-L/336, rank 64, qkvom, every 4th layer)."""
    from transformers import CLIPVisionConfig, LlamaConfig

    from vlora_hf import VLoRAConfig
    from vlora_hf import flops
    from vlora_hf.conversion.model_card import compute_rows

    config = VLoRAConfig(
        text_config=LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=32),
        vision_config=CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                       num_attention_heads=16, image_size=336, patch_size=14),
        generator_hidden_size=512, generator_depth=8, lora_rank=64, skip_layers=4, target_modules="qkvom")
    rows = {q: (a, b) for q, a, b in compute_rows(config)}
    visual = rows["Visual FLOPs (image-dependent compute on the LLM side)"]
    assert 7.0e12 < visual[1] < 8.5e12  # LLaVA-1.5-7B: ~7.6 TFLOPs for 576 visual tokens (paper: 7.63)
    assert visual[0] < visual[1] / 7  # VLoRA's image costs an order of magnitude less
    assert visual == (40916484096, 7591270809600)
    # one token through 32 layers: q,k,v,o 4·2·4096² + MLP 3·2·4096·11008, attention to itself 4·4096
    assert flops.prefill(config, 1) == 32 * (8 * 4096**2 + 6 * 4096 * 11008 + 4 * 4096)
    assert rows["Extra FLOPs per generated token due to the image"] == (8 * 5 * 2 * 64 * 2 * 4096, 32 * 4 * 576 * 4096)


# ----- processor with a tokenizer ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def converted_with_tokenizer(tmp_path_factory):
    from vlora_hf.training.bpe_tokenizer import build_tokenizer

    prompts = json.loads((FIXTURE / "prompts.json").read_text())
    tok_dir = tmp_path_factory.mktemp("tok")
    build_tokenizer([prompts["vicuna_v1"]["two_turns"]["prompt"]] * 4, vocab_size=300).save_pretrained(tok_dir)
    out = tmp_path_factory.mktemp("conv_tok") / "vlora-tiny-tok"
    assert convert_main(["--checkpoint", str(CKPT), "--output", str(out), "--tokenizer", str(tok_dir),
                         "--model-id", "alice/vlora-tiny", "--license", "apache-2.0"]) == 0
    return out


SNIPPET = HIDE_PACKAGE + """
import re, sys
card = open(sys.argv[1] + '/README.md').read()
code = re.search(r'```python\\n(.*?)```', card, re.S).group(1)
assert 'model_id = "alice/vlora-tiny"' in code
exec(code.replace('"alice/vlora-tiny"', repr(sys.argv[1])))
assert out.shape[0] == 1 and out.shape[1] > inputs['input_ids'].shape[1]
assert 'vlora_hf' not in type(processor).__module__ and 'vlora_hf' not in type(model).__module__
rendered = processor.apply_chat_template(
    [{'role': 'user', 'content': '<image>\\nWhat is in the picture?'}, {'role': 'assistant', 'content': None}])
print('RENDERED', repr(rendered))
"""


@pytest.mark.slow
@needs_fixture
def test_tokenizer_processor_and_the_card_snippet_work_without_the_package(converted_with_tokenizer):
    out = converted_with_tokenizer
    config = json.loads((out / "config.json").read_text())
    tok = json.loads((out / "tokenizer.json").read_text())
    image_id = next(t["id"] for t in tok["added_tokens"] if t["content"] == "<image>")
    assert config["image_token_id"] == image_id
    assert (out / "processor_config.json").is_file()
    stdout = run_hidden(SNIPPET, out)
    prompts = json.loads((FIXTURE / "prompts.json").read_text())
    assert f"RENDERED {prompts['vicuna_v1']['one_turn']['prompt']!r}" in stdout
    assert parity(out)["LOGITS"] < 1e-4  # the placeholder id changed, the logits did not


# ----- export of our own models -----------------------------------------------------------------------------------
def test_export_cli_round_trip(tmp_path, capsys):
    from vlora_hf import VLoRAForCausalLM
    from vlora_hf.conversion.export import main as export_main

    model = tiny_model(seed=3)
    model.save_pretrained(tmp_path / "run")
    out = tmp_path / "hub"
    assert export_main([str(tmp_path / "run"), str(out), "--max-shard-size", "100KB", "--base-model",
                        "lmsys/vicuna-7b-v1.5"]) == 0
    assert "tokenizer missing" in capsys.readouterr().err
    assert (out / "model.safetensors.index.json").is_file()
    for name in ("config.json", "generation_config.json", "preprocessor_config.json", "README.md", "modeling_vlora.py"):
        assert (out / name).is_file(), name
    again = VLoRAForCausalLM.from_pretrained(out)
    ids = torch.tensor([[1, model.config.image_token_id, 5, 6]])
    px = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, pixel_values=px).logits, again(input_ids=ids, pixel_values=px).logits)
    from huggingface_hub import ModelCard

    data = ModelCard.load(out / "README.md").data.to_dict()
    assert (data["license"], data["base_model"], data["library_name"]) == ("apache-2.0", "lmsys/vicuna-7b-v1.5",
                                                                           "transformers")
    assert export_main([str(tmp_path / "run"), str(out)]) == 2
    assert "pass --force" in capsys.readouterr().err


def test_export_folder_rejects_a_processor_with_another_image_id(tmp_path):
    from vlora_hf.conversion.export import export_folder
    from vlora_hf.processing import VLoRAImageProcessor, VLoRAProcessor
    from vlora_hf.training.bpe_tokenizer import build_tokenizer

    model = tiny_model(seed=2)
    processor = VLoRAProcessor(image_processor=VLoRAImageProcessor(), tokenizer=build_tokenizer(["a b c"]))
    with pytest.raises(ValueError, match="has id 4 but config.image_token_id is 96"):
        export_folder(model, processor, tmp_path / "x")
    assert not (tmp_path / "x").exists() and list(tmp_path.iterdir()) == []
    model.config.image_token_id = 4
    out = export_folder(model, processor, tmp_path / "x", dtype="bfloat16")
    assert (out / "tokenizer.json").is_file() and (out / "processor_config.json").is_file()
    assert {t.dtype for t in hub_tensors(out).values()} == {torch.bfloat16}
    assert next(model.parameters()).dtype == torch.float32  # the caller's model is untouched


def test_convert_cli_help():
    from vlora_hf.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["convert", "--help"])
    assert exc.value.code == 0


# ----- a release-format checkpoint written from one of our models (shared generator, weights_sep=False) --------
def to_release(model) -> dict:
    """Inverse of the conversion's key mapping (what the release would save for this model)."""
    cfg = model.config
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith("model.language_model."):
            out["model." + key[len("model.language_model."):]] = value
        elif key.startswith("model.vision_tower."):
            out["model.vision_tower.vision_tower.vision_model." + key[len("model.vision_tower."):]] = value
        elif key.startswith("model.generator.decoders."):
            index, rest = key[len("model.generator.decoders."):].split(".", 1)
            rest = rest.replace("blocks.", "decoders.", 1) if rest.startswith("blocks.") else rest
            prefix = f"gen.{index}." if cfg.separate_generators else "gen."
            out["model.mm_projector." + prefix + rest] = value
        elif key.startswith("model.generator.lora_B."):
            continue
        elif key.startswith("model.generator."):
            out["model.mm_projector." + key[len("model.generator."):]] = value
        else:
            out[key] = value
    bs = torch.stack([model.model.generator.lora_B[t] for t in cfg.target_modules])  # [T, k, h, r]
    out["model.mm_projector.Bs"] = bs.reshape(1, -1, bs.shape[2] * bs.shape[3])
    for i in range(cfg.text_config.num_hidden_layers):
        out[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.ones(2)
    return {k: v.contiguous() for k, v in out.items()}


def test_shared_generator_release_checkpoint_round_trip(tmp_path, capsys):
    model = tiny_model(seed=5, separate_generators=False, generator_num_heads=16, target_modules="qkvom")
    tc = model.config.text_config
    ckpt = tmp_path / "release"
    ckpt.mkdir()
    model.model.vision_tower.save_pretrained(tmp_path / "tower")
    save_file(to_release(model), str(ckpt / "model.safetensors"))
    (ckpt / "config.json").write_text(json.dumps({
        "model_type": "llava_vlora", "mm_projector_type": "vlora", "mm_vision_tower": "tower",
        "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "image_aspect_ratio": "pad",
        "vocab_size": tc.vocab_size, "hidden_size": tc.hidden_size, "intermediate_size": tc.intermediate_size,
        "num_hidden_layers": tc.num_hidden_layers, "num_attention_heads": tc.num_attention_heads,
        "num_key_value_heads": tc.num_key_value_heads, "rms_norm_eps": tc.rms_norm_eps, "torch_dtype": "float32",
        "vlora_dim": 16, "vlora_depth": 1, "vlora_visual_dim": 16, "vlora_pos_num": 4, "vlora_llm_dim": tc.hidden_size,
        "vlora_llm_depth": tc.num_hidden_layers, "vlora_rank": 4, "vlora_alpha": 8, "vlora_type": "qkvom",
        "weights_sep": False, "skip_layers": 2, "mm_use_im_start_end": False,
    }))
    out = tmp_path / "out"
    assert convert_main(["--checkpoint", str(ckpt), "--output", str(out)]) == 0, capsys.readouterr().err
    from vlora_hf import VLoRAForCausalLM

    again = VLoRAForCausalLM.from_pretrained(out).eval()
    assert again.config.separate_generators is False and len(again.model.generator.decoders) == 1
    ids = torch.tensor([[1, model.config.image_token_id, 5, 6], [1, 7, 8, 9]])
    px = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, pixel_values=px).logits, again(input_ids=ids, pixel_values=px).logits)
