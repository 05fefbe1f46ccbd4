"""PEFT LoRA on top of VLoRA: the image deltas stay applied through training, saving, reloading and merging."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_model

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

from vlora_hf import VLoRAForCausalLM  # noqa: E402


def pixels(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 28, 28, generator=torch.Generator().manual_seed(seed))


def batch(model, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.text_config.vocab_size, (4, 10), generator=gen)
    ids[:, 0], ids[:, 1] = 1, model.config.image_token_id
    return ids, pixels(4, seed)


def logits(model, ids, px):
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=px).logits


@pytest.mark.slow
def test_peft_lora_trains_saves_reloads_and_generates_with_image_deltas(tmp_path):
    base = tiny_model(seed=5)
    base.generation_config.eos_token_id = None
    base.save_pretrained(tmp_path / "base")
    ids, px = batch(base)
    base_logits = logits(base, ids, px)
    base_text_only = logits(base, ids.masked_fill(ids == base.config.image_token_id, 5), None)

    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    wrapped = model.base_model.model.model.language_model.layers[1].self_attn.q_proj
    assert type(wrapped).__module__.startswith("peft") and wrapped.base_layer._forward_hooks  # hook kept on base
    # LoRA starts as a no-op: the logits are the base model's *with* its image deltas.
    torch.testing.assert_close(logits(model, ids, px), base_logits, atol=0, rtol=0)

    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=5e-2)
    losses = []
    for _ in range(15):
        loss = model(input_ids=ids, pixel_values=px, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    assert losses[-1] < losses[0] - 0.1
    trained = logits(model, ids, px)
    assert (trained - base_logits).abs().max() > 1e-2  # LoRA learnt something
    # The image still matters: a different image changes the trained model's logits.
    assert (logits(model, ids, pixels(4, seed=9)) - trained).abs().max() > 1e-3
    assert (logits(model, ids.masked_fill(ids == base.config.image_token_id, 5), None) - base_text_only).abs().max() > 0

    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(VLoRAForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    reloaded.eval()
    torch.testing.assert_close(logits(reloaded, ids, px), trained, atol=1e-6, rtol=0)
    gen = dict(input_ids=ids[:2], pixel_values=px[:2], max_new_tokens=6, do_sample=False)
    expected = model.generate(**gen)
    assert reloaded.generate(**gen).tolist() == expected.tolist()

    merged = reloaded.merge_and_unload()  # back to plain projections, the delta hooks with them
    assert isinstance(merged, VLoRAForCausalLM)
    torch.testing.assert_close(logits(merged, ids, px), trained, atol=1e-5, rtol=0)
    assert merged.generate(**gen).tolist() == expected.tolist()


def test_llm_lora_helpers_target_only_the_language_model_and_merge_exactly():
    from vlora_hf.training.llm_lora import apply_llm_lora, merge_llm_lora

    model = tiny_model(seed=6)
    ids, px = batch(model)
    before = logits(model, ids, px)
    n = apply_llm_lora(model, target_modules=["q_proj", "v_proj"], r=4, alpha=8)
    assert n == 4 * 2 * (4 * 32 + 4 * 32)  # 4 layers x (q, v) x (A [4, 32] + B [32, 4])
    wrapped = {name for name, m in model.named_modules() if hasattr(m, "base_layer")}
    assert wrapped and all(name.startswith("model.language_model.layers.") for name in wrapped)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_" in name for name in trainable if "language_model" in name) and "lm_head.weight" not in trainable
    assert any(name.startswith("model.generator.") for name in trainable)  # the generator trains beside it
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B.default" in name:
                p.normal_(0, 0.2)
    with_lora = logits(model, ids, px)
    assert (with_lora - before).abs().max() > 1e-3
    assert merge_llm_lora(model) == 8
    assert not any(hasattr(m, "base_layer") for m in model.modules())
    assert set(model.state_dict()) == set(tiny_model(seed=6).state_dict())  # a plain VLoRA model again
    torch.testing.assert_close(logits(model, ids, px), with_lora, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_recipe_llm_lora_trains_q_and_v_only_and_exports_merged(tmp_path):
    from test_training import FROM_CHECKPOINT, tiny_args

    from vlora_hf.training.arguments import check_arguments
    from vlora_hf.training.train import run

    # a scratch model saved first, then LoRA-finetuned from it as a checkpoint
    run(*tiny_args(tmp_path / "a", max_steps=1))
    lora = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    args = tiny_args(tmp_path / "b", stage="finetune", checkpoint=str(tmp_path / "a" / "out"), max_steps=3,
                     llm_lora=lora, **FROM_CHECKPOINT)
    summary = run(*args)
    assert summary["trainable"]["language_model"] == 2 * 2 * (4 * 32 + 32 * 4)  # 2 layers x (q, v)
    before = VLoRAForCausalLM.from_pretrained(tmp_path / "a" / "out")
    after = VLoRAForCausalLM.from_pretrained(tmp_path / "b" / "out")
    old, new = before.state_dict(), after.state_dict()
    assert set(old) == set(new)  # merged: no LoRA keys in the export
    changed = {k for k in old if not torch.equal(old[k], new[k])}
    lm_changed = {k for k in changed if k.startswith("model.language_model.")}
    assert lm_changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in lm_changed)
    assert any(k.startswith("model.generator.") for k in changed)
    assert not any(k.startswith("model.vision_tower.") for k in changed)
    model_args, data_args, _, training_args = args
    training_args.stage = "pretrain"
    with pytest.raises(ValueError, match="use stage finetune"):
        check_arguments(model_args, data_args, training_args)
    with pytest.raises(ValueError, match="target_modules required"):
        tiny_args(tmp_path / "c", stage="finetune", checkpoint="x", llm_lora={"r": 4}, **FROM_CHECKPOINT)
