"""The web page's model side without a browser: delta norms against explicit products, the demo session's
answers and weight reuse, and the clear errors bad input gets."""

from __future__ import annotations

import configparser
import struct
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

import vlora_hf
from tiny import REPO, qwen2_config, tiny_model
from vlora_hf.visualize import delta_norms, plot_delta_norms

EXAMPLES = Path(vlora_hf.__file__).parent / "examples"


@pytest.mark.parametrize("targets", ["qkvom", ["q", "k", "v", "o", "gate", "up", "down"]])
def test_delta_norms_equal_norms_of_explicit_products(targets):
    """GQA backbone: k/v and gate/up/down deltas are not square, so A and B differ in shape."""
    model = tiny_model(text=qwen2_config(), target_modules=targets)
    pixel_values = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    norms = delta_norms(model, pixel_values)
    generator = model.model.generator
    A, B = generator.split(model.get_image_features(pixel_values=pixel_values)), generator.scaled_B()
    assert norms.layers == model.config.receiving_layers == [1, 3]
    assert norms.targets == generator.targets
    assert norms.values.shape == (3, 2, len(norms.targets))
    for k, target in enumerate(norms.targets):
        explicit = torch.linalg.matrix_norm(A[target].double() @ B[target].double().transpose(-1, -2))  # [3, 2]
        torch.testing.assert_close(norms.values[..., k].double(), explicit, rtol=1e-5, atol=1e-6)
    weights = model.get_image_features(pixel_values=pixel_values)
    torch.testing.assert_close(delta_norms(model, perceptual_weights=weights).values, norms.values)
    with pytest.raises(ValueError, match="exactly one"):
        delta_norms(model, pixel_values, perceptual_weights=weights)


@torch.no_grad()
def test_delta_norms_measure_the_delta_the_model_adds():
    """The q projection of a receiving layer gains x·A·Bᵀ, the matrix whose norm delta_norms reports."""
    model = tiny_model()
    layer = model.config.receiving_layers[0]
    pixel_values = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    q_proj = model.model.language_model.layers[layer].self_attn.q_proj
    seen = []
    hook = q_proj.register_forward_hook(lambda module, args, out: seen.append((args[0], out)))
    model(input_ids=torch.tensor([[1, 5, model.config.image_token_id, 7, 9, 11]]), pixel_values=pixel_values)
    hook.remove()
    (x, with_image), = seen
    without = q_proj(x)  # outside a forward call no deltas are active: the plain projection
    generator = model.model.generator
    A = generator.split(model.get_image_features(pixel_values=pixel_values))["q"][0, 0]
    delta = A @ generator.scaled_B()["q"][0].T
    torch.testing.assert_close(with_image - without, x @ delta, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(delta_norms(model, pixel_values).values[0, 0, 0], torch.linalg.matrix_norm(delta))


def test_plot_delta_norms_draws_one_map_per_image():
    model = tiny_model()
    norms = delta_norms(model, torch.randn(2, 3, 28, 28))
    fig = plot_delta_norms(norms, titles=["first", "second"])
    maps = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in maps] == ["first", "second"]
    assert [t.get_text() for t in maps[0].get_yticklabels()] == norms.targets
    with pytest.raises(ValueError, match="1 titles for 2 images"):
        plot_delta_norms(norms, titles=["one"])


@pytest.fixture(scope="module")
def session():
    from vlora_hf.web.session import DemoSession

    return DemoSession.load(device="cpu")


def test_session_answers_and_reuses_the_weights(session):
    calls = []
    hook = session.model.model.generator.register_forward_hook(lambda *args: calls.append(1))
    try:
        image = session.image_weights(EXAMPLES / "shapes_0.png")
        first = session.answer(image, "Describe the image.")
        follow_up = session.answer(image, "How many shapes are there?", [("Describe the image.", first.text)])
    finally:
        hook.remove()
    assert (image.name, first.text, follow_up.text) == ("shapes_0.png", "3 blue triangles", "3")
    assert len(calls) == 1
    assert first.prompt_tokens < follow_up.prompt_tokens and first.new_tokens >= 4
    plot = session.delta_plot([image, session.image_weights(EXAMPLES / "shapes_1.png")])
    assert plot.format == "PNG" and plot.width > plot.height > 100


def _png_claiming(width: int, height: int) -> bytes:
    """A few bytes of PNG whose header claims width × height pixels (Pillow checks the size before decoding)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("name, content, problem", [
    ("notes.txt", b"just some text", "not a recognised image format"),
    ("cut.png", (EXAMPLES / "shapes_0.png").read_bytes()[:120], "truncated or corrupt"),
    ("huge.png", _png_claiming(30000, 30000), "too large to decode safely"),
])
def test_session_rejects_bad_files_with_the_processors_error(session, tmp_path, name, content, problem):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"'{name}'.* {problem}"):
        session.image_weights(path)


def test_session_rejects_empty_and_over_context_questions(session):
    image = session.image_weights(EXAMPLES / "shapes_0.png")
    with pytest.raises(ValueError, match="The question is empty"):
        session.answer(image, "  ")
    assert session.context == session.model.config.text_config.max_position_embeddings == 128
    with pytest.raises(ValueError, match="longer than the model's maximum of 128 positions"):
        session.answer(image, "How many shapes are there? " * 40)
    history = [("How many shapes are there?", "3")] * 12  # grows the prompt towards the context, turn by turn
    with pytest.raises(ValueError, match="longer than the model's maximum|no room for an answer"):
        session.answer(image, "Describe the image.", history)
    assert session.answer(image, "Describe the image.").text == "3 blue triangles"  # still answering


def test_space_requirements_cover_the_package():
    """The Space installs requirements.txt, not the package: it must list every runtime dependency."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    needed = cfg["options"]["install_requires"].split() + cfg["options.extras_require"]["web"].split()
    names = {line.split(">")[0].split("<")[0].split("=")[0].strip() for line in needed if line[:1].isalpha()}
    listed = (REPO / "requirements.txt").read_text().split("\n")
    assert names <= {line.split(">")[0].split("<")[0].split("=")[0].strip() for line in listed if line[:1].isalpha()}
    assert "share=True" not in (REPO / "app.py").read_text()


def test_cli_lists_web_with_loopback_default(capsys):
    from vlora_hf import cli
    from vlora_hf.web import build_parser

    assert cli.main(["--help"]) == 0 and "web " in capsys.readouterr().out
    args = build_parser().parse_args([])
    assert (args.model, args.host, args.port) == (None, "127.0.0.1", 7860)
