"""generate(): one generator run per call, per-row equality under left padding, cache on/off, beams, sampling."""

from __future__ import annotations

import pytest
import torch
from tiny import qwen2_config, siglip_config, tiny_model


def pixels(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 28, 28, generator=torch.Generator().manual_seed(seed))


def left_padded(rows: list[list[int]], pad_id: int = 0):
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    return ids, mask


@pytest.fixture(scope="module")
def model():
    m = tiny_model(seed=1)
    m.generation_config.pad_token_id = 0
    m.generation_config.eos_token_id = None  # always run max_new_tokens: more tokens compared
    return m


def rows_for(model):
    img = model.config.image_token_id
    return [[1, img, 10, 11, 12], [1, 20, 21], [1, img, 30, 31, 32, 33, 34, 35]], [0, 2]


def count_generator_calls(model):
    calls = []
    handle = model.model.generator.register_forward_hook(lambda *a: calls.append(a[1][0].shape[0]))
    return calls, handle


def test_left_padded_batch_equals_each_row_alone(model):
    rows, image_rows = rows_for(model)
    px = pixels(2)
    ids, mask = left_padded(rows)
    batched = model.generate(input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=6, do_sample=False)
    images = iter(px)
    for i, row in enumerate(rows):
        kwargs = {"pixel_values": next(images)[None]} if i in image_rows else {}
        alone = model.generate(input_ids=torch.tensor([row]), max_new_tokens=6, do_sample=False, **kwargs)
        assert batched[i, -6:].tolist() == alone[0, -6:].tolist()


def test_generated_tokens_follow_the_forward_argmax(model):
    """Greedy decoding with the cache is the argmax of a plain forward over the growing sequence."""
    rows, _ = rows_for(model)
    ids = torch.tensor([rows[0]])
    px = pixels(1)
    out = model.generate(input_ids=ids, pixel_values=px, max_new_tokens=5, do_sample=False)
    seq = ids
    for _ in range(5):
        with torch.no_grad():
            nxt = model(input_ids=seq, pixel_values=px).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert out.tolist() == seq.tolist()


def test_cache_off_gives_the_same_tokens(model):
    rows, _ = rows_for(model)
    ids, mask = left_padded(rows)
    a = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels(2), max_new_tokens=6, do_sample=False)
    b = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels(2), max_new_tokens=6, do_sample=False,
                       use_cache=False)
    assert a.tolist() == b.tolist()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"do_sample": False},
        {"num_beams": 3, "do_sample": False},
        {"num_beams": 2, "num_return_sequences": 2, "do_sample": False},
        {"do_sample": True, "num_return_sequences": 3, "top_k": 5},
    ],
)
def test_generator_runs_once_per_image_per_call(model, kwargs):
    rows, _ = rows_for(model)
    ids, mask = left_padded(rows)
    calls, handle = count_generator_calls(model)
    try:
        torch.manual_seed(0)
        out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels(2), max_new_tokens=4, **kwargs)
    finally:
        handle.remove()
    assert calls == [2]  # one call, two images, whatever the beams / samples
    assert out.shape[0] == 3 * kwargs.get("num_return_sequences", 1)


def test_beam_search_rows_match_single_row_beam_search(model):
    rows, _ = rows_for(model)
    ids, mask = left_padded(rows)
    px = pixels(2)
    batched = model.generate(input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=4, num_beams=3,
                             num_return_sequences=2, do_sample=False)
    alone = model.generate(input_ids=torch.tensor([rows[2]]), pixel_values=px[1:], max_new_tokens=4, num_beams=3,
                           num_return_sequences=2, do_sample=False)
    assert batched[4:, -4:].tolist() == alone[:, -4:].tolist()


@pytest.mark.slow
def test_sampling_is_reproducible_and_image_dependent(model):
    rows, _ = rows_for(model)
    ids = torch.tensor([rows[0]])

    def sample(px):
        torch.manual_seed(123)
        return model.generate(input_ids=ids, pixel_values=px, max_new_tokens=8, do_sample=True, temperature=1.5)

    assert sample(pixels(1)).tolist() == sample(pixels(1)).tolist()
    greedy = [model.generate(input_ids=ids, pixel_values=pixels(1, seed=s), max_new_tokens=8, do_sample=False)
              for s in range(4)]
    assert len({tuple(g[0].tolist()) for g in greedy}) > 1  # the image steers the answer


def test_precomputed_weights_in_generate(model):
    rows, _ = rows_for(model)
    ids = torch.tensor([rows[0]])
    px = pixels(1)
    weights = model.get_image_features(pixel_values=px)
    a = model.generate(input_ids=ids, pixel_values=px, max_new_tokens=5, do_sample=False)
    b = model.generate(input_ids=ids, perceptual_weights=weights, max_new_tokens=5, do_sample=False)
    assert a.tolist() == b.tolist()


def test_generate_on_gqa_siglip_model():
    m = tiny_model(seed=2, text=qwen2_config(), vision=siglip_config())
    m.generation_config.pad_token_id = 0
    img = m.config.image_token_id
    ids, mask = left_padded([[1, img, 5, 6], [1, img, 7, 8, 9, 10]])
    px = pixels(2)
    out = m.generate(input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=4, do_sample=False)
    alone = m.generate(input_ids=torch.tensor([[1, img, 5, 6]]), pixel_values=px[:1], max_new_tokens=4, do_sample=False)
    assert out[0, -4:].tolist() == alone[0, -4:].tolist()


def test_generate_rejects_missing_images(model):
    rows, _ = rows_for(model)
    with pytest.raises(ValueError, match="no image was given"):
        model.generate(input_ids=torch.tensor([rows[0]]), max_new_tokens=2)
