"""`vlora-hf generate` on the shipped example images with the demo model: exact answers, batching, flags."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vlora_hf.generate import main
from vlora_hf.data.example_images import EXAMPLES, examples_dir

EX = examples_dir()


def run_cli(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_examples_are_the_shipped_drawings():
    from vlora_hf.data.example_images import draw_example

    for name in EXAMPLES:
        from PIL import Image
        import numpy as np

        shipped = np.asarray(Image.open(EX / name).convert("RGB"))
        assert (shipped == np.asarray(draw_example(name).image)).all(), name
        assert dict(draw_example(name).qa) == EXAMPLES[name][2]


# One example in the fast tier; the other three (the same code path, other answers) with the slow tests.
@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.slow] if i else []) for i, n in
                                  enumerate(sorted(EXAMPLES))])
def test_exact_answers_on_the_examples(capsys, name):
    for question, answer in EXAMPLES[name][2].items():
        rc, out, err = run_cli(capsys, "--image", str(EX / name), "--prompt", question)
        assert rc == 0, err
        assert out == answer + "\n"


def test_several_images_one_batch_one_answer_each(capsys):
    names = ["shapes_0.png", "shapes_2.png"]
    rc, out, _ = run_cli(capsys, *sum((["--image", str(EX / n)] for n in names), []), "--prompt",
                         "Describe the image.", "--dtype", "float32", "--device", "cpu")
    assert rc == 0
    assert out.splitlines() == [f"{EX / n}: {EXAMPLES[n][2]['Describe the image.']}" for n in names]


def test_default_prompt_and_max_new_tokens(capsys):
    rc, out, _ = run_cli(capsys, "--image", str(EX / "shapes_0.png"))  # model's default prompt: describe
    assert rc == 0 and out == "3 blue triangles\n"
    rc, out, _ = run_cli(capsys, "--image", str(EX / "shapes_0.png"), "--max-new-tokens", "1")
    assert rc == 0 and out == "3\n"


def test_sampling_is_reproducible_with_a_seed(capsys):
    args = ["--image", str(EX / "shapes_1.png"), "--prompt", "What color is the shape?", "--do-sample",
            "--temperature", "1.5", "--top-p", "0.9", "--seed", "3", "--max-new-tokens", "4"]
    rc1, out1, _ = run_cli(capsys, *args)
    rc2, out2, _ = run_cli(capsys, *args)
    assert rc1 == rc2 == 0 and out1 == out2 and out1.strip()


def test_errors_are_clear(capsys, tmp_path):
    rc, _, err = run_cli(capsys, "--image", str(tmp_path / "nope.png"))
    assert rc == 1 and "Image file not found" in err
    with pytest.raises(SystemExit):
        main(["--image", str(EX / "shapes_0.png"), "--temperature", "0.5"])
    assert "only apply with --do-sample" in capsys.readouterr().err
    rc, _, err = run_cli(capsys, "--image", str(EX / "shapes_0.png"), "--model", str(tmp_path))
    assert rc == 1 and "error" in err


@pytest.mark.slow
def test_console_script_like_make_demo():
    """What `make demo` runs: `vlora-hf generate --image ... --prompt ...` in a fresh process."""
    proc = subprocess.run([sys.executable, "-m", "vlora_hf.cli", "generate", "--image", str(EX / "shapes_1.png"),
                           "--prompt", "What color is the shape?"], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == "red\n"
