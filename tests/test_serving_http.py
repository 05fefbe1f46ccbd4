"""`vlora-hf serve` over HTTP on 127.0.0.1: a real server process (vLLM's OpenAI server + our middleware) on the
demo model; answers against `VLoRAForCausalLM.generate`, the bad inputs, and the adapter folder after each."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here: the serving tests run in .venv-serve "
                                   "(`make serving-setup`, or `make test`, which sets it up)")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from test_serving import MAX_TOKENS, reference_generate  # noqa: E402

from vlora_hf.data.shapes import heldout_samples  # noqa: E402
from vlora_hf.serving.measure import start_server  # noqa: E402

MODEL = "vlora-demo"
MAX_IMAGE_MB = 0.05


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    adapters = tmp_path_factory.mktemp("adapters")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLORA_SERVING_CACHE": str(tmp_path_factory.mktemp("export"))}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the server as users run it: vLLM's engine processes
    log = tmp_path_factory.mktemp("log") / "server.log"
    args = ["--max-images-in-flight", "4", "--adapter-dir", str(adapters), "--max-image-mb", str(MAX_IMAGE_MB),
            "--enforce-eager", "--kv-cache-memory-bytes", str(64 << 20), "--dtype", "float32"]
    try:
        proc, base = start_server(args, log, env=env)
    except RuntimeError:
        pytest.fail(f"the server did not start:\n{log.read_text()[-4000:]}")
    yield base, adapters
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
    assert not any(adapters.iterdir()), "the server left its adapter store behind"


@pytest.fixture(scope="module")
def reference():
    return reference_generate()


def post(base, body, path="/v1/chat/completions"):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def data_url(image, fmt="PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def chat(image_url, question, **extra):
    content = [{"type": "text", "text": question}]
    if image_url is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": image_url}})
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": MAX_TOKENS,
            "temperature": 0, "return_token_ids": True, **extra}


def answer_tokens(base, body):
    status, raw = post(base, body)
    assert status == 200, raw
    out = json.loads(raw)
    assert out["model"] == MODEL
    return out["choices"][0]["token_ids"]


def stored(adapters) -> set:
    return {p.name for store in adapters.iterdir() for p in store.iterdir()}


def test_image_requests_from_concurrent_clients_equal_generate(server, reference):
    base, _ = server
    requests = [(s.image, q) for s in heldout_samples(6) for q, _ in s.qa]  # 12 questions, 6 distinct images
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda r: answer_tokens(base, chat(data_url(r[0]), r[1])), requests))
    assert got == [reference(image, q) for image, q in requests]
    # The same pixels sent again (a new request, a new encoding): the stored adapter answers.
    assert answer_tokens(base, chat(data_url(requests[0][0].copy()), requests[0][1])) == got[0]


def test_text_only_and_streaming(server, reference):
    base, _ = server
    assert answer_tokens(base, chat(None, "Describe the image.")) == reference(None, "Describe the image.")
    image, question = heldout_samples(1)[0].image, "What color is the shape?"
    body = chat(data_url(image), question, stream=True)
    req = urllib.request.Request(base + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        events = [json.loads(line[6:]) for line in r.read().decode().splitlines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    assert {e["model"] for e in events} == {MODEL}
    streamed = [t for e in events for c in e["choices"] for t in c.get("token_ids") or []]
    assert streamed == reference(image, question)


def test_models_lists_the_served_model_only(server):
    base, _ = server
    with urllib.request.urlopen(base + "/v1/models", timeout=30) as r:
        assert [m["id"] for m in json.loads(r.read())["data"]] == [MODEL]


def _noise_png(side: int) -> str:
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    return data_url(Image.fromarray(pixels))


def _bad_requests():
    good = data_url(heldout_samples(1)[0].image)
    truncated = good[: len(good) // 2]
    return {
        "not json": (b"{not json", "not valid JSON"),
        "empty messages": ({"model": MODEL, "messages": []}, "non-empty list"),
        "unknown model": ({**chat(None, "hi"), "model": "gpt-4"}, "unknown model 'gpt-4'"),
        "not an image": (chat("data:text/plain;base64,aGVsbG8=", "hi"), "not an image"),
        "corrupt image": (chat(truncated, "hi"), "image"),
        "image over the cap": (chat(_noise_png(256), "hi"), "larger than the server's cap"),
        "two images": ({**chat(good, "hi"), "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": good}}, {"type": "image_url", "image_url": {"url": good}},
            {"type": "text", "text": "hi"}]}]}, "2 images"),
        "remote url": (chat("https://example.com/cat.png", "hi"), "remote image URLs are refused"),
        "literal placeholder": (chat(None, "<image> hi"), "literal '<image>'"),
        "prompt over the context": (chat(good, "word " * 300), "context length is 128"),
        # refused by vLLM after the adapter exists: the adapter must go again
        "max_tokens over the context": (chat(data_url(heldout_samples(40)[39].image), "hi", max_tokens=500),
                                        "max_tokens"),
    }


@pytest.mark.parametrize("case", list(_bad_requests()))
def test_bad_input_is_a_400_and_leaves_no_adapter(server, reference, case):
    base, adapters = server
    body, message = _bad_requests()[case]
    before = stored(adapters)
    status, raw = post(base, body)
    assert status == 400, raw
    error = json.loads(raw)["error"]
    assert error["code"] == 400 and error["type"] == "BadRequestError"
    assert message in error["message"], error["message"]
    assert stored(adapters) <= before
    image, question = heldout_samples(3)[2].image, "How many shapes are there?"  # the server keeps serving
    assert answer_tokens(base, chat(data_url(image), question)) == reference(image, question)


@pytest.mark.parametrize("path", ["/v1/responses", "/v1/messages"])
def test_routes_that_would_bypass_the_adapters_are_refused(server, path):
    base, _ = server
    status, raw = post(base, {"model": MODEL, "input": "hi", "messages": [{"role": "user", "content": "hi"}]}, path)
    assert status == 404, raw
    error = json.loads(raw)["error"]
    assert error["type"] == "NotFoundError" and "use /v1/chat/completions" in error["message"], error
