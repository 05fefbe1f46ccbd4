"""transformers' model contracts: cache on/off, tuple outputs, inputs_embeds, tensor parallel, image outputs."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_model
from transformers import AutoModelForCausalLM
from transformers.modeling_outputs import BaseModelOutputWithPooling

ANSWER = 24  # long enough for a wrong mask or position to change the tokens


def pixels(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 28, 28, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model():
    m = tiny_model(seed=4)
    m.generation_config.pad_token_id = 0
    m.generation_config.eos_token_id = None  # every row runs ANSWER tokens
    return m


def prompts(model, batch: int, padded: bool):
    """Rows with a system-like prefix, then the image, then the question.

    Unpadded rows have equal lengths and all hold an image (so, the placeholders taken out, no mask column is 0);
    padded rows differ in length and the middle one is text-only (a single padded row carries two padding
    columns)."""
    img = model.config.image_token_id
    rows = [[1, 40, 41, 42, img, 10, 11, 12, 13], [1, 50, 51, 52, 53 if padded else img, 20, 21, 22, 23],
            [1, 60, 61, 62, img, 30, 31, 32, 33]][:batch]
    if padded:
        rows = [row[:len(row) - 2 * i] for i, row in enumerate(rows)] if batch > 1 else rows
    width = max(map(len, rows)) + (2 if padded and batch == 1 else 0)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    n_images = int((ids == img).sum())
    return ids, mask, pixels(n_images, seed=batch)


def greedy(model, ids, mask, px, **kwargs):
    return model.generate(input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=ANSWER, do_sample=False,
                          output_logits=True, return_dict_in_generate=True, **kwargs)


# ----- 1. use_cache=False is the cached path, in every padding case --------------------------------------
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("padded", [False, True])
def test_cache_off_gives_the_cached_tokens_and_logits(model, batch, padded):
    ids, mask, px = prompts(model, batch, padded)
    if not padded:
        assert mask.all()  # the case transformers turns into "no mask"
    cached = greedy(model, ids, mask, px)
    uncached = greedy(model, ids, mask, px, use_cache=False)
    assert uncached.sequences.tolist() == cached.sequences.tolist()
    for a, b in zip(cached.logits, uncached.logits):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)


@pytest.mark.parametrize("use_cache", [True, False])
def test_generated_logits_equal_a_plain_forward_over_the_answer(model, use_cache):
    """Each step's logits are those of one plain forward (placeholder masked in place) over prompt + answer."""
    ids, mask, px = prompts(model, 1, padded=False)
    out = greedy(model, ids, mask, px, use_cache=use_cache)
    with torch.no_grad():
        full = model(input_ids=out.sequences[:, :-1], pixel_values=px).logits
    steps = torch.stack(out.logits, dim=1)
    torch.testing.assert_close(steps, full[:, ids.shape[1] - 1:], atol=1e-5, rtol=0)


# ----- 2. return_dict=False ---------------------------------------------------------------------------------
def test_return_dict_false_gives_tuples_in_the_usual_order(model):
    ids, mask, px = prompts(model, 3, padded=True)
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, pixel_values=px, labels=labels, use_cache=True)
        tup = model(input_ids=ids, attention_mask=mask, pixel_values=px, labels=labels, use_cache=True,
                    return_dict=False)
        base_ref = model.model(input_ids=ids, attention_mask=mask, pixel_values=px)
        base_tup = model.model(input_ids=ids, attention_mask=mask, pixel_values=px, return_dict=False)
    assert isinstance(tup, tuple) and isinstance(base_tup, tuple)
    loss, logits, cache, image_outputs = tup
    torch.testing.assert_close(loss, ref.loss)
    torch.testing.assert_close(logits, ref.logits)
    assert cache.get_seq_length() == ids.shape[1]
    assert isinstance(image_outputs, tuple)  # nested encoder output flattened, as transformers' VLMs do
    torch.testing.assert_close(image_outputs[-1], ref.perceptual_weights)
    torch.testing.assert_close(base_tup[0], base_ref.last_hidden_state)


def test_config_return_dict_false_is_honoured(model):
    ids, mask, px = prompts(model, 1, padded=False)
    model.config.return_dict = False
    try:
        with torch.no_grad():
            out = model(input_ids=ids, pixel_values=px, use_cache=False)
    finally:
        model.config.return_dict = True
    assert isinstance(out, tuple)
    with torch.no_grad():
        torch.testing.assert_close(out[0], model(input_ids=ids, pixel_values=px).logits)


# ----- 3. inputs_embeds -------------------------------------------------------------------------------------
def embeddings(model, ids):
    """The prompt's token embeddings; the placeholder's row is arbitrary (never read)."""
    is_image = ids == model.config.image_token_id
    emb = model.get_input_embeddings()(ids.masked_fill(is_image, 0))
    return emb.masked_fill(is_image[..., None], 7.0)


@pytest.mark.parametrize("padded", [False, True])
def test_inputs_embeds_in_forward_equal_the_input_ids_path(model, padded):
    ids, mask, px = prompts(model, 3, padded)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, pixel_values=px).logits
        got = model(input_ids=ids, inputs_embeds=embeddings(model, ids), attention_mask=mask, pixel_values=px).logits
    keep = ids != model.config.image_token_id
    torch.testing.assert_close(got[keep], ref[keep], atol=1e-5, rtol=0)


@pytest.mark.parametrize("padded", [False, True])
def test_inputs_embeds_in_generate_equal_the_input_ids_path(model, padded):
    ids, mask, px = prompts(model, 3, padded)
    ref = greedy(model, ids, mask, px)
    got = greedy(model, ids, mask, px, inputs_embeds=embeddings(model, ids))
    assert got.sequences.tolist() == ref.sequences.tolist()
    for a, b in zip(ref.logits, got.logits):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)


def test_edited_inputs_embeds_change_the_answer(model):
    """The embeddings given are the ones used (not re-looked-up from input_ids)."""
    ids, mask, px = prompts(model, 1, padded=False)
    emb = embeddings(model, ids)
    emb[:, 6] += 3.0
    ref = greedy(model, ids, mask, px)
    got = greedy(model, ids, mask, px, inputs_embeds=emb)
    assert (got.logits[0] - ref.logits[0]).abs().max() > 1e-3
    uncached = greedy(model, ids, mask, px, inputs_embeds=emb, use_cache=False)
    assert uncached.sequences.tolist() == got.sequences.tolist()
    for a, b in zip(got.logits, uncached.logits):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)


def test_inputs_embeds_without_input_ids_cannot_place_images(model):
    ids, mask, px = prompts(model, 1, padded=False)
    with pytest.raises(ValueError, match="pass input_ids beside them"):
        model(inputs_embeds=embeddings(model, ids), pixel_values=px)
    with pytest.raises(ValueError, match="same \\[batch, sequence\\]"):
        model(input_ids=ids[:, 1:], inputs_embeds=embeddings(model, ids), pixel_values=px)
    text_only = ids.masked_fill(ids == model.config.image_token_id, 5)
    with torch.no_grad():  # no image: inputs_embeds alone are fine
        torch.testing.assert_close(model(inputs_embeds=embeddings(model, text_only)).logits,
                                   model(input_ids=text_only).logits)


# ----- 4. tensor parallel -----------------------------------------------------------------------------------
def test_tensor_parallel_is_refused_at_load(model, tmp_path):
    from transformers.distributed import DistributedConfig

    model.save_pretrained(tmp_path)
    for kwargs in ({"tp_plan": "auto"}, {"tp_size": 2}, {"distributed_config": DistributedConfig(tp_plan="auto")},
                   {"distributed_config": {"tp_size": 2}}):
        with pytest.raises(ValueError, match="VLoRA does not support tensor parallelism"):
            AutoModelForCausalLM.from_pretrained(tmp_path, **kwargs)
    assert model.tp_plan == {} and model.model.tp_plan == {}
    assert not model.supports_tp_plan  # accelerate's TP preparation asks this


# ----- 7. transformers' VLM conventions -----------------------------------------------------------------------
def test_image_features_and_image_outputs_follow_transformers_vlms(model):
    ids, mask, px = prompts(model, 3, padded=True)
    weights = model.get_image_features(pixel_values=px)  # unchanged: the perceptual weights
    outputs = model.get_image_features(pixel_values=px, return_dict=True)
    assert isinstance(outputs, BaseModelOutputWithPooling)
    torch.testing.assert_close(outputs.pooler_output, weights)
    torch.testing.assert_close(outputs.last_hidden_state, model.model.get_vision_features(px))
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=px)
        via_encoder = model(input_ids=ids, attention_mask=mask, mm_encoder_outputs={"image": outputs})
    torch.testing.assert_close(out.image_outputs.pooler_output, weights)
    torch.testing.assert_close(out.perceptual_weights, weights)
    torch.testing.assert_close(via_encoder.logits, out.logits)
    gen = model.generate(input_ids=ids, attention_mask=mask, mm_encoder_outputs={"image": outputs},
                         max_new_tokens=4, do_sample=False)
    assert gen.tolist() == model.generate(input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=4,
                                          do_sample=False).tolist()


def test_generate_step_outputs_are_one_column_shorter_per_image(model):
    """The documented shape: sequences keep the placeholder, hidden states (and attentions) see text only."""
    ids, mask, px = prompts(model, 1, padded=False)
    out = model.generate(input_ids=ids, pixel_values=px, max_new_tokens=3, do_sample=False,
                         return_dict_in_generate=True, output_hidden_states=True)
    assert out.sequences.shape[1] == ids.shape[1] + 3
    assert out.hidden_states[0][0].shape[1] == ids.shape[1] - 1
