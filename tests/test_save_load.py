"""save_pretrained / from_pretrained, Auto classes, remote code with the package hidden, dtype, device_map."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from tiny import HIDE_PACKAGE, PYTHON, hidden_package_env, qwen2_config, siglip_config, tiny_model
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText

from vlora_hf import VLoRAConfig, VLoRAForCausalLM


def inputs(model):
    ids = torch.tensor([[1, model.config.image_token_id, 5, 6, 7], [1, 8, 9, 10, 11]])
    px = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    return ids, px


@pytest.fixture(scope="module", params=["llama_clip", "qwen2_siglip"])
def saved(request, tmp_path_factory):
    kwargs = {} if request.param == "llama_clip" else {"text": qwen2_config(), "vision": siglip_config()}
    model = tiny_model(seed=4, **kwargs)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    ids, px = inputs(model)
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=px).logits
    torch.save({"ids": ids, "px": px, "logits": logits}, path / "expected.pt")
    return path


def test_saved_folder_lists_every_auto_class_and_ships_its_code(saved):
    config = json.loads((saved / "config.json").read_text())
    assert config["model_type"] == "vlora"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_vlora.VLoRAConfig",
        "AutoModel": "modeling_vlora.VLoRAForCausalLM",
        "AutoModelForCausalLM": "modeling_vlora.VLoRAForCausalLM",
        "AutoModelForImageTextToText": "modeling_vlora.VLoRAForCausalLM",
    }
    for name in ("configuration_vlora.py", "generator_vlora.py", "injection_vlora.py", "modeling_vlora.py",
                 "outputs_vlora.py", "placeholders_vlora.py", "validation_vlora.py", "pipeline_vlora.py"):
        assert (saved / name).is_file()


@pytest.mark.parametrize("auto", [AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText])
def test_round_trip_logits_equal(saved, auto):
    expected = torch.load(saved / "expected.pt")
    model = auto.from_pretrained(saved).eval()
    assert isinstance(model, VLoRAForCausalLM)
    with torch.no_grad():
        logits = model(input_ids=expected["ids"], pixel_values=expected["px"]).logits
    assert torch.equal(logits, expected["logits"])


def test_config_round_trip(saved):
    config = AutoConfig.from_pretrained(saved)
    assert isinstance(config, VLoRAConfig)
    again = VLoRAConfig.from_dict(config.to_dict())
    assert again.target_modules == config.target_modules and again.receiving_layers == config.receiving_layers
    assert type(again.text_config) is type(config.text_config)


REMOTE = HIDE_PACKAGE + """
import sys, torch
from transformers import AutoModel, AutoModelForCausalLM
path = sys.argv[1]
expected = torch.load(path + '/expected.pt')
for auto in (AutoModel, AutoModelForCausalLM):
    model = auto.from_pretrained(path, trust_remote_code=True).eval()
    assert type(model).__name__ == 'VLoRAForCausalLM', type(model)
    assert 'vlora_hf' not in type(model).__module__, type(model).__module__
    with torch.no_grad():
        logits = model(input_ids=expected['ids'], pixel_values=expected['px']).logits
    # another process may run another number of threads: same weights, last-bit differences at most
    torch.testing.assert_close(logits, expected['logits'], atol=1e-6, rtol=1e-6)
    out = model.generate(input_ids=expected['ids'][:1], pixel_values=expected['px'], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 8), out.shape
print('remote ok')
"""


@pytest.mark.slow
def test_remote_code_load_without_the_package(saved):
    result = subprocess.run([PYTHON, "-c", REMOTE, str(saved)], capture_output=True, text=True,
                            env=hidden_package_env(), cwd="/", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "remote ok" in result.stdout


def test_bf16_loading(saved):
    model = VLoRAForCausalLM.from_pretrained(saved, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    expected = torch.load(saved / "expected.pt")
    with torch.no_grad():
        logits = model(input_ids=expected["ids"], pixel_values=expected["px"]).logits
    assert logits.dtype == torch.bfloat16
    assert (logits.float() - expected["logits"]).abs().max() < 0.1


def test_device_map_auto_loads_on_cpu(saved):
    model = VLoRAForCausalLM.from_pretrained(saved, device_map="auto")
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    expected = torch.load(saved / "expected.pt")
    with torch.no_grad():
        logits = model(input_ids=expected["ids"], pixel_values=expected["px"]).logits
    torch.testing.assert_close(logits, expected["logits"])
