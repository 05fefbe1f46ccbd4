"""Hostile but fair input: every case gets one clear error naming the problem, or the right answer.

One test per case family: array ranges, bad pixel values, length limits, one decode path, checkpoint keys, push
secrets, pixel shapes, token ids, attention masks, empty pipeline input, broken conversion inputs, URL fetching,
padded-size bound, interrupted folder writes.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from tiny import FIXTURE, PYTHON, llama_config, tiny_model

import vlora_hf
from vlora_hf.processing import image_loading_vlora as loading
from vlora_hf.processing import image_processing_vlora as ipv
from vlora_hf.processing.image_loading_vlora import ImageInputError
from vlora_hf.processing.image_processing_vlora import VLoRAImageProcessor

IMAGE_TOKEN = 96  # tiny models: the placeholder id is the text vocab size


def small_ip(**kwargs) -> VLoRAImageProcessor:
    return VLoRAImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}, **kwargs)


def pixels(ip, image, **kwargs) -> torch.Tensor:
    return ip(image, return_tensors="pt", **kwargs)["pixel_values"]


def png_bytes(image: Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", **save)
    return buf.getvalue()


def tower_calls(model) -> list:
    calls = []
    model.model.vision_tower.register_forward_pre_hook(lambda *a: calls.append(1))
    return calls


def prompt_ids(n_text: int = 5, image: bool = True) -> torch.Tensor:
    ids = torch.arange(5, 5 + n_text).unsqueeze(0)
    return torch.cat([torch.tensor([[IMAGE_TOKEN]]), ids], 1) if image else ids


# ----- 1. array ranges come from the dtype and `array_range`, never from the values -----------------------------
def test_array_ranges_follow_the_dtype_and_out_of_range_values_are_an_error():
    ip = small_ip()
    rgb = np.random.default_rng(0).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    ref = pixels(ip, rgb)
    assert torch.equal(pixels(ip, rgb.astype(np.float32) / 255), ref)
    assert torch.equal(pixels(ip, rgb.astype(np.float32) / 127.5 - 1, array_range=(-1, 1)), ref)
    assert torch.equal(pixels(ip, rgb.astype(np.float64), array_range=(0, 255)), ref)
    assert torch.equal(pixels(ip, rgb.astype(np.uint16) * 257), ref)  # uint16: 0-65535
    almost = rgb.astype(np.float32) / 255
    almost[0, 0, 0] = 1.0001
    cases = [
        (almost, "1.0001], outside the range [0, 1] expected for float32 images"),
        (rgb.astype(np.float32) / 127.5 - 1, "outside the range [0, 1] expected for float32 images"),
        (np.full((4, 4), 300.0), "span [300, 300], outside the range [0, 1] expected for float64 images"),
        (np.full((4, 4), -3, np.int16), "span [-3, -3], outside the range [0, 255] expected for int16 images"),
        (np.ones((4, 4), np.complex64), "dtype complex64 are not supported"),
    ]
    for array, words in cases:
        with pytest.raises(ImageInputError, match=words.replace("[", r"\[").replace("]", r"\]")):
            pixels(ip, array)
    with pytest.raises(ImageInputError, match=r"outside the range \[-1, 1\] expected for array_range=\(-1, 1\)"):
        pixels(ip, np.full((4, 4), 2.0), array_range=(-1, 1))


# ----- 2. NaN / inf / integer pixel_values: one error before the tower runs --------------------------------------
def test_nan_and_integer_pixel_values_are_refused_before_the_tower():
    model = tiny_model()
    calls = tower_calls(model)
    good = torch.zeros(1, 3, 28, 28)
    for bad, words in ((good.clone().index_fill_(2, torch.tensor([3]), float("nan")), "NaN or infinite"),
                       (good.clone().fill_(float("inf")), "NaN or infinite"),
                       (good.to(torch.uint8), "dtype torch.uint8, expected floating point")):
        with pytest.raises(ValueError, match=words):
            model(input_ids=prompt_ids(), pixel_values=bad)
        with pytest.raises(ValueError, match=words):
            model.generate(input_ids=prompt_ids(), pixel_values=bad, max_new_tokens=2)
    assert calls == []


# ----- 3. every written tokenizer carries the model's limit; generate stays within it ----------------------------
def test_length_limits_are_the_models_max_position_embeddings(tmp_path):
    from transformers import AutoTokenizer

    from vlora_hf.conversion.export import export_folder
    from vlora_hf.processing import VLoRAProcessor
    from vlora_hf.training.bpe_tokenizer import build_tokenizer

    demo = vlora_hf.demo_model_path()
    limit = json.loads((demo / "config.json").read_text())["text_config"]["max_position_embeddings"]
    processor = VLoRAProcessor.from_pretrained(demo)
    assert processor.tokenizer.model_max_length == limit == 128
    long_prompt = "<image>\n" + "How many shapes are there? " * 40
    with pytest.raises(ValueError, match=f"longer than the model's maximum of {limit} positions"):
        processor(images=Image.new("RGB", (8, 8)), text=long_prompt)

    tok = build_tokenizer(["a b c d e f"], vocab_size=300)
    assert tok.model_max_length == 2048
    model = tiny_model(text=llama_config(vocab_size=len(tok), max_position_embeddings=40),
                       image_token_id=tok.convert_tokens_to_ids("<image>"))
    export_folder(model, VLoRAProcessor(image_processor=small_ip(), tokenizer=tok), tmp_path / "out")
    assert AutoTokenizer.from_pretrained(tmp_path / "out").model_max_length == 40

    model = tiny_model(text=llama_config(max_position_embeddings=16))
    model.generation_config.eos_token_id = None
    ids = prompt_ids(9)  # 10 positions, the placeholder included
    with pytest.warns(UserWarning, match=r"prompt \(10 positions\) \+ max_new_tokens \(20\) exceeds the model's "
                                         r"max_position_embeddings=16: generating at most 6 new tokens"):
        out = model.generate(input_ids=ids, pixel_values=torch.zeros(1, 3, 28, 28), max_new_tokens=20)
    assert out.shape == (1, 16)
    with pytest.raises(ValueError, match="the prompt takes 16 positions, but the model has max_position_embeddings=16"):
        model.generate(input_ids=prompt_ids(15), pixel_values=torch.zeros(1, 3, 28, 28), max_new_tokens=2)


# ----- 4. one decode path: the same file by path, bytes, URL, data URL and PIL gives the same pixels --------------
def test_every_source_decodes_the_same_way_with_exif_orientation(tmp_path, http_server):
    rng = np.random.default_rng(1)
    rgba = rng.integers(0, 256, (3, 6, 4), dtype=np.uint8)
    rgba[0, :, 3] = 0  # a transparent row: composited over the mean colour, whatever the source
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: viewers rotate it upright
    data = png_bytes(Image.fromarray(rgba, "RGBA"), exif=exif)
    (tmp_path / "photo.png").write_bytes(data)
    url, state = http_server
    state["files"]["/photo.png"] = data
    ip = small_ip()
    upright = pixels(ip, np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGBA")))
    assert not torch.equal(upright, pixels(ip, rgba))  # the orientation matters for this image
    sources = {"path": str(tmp_path / "photo.png"), "bytes": data, "url": f"{url}/photo.png",
               "data url": "data:image/png;base64," + base64.b64encode(data).decode(),
               "pil": Image.open(tmp_path / "photo.png"), "file object": open(tmp_path / "photo.png", "rb")}
    for name, source in sources.items():
        assert torch.equal(pixels(ip, source), upright), name


# ----- 5. a checkpoint whose generator tensors disagree with its config does not load ----------------------------
def test_checkpoint_with_missing_or_unexpected_generator_tensors_is_refused(tmp_path):
    from vlora_hf import VLoRAForCausalLM

    tiny_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["target_modules"] == ["q", "k", "v", "o", "m"]
    for targets, words in ((["q", "k", "v", "o"], r"unexpected \[.*'model.generator.lora_B.m'"),
                           (["q", "k", "v", "o", "m", "gate"], r"missing \[.*'model.generator.lora_B.gate'")):
        (tmp_path / "config.json").write_text(json.dumps({**config, "target_modules": targets}))
        with pytest.raises(ValueError, match="generator does not match its config") as err:
            VLoRAForCausalLM.from_pretrained(tmp_path)
        assert err.match(words)


# ----- 6. push scans every uploaded file for secrets and sends nothing when one is found -------------------------
def test_push_finds_tokens_in_any_file_and_skips_cache_folders(tmp_path, capsys, monkeypatch):
    from safetensors.torch import save_file
    from test_push import FakeHub

    from vlora_hf.conversion.export import export_folder
    from vlora_hf.conversion.push import main as push_main

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    server.state = state = {"requests": [], "repos": {}, "validated": [], "branches": [], "commits": []}
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    folder = export_folder(tiny_model(), None, tmp_path / "hub")
    hf = "hf_" + "a1B2" * 9
    secrets = {
        "token.txt": ("ghp_" + "Z9y8" * 9, "a GitHub token"),
        "notes/creds.md": ("key: AKIA" + "ABCDEFGHIJKLMNOP", "an AWS access key"),
        "deploy.txt": ("-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n", "a private key"),
        "extra.safetensors": (f"not really safetensors {hf}", "a Hugging Face token"),
    }
    try:
        for name, (text, kind) in secrets.items():
            bad = shutil.copytree(folder, tmp_path / name.replace("/", "_"))
            (bad / name).parent.mkdir(exist_ok=True)
            (bad / name).write_text(text)
            assert push_main([str(bad), "alice/x", "--endpoint", url]) == 1
            assert f"{name} (holds a string that looks like {kind})" in capsys.readouterr().err
        bad = shutil.copytree(folder, tmp_path / "meta")
        save_file({"w": torch.zeros(2)}, str(bad / "adapter.safetensors"), metadata={"note": hf})
        assert push_main([str(bad), "alice/x", "--endpoint", url]) == 1
        assert "adapter.safetensors (holds a string that looks like a Hugging Face token)" in capsys.readouterr().err
        assert state["requests"] == []  # refused before the first request
        ok = shutil.copytree(folder, tmp_path / "ok")
        (ok / ".cache" / "notes").mkdir(parents=True)
        (ok / ".cache" / "notes" / ".env").write_text(f"HF_TOKEN={hf}\n")
        assert push_main([str(ok), "alice/x", "--endpoint", url]) == 0, capsys.readouterr().err
        [commit] = state["commits"]
        assert not [p for p in commit["files"] if ".cache" in p] and "model.safetensors" in commit["files"]
    finally:
        server.shutdown()
        server.server_close()


# ----- 7. pixel_values shape and image count are checked before the tower ----------------------------------------
def test_pixel_values_shape_and_count_are_checked_before_the_tower():
    model = tiny_model()
    calls = tower_calls(model)
    for shape in ([1, 1, 28, 28], [3, 28, 28], [1, 3, 14, 14]):
        with pytest.raises(ValueError, match=rf"pixel_values has shape \[{', '.join(map(str, shape))}\], "
                                             r"expected \[n_images, 3, 28, 28\]"):
            model(input_ids=prompt_ids(), pixel_values=torch.zeros(shape))
    with pytest.raises(ValueError, match="pixel_values holds no images"):
        model.get_image_features(pixel_values=torch.zeros(0, 3, 28, 28))
    with pytest.raises(ValueError, match="got 2 images but input_ids hold 1 <image> placeholders"):
        model(input_ids=prompt_ids(), pixel_values=torch.zeros(2, 3, 28, 28))
    assert calls == []


# ----- 8. token ids outside the vocabulary ----------------------------------------------------------------------
def test_out_of_vocabulary_token_ids_are_a_clear_error():
    model = tiny_model()
    for bad in (500, -1):
        ids = prompt_ids(3, image=False)
        ids[0, 1] = bad
        with pytest.raises(ValueError, match=rf"input_ids hold ids outside the vocabulary \[0, 96\): \[{bad}\]"):
            model(input_ids=ids)
        with pytest.raises(ValueError, match="outside the vocabulary"):
            model.generate(input_ids=ids, max_new_tokens=2)


# ----- 9. attention masks that do not fit the prompt ------------------------------------------------------------
def test_bad_attention_masks_are_a_clear_error():
    model = tiny_model()
    ids, px = torch.cat([prompt_ids(), prompt_ids()]), torch.zeros(2, 3, 28, 28)
    mask = torch.ones_like(ids)
    mask[1] = 0
    with pytest.raises(ValueError, match=r"attention_mask leaves rows \[1\] with no token to attend to"):
        model.generate(input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=2)
    short = torch.ones(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"attention_mask has shape \[2, 4\] but input_ids \[2, 6\]"):
        model.generate(input_ids=ids, attention_mask=short, pixel_values=px, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"attention_mask has shape \[2, 4\] but input_ids \[2, 6\]"):
        model(input_ids=ids, attention_mask=short, pixel_values=px)


# ----- 10. an empty image list in the pipeline -------------------------------------------------------------------
def test_pipeline_with_an_empty_image_list_is_a_clear_error():
    from transformers import pipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        captioner = pipeline("image-to-text", model=str(vlora_hf.demo_model_path()), trust_remote_code=True)
    with pytest.raises(ValueError, match="the pipeline got an empty list of images"):
        captioner([])
    image = str(vlora_hf.demo_model_path().parent / "examples" / "shapes_0.png")
    assert captioner(image, max_new_tokens=8)[0]["generated_text"].strip() == "3 blue triangles"


# ----- 11. broken conversion inputs: one line naming the file, exit code 2 ---------------------------------------
class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['PAYLOAD_MARKER']}",))


@pytest.mark.skipif(not FIXTURE.is_dir(), reason="release fixture not available")
def test_conversion_of_broken_files_is_one_line_naming_the_file(tmp_path, capsys, monkeypatch):
    from vlora_hf.conversion.convert_official import main as convert_main

    ckpt, tower = FIXTURE / "official_checkpoint", FIXTURE / "vision_tower"

    def broken(name: str, write) -> str:
        folder = tmp_path / name
        folder.mkdir()
        shutil.copy(ckpt / "config.json", folder)
        write(folder)
        assert convert_main(["--checkpoint", str(folder), "--output", str(tmp_path / f"{name}-out"),
                             "--vision-tower", str(tower)]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("vlora-hf convert: error: ") and "Traceback" not in err
        return err

    data = (ckpt / "model.safetensors").read_bytes()
    err = broken("truncated", lambda f: (f / "model.safetensors").write_bytes(data[: len(data) // 2]))
    assert "truncated/model.safetensors: truncated or not a safetensors file" in err
    err = broken("badjson", lambda f: ((f / "config.json").write_text("{'not': json"),
                                       shutil.copy(ckpt / "model.safetensors", f)))
    assert "badjson/config.json is not a readable JSON file" in err
    marker = tmp_path / "payload-ran"
    monkeypatch.setenv("PAYLOAD_MARKER", str(marker))
    err = broken("pickle", lambda f: torch.save({"x": Payload()}, f / "pytorch_model.bin",
                                                _use_new_zipfile_serialization=False))
    assert "pickle/pytorch_model.bin safely (torch.load weights_only=True)" in err
    assert not marker.exists()


# ----- 12. URL fetching: timeout, redirects, size cap, unreachable hosts, the off switch ------------------------
class Images(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):  # noqa: N802
        state = self.server.state
        state["requests"].append(self.path)
        if self.path in state["redirects"]:
            self.send_response(302)
            self.send_header("Location", state["redirects"][self.path])
            self.end_headers()
            return
        body = state["files"].get(self.path)
        self.send_response(200 if body is not None else 404)
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        self.wfile.write(body or b"")


@pytest.fixture()
def http_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Images)
    server.state = {"requests": [], "files": {}, "redirects": {}}
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", server.state
    server.shutdown()
    server.server_close()


def test_url_fetch_is_bounded_checked_and_can_be_turned_off(http_server, monkeypatch):
    url, state = http_server
    red = png_bytes(Image.new("RGB", (5, 5), (255, 0, 0)))
    state["files"]["/red.png"] = red
    state["redirects"].update({"/hop": "/red.png", "/loop": "/loop", "/local": "file:///etc/passwd"})
    ip = small_ip(image_fetch_timeout=0.5)
    assert torch.equal(pixels(ip, f"{url}/hop"), pixels(ip, red))  # one redirect, followed
    with socket.socket() as stall:  # accepts connections (the kernel's backlog) and never answers
        stall.bind(("127.0.0.1", 0))
        stall.listen(8)
        stalled = f"http://127.0.0.1:{stall.getsockname()[1]}/slow.png"
        start = time.monotonic()
        with pytest.raises(ImageInputError, match=f"Fetching image URL '{stalled}' timed out after 0.5 s"):
            pixels(ip, stalled)
        assert time.monotonic() - start < 3
    for path, words in (("/loop", "redirects more than 3 times"),
                        ("/local", "leads to 'file:///etc/passwd', which is not an http\\(s\\) URL"),
                        ("/missing.png", "HTTP 404")):
        with pytest.raises(ImageInputError, match=f"'{url}{path}'.*{words}|{words}"):
            pixels(ip, f"{url}{path}")
    monkeypatch.setattr(loading, "MAX_FETCH_BYTES", 20)
    with pytest.raises(ImageInputError, match=f"Image URL '{url}/red.png' announces {len(red)} bytes, more than "
                                              "the 20-byte limit"):
        pixels(ip, f"{url}/red.png")
    monkeypatch.undo()
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{closed.getsockname()[1]}/x.png"
    with pytest.raises(ImageInputError, match=f"Could not fetch image URL '{dead}'"):
        pixels(ip, dead)
    sent = len(state["requests"])
    with pytest.raises(ImageInputError, match="remote images are turned off"):
        pixels(ip, f"{url}/red.png", allow_remote_images=False)
    with pytest.raises(ImageInputError, match="remote images are turned off"):
        pixels(small_ip(allow_remote_images=False), f"{url}/red.png")
    monkeypatch.setenv("VLORA_HF_REMOTE_IMAGES", "0")
    with pytest.raises(ImageInputError, match=r"Refusing to fetch image URL .*VLORA_HF_REMOTE_IMAGES=0"):
        pixels(ip, f"{url}/red.png", allow_remote_images=True)
    assert len(state["requests"]) == sent  # refusals send nothing


# ----- 13. no canvas larger than the stated bound, whatever the aspect ratio ------------------------------------
def test_padding_and_resizing_never_allocate_more_than_the_bound(monkeypatch):
    sizes = []
    new, resize = Image.new, Image.Image.resize
    monkeypatch.setattr(Image, "new", lambda mode, size, *a, **k: sizes.append(tuple(size)) or new(mode, size, *a, **k))
    monkeypatch.setattr(Image.Image, "resize",
                        lambda self, size, *a, **k: sizes.append(tuple(size)) or resize(self, size, *a, **k))
    pad = VLoRAImageProcessor.pad_to_square  # the square padding allocates its (CHW) canvas in NumPy
    monkeypatch.setattr(VLoRAImageProcessor, "pad_to_square",
                        lambda self, im, *a, **k: sizes.append((max(im.shape[1:]),) * 2) or pad(self, im, *a, **k))
    ip = small_ip()
    for size in ((40000, 1), (1, 40000), (5000, 3000)):
        for aspect in ("pad", "square"):
            assert pixels(ip, new("RGB", size, (0, 200, 0)), image_aspect_ratio=aspect).shape == (1, 3, 28, 28)
    assert max(w * h for w, h in sizes) <= ipv.MAX_CANVAS_SIDE**2
    ok = new("RGB", (300, 40))  # within the bound: untouched, so the release's exact pixels
    assert ipv.fit_canvas(ok, "pad", {"shortest_edge": 28}) is ok


# ----- 14. interrupted folder writes are recovered by the next run ---------------------------------------------
KILL_BETWEEN_RENAMES = """
import os, signal, sys
from vlora_hf import atomic
from vlora_hf.data.shapes import make_dataset
real = os.rename
def rename(src, dst):
    real(src, dst)
    if os.path.basename(str(dst)).startswith('.' + os.path.basename(sys.argv[1]) + '.' + sys.argv[2]):
        os.kill(os.getpid(), signal.SIGKILL)
atomic.os.rename = rename
make_dataset(sys.argv[1], n=int(sys.argv[3]), overwrite=True)
"""


@pytest.mark.slow
def test_killed_folder_swaps_are_finished_or_cleaned_by_the_next_run(tmp_path, capsys):
    from vlora_hf.data.shapes import make_dataset

    out = tmp_path / "shapes"
    make_dataset(out, n=1)

    def killed(stage: str, n: int) -> None:
        proc = subprocess.run([PYTHON, "-c", KILL_BETWEEN_RENAMES, str(out), stage, str(n)], capture_output=True)
        assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]

    killed("old", 2)  # killed right after `shapes -> .shapes.old-*`: the new folder is complete, not in place
    assert not out.exists() and sorted(p.name.split("-")[0] for p in tmp_path.iterdir()) == [".shapes.new", ".shapes.old"]
    make_dataset(out, n=3, overwrite=True)
    err = capsys.readouterr().err
    assert f"finished an interrupted write: {out} now holds the new folder from .shapes.new-" in err
    assert "removed .shapes.old-" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shapes"]
    assert len(list((out / "images").iterdir())) == 3

    killed("new", 4)  # killed while the old folder was still in place, the new one complete
    assert len(list((out / "images").iterdir())) == 3
    from vlora_hf.atomic import recover

    assert recover(out)[0].startswith(f"finished an interrupted write: {out} now holds the new folder")
    assert len(list((out / "images").iterdir())) == 4 and sorted(p.name for p in tmp_path.iterdir()) == ["shapes"]

    partial = tmp_path / ".shapes.tmp-999999999-abcd"  # a writer that died mid-write (no such process)
    (partial / "images").mkdir(parents=True)
    make_dataset(out, n=1, overwrite=True)
    assert "removed .shapes.tmp-999999999-abcd, a partial folder left by an interrupted write" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shapes"]

    os.rename(out, tmp_path / ".shapes.old-2-y")  # a swap killed after its first rename, before the new was ready
    assert recover(out) == [f"restored {out} from .shapes.old-2-y, left by an interrupted write"]
    assert (out / "shapes_vqa.json").is_file()


def test_atomic_file_replaces_whole_or_leaves_the_old_file(tmp_path):
    from vlora_hf.atomic import atomic_file

    target = tmp_path / "sub" / "report.json"
    with atomic_file(target) as tmp:
        assert tmp.suffix == ".json" and tmp.parent == target.parent
        tmp.write_text("old")
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_file(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["report.json"]
