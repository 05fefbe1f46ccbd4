"""The `vlora` lmms-eval backend and the `vlora_shapes_vqa` task, through the real lmms-eval (its venv: make test).

Checked against our own code: the backend's answers are `answer_questions`'s, its log-likelihoods the model's own
summed log-probs of one unpadded row; bad input ends the run with one message and writes nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval", reason="lmms-eval lives in the evaluation venv (make eval-setup)")

import torch  # noqa: E402
from lmms_eval.api.instance import Instance  # noqa: E402
from PIL import Image  # noqa: E402

from vlora_hf import demo_model_path  # noqa: E402
from vlora_hf.answering import answer_questions  # noqa: E402
from vlora_hf.evaluation import lmms_eval_vlora  # noqa: E402
from vlora_hf.evaluation.lmms_eval_vlora import HarnessInputError, VLoRA  # noqa: E402
from vlora_hf.evaluation.shapes_task import TASK_NAME, heldout_questions, tasks_dir  # noqa: E402


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "datasets"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def backend():
    return VLoRA.create_from_arg_string("batch_size=4,dtype=float32,device=cpu", {"batch_size": 1, "device": None})


def task_manager():
    from lmms_eval.tasks import TaskManager

    return TaskManager("WARNING", include_path=str(tasks_dir()), include_defaults=False)


def request(kind, args, task="t", doc_id=0):
    return Instance(request_type=kind, arguments=args, idx=0, metadata={"task": task, "doc_id": doc_id, "repeats": 1})


def with_docs(model, docs):
    model.task_dict = {"t": {"test": docs}}
    return model


def test_entry_point_makes_vlora_a_model_of_lmms_eval():
    from lmms_eval import models

    assert models.get_model("vlora") is VLoRA
    assert "vlora" in models.list_available_models()


def test_task_documents_are_the_heldout_questions():
    from lmms_eval.tasks import get_task_dict

    task = get_task_dict([TASK_NAME], task_manager(), "simple")[TASK_NAME]
    docs = task.dataset["test"]
    images, rows = heldout_questions()
    assert len(docs) == len(rows) == 2000
    assert [(d["question"], d["answer"]) for d in docs] == [(q, a) for _, q, a in rows]
    for k in (0, 1, 1999):  # the stored PNG is the drawn image, pixel for pixel
        assert docs[k]["image"].tobytes() == images[rows[k][0]].convert("RGB").tobytes()
    assert {d["family"] for d in docs} == {"color", "shape", "count", "describe", "relation_color",
                                          "relation_yesno", "small_count", "small_shape"}


@pytest.mark.slow
def test_harness_answers_a_slice_with_the_answers_of_our_loop(backend):
    from lmms_eval.evaluator import simple_evaluate

    n = 24
    images, rows = heldout_questions()
    rows = rows[:n]
    expected = answer_questions(backend.model, backend.processor, [images[i] for i, _, _ in rows],
                                [q for _, q, _ in rows], max_new_tokens=12, batch_size=4)
    # the harness loads its own backend by name (and frees its model afterwards)
    out = simple_evaluate(model="vlora", model_args="batch_size=4,dtype=float32,device=cpu", tasks=[TASK_NAME],
                          limit=n, task_manager=task_manager(), log_samples=True)
    samples = sorted(out["samples"][TASK_NAME], key=lambda s: s["doc_id"])
    assert [s["filtered_resps"][0] for s in samples] == expected
    hits = [int(e == a) for e, (_, _, a) in zip(expected, rows)]
    assert out["results"][TASK_NAME]["exact_match,none"] == pytest.approx(sum(hits) / n)
    assert [s["exact_match"] for s in samples] == hits


def test_generate_until_batches_image_and_text_only_requests(backend):
    images, rows = heldout_questions(classic_images=6)
    docs = [{"image": images[i]} for i, _, _ in rows[:3]]
    model = with_docs(backend, docs)
    greedy = {"max_new_tokens": 8, "do_sample": False, "until": []}
    reqs = [request("generate_until", (rows[k][1], dict(greedy), lambda d: [d["image"]], k, "t", "test"), doc_id=k)
            for k in range(3)]
    reqs.insert(1, request("generate_until", ("Describe the image.", dict(greedy), None, 0, "t", "test")))
    got = model.generate_until(reqs)
    alone = [answer_questions(model.model, model.processor, [images[rows[k][0]]], [rows[k][1]], max_new_tokens=8)[0]
             for k in range(3)]
    assert [got[0], got[2], got[3]] == alone
    stops = dict(greedy, until=["ASSISTANT:"], llava={"image_aspect_ratio": "original"})  # MMBench's settings
    assert model.generate_until([request("generate_until", (rows[0][1], stops, lambda d: [d["image"]], 0, "t",
                                                           "test"))]) == alone[:1]
    text_prompt = model.processor.apply_chat_template([{"role": "user", "content": "Describe the image."}],
                                                      add_generation_prompt=True, tokenize=False)
    enc = model.processor(text=text_prompt, return_tensors="pt")
    out = model.model.generate(**enc, max_new_tokens=8, do_sample=False,
                               pad_token_id=model.tokenizer.pad_token_id, eos_token_id=model.tokenizer.eos_token_id)
    assert got[1] == model.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def test_stop_strings_cut_the_answer():
    assert lmms_eval_vlora.cut_at("1 red circle\n\nmore", ["\n\n"]) == "1 red circle"
    assert lmms_eval_vlora.cut_at("red", ["ASSISTANT:", "x"]) == "red"
    assert lmms_eval_vlora.cut_at("a:b:c", [":", "b"]) == "a"


def summed_logprob(model, processor, prompt, continuation, image):
    """The reference: one unpadded row, the model's own forward."""
    images = None if image is None else [image]
    context = processor(text=prompt, images=images, return_tensors="pt")
    whole = processor(text=prompt + continuation, images=images, return_tensors="pt")
    n = whole["input_ids"].shape[1] - context["input_ids"].shape[1]
    with torch.no_grad():
        logits = model(**whole).logits[0].float()
    logprobs = torch.log_softmax(logits[-n - 1 : -1], dim=-1)
    target = whole["input_ids"][0, -n:]
    return float(logprobs.gather(1, target[:, None]).sum()), bool((logprobs.argmax(-1) == target).all())


def test_loglikelihood_equals_the_models_summed_logprobs(backend):
    images, rows = heldout_questions(classic_images=4)
    docs = [{"image": images[i], "answer": a} for i, _, a in rows[:4]]
    model = with_docs(backend, docs)
    cases = [(rows[k][1], " " + rows[k][2], k, True) for k in range(4)]  # the right answers
    cases += [(rows[0][1], " purple", 0, True), (rows[3][1], " 4 green triangles", 3, True),
              ("Say something.", " hello", 0, False)]  # wrong answers, a text-only request
    reqs = [request("loglikelihood", (q, c, (lambda d: [d["image"]]) if has else None, k, "t", "test"), doc_id=k)
            for q, c, k, has in cases]
    got = model.loglikelihood(reqs)
    for (question, continuation, k, has), (logprob, greedy) in zip(cases, got):
        image = docs[k]["image"] if has else None
        prompt = model._prompt(question, image, "test")
        ref_logprob, ref_greedy = summed_logprob(model.model, model.processor, prompt, continuation, image)
        assert logprob == pytest.approx(ref_logprob, abs=1e-4)
        assert greedy == ref_greedy
    assert got[0][0] > got[4][0]  # the right colour is likelier than a wrong one


def test_unknown_model_args_key_is_one_clear_error():
    with pytest.raises(HarnessInputError, match="unknown --model_args key 'temprature'"):
        VLoRA.create_from_arg_string("pretrained=x,temprature=0.5")
    with pytest.raises(HarnessInputError, match="'batch_size' is not key=value|entry 'batch_size' is not key=value"):
        VLoRA.create_from_arg_string("batch_size")
    with pytest.raises(HarnessInputError, match="batch_size='auto'"):
        VLoRA.create_from_arg_string("batch_size=auto")


def test_a_folder_that_is_not_a_vlora_checkpoint_is_refused(tmp_path):
    with pytest.raises(HarnessInputError, match="is not a VLoRA checkpoint: no readable config.json"):
        VLoRA(pretrained=str(tmp_path))
    from transformers import LlavaConfig

    LlavaConfig().save_pretrained(tmp_path)
    with pytest.raises(HarnessInputError, match="'llava' checkpoint, not a VLoRA one.*--model llava_hf"):
        VLoRA(pretrained=str(tmp_path))


def test_requests_we_cannot_answer_are_refused_naming_the_request(backend):
    image = Image.open(Path(demo_model_path()).parent / "examples" / "shapes_0.png")
    model = with_docs(backend, [{"image": image}])
    greedy = {"max_new_tokens": 4, "until": []}
    two = request("generate_until", ("Compare.", greedy, lambda d: [d["image"], d["image"]], 0, "t", "test"))
    with pytest.raises(HarnessInputError, match="task 't', doc 0 gives 2 images; VLoRA applies one image"):
        model.generate_until([two])
    video = request("generate_until", ("What happens?", greedy, lambda d: ["clip.mp4"], 0, "t", "test"))
    with pytest.raises(HarnessInputError, match="task 't', doc 0 gives a video or audio file"):
        model.generate_until([video])
    multi = request("generate_until_multi_round", ("Hi", greedy, None, None, 0, "t", "test"))
    with pytest.raises(HarnessInputError, match="task 't' needs multi-round generation"):
        model.generate_until_multi_round([multi])
    odd = request("generate_until", ("Hi", {"max_new_tokens": 4, "min_p": 0.1}, None, 0, "t", "test"))
    with pytest.raises(HarnessInputError, match=r"generation settings \['min_p'\]"):
        model.generate_until([odd])


@pytest.mark.slow
@pytest.mark.parametrize("model_args, message", [
    ("batch_size=2,temprature=0", "unknown --model_args key 'temprature'"),
    ("pretrained=/nonexistent/folder", "is not a VLoRA checkpoint"),
])
def test_cli_run_with_bad_input_fails_with_one_line_and_writes_nothing(tmp_path, model_args, message):
    out = tmp_path / "out"
    cli = Path(sys.executable).with_name("vlora-hf")
    run = subprocess.run([str(cli), "lmms-eval", "--model", "vlora", "--model_args", model_args, "--tasks", TASK_NAME,
                          "--limit", "4", "--output_path", str(out), "--log_samples"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode != 0
    assert message in run.stderr
    assert "Traceback" not in run.stdout + run.stderr
    assert not out.exists()


def test_sampling_settings_reach_generate(backend):
    images, rows = heldout_questions(classic_images=2)
    model = with_docs(backend, [{"image": images[i]} for i, _, _ in rows[:2]])
    sampled = {"max_new_tokens": 8, "temperature": 3.0, "top_p": 0.9, "until": []}  # hot: not the greedy answers
    reqs = [request("generate_until", (rows[k][1], dict(sampled), lambda d: [d["image"]], k, "t", "test"), doc_id=k)
            for k in range(2)]
    torch.manual_seed(7)
    got = model.generate_until(reqs)
    torch.manual_seed(7)
    expected = answer_questions(model.model, model.processor, [images[rows[k][0]] for k in range(2)],
                                [rows[k][1] for k in range(2)], max_new_tokens=8, do_sample=True, temperature=3.0,
                                top_p=0.9, batch_size=4)
    assert got == expected
    greedy = answer_questions(model.model, model.processor, [images[rows[k][0]] for k in range(2)],
                              [rows[k][1] for k in range(2)], max_new_tokens=8)
    assert got != greedy
