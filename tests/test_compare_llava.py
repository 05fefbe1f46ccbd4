"""The LLaVA baseline (`architecture: llava`) on our training path: same inputs as VLoRA, a falling loss, and an
export that plain transformers loads and the image-text-to-text pipeline answers with."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlavaForConditionalGeneration, LlavaProcessor, pipeline, set_seed

from test_training import fixed_batch, tiny_args, _rows, batch_loss
from vlora_hf.answering import answer_questions
from vlora_hf.data import shapes
from vlora_hf.training.llava_baseline import ExpandImageTokens, build_llava, image_tokens
from vlora_hf.training.model_builder import build_model_and_processor
from vlora_hf.training.train import run

LLAVA = {"architecture": "llava", "scratch_tower": {"patch_embedding": "fan_in", "position_embedding": "sincos",
                                                    "warm_start": {"steps": 2, "batch_size": 4}}}


def llava_args(tmp_path, *flags, **overrides):
    return tiny_args(tmp_path, *flags, **{**LLAVA, **overrides})


def test_llava_sees_the_same_pixels_and_text_as_vlora(tmp_path):
    """Same tokenizer, chat template and pixels as the VLoRA recipe; the collator's expansion of `<image>` gives
    exactly the ids LlavaProcessor makes from the rendered conversation."""
    args = llava_args(tmp_path)
    set_seed(0)
    llava, lp = build_llava(args[0], _rows(args))
    vlora_args = tiny_args(tmp_path / "v")
    _, vp = build_model_and_processor(vlora_args[0], rows_for_tokenizer=_rows(vlora_args))
    assert lp.tokenizer.get_vocab() == vp.tokenizer.get_vocab()
    assert lp.chat_template == vp.chat_template
    images, _ = shapes.make_rows(3, split="eval")
    torch.testing.assert_close(lp.image_processor(images, return_tensors="pt")["pixel_values"],
                               vp.image_processor(images, return_tensors="pt")["pixel_values"], rtol=0, atol=0)
    n = image_tokens(llava)
    assert n == (32 // 16) ** 2

    batch = fixed_batch(lp, n=4)  # one <image> id per row, as VLoRA trains
    expand = ExpandImageTokens(lambda rows: rows, lp.image_token_id, n)
    row = expand.expand({"input_ids": batch["input_ids"][0][batch["attention_mask"][0].bool()],
                  "labels": batch["labels"][0][batch["attention_mask"][0].bool()]})
    text = lp.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                {"type": "text", "text": shapes.Q_COLOR}]}],
                                  add_generation_prompt=True, tokenize=False)
    prompt = lp(images=images[:1], text=[text], return_tensors="pt")["input_ids"][0]
    assert (prompt == lp.image_token_id).sum() == n
    assert row["input_ids"][: len(prompt)].tolist() == prompt.tolist()
    assert (row["labels"][row["input_ids"] == lp.image_token_id] == -100).all()


def test_llava_baseline_trains_and_exports_a_plain_transformers_checkpoint(tmp_path):
    """A few steps lower the loss; the export loads without remote code and the pipeline answers as generate."""
    args = llava_args(tmp_path, "--max_steps", "12")
    set_seed(0)
    model0, processor0 = build_llava(args[0], _rows(args))
    collate = ExpandImageTokens(lambda b: b, processor0.image_token_id, image_tokens(model0))
    batch0 = fixed_batch(processor0)
    from vlora_hf.data.llava import LLaVACollator

    def expanded(batch, processor):
        rows = [{"input_ids": i[m.bool()], "labels": l[m.bool()]}
                for i, l, m in zip(batch["input_ids"], batch["labels"], batch["attention_mask"])]
        out = LLaVACollator(processor.tokenizer.pad_token_id)([collate.expand(r) for r in rows])
        return {**out, "pixel_values": batch["pixel_values"]}

    before = batch_loss(model0, expanded(batch0, processor0))
    summary = run(*args)
    assert summary["steps"] == 12 and set(summary["trainable"]) == {"vision_tower", "projector", "language_model"}
    out = tmp_path / "out"
    assert json.loads((out / "config.json").read_text())["model_type"] == "llava"
    assert not list(out.glob("*.py")) and "auto_map" not in (out / "config.json").read_text()
    model = LlavaForConditionalGeneration.from_pretrained(out).eval()
    processor = LlavaProcessor.from_pretrained(out)
    after = batch_loss(model, expanded(fixed_batch(processor), processor))
    assert after < 0.85 * before, (before, after)

    images, rows = shapes.make_rows(2, split="eval")
    expected = answer_questions(model, processor, [images[i] for i, _, _ in rows], [q for _, q, _ in rows],
                                max_new_tokens=5, batch_size=1)
    pipe = pipeline("image-text-to-text", model=str(out))
    for (i, q, _), want in zip(rows, expected):
        got = pipe(text=[{"role": "user", "content": [{"type": "image", "image": images[i]},
                                                      {"type": "text", "text": q}]}],
                   max_new_tokens=5, do_sample=False, return_full_text=False)
        assert got[0]["generated_text"].strip() == want


@pytest.mark.parametrize("overrides, message", [
    ({"stage": "finetune", "text_config": None, "vision_config": None, "tokenizer_build": None,
      "scratch_tower": None, "checkpoint": "somewhere"}, "architecture llava is a baseline trained from configs"),
    ({"architecture": "gpt"}, "architecture='gpt' is not one of ['vlora', 'llava']"),
])
def test_llava_switch_refuses_what_it_cannot_train(tmp_path, overrides, message):
    with pytest.raises(ValueError) as err:
        llava_args(tmp_path, **overrides)
    assert message in str(err.value)
