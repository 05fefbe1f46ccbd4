"""The shipped demo model (src/vlora_hf/demo_model/): complete, small, and right on held-out shapes-vqa images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import vlora_hf
from vlora_hf.data import shapes
from vlora_hf.training.evaluate import exact_match

TARGET_ACCURACY = 0.95  # the demo model's goal per question type
# The shipped model (seed 1) measured 100 / 100 / 96.1 / 95.6 % on the card's held-out split below
# (recipes/demo.yaml heldout_images: 2000, heldout_seed: 0); on the 2000-image splits of seeds 1 and 2,
# 100 / 99.9 / 95.4 / 95.0 % and 100 / 100 / 97.4 / 97.1 %. A retrained or broken model under the goal on
# this split fails here.
FLOORS = {question: TARGET_ACCURACY for question in shapes.QUESTIONS}
N_HELDOUT_IMAGES = 2000  # the card's split: 1000 single-shape images (colour, shape) + 1000 count images


@pytest.fixture(scope="module")
def demo():
    from vlora_hf import VLoRAForCausalLM
    from vlora_hf.processing import VLoRAProcessor

    path = vlora_hf.demo_model_path()
    return path, VLoRAForCausalLM.from_pretrained(path).eval(), VLoRAProcessor.from_pretrained(path)


def test_demo_model_code_equals_the_package_sources():
    """The demo folder's .py files are copies of modeling/ and processing/ (run as remote code): a change to a
    source that is not copied over would ship the old code. Re-copy with
    `cp src/vlora_hf/{modeling,processing}/*_vlora.py src/vlora_hf/processing/chat_templates.py src/vlora_hf/demo_model/`."""
    package = Path(vlora_hf.__file__).parent
    sources = {p.name: p for folder in ("modeling", "processing") for p in (package / folder).glob("*.py")
               if p.name != "__init__.py"}
    copies = {p.name: p for p in (package / "demo_model").glob("*.py")}
    assert sorted(copies) == sorted(sources)
    stale = [name for name, path in copies.items() if path.read_bytes() != sources[name].read_bytes()]
    assert not stale, f"demo_model copies differ from their sources: {stale}"


def test_demo_folder_is_complete_and_small(demo):
    path, model, processor = demo
    for name in ("config.json", "model.safetensors", "generation_config.json", "README.md", "tokenizer.json",
                 "preprocessor_config.json", "processor_config.json", "modeling_vlora.py", "training_summary.json"):
        assert (path / name).is_file(), name
    assert not list(path.glob("*.bin")) and not list(path.glob("*.pt"))
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    assert size <= 25 * 2**20, f"demo model folder is {size / 2**20:.1f} MB"
    assert processor.image_token_id == model.config.image_token_id
    assert processor.tokenizer.decode(processor.tokenizer(" 3 blue triangles")["input_ids"],
                                      skip_special_tokens=True) == " 3 blue triangles"
    card = (path / "README.md").read_text()
    summary = json.loads((path / "training_summary.json").read_text())
    for question in shapes.QUESTIONS:  # the card reports the held-out figures per question type
        assert question in card
        assert summary["eval"]["per_question"][question] >= FLOORS[question]
    assert "min of training" in card


@pytest.mark.slow
def test_demo_model_answers_heldout_images(demo):
    """Exact match on held-out images (the eval split, never drawn for training), per question type."""
    _, model, processor = demo
    samples = shapes.heldout_samples(N_HELDOUT_IMAGES, seed=0)
    images = [s.image for s in samples]
    rows = [(i, q, a) for i, s in enumerate(samples) for q, a in s.qa]
    torch.manual_seed(0)
    results = exact_match(model, processor, images, rows, max_new_tokens=12, batch_size=200)
    assert set(results["per_question"]) == set(shapes.QUESTIONS)
    assert all(n == N_HELDOUT_IMAGES // 2 for n in results["counts"].values())
    low = {q: acc for q, acc in results["per_question"].items() if acc < FLOORS[q]}
    assert not low, f"below the floors {FLOORS}: {low}; first errors: {results['errors'][:5]}"


def test_demo_model_uses_the_image(demo):
    """The same question about two different images gets two different, correct answers."""
    import random

    _, model, processor = demo
    red = shapes.draw_single(random.Random(1), kind="square", color="red")
    blue = shapes.draw_single(random.Random(2), kind="circle", color="blue")
    rows = [(0, shapes.Q_COLOR, "red"), (1, shapes.Q_COLOR, "blue"), (0, shapes.Q_SHAPE, "square"),
            (1, shapes.Q_SHAPE, "circle")]
    results = exact_match(model, processor, [red.image, blue.image], rows, max_new_tokens=6)
    assert results["overall"] == 1.0, results["errors"]


def test_demo_model_reads_the_vicuna_v1_prompt(demo):
    """The demo model is prompted with vicuna_v1 itself (system sentence included); its tokenizer holds the
    template's fixed text as one token each, so the prompt stays short."""
    from vlora_hf.processing import VICUNA_V1_SYSTEM

    _, _, processor = demo
    question = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": shapes.Q_COUNT}]}]
    prompt = processor.apply_chat_template(question, add_generation_prompt=True)
    assert prompt == VICUNA_V1_SYSTEM + " USER: <image>\nHow many shapes are there? ASSISTANT:"
    tokens = processor.tokenizer.convert_ids_to_tokens(processor.tokenizer(prompt)["input_ids"])
    assert tokens[:3] == ["<s>", VICUNA_V1_SYSTEM + " USER: ", "<image>"] and tokens[-1] == " ASSISTANT:"
    assert len(tokens) <= 12
