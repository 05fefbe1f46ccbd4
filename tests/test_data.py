"""LLaVA-format dataset + collator: exact ids/labels/masks, images in row order, errors, cached features."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vlora_hf.data.llava import IGNORE_INDEX, LLaVACollator, LLaVADataset
from vlora_hf.training.bpe_tokenizer import build_tokenizer

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
COLORS = {"a.png": (255, 0, 0), "b.png": (0, 0, 255), "c.png": (0, 200, 0)}


@pytest.fixture(scope="module")
def tok():
    texts = [SYSTEM, "USER: ASSISTANT: What color is the shape? red circle blue square Describe the image."]
    return build_tokenizer(texts * 3, vocab_size=400)


@pytest.fixture()
def folder(tmp_path):
    for name, rgb in COLORS.items():
        Image.new("RGB", (6, 4), rgb).save(tmp_path / name)
    return tmp_path


def to_tensor(image):  # a plain callable image processor: image -> [3, H, W] float
    return torch.tensor(np.asarray(image), dtype=torch.float32).permute(2, 0, 1)


def pieces(tok, *parts):
    """Token ids of each literal piece (no bos) -- the expectation is built from these, not from the template."""
    return [tok(p, add_special_tokens=False)["input_ids"] for p in parts]


REC_IMAGE = {"id": "r1", "image": "a.png", "conversations": [
    {"from": "human", "value": "What color is the shape?\n<image>"},  # placeholder moved to the front
    {"from": "gpt", "value": "red circle"},
    {"from": "human", "value": "Describe the image."},
    {"from": "gpt", "value": "blue square"},
]}
REC_TEXT = {"id": "t1", "conversations": [{"from": "human", "value": "What color?"}, {"from": "gpt", "value": "red"}]}
REC_B = {"id": "r2", "image": "b.png", "conversations": [
    {"from": "human", "value": "<image>\nWhat color is the shape?"}, {"from": "gpt", "value": "blue"}]}


def expected_vicuna(tok):
    p1, a1, p2, a2 = pieces(
        tok, SYSTEM + " USER: <image>\nWhat color is the shape? ASSISTANT:", " red circle</s>",
        "USER: Describe the image. ASSISTANT:", " blue square</s>")
    ids = [tok.bos_token_id] + p1 + a1 + p2 + a2
    labels = [IGNORE_INDEX] * (1 + len(p1)) + a1 + [IGNORE_INDEX] * len(p2) + a2
    return ids, labels


def test_vicuna_labels_only_on_assistant_turns(tok, folder):
    ds = LLaVADataset([REC_IMAGE], tok, image_folder=folder, image_processor=to_tensor)
    item = ds[0]
    ids, labels = expected_vicuna(tok)
    assert item["input_ids"].tolist() == ids
    assert item["labels"].tolist() == labels
    learned = [t for t in item["labels"].tolist() if t != IGNORE_INDEX]
    assert tok.decode(learned) == " red circle</s> blue square</s>"
    assert item["input_ids"].tolist().count(tok.convert_tokens_to_ids("<image>")) == 1
    assert tok.decode(item["input_ids"].tolist()[1:]) == (
        SYSTEM + " USER: <image>\nWhat color is the shape? ASSISTANT: red circle</s>USER: Describe the image. "
        "ASSISTANT: blue square</s>")
    assert torch.equal(item["pixel_values"], to_tensor(Image.new("RGB", (6, 4), COLORS["a.png"])))


def test_plain_mode_caption_pretraining(tok, folder):
    rec = {"id": "cap", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": "red circle"}]}
    ds = LLaVADataset([rec], tok, image_folder=folder, image_processor=to_tensor, mode="plain")
    item = ds[0]
    head, cap = pieces(tok, "<image>\n", "red circle\n")  # the question is dropped, as in the release
    assert item["input_ids"].tolist() == [tok.bos_token_id] + head + cap
    assert item["labels"].tolist() == [IGNORE_INDEX] * (1 + len(head)) + cap
    assert tok.decode(cap) == "red circle\n"


def test_collator_pads_right_and_orders_images_by_row(tok, folder):
    ds = LLaVADataset([REC_B, REC_TEXT, REC_IMAGE], tok, image_folder=folder, image_processor=to_tensor)
    rows = [ds[0], ds[1], ds[2]]
    batch = LLaVACollator(tok.pad_token_id)(rows)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "pixel_values"}
    pb, ab = pieces(tok, SYSTEM + " USER: <image>\nWhat color is the shape? ASSISTANT:", " blue</s>")
    pt, at = pieces(tok, SYSTEM + " USER: What color? ASSISTANT:", " red</s>")
    row0 = [tok.bos_token_id] + pb + ab
    row1 = [tok.bos_token_id] + pt + at
    row2, lab2 = expected_vicuna(tok)
    T = len(row2)
    assert T > len(row0) and T > len(row1)
    pad = tok.pad_token_id
    assert batch["input_ids"].tolist() == [row0 + [pad] * (T - len(row0)), row1 + [pad] * (T - len(row1)), row2]
    assert batch["attention_mask"].tolist() == [[1] * len(row0) + [0] * (T - len(row0)),
                                                [1] * len(row1) + [0] * (T - len(row1)), [1] * T]
    assert batch["labels"].tolist() == [
        [IGNORE_INDEX] * (1 + len(pb)) + ab + [IGNORE_INDEX] * (T - len(row0)),
        [IGNORE_INDEX] * (1 + len(pt)) + at + [IGNORE_INDEX] * (T - len(row1)),
        lab2,
    ]
    # two images (rows 0 and 2; row 1 is text-only), in row order: blue then red
    px = batch["pixel_values"]
    assert px.shape == (2, 3, 4, 6)
    assert px[0, :, 0, 0].tolist() == [0, 0, 255] and px[1, :, 0, 0].tolist() == [255, 0, 0]
    left = LLaVACollator(tok.pad_token_id, padding_side="left")([ds[0], ds[2]])
    assert left["input_ids"][0].tolist() == [pad] * (T - len(row0)) + row0
    assert left["attention_mask"][0].tolist() == [0] * (T - len(row0)) + [1] * len(row0)
    text_only = LLaVACollator(tok.pad_token_id)([ds[1]])
    assert set(text_only) == {"input_ids", "attention_mask", "labels"}


def test_truncation_and_image_token_remap(tok, folder):
    ids, labels = expected_vicuna(tok)
    ds = LLaVADataset([REC_IMAGE], tok, image_folder=folder, image_processor=to_tensor, model_max_length=len(ids) - 3)
    item = ds[0]
    assert item["input_ids"].tolist() == ids[:-3] and item["labels"].tolist() == labels[:-3]
    tiny = LLaVADataset([REC_IMAGE], tok, image_folder=folder, image_processor=to_tensor, model_max_length=5)
    with pytest.raises(ValueError, match="'r1'.*removes the <image>"):
        tiny[0]
    remapped = LLaVADataset([REC_IMAGE], tok, image_folder=folder, image_processor=to_tensor, image_token_id=999)
    got = remapped[0]["input_ids"].tolist()
    image_id = tok.convert_tokens_to_ids("<image>")
    assert got == [999 if t == image_id else t for t in ids] and got.count(999) == 1


BAD = [
    ({"id": "x1", "image": "a.png"}, "'x1'.*'conversations'"),
    ({"id": "x2", "conversations": [{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "a"}]}, "'x2'.*speaker"),
    ({"id": "x3", "conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]}, "'x3'.*alternate"),
    ({"id": "x4", "conversations": [{"from": "human", "value": "a"}]}, "'x4'.*end with a gpt turn"),
    ({"id": "x5", "image": "a.png", "conversations": [{"from": "human", "value": "<image> <image>"},
                                                      {"from": "gpt", "value": "b"}]}, "'x5'.*exactly one <image>"),
    ({"id": "x6", "image": "a.png", "conversations": [{"from": "human", "value": "no placeholder"},
                                                      {"from": "gpt", "value": "b"}]}, "'x6'.*exactly one <image>"),
    ({"id": "x7", "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "b"}]},
     "'x7'.*text-only"),
    ({"id": "x8", "conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "b"}]}, "'x8'.*string"),
    ({"id": "x9", "image": ["a.png", "b.png"], "conversations": [{"from": "human", "value": "<image>"},
                                                                 {"from": "gpt", "value": "b"}]}, "'x9'.*'image'"),
    ("not a record", "index 0.*json object"),
]


@pytest.mark.parametrize("record,match", BAD)
def test_malformed_records_raise_naming_the_record(tok, folder, record, match):
    with pytest.raises(ValueError, match=match):
        LLaVADataset([record], tok, image_folder=folder, image_processor=to_tensor)


def test_plain_mode_rejects_multi_turn_and_text_only(tok, folder):
    with pytest.raises(ValueError, match="'r1'.*plain mode needs exactly one human and one gpt"):
        LLaVADataset([REC_IMAGE], tok, image_folder=folder, mode="plain")
    with pytest.raises(ValueError, match="'t1'.*plain.*need an image"):
        LLaVADataset([REC_TEXT], tok, image_folder=folder, mode="plain")
    with pytest.raises(ValueError, match="unknown data mode"):
        LLaVADataset([REC_TEXT], tok, image_folder=folder, mode="chatml")


def test_missing_or_broken_image_file(tok, folder):
    rec = dict(REC_B, id="gone", image="missing.png")
    with pytest.raises(ValueError, match="'gone'.*missing.png does not exist"):
        LLaVADataset([REC_TEXT, rec], tok, image_folder=folder, image_processor=to_tensor)
    lazy = LLaVADataset([rec], tok, image_folder=folder, image_processor=to_tensor, check_images=False)
    with pytest.raises(ValueError, match="'gone'.*does not exist"):
        lazy[0]
    (folder / "broken.png").write_bytes(b"not a png")
    broken = LLaVADataset([dict(REC_B, id="bad", image="broken.png")], tok, image_folder=folder, image_processor=to_tensor)
    with pytest.raises(ValueError, match="'bad'.*cannot read image"):
        broken[0]
    no_proc = LLaVADataset([REC_B], tok, image_folder=folder)
    with pytest.raises(ValueError, match="'r2'.*no image_processor"):
        no_proc[0]


def test_in_memory_images_pil_and_preprocessed(tok, tmp_path):
    """`images=`: records name in-memory images (no files); PIL goes through the processor, tensors as they are."""
    red = Image.new("RGB", (6, 4), COLORS["a.png"])
    pre = torch.full((3, 4, 6), 7.0)
    recs = [dict(REC_B, id="pil", image="k1"), dict(REC_B, id="pre", image="k2"), REC_TEXT]
    ds = LLaVADataset(recs, tok, image_processor=to_tensor, images={"k1": red, "k2": pre})
    assert torch.equal(ds[0]["pixel_values"], to_tensor(red)) and ds[1]["pixel_values"] is pre
    assert ds[0]["input_ids"].tolist() == ds[1]["input_ids"].tolist()  # same conversation, tokenised once
    assert len(ds._encoded) == 1 and "pixel_values" not in ds[2] and len(ds._encoded) == 2
    with pytest.raises(ValueError, match="'lost'.*'k3' is not among the 2 in-memory images"):
        LLaVADataset([dict(REC_B, id="lost", image="k3")], tok, images={"k1": red, "k2": pre})


def test_json_file_and_default_image_folder(tok, folder):
    path = folder / "data.json"
    path.write_text(json.dumps([REC_B, REC_TEXT]))
    ds = LLaVADataset(str(path), tok, image_processor=to_tensor)
    assert len(ds) == 2 and ds[0]["pixel_values"][:, 0, 0].tolist() == [0, 0, 255] and "pixel_values" not in ds[1]
    assert ds.modality_lengths[1] < 0 < ds.modality_lengths[0]
    (folder / "bad.json").write_text("{nope")
    with pytest.raises(ValueError, match="not valid json"):
        LLaVADataset(str(folder / "bad.json"), tok)


def test_precomputed_features_encode_each_image_once(tok, folder):
    calls = []

    def encode(px):  # [n,3,H,W] -> [n, P=2, Dv=3]: per-image channel means, twice
        calls.append(px.shape[0])
        return px.mean(dim=(2, 3))[:, None, :].repeat(1, 2, 1)

    recs = [REC_B, REC_TEXT, REC_IMAGE, dict(REC_B, id="r2-again")]
    ds = LLaVADataset(recs, tok, image_folder=folder, image_processor=to_tensor)
    cache = folder / "cache" / "feats.pt"
    assert ds.precompute_image_features(encode, batch_size=1, cache_file=cache) == 2  # a.png, b.png once each
    assert calls == [1, 1] and cache.is_file()
    for _epoch in range(2):
        batch = LLaVACollator(tok.pad_token_id)([ds[i] for i in range(4)])
        assert "pixel_values" not in batch
        assert batch["image_features"].tolist() == [[[0, 0, 255]] * 2, [[255, 0, 0]] * 2, [[0, 0, 255]] * 2]
    assert calls == [1, 1]  # reused, not recomputed
    again = LLaVADataset(recs, tok, image_folder=folder, image_processor=to_tensor)
    assert again.precompute_image_features(encode, cache_file=cache) == 0 and calls == [1, 1]
    assert torch.equal(again[0]["image_features"], ds[0]["image_features"])


def test_features_path_matches_pixels_through_the_model(tok, folder):
    """The collated image_features batch gives the model the same loss as the pixel batch."""
    from tiny import llama_config, tiny_model

    from vlora_hf.data.llava import vision_feature_encoder

    model = tiny_model(text=llama_config(vocab_size=len(tok)), image_token_id=tok.convert_tokens_to_ids("<image>"))

    def proc(image):  # 28x28 as the tiny tower expects
        return to_tensor(image.resize((28, 28))) / 255.0

    recs = [REC_B, REC_TEXT, REC_IMAGE]
    ds = LLaVADataset(recs, tok, image_folder=folder, image_processor=proc)
    collate = LLaVACollator(tok.pad_token_id)
    px_batch = collate([ds[i] for i in range(3)])
    ds.precompute_image_features(vision_feature_encoder(model))
    f_batch = collate([ds[i] for i in range(3)])
    assert f_batch["image_features"].shape[0] == 2
    with torch.no_grad():
        loss_px = model(**px_batch).loss
        loss_f = model(**f_batch).loss
        other = dict(px_batch, pixel_values=px_batch["pixel_values"].flip(0))
        loss_swapped = model(**other).loss
    assert torch.allclose(loss_px, loss_f, atol=1e-6)
    assert not torch.allclose(loss_px, loss_swapped, atol=1e-6)  # images really reach their rows


def test_renders_the_release_prompt_and_takes_a_transformers_image_processor(tok, folder):
    """vicuna_v1 text == the release's prompt (fixture) + answer + </s>; a real image processor is accepted."""
    from tiny import FIXTURE

    from vlora_hf.data.llava import encode_messages, to_messages
    from vlora_hf.processing import VLoRAImageProcessor

    prompts = FIXTURE / "prompts.json"
    if not prompts.is_file():
        pytest.skip("fixture absent")
    two = json.loads(prompts.read_text())["vicuna_v1"]["two_turns"]
    (u1, a1, u2, _) = [m[1] for m in two["messages"]]
    rec = {"id": "fx", "image": "a.png", "conversations": [
        {"from": "human", "value": u1}, {"from": "gpt", "value": a1}, {"from": "human", "value": u2},
        {"from": "gpt", "value": "Red."}]}
    messages, _ = to_messages(rec, 0)
    _, labels, text = encode_messages(tok, messages)
    assert text == two["prompt"] + " Red.</s>"
    assert tok.decode([t for t in labels if t != IGNORE_INDEX]) == " " + a1 + "</s> Red.</s>"
    proc = VLoRAImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    item = LLaVADataset([rec], tok, image_folder=folder, image_processor=proc)[0]
    assert item["pixel_values"].shape == (3, 28, 28)
