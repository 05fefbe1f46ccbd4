"""Pipelines and AutoProcessor on a saved tiny checkpoint, as remote code (the package hidden)."""

from __future__ import annotations

import json
import subprocess
import textwrap

import pytest
from PIL import Image

from tiny import HIDE_PACKAGE, PYTHON, hidden_package_env, llama_config

pytest.importorskip("vlora_hf.modeling.modeling_vlora")

CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions. USER: ASSISTANT: </s>",
    "<image>\nWhat is in the picture? A red square on a white background. Describe the image.",
]
MAX_POSITIONS = 256


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from tiny import tiny_model
    from vlora_hf.processing import VLoRAImageProcessor, VLoRAProcessor
    from vlora_hf.training.bpe_tokenizer import build_tokenizer

    tok = build_tokenizer(CORPUS, vocab_size=300)
    tok.model_max_length = MAX_POSITIONS  # what an export does: the tokenizer knows the model's limit
    text = llama_config(vocab_size=len(tok), max_position_embeddings=MAX_POSITIONS, bos_token_id=1,
                        eos_token_id=2, pad_token_id=3)
    model = tiny_model(text=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                       default_prompt="What is in the picture?")
    ip = VLoRAImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    processor = VLoRAProcessor(image_processor=ip, tokenizer=tok)
    d = tmp_path_factory.mktemp("vlora_ckpt")
    model.save_pretrained(d)
    processor.save_pretrained(d)
    Image.new("RGB", (30, 20), (200, 10, 10)).save(d / "red.png")
    Image.new("RGBA", (20, 40), (10, 10, 200, 255)).save(d / "blue.png")
    (d / "corrupt.png").write_bytes((d / "red.png").read_bytes()[:50])
    return d


def test_config_declares_custom_pipeline(checkpoint):
    from vlora_hf.modeling.pipeline_vlora import CUSTOM_PIPELINES

    cfg = json.loads((checkpoint / "config.json").read_text())
    assert cfg["custom_pipelines"] == CUSTOM_PIPELINES
    assert cfg["auto_map"]["AutoModelForImageTextToText"].startswith("modeling_vlora.")
    assert (checkpoint / "pipeline_vlora.py").is_file()


SCRIPT = """
import torch
from PIL import Image
from transformers import AutoProcessor, pipeline

d = {d!r}
red, blue = Image.open(d + "/red.png"), Image.open(d + "/blue.png")
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
          "helpful, detailed, and polite answers to the user's questions.")


def manual(pipe, images, prompts, n=4):
    # the reference path: processor + greedy generate + decode of the new tokens only
    inputs = pipe.processor(images=images, text=prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = pipe.model.generate(**inputs, max_new_tokens=n, do_sample=False)
    return pipe.processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def expect_error(fn, text, kinds=(ValueError,)):
    try:
        fn()
    except kinds as err:
        assert text in str(err), str(err)
    else:
        raise AssertionError("no error for " + text)


proc = AutoProcessor.from_pretrained(d, trust_remote_code=True)
assert type(proc).__name__ == "VLoRAProcessor" and not type(proc).__module__.startswith("vlora_hf")

# ---- image-to-text: a bare image gets config.default_prompt through the chat template
cap = pipeline("image-to-text", model=d, trust_remote_code=True)
assert type(cap).__name__ == "VLoRAImageToTextPipeline", type(cap)
assert type(cap.model).__name__ == "VLoRAForCausalLM" and not type(cap.model).__module__.startswith("vlora_hf")
prompt = SYSTEM + " USER: <image>\\nWhat is in the picture? ASSISTANT:"
one = cap(red, max_new_tokens=4)
assert isinstance(one, list) and len(one) == 1 and one[0]["input_text"] == prompt, one
assert one[0]["generated_text"] == manual(cap, [red], [prompt])[0], one
two = cap([red, d + "/blue.png"], max_new_tokens=4)
assert [r["generated_text"] for r in two] == manual(cap, [red, blue], [prompt, prompt]), two
assert two[0]["generated_text"] == one[0]["generated_text"]
full = cap(red, max_new_tokens=4, return_full_text=True)
assert full[0]["generated_text"] == prompt + one[0]["generated_text"]
asked = cap(red, text="Describe the image.", max_new_tokens=4)  # a question without <image> is templated
assert asked[0]["input_text"] == SYSTEM + " USER: <image>\\nDescribe the image. ASSISTANT:"
cap.model.config.default_prompt = "Describe the image."
assert cap(red, max_new_tokens=4)[0]["generated_text"] == asked[0]["generated_text"]

# ---- image-text-to-text: explicit placeholder text, single and batched
itt = pipeline("image-text-to-text", model=d, trust_remote_code=True)
q1, q2 = "<image>\\nWhat is in the picture?", "<image>\\nDescribe the image."
single = itt(red, text=q1, max_new_tokens=4, return_full_text=False)
assert single[0]["generated_text"] == manual(itt, [red], [q1])[0], single
batch = itt([red, blue], text=[q1, q2], max_new_tokens=4, return_full_text=False)
assert [r["generated_text"] for r in batch] == manual(itt, [red, blue], [q1, q2]), batch
assert batch[0]["generated_text"] == single[0]["generated_text"]  # left padding does not change the answer
assert batch[1]["generated_text"] == itt(blue, text=q2, max_new_tokens=4, return_full_text=False)[0]["generated_text"]
assert itt(red, text=q1, max_new_tokens=4)[0]["generated_text"] == q1 + single[0]["generated_text"]

# ---- chat messages, single and batched
def chat(img, question):
    return [{{"role": "user", "content": [{{"type": "image", "image": img}}, {{"type": "text", "text": question}}]}}]

c1 = itt(text=chat(red, "What is in the picture?"), max_new_tokens=4, return_full_text=False)
assert c1[0]["generated_text"] == manual(itt, [red], [prompt])[0], c1
cb = itt(text=[chat(red, "What is in the picture?"), chat(d + "/blue.png", "Describe the image.")],
         max_new_tokens=4, return_full_text=False)
assert [r[0]["generated_text"] for r in cb] == [
    c1[0]["generated_text"], manual(itt, [blue], [SYSTEM + " USER: <image>\\nDescribe the image. ASSISTANT:"])[0]
], cb
assert cap(text=chat(red, "What is in the picture?"), max_new_tokens=4)[0]["generated_text"] == c1[0]["generated_text"]

# ---- errors
expect_error(lambda: cap(d + "/corrupt.png", max_new_tokens=2), "truncated or corrupt")
# the stock image-text-to-text pipeline decodes paths itself (transformers' load_images) before our processor
expect_error(lambda: itt(d + "/corrupt.png", text=q1, max_new_tokens=2), "truncated", (ValueError, OSError))
for pipe in (cap, itt):
    expect_error(lambda: pipe(red, text="<image>\\n" + "hello " * 400, max_new_tokens=2), "longer than the model")
expect_error(lambda: itt(red, text="", max_new_tokens=2), "is empty")
expect_error(lambda: itt([red, blue], text=[q1, "no placeholder"], max_new_tokens=2), "Expected 1 image")
print("PIPELINES_OK")
"""


@pytest.mark.slow
def test_pipelines_remote_code_without_package(checkpoint):
    code = HIDE_PACKAGE + textwrap.dedent(SCRIPT.format(d=str(checkpoint)))
    res = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, env=hidden_package_env(),
                         cwd=str(checkpoint), timeout=600)
    assert res.returncode == 0 and "PIPELINES_OK" in res.stdout, res.stdout[-3000:] + res.stderr[-6000:]


def test_image_text_to_text_with_package_installed(checkpoint):
    """With vlora_hf imported, the registered classes serve the pipeline without remote code."""
    import vlora_hf  # noqa: F401
    from transformers import pipeline

    pipe = pipeline("image-text-to-text", model=str(checkpoint))
    assert type(pipe.model).__module__.startswith("vlora_hf")
    out = pipe(Image.open(checkpoint / "red.png"), text="<image>\nWhat is in the picture?", max_new_tokens=3,
               return_full_text=False)
    assert isinstance(out[0]["generated_text"], str)
