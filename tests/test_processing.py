"""Processor, image processor, chat templates and tokenizer (no model needed)."""

from __future__ import annotations

import io
import json
import subprocess
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from tiny import FIXTURE, HIDE_PACKAGE, PYTHON, hidden_package_env
from vlora_hf.processing import (
    PLAIN_TEMPLATE,
    VICUNA_V1_TEMPLATE,
    VLoRAImageProcessor,
    VLoRAProcessor,
    expand2square,
)
from vlora_hf.training.bpe_tokenizer import build_tokenizer

CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant. USER: ASSISTANT: </s>",
    "<image>\nWhat is in the picture? A red square on a white background. What color is the square?",
    "Describe the image. hello world, a blue circle and a green triangle.",
]
MEAN = (0.48145466, 0.4578275, 0.40821073)
MEAN_RGB = tuple(int(x * 255) for x in MEAN)


def need_fixture():
    if not FIXTURE.is_dir():
        pytest.skip("official fixture not available")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(CORPUS, vocab_size=300)


@pytest.fixture(scope="module")
def image_processor():
    return VLoRAImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})


@pytest.fixture(scope="module")
def processor(tokenizer, image_processor):
    return VLoRAProcessor(image_processor=image_processor, tokenizer=tokenizer)


def raw(**kw):
    """Pad-only processor: no resize/crop/rescale/normalise, so outputs are the padded pixels."""
    return VLoRAImageProcessor(
        do_resize=False, do_center_crop=False, do_rescale=False, do_normalize=False, **kw
    )


# ---------------------------------------------------------------- tokenizer
def test_build_tokenizer_specials_and_round_trip(tokenizer):
    assert tokenizer.convert_tokens_to_ids(["<unk>", "<s>", "</s>", "<pad>", "<image>"]) == [0, 1, 2, 3, 4]
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "<pad>")
    text = "héllo  world <image>\nWhat?</s>  \t ünseen 文字 ✓"
    ids = tokenizer(text).input_ids
    assert ids[0] == 1 and ids.count(4) == 1 and 2 in ids  # bos, one <image>, </s> as a single token
    assert tokenizer.decode(ids) == "<s>" + text
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False).input_ids) == text
    assert len(tokenizer) == 300
    with pytest.raises(ValueError, match="vocab_size"):
        build_tokenizer(CORPUS, vocab_size=100)


def test_template_phrases_become_single_tokens(tmp_path):
    """template_tokens: the vicuna_v1 system sentence + "USER: ", " ASSISTANT:" (and with follow_up a further
    turn's "USER: ") are one token each, the prompt's tokens are a prefix of the trained conversation's, and the
    text round-trips through a reload."""
    from transformers import AutoTokenizer

    from vlora_hf.training.bpe_tokenizer import template_phrases

    system = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
              "helpful, detailed, and polite answers to the user's questions.")
    assert template_phrases(VICUNA_V1_TEMPLATE) == [system + " USER: ", " ASSISTANT:"]
    phrases = template_phrases(VICUNA_V1_TEMPLATE, follow_up=True)
    assert phrases == [system + " USER: ", " ASSISTANT:", "USER: "]
    tok = build_tokenizer(CORPUS, vocab_size=300, added_phrases=phrases)
    tok.save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    user = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the square?"}]}]
    prompt = tok.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    full = tok.apply_chat_template(user + [{"role": "assistant", "content": "red"}], tokenize=False)
    assert full == system + " USER: <image>\nWhat color is the square? ASSISTANT: red</s>"
    ids, prompt_ids = tok(full).input_ids, tok(prompt).input_ids
    assert ids[: len(prompt_ids)] == prompt_ids and tok.decode(ids[1:]) == full
    tokens = tok.convert_ids_to_tokens(ids)
    assert tokens[:3] == ["<s>", system + " USER: ", "<image>"] and tokens[len(prompt_ids) - 1] == " ASSISTANT:"
    two_turns = user + [{"role": "assistant", "content": "red"}, {"role": "user", "content": "Why?"},
                        {"role": "assistant", "content": "no"}]  # ids ends with "</s>": "USER: " opens turn 2
    tokens = tok.convert_ids_to_tokens(tok(tok.apply_chat_template(two_turns, tokenize=False)).input_ids)
    assert tokens[len(ids) - 1:len(ids) + 1] == ["</s>", "USER: "] and tokens.count(" ASSISTANT:") == 2
    assert len(tok) == 303


# ---------------------------------------------------------------- image processor
def test_pixel_parity_with_release(tmp_path):
    need_fixture()
    from safetensors.torch import load_file

    ref = load_file(str(FIXTURE / "reference.safetensors"))["pixel_values"]
    ip = VLoRAImageProcessor.from_tower_preprocessor(FIXTURE / "vision_tower")
    assert ip.image_aspect_ratio == "pad" and dict(ip.size) == {"shortest_edge": 56}
    paths = [FIXTURE / "images" / f"image{i}.png" for i in range(3)]
    rgb = [np.array(Image.open(p).convert("RGB")) for p in paths]
    variants = {
        "paths": [str(p) for p in paths],
        "pil": [Image.open(p) for p in paths],
        "numpy_hwc": rgb,
        "torch_chw_uint8": [torch.from_numpy(a).permute(2, 0, 1) for a in rgb],
        "torch_chw_float01": [torch.from_numpy(a).permute(2, 0, 1).float() / 255 for a in rgb],
        "bytes": [p.read_bytes() for p in paths],
    }
    for name, images in variants.items():
        px = ip(images, return_tensors="pt")["pixel_values"]
        assert px.shape == ref.shape, name
        assert (px - ref).abs().max().item() < 1e-4, name
    # saved and reloaded, the processor keeps the tower's settings
    ip.save_pretrained(tmp_path)
    again = VLoRAImageProcessor.from_pretrained(tmp_path)
    assert (again(variants["pil"], return_tensors="pt")["pixel_values"] - ref).abs().max().item() < 1e-4
    # without padding the result differs (centre crop instead): the pad mode is really applied
    nopad = ip(variants["pil"], image_aspect_ratio="square", return_tensors="pt")["pixel_values"]
    assert (nopad[:2] - ref[:2]).abs().max().item() > 0.1
    assert (nopad[2] - ref[2]).abs().max().item() < 1e-4  # the square image is unchanged


def test_pad_switch_and_vision_config(tmp_path):
    """``image_aspect_ratio`` and transformers' ``do_pad`` are one switch (both saved; an override of either at
    load time replaces both); ``from_vision_config`` reads the tower's preprocessor_config.json when
    the folder has one, else uses the tower's image size."""
    from transformers import CLIPVisionConfig

    assert (VLoRAImageProcessor().do_pad, VLoRAImageProcessor(do_pad=False).image_aspect_ratio) == (True, "square")
    assert VLoRAImageProcessor(image_aspect_ratio="square").do_pad is False
    with pytest.raises(ValueError, match="disagree"):
        VLoRAImageProcessor(image_aspect_ratio="pad", do_pad=False)
    ip = raw()
    wide = np.zeros((4, 10, 3), np.uint8)
    assert ip(wide, do_pad=False, return_tensors="np")["pixel_values"].shape == (1, 3, 4, 10)
    assert ip(wide, image_aspect_ratio="square", return_tensors="np")["pixel_values"].shape == (1, 3, 4, 10)
    ip.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert (saved["image_aspect_ratio"], saved["do_pad"]) == ("pad", True)
    assert VLoRAImageProcessor.from_pretrained(tmp_path, image_aspect_ratio="square").do_pad is False
    assert VLoRAImageProcessor.from_pretrained(tmp_path, do_pad=False).image_aspect_ratio == "square"
    vision = CLIPVisionConfig(image_size=28)
    built = VLoRAImageProcessor.from_vision_config(vision, tmp_path / "no-such-tower", image_aspect_ratio="square")
    assert (dict(built.size), dict(built.crop_size), built.do_pad) == ({"shortest_edge": 28},
                                                                       {"height": 28, "width": 28}, False)
    if FIXTURE.is_dir():
        tower = VLoRAImageProcessor.from_vision_config(vision, FIXTURE / "vision_tower")
        assert dict(tower.size) == {"shortest_edge": 56} and tower.image_aspect_ratio == "pad"


def test_pad_to_square_matches_expand2square():
    img = np.arange(4 * 10 * 3, dtype=np.uint8).reshape(4, 10, 3)  # h=4, w=10
    out = raw()(img, return_tensors="np")["pixel_values"][0]  # CHW
    assert out.shape == (3, 10, 10)
    hwc = np.moveaxis(out, 0, -1)
    assert (hwc[:3] == MEAN_RGB).all() and (hwc[7:] == MEAN_RGB).all()  # (10 - 4) // 2 = 3 rows above
    assert (hwc[3:7] == img).all()
    tall = np.full((7, 2, 3), 9, np.uint8)  # w=2, h=7 -> x offset (7 - 2) // 2 = 2
    hwc = np.moveaxis(raw()(tall, return_tensors="np")["pixel_values"][0], 0, -1)
    assert (hwc[:, 2:4] == 9).all() and (hwc[:, :2] == MEAN_RGB).all() and (hwc[:, 4:] == MEAN_RGB).all()
    ref = np.asarray(expand2square(Image.fromarray(tall), MEAN_RGB))
    assert (hwc == ref).all()


def test_image_modes_and_layouts():
    ip = raw()
    flat = lambda x: ip(x, return_tensors="np")["pixel_values"][0]  # noqa: E731
    mean_img = flat(Image.new("RGB", (5, 5), MEAN_RGB))
    # fully transparent RGBA / LA / P-with-transparency -> the mean colour
    assert (flat(Image.new("RGBA", (5, 5), (255, 0, 0, 0))) == mean_img).all()
    assert (flat(Image.new("LA", (5, 5), (200, 0))) == mean_img).all()
    p = Image.new("P", (5, 5), 0)
    p.putpalette([10, 20, 30] * 256)
    p.info["transparency"] = 0
    assert (flat(p) == mean_img).all()
    # opaque RGBA keeps its colour; half transparency blends with the mean colour
    assert (flat(Image.new("RGBA", (5, 5), (255, 0, 0, 255)))[:, 0, 0] == [255, 0, 0]).all()
    half = flat(Image.new("RGBA", (5, 5), (255, 255, 255, 128)))[:, 0, 0]
    assert np.allclose(half, [(255 * 128 + m * 127) / 255 for m in MEAN_RGB], atol=1)
    # grey levels, 16-bit, CMYK, binary
    assert (flat(Image.new("L", (3, 3), 128)) == 128).all()
    assert (flat(Image.new("I;16", (3, 3), 65535)) == 255).all()
    assert (flat(Image.new("CMYK", (3, 3), (0, 0, 0, 0))) == 255).all()
    assert (flat(Image.new("1", (3, 3), 1)) == 255).all()
    # arrays: HW, HWC, CHW, float in [0, 1], torch CHW; all 1x1 sizes work
    rgb = np.array([[[10, 200, 30]]], np.uint8)
    for x in (rgb, np.moveaxis(rgb, -1, 0), torch.from_numpy(np.moveaxis(rgb, -1, 0).copy()),
              rgb.astype(np.float32) / 255, Image.fromarray(rgb)):
        assert flat(x)[:, 0, 0].tolist() == [10, 200, 30], type(x)
    assert flat(np.full((2, 3), 7, np.uint8)).shape == (3, 3, 3)
    full = VLoRAImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    for size in [(1, 1), (1, 300), (300, 1)]:
        assert full(Image.new("RGB", size), return_tensors="pt")["pixel_values"].shape == (1, 3, 28, 28)


def test_siglip_tower_settings():
    ip = VLoRAImageProcessor.from_tower_preprocessor(
        {"image_processor_type": "SiglipImageProcessor", "size": {"height": 14, "width": 14}, "resample": 3,
         "do_resize": True, "do_rescale": True, "do_normalize": True, "rescale_factor": 1 / 255}
    )
    assert ip.do_center_crop is False and tuple(ip.image_mean) == (0.5, 0.5, 0.5)
    px = ip(Image.new("RGB", (20, 10), (255, 255, 255)), return_tensors="pt")["pixel_values"]
    assert px.shape == (1, 3, 14, 14)
    assert px[0, :, 7, 7].tolist() == [1.0, 1.0, 1.0]  # white -> (1 - 0.5) / 0.5
    assert abs(px[0, 0, 0, 7].item() - (127 / 255 - 0.5) / 0.5) < 1e-4  # padded with mean 0.5 -> int(127.5)=127


def test_bad_images(tmp_path):
    ip = VLoRAImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, format="PNG")
    good = buf.getvalue()
    jpg = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(jpg, format="JPEG")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(jpg.getvalue()[: len(jpg.getvalue()) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        ip(str(truncated))
    (tmp_path / "garbage.png").write_bytes(b"not an image at all" * 10)
    with pytest.raises(ValueError, match="not a recognised image format"):
        ip(str(tmp_path / "garbage.png"))
    with pytest.raises(ValueError, match="truncated or corrupt"):
        ip(good[:60])
    with pytest.raises(ValueError, match="not found"):
        ip(str(tmp_path / "missing.png"))
    old = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = 1000  # 64*64 = 4096 > 2 * 1000: Pillow's bomb error; 1500..3000: its warning
        with pytest.raises(ValueError, match="decompression-bomb"):
            ip(good)
        Image.MAX_IMAGE_PIXELS = 3000
        with pytest.raises(ValueError, match="decompression-bomb"):
            ip(good)
    finally:
        Image.MAX_IMAGE_PIXELS = old
    assert ip(good, return_tensors="pt")["pixel_values"].shape == (1, 3, 28, 28)
    with pytest.raises(ValueError, match="Empty image"):
        ip(np.zeros((0, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="Unsupported image type"):
        ip(object())
    with pytest.raises(ValueError, match="image_aspect_ratio"):
        VLoRAImageProcessor(image_aspect_ratio="anyres")


# ---------------------------------------------------------------- chat templates
def _release_messages(entry):
    return [{"role": r, "content": c} for r, c in entry["messages"] if c is not None]


def _hf_messages(entry):
    out = []
    for role, content in entry["messages"]:
        if content is None:
            continue
        if content.startswith("<image>\n"):
            parts = [{"type": "image"}, {"type": "text", "text": content[len("<image>\n"):]}]
        else:
            parts = [{"type": "text", "text": content}]
        out.append({"role": role, "content": parts})
    return out


def test_chat_templates_render_release_strings(processor, tokenizer):
    need_fixture()
    prompts = json.loads((FIXTURE / "prompts.json").read_text())
    for turns in ("one_turn", "two_turns"):
        entry = prompts["vicuna_v1"][turns]
        for msgs in (_release_messages(entry), _hf_messages(entry)):
            assert processor.apply_chat_template(msgs, add_generation_prompt=True) == entry["prompt"]
            assert tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == entry["prompt"]
            assert processor.apply_chat_template(msgs, chat_template=VICUNA_V1_TEMPLATE,
                                                 add_generation_prompt=True) == entry["prompt"]
    plain = prompts["plain"]["one_turn"]
    for msgs in (_release_messages(plain), _hf_messages(plain)):
        assert processor.apply_chat_template(msgs, chat_template="plain") == plain["prompt"]
        assert processor.apply_chat_template(msgs, chat_template=PLAIN_TEMPLATE) == plain["prompt"]
    # image part before the text, whatever the order in the content list; a system message replaces the default
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi?"}, {"type": "image"}]}]
    assert processor.apply_chat_template(msgs, add_generation_prompt=True) == "Be brief. USER: <image>\nHi? ASSISTANT:"
    assert processor.apply_chat_template(msgs[1:]).endswith("USER: <image>\nHi? ")
    # a processor built with a single template string still finds the named alternative
    single = VLoRAProcessor(image_processor=processor.image_processor, tokenizer=tokenizer,
                            chat_template=VICUNA_V1_TEMPLATE)
    assert single.apply_chat_template(_release_messages(plain), chat_template="plain") == plain["prompt"]


# ---------------------------------------------------------------- processor
def _px(ip, img):
    return ip(img, return_tensors="pt")["pixel_values"][0]


def test_placeholders_ordering_and_left_padding(processor, image_processor, tokenizer):
    a = Image.new("RGB", (30, 20), (250, 10, 10))
    b = Image.new("RGB", (12, 40), (10, 10, 250))
    texts = ["<image>\nWhat is in the picture? A long question here.", "hello", "Describe <image> it"]
    out = processor(images=[a, b], text=texts, return_tensors="pt")
    assert set(out.keys()) == {"input_ids", "attention_mask", "pixel_values"}
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids.shape == mask.shape and ids.shape[0] == 3
    # one placeholder token per image, in the right rows; images in placeholder order
    assert (ids == processor.image_token_id).sum(1).tolist() == [1, 0, 1]
    assert processor.image_token == "<image>" and processor.image_token_id == 4
    assert torch.equal(out["pixel_values"][0], _px(image_processor, a))
    assert torch.equal(out["pixel_values"][1], _px(image_processor, b))
    # left padding: pads (and mask zeros) only at the start; each row is its unpadded encoding
    for row, text in enumerate(texts):
        alone = tokenizer(text).input_ids
        n = len(alone)
        assert ids[row, -n:].tolist() == alone
        assert mask[row].tolist() == [0] * (ids.shape[1] - n) + [1] * n
        assert (ids[row, : ids.shape[1] - n] == tokenizer.pad_token_id).all()
    # nested form (one list per row) gives the same result
    nested = processor(images=[[a], [], [b]], text=texts, return_tensors="pt")
    for k in out:
        assert torch.equal(out[k], nested[k])
    # right padding on request
    right = processor(images=[a, b], text=texts, padding_side="right", return_tensors="pt")
    assert right["attention_mask"][1, 0] == 1 and right["attention_mask"][1, -1] == 0
    # text-only call and image-only call
    txt = processor(text=["hello", "What is in the picture?"], return_tensors="pt")
    assert set(txt.keys()) == {"input_ids", "attention_mask"} and txt["attention_mask"][0, 0] == 0
    assert processor(images=a, return_tensors="pt")["pixel_values"].shape == (1, 3, 28, 28)
    # decode
    assert processor.batch_decode(ids, skip_special_tokens=True)[1] == "hello"
    assert processor.decode(ids[0], skip_special_tokens=False).endswith(texts[0])


def test_count_mismatches_raise(processor):
    img = Image.new("RGB", (8, 8))
    with pytest.raises(ValueError, match=r"Expected 1 image\(s\).*got 2"):
        processor(images=[img, img], text=["<image>\nhi", "no image"])
    with pytest.raises(ValueError, match=r"Expected 2 image\(s\).*no images were given"):
        processor(text=["<image>\nhi", "<image> there"])
    with pytest.raises(ValueError, match=r"Expected 0 image\(s\)"):
        processor(images=img, text="no placeholder")
    with pytest.raises(ValueError, match="at most one image"):
        processor(images=[img, img], text="<image> and <image>")
    with pytest.raises(ValueError, match="Prompt 1 holds 0"):
        processor(images=[[img], [img]], text=["<image>", "none"])


def test_bad_prompts(processor, tokenizer):
    img = Image.new("RGB", (8, 8))
    with pytest.raises(ValueError, match="Prompt 0 is empty"):
        processor(images=None, text="")
    with pytest.raises(ValueError, match="Prompt 1 is empty"):
        processor(text=["ok", "   "])
    with pytest.raises(ValueError, match="string or a list of strings"):
        processor(text=[1, 2])
    old = tokenizer.model_max_length
    try:
        tokenizer.model_max_length = 16
        with pytest.raises(ValueError, match="longer than the model's maximum of 16"):
            processor(images=img, text="<image>\n" + "hello world " * 20)
        short = processor(text="<image>\n" + "hello world " * 20, images=img, truncation=True, max_length=16)
        assert len(short["input_ids"][0]) == 16
    finally:
        tokenizer.model_max_length = old


@pytest.mark.slow
def test_auto_processor_remote_code_without_package(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"processor_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
            "processing_vlora.py", "image_processing_vlora.py", "image_loading_vlora.py", "chat_templates.py"} <= names
    cfg = json.loads((tmp_path / "processor_config.json").read_text())
    assert cfg["auto_map"]["AutoProcessor"] == "processing_vlora.VLoRAProcessor"
    assert cfg["image_processor"]["auto_map"]["AutoImageProcessor"] == "image_processing_vlora.VLoRAImageProcessor"
    assert (tmp_path / "chat_template.jinja").read_text() == VICUNA_V1_TEMPLATE
    expected = processor(images=Image.new("RGB", (30, 20), (1, 2, 3)), text=["<image>\nhi", "hello world"],
                         return_tensors="pt")
    torch.save(dict(expected), tmp_path / "expected.pt")
    code = HIDE_PACKAGE + textwrap.dedent(f"""
        import torch
        from PIL import Image
        from transformers import AutoProcessor
        d = {str(tmp_path)!r}
        p = AutoProcessor.from_pretrained(d, trust_remote_code=True)
        assert type(p).__name__ == "VLoRAProcessor", type(p)
        assert type(p.image_processor).__name__ == "VLoRAImageProcessor", type(p.image_processor)
        assert not type(p).__module__.startswith("vlora_hf")
        assert p.image_token_id == 4
        got = p(images=Image.new("RGB", (30, 20), (1, 2, 3)), text=["<image>\\nhi", "hello world"],
                return_tensors="pt")
        exp = torch.load(d + "/expected.pt")
        assert set(got) == set(exp)
        for k in exp:
            assert torch.equal(got[k], exp[k]), k
        msgs = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "Hi?"}}]}}]
        assert p.apply_chat_template(msgs, add_generation_prompt=True).endswith(" USER: <image>\\nHi? ASSISTANT:")
        assert p.apply_chat_template(msgs, chat_template="plain") == "<image>\\nHi?\\n"
        print("REMOTE_OK")
    """)
    res = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, env=hidden_package_env(),
                         cwd=str(tmp_path), timeout=300)
    assert res.returncode == 0 and "REMOTE_OK" in res.stdout, res.stdout + res.stderr
