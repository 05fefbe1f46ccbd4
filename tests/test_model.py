"""Core model: the math against the release fixture, batching, text-only rows, threads, checkpointing."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from safetensors.torch import load_file
from tiny import FIXTURE, clip_config, llama_config, mistral_config, qwen2_config, siglip_config, tiny_model, vlora_config
from transformers import AutoModel, CLIPVisionConfig, LlamaConfig

from vlora_hf import VLoRAConfig, VLoRAForCausalLM


def pixels(n: int, seed: int = 0, size: int = 28) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def prompt(model, n_rows: int, length: int = 7, image_rows=None, seed: int = 0) -> torch.Tensor:
    """Random token ids; rows in `image_rows` get the placeholder at position 1."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.text_config.vocab_size, (n_rows, length), generator=gen)
    ids[:, 0] = 1
    for row in range(n_rows) if image_rows is None else image_rows:
        ids[row, 1] = model.config.image_token_id
    return ids


# ----- parity with the authors' release (independent of the conversion code) -------------------------------
@pytest.mark.skipif(not FIXTURE.is_dir(), reason="release fixture not available")
def test_release_logits_reproduced_from_hand_mapped_weights():
    oc = json.loads((FIXTURE / "official_checkpoint" / "config.json").read_text())
    text = LlamaConfig(**{k: oc[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                               "num_attention_heads", "num_key_value_heads", "rms_norm_eps")})
    config = VLoRAConfig(
        text_config=text, vision_config=CLIPVisionConfig.from_pretrained(FIXTURE / "vision_tower"),
        generator_hidden_size=oc["vlora_dim"], generator_depth=oc["vlora_depth"], lora_rank=oc["vlora_rank"],
        lora_alpha=oc["vlora_alpha"], skip_layers=oc["skip_layers"], target_modules=oc["vlora_type"],
    )
    model = VLoRAForCausalLM(config).eval()
    ours = {}
    types, slots, h, r = list(oc["vlora_type"]), 2, 64, 8
    for key, value in load_file(FIXTURE / "official_checkpoint" / "model.safetensors").items():
        if "rotary_emb" in key:
            continue
        if key.startswith("model.vision_tower.vision_tower.vision_model."):
            ours["model.vision_tower." + key.split("vision_model.", 1)[1]] = value
        elif key == "model.mm_projector.Bs":
            for t, b in zip(types, value.reshape(len(types), slots, h, r)):
                ours[f"model.generator.lora_B.{t}"] = b
        elif key.startswith("model.mm_projector.gen."):
            ours["model.generator.decoders." + key.split("gen.", 1)[1].replace(".decoders.", ".blocks.")] = value
        elif key.startswith("model.mm_projector."):
            ours["model.generator." + key.split("mm_projector.", 1)[1]] = value
        elif key.startswith("model."):
            ours["model.language_model." + key[len("model."):]] = value
        else:
            ours[key] = value
    missing, unexpected = model.load_state_dict(ours, strict=False)
    assert not missing and not unexpected

    ref = load_file(FIXTURE / "reference.safetensors")
    placeholder = ref["input_ids"] == -200
    ids = ref["input_ids"].masked_fill(placeholder, config.image_token_id)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=torch.arange(20).expand(3, 20),
                    pixel_values=ref["pixel_values"][:2])
        alone = model(input_ids=ids[:1], pixel_values=ref["pixel_values"][1:2])
    assert (out.logits - ref["logits"]).abs()[~placeholder].max() < 1e-4
    assert (alone.logits - ref["logits_row0_with_image1"]).abs()[~placeholder[:1]].max() < 1e-4
    # The factors themselves: A per image (row 2 has no image: zeros), B scaled by alpha / r.
    A = model.model.generator.split(model.model.row_weights(ids, out.perceptual_weights))
    B = model.model.generator.scaled_B()
    for slot, layer in enumerate((1, 3)):
        for t in types:
            assert torch.allclose(A[t][:, slot], ref[f"vlora.layer{layer}.{t}.A"], atol=1e-5)
            assert torch.allclose(B[t][slot], ref[f"vlora.layer{layer}.{t}.B"][0], atol=1e-6)


# ----- batching and text-only rows -----------------------------------------------------------------------
@pytest.mark.parametrize("text", [llama_config, qwen2_config, mistral_config])
def test_batched_rows_equal_per_row_runs(text):
    model = tiny_model(text=text())
    ids = prompt(model, 3, image_rows=[0, 2])
    px = pixels(2)
    with torch.no_grad():
        batched = model(input_ids=ids, pixel_values=px).logits
        row0 = model(input_ids=ids[:1], pixel_values=px[:1]).logits
        row1 = model(input_ids=ids[1:2]).logits
        row2 = model(input_ids=ids[2:], pixel_values=px[1:]).logits
    torch.testing.assert_close(batched, torch.cat([row0, row1, row2]), atol=1e-5, rtol=1e-5)


def test_text_only_row_equals_plain_backbone():
    model = tiny_model()
    ids = prompt(model, 2, image_rows=[0])
    backbone = AutoModel.from_config(model.config.text_config)
    backbone.load_state_dict(model.model.language_model.state_dict())
    is_image = ids == model.config.image_token_id
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels(1)).logits
        # Same batch through the bare backbone: the text-only row must be bit-identical (its delta is exactly 0).
        plain = model.lm_head(backbone(input_ids=ids.masked_fill(is_image, 0), attention_mask=(~is_image).long(),
                                       position_ids=torch.arange(ids.shape[1]).expand_as(ids)).last_hidden_state)
        alone = model.lm_head(backbone(input_ids=ids[1:]).last_hidden_state)
    assert torch.equal(out[1], plain[1])
    torch.testing.assert_close(out[1], alone[0])


def test_language_model_keys_are_the_backbones():
    model = tiny_model()
    backbone = AutoModel.from_config(model.config.text_config)
    assert set(model.model.language_model.state_dict()) == set(backbone.state_dict())


def test_image_changes_logits_and_zero_B_does_not():
    model = tiny_model()
    ids = prompt(model, 1)
    with torch.no_grad():
        a = model(input_ids=ids, pixel_values=pixels(1, seed=1)).logits
        b = model(input_ids=ids, pixel_values=pixels(1, seed=2)).logits
        assert (a - b).abs().max() > 1e-3
        for B in model.model.generator.lora_B.values():
            B.zero_()
        c = model(input_ids=ids, pixel_values=pixels(1, seed=1)).logits
        d = model(input_ids=ids.masked_fill(ids == model.config.image_token_id, 0),
                  attention_mask=(ids != model.config.image_token_id).long(),
                  position_ids=torch.arange(ids.shape[1])[None]).logits
    torch.testing.assert_close(c, d)


def test_placeholder_is_never_attended_to():
    """Whatever sits in the placeholder slot (its embedding) cannot change any other position."""
    model = tiny_model()
    ids = prompt(model, 1)
    px = pixels(1)
    with torch.no_grad():
        base = model(input_ids=ids, pixel_values=px).logits
        emb = model.get_input_embeddings().weight
        emb[0] += 5.0  # the placeholder's slot reads id 0, like the release
        moved = model(input_ids=ids, pixel_values=px).logits
    keep = ids[0] != model.config.image_token_id
    torch.testing.assert_close(base[0, keep], moved[0, keep])


def test_precomputed_features_and_weights_match_pixels():
    model = tiny_model()
    ids = prompt(model, 2)
    px = pixels(2)
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=px).logits
        feats = model.model.get_vision_features(px)
        weights = model.get_image_features(pixel_values=px)
        assert weights.shape == (2, model.model.generator.weights_dim)
        torch.testing.assert_close(model(input_ids=ids, image_features=feats).logits, ref)
        torch.testing.assert_close(model(input_ids=ids, perceptual_weights=weights).logits, ref)


def test_labels_give_shifted_cross_entropy():
    model = tiny_model()
    ids = prompt(model, 2)
    labels = ids.clone()
    labels[:, :3] = -100
    out = model(input_ids=ids, pixel_values=pixels(2), labels=labels)
    logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
    expected = torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)


def test_gqa_and_mlp_projection_targets_have_their_own_widths():
    model = tiny_model(text=qwen2_config(), vision=siglip_config(), target_modules=["q", "k", "v", "o", "gate", "up", "down"])
    A = model.model.generator.split(model.get_image_features(pixel_values=pixels(1)))
    assert A["k"].shape == (1, 2, 32, 4) and A["down"].shape == (1, 2, 48, 4)
    assert model.model.generator.lora_B["k"].shape == (2, 16, 4)  # 2 kv heads x 8
    assert model.model.generator.lora_B["up"].shape == (2, 48, 4)
    ids = prompt(model, 2)
    with torch.no_grad():
        a = model(input_ids=ids, pixel_values=pixels(2)).logits
        b = model(input_ids=ids[1:], pixel_values=pixels(2)[1:]).logits
    torch.testing.assert_close(a[1:], b, atol=1e-5, rtol=1e-5)


def test_shared_generator_and_explicit_layers():
    model = tiny_model(separate_generators=False, target_layers=[0, 3])
    assert len(model.model.generator.decoders) == 1
    assert model.model.generator.decoders[0].queries.shape[1] == 2 * 5
    ids = prompt(model, 1)
    with torch.no_grad():
        a = model(input_ids=ids, pixel_values=pixels(1, seed=1)).logits
        b = model(input_ids=ids, pixel_values=pixels(1, seed=2)).logits
    assert (a - b).abs().max() > 1e-4


# ----- concurrency and checkpointing ---------------------------------------------------------------------
@pytest.mark.slow
def test_threads_sharing_a_model_get_their_own_images():
    model = tiny_model()
    ids = prompt(model, 1)
    images = [pixels(1, seed=s) for s in range(4)]
    with torch.no_grad():
        alone = [model(input_ids=ids, pixel_values=px).logits for px in images]
    results = [None] * 4
    barrier = threading.Barrier(4)

    def work(i):
        barrier.wait()
        with torch.no_grad():
            for _ in range(5):
                results[i] = model(input_ids=ids, pixel_values=images[i]).logits

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, expected in zip(results, alone):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("enable", ["activation_checkpointing_enable", "gradient_checkpointing_enable"])
def test_gradient_checkpointing_recomputes_with_the_same_deltas(enable):
    def grads(checkpointing: bool):
        model = tiny_model(seed=3).train()
        if checkpointing:
            getattr(model, enable)(**({} if enable.startswith("activation") else {"gradient_checkpointing_kwargs": {"use_reentrant": True}}))
        ids = prompt(model, 2)
        loss = model(input_ids=ids, pixel_values=pixels(2), labels=ids).loss
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, ckpt = grads(False), grads(True)
    assert set(plain) == set(ckpt)
    assert any("lora_B" in n for n in plain)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], atol=1e-5, rtol=1e-5, msg=name)


def test_bf16_forward():
    model = tiny_model().to(torch.bfloat16)
    out = model(input_ids=prompt(model, 2), pixel_values=pixels(2))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()


# ----- configuration errors ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"generator_hidden_size": 18, "generator_num_heads": 4}, "multiple of generator_num_heads"),
        ({"target_modules": "qkvx"}, "target_modules"),
        ({"target_layers": [0, 4]}, "target_layers"),
        ({"skip_layers": 5}, "skip_layers"),
        ({"num_visual_positions": 5}, "num_visual_positions"),
        ({"vision_feature_select_strategy": "cls"}, "vision_feature_select_strategy"),
        ({"vision": siglip_config(), "vision_feature_select_strategy": "default"}, "has none"),
        ({"separate_generators": False, "target_modules": ["q", "down"]}, "same input"),
    ],
)
def test_bad_configs_raise(overrides, message):
    with pytest.raises(ValueError, match=message):
        vlora_config(**overrides)


def test_backbone_without_targets_raises():
    from transformers import GPT2Config

    with pytest.raises(ValueError, match="no known module path for target.*give target_module_paths"):
        VLoRAConfig(text_config=GPT2Config(n_layer=4), vision_config=clip_config())
    with pytest.raises(ValueError, match=r"unknown targets \['x'\]"):
        vlora_config(target_module_paths={"x": "mlp"})


def test_a_new_backbone_is_configured_by_data_alone():
    """Cohere (parallel attention + MLP) is not in the built-in map; its module paths in the config suffice."""
    from transformers import AutoConfig

    cohere = AutoConfig.for_model("cohere", vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                                  num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
                                  eos_token_id=2)
    with pytest.raises(ValueError, match="'cohere' has no known module path"):
        vlora_config(text=cohere)
    paths = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
             "m": "mlp"}
    model = tiny_model(text=cohere, target_module_paths=paths)
    layers = model.model.language_model.layers
    hooked = {(i, name) for i, layer in enumerate(layers) for name, m in layer.named_modules() if m._forward_hooks}
    assert hooked == {(i, p) for i in model.config.receiving_layers for p in paths.values()}
    reloaded = VLoRAConfig.from_dict(model.config.to_dict())
    assert reloaded.module_paths == paths
    ids = prompt(model, 1)
    with torch.no_grad():
        a = model(input_ids=ids, pixel_values=pixels(1, seed=1)).logits
        b = model(input_ids=ids, pixel_values=pixels(1, seed=2)).logits
    assert (a - b).abs().max() > 1e-3  # the image reaches the output through the configured modules


def test_image_count_mismatches_raise():
    model = tiny_model()
    ids = prompt(model, 2)
    with pytest.raises(ValueError, match="got 1 images but input_ids hold 2"):
        model(input_ids=ids, pixel_values=pixels(1))
    with pytest.raises(ValueError, match="no image was given"):
        model(input_ids=ids)
    two = ids.clone()
    two[0, 3] = model.config.image_token_id
    with pytest.raises(ValueError, match="one image per sequence"):
        model(input_ids=two, pixel_values=pixels(3))
