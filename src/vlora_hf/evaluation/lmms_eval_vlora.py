"""The lmms-eval model backend `vlora`: any lmms-eval task on a VLoRA checkpoint (ours or a converted one).

  lmms-eval --model vlora --model_args pretrained=PATH_OR_HUB_ID,batch_size=64 --tasks mme --output_path out/

Registered through lmms-eval's `lmms_eval.models` entry point (`vlora_hf.evaluation.plugin`). A "simple" backend:
it gets the task's prompt text and images (`doc_to_text`, `doc_to_visual`) and writes the chat template itself,
the one our own loop uses (`vlora_hf.answering`), so a question gets the same tokens, the same batches and the
same greedy answer as `vlora-hf evaluate`. `generate_until` batches requests in their given order (left padding,
one image or none per request); `loglikelihood` scores continuations (multiple-choice tasks).

Bad input stops the run with one message (`HarnessInputError`, a `SystemExit`: lmms-eval's CLI catches every
`Exception`, prints its traceback and carries on with exit status 0, and writes its results only at the end).
"""

from __future__ import annotations

import time

import torch
from lmms_eval.api.model import lmms
from loguru import logger
from PIL import Image

from ..answering import answer_prompts, user_message
from ..dtypes import DTYPES, pick_device_and_dtype

MODEL_ARGS = {"pretrained": "checkpoint folder or Hub id (default: the shipped demo model)",
              "dtype": f"auto (default) or one of {', '.join(DTYPES)}",
              "device": "cpu, cuda, cuda:1 ... (default: --device, else cuda when available)",
              "batch_size": "requests per forward (default: --batch_size, else 1)",
              "max_new_tokens": "answer length when the task sets none (default 256)"}
HARNESS_ARGS = ("batch_size", "device", "max_batch_size")  # lmms-eval passes its own CLI values of these
GENERATION_KEYS = {"max_new_tokens", "temperature", "top_p", "top_k", "num_beams", "do_sample", "until",
                   "repetition_penalty", "num_return_sequences"}
IGNORED_KEYS = {"image_aspect_ratio", "llava"}  # LLaVA-release options (MMBench, ScienceQA); our processor decides


class HarnessInputError(SystemExit):
    """One clear message that ends the lmms-eval run (see the module docstring for why a SystemExit)."""

    def __init__(self, message: str):
        super().__init__(f"lmms-eval --model vlora: {message}")


def parse_model_args(arg_string: str) -> dict:
    """"key=value,key=value" -> {key: value} (numbers and true/false converted, as lmms-eval does); an unknown
    key or an entry without "=" is refused, naming it."""
    args = {}
    for item in filter(None, (part.strip() for part in (arg_string or "").split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise HarnessInputError(f"--model_args entry {item!r} is not key=value")
        if key not in MODEL_ARGS:
            known = "; ".join(f"{k}: {v}" for k, v in MODEL_ARGS.items())
            raise HarnessInputError(f"unknown --model_args key {key!r}. Known keys: {known}")
        args[key] = value
    for key in ("batch_size", "max_new_tokens"):
        if key in args:
            args[key] = positive_int(args[key], key)
    return args


def positive_int(value, name: str) -> int:
    try:
        number = int(str(value))
    except ValueError:
        number = 0
    if number <= 0:
        raise HarnessInputError(f"{name}={value!r}: expected a positive whole number"
                                + (" (batch sizes such as 'auto' are not supported)" if name == "batch_size" else ""))
    return number


def load_checkpoint(pretrained: str, device: torch.device, dtype: torch.dtype):
    """-> (model, processor) through the Auto classes with the checkpoint's own code (trust_remote_code)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor

    try:
        config = AutoConfig.from_pretrained(pretrained, trust_remote_code=True)
    except Exception as err:  # noqa: BLE001 - OSError, ValueError, ...: all mean "not a checkpoint we can read"
        raise HarnessInputError(f"pretrained={pretrained!r} is not a VLoRA checkpoint: no readable config.json there "
                                f"({type(err).__name__}: {str(err).splitlines()[0]})") from None
    if config.model_type != "vlora":
        hint = " (for transformers' LLaVA use --model llava_hf)" if config.model_type.startswith("llava") else ""
        raise HarnessInputError(f"pretrained={pretrained!r} is a {config.model_type!r} checkpoint, not a VLoRA one "
                                f"(model_type 'vlora'){hint}")
    model = AutoModelForCausalLM.from_pretrained(pretrained, trust_remote_code=True, dtype=dtype).to(device).eval()
    processor = AutoProcessor.from_pretrained(pretrained, trust_remote_code=True)
    return model, processor


class VLoRA(lmms):
    is_simple = True

    def __init__(self, pretrained: str | None = None, dtype: str = "auto", device: str | None = None,
                 batch_size: int = 1, max_new_tokens: int = 256, max_batch_size: int | None = None) -> None:
        super().__init__()
        if pretrained is None:
            from .. import demo_model_path

            pretrained = str(demo_model_path())
        try:
            self._device, self._dtype = pick_device_and_dtype(device, str(dtype))
        except ValueError as err:
            raise HarnessInputError(f"{err} (model_args device / dtype)") from None
        self.pretrained = str(pretrained)
        self.batch_size_per_gpu = positive_int(batch_size, "batch_size")
        self.max_new_tokens = positive_int(max_new_tokens, "max_new_tokens")
        self.model, self.processor = load_checkpoint(self.pretrained, self._device, self._dtype)
        self.tokenizer = self.processor.tokenizer
        self.image_token = self.processor.image_token
        self._ignored_noted: set[str] = set()

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "VLoRA":
        """As lmms-eval's, but `--model_args` keys are checked (one message naming an unknown key) and a
        `batch_size` / `device` there wins over the CLI's `--batch_size` / `--device` (lmms-eval would fail on
        the duplicate keyword)."""
        args = parse_model_args(arg_string)
        for key, value in (additional_config or {}).items():
            if key not in HARNESS_ARGS:
                raise HarnessInputError(f"unexpected setting {key}={value!r} from lmms-eval")
            if value is not None and key != "max_batch_size":
                args.setdefault(key, value)
        return cls(**args)

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self._device

    # ------------------------------------------------------------------ requests -> prompts
    def _doc(self, task: str, split: str, doc_id: int) -> dict:
        return self.task_dict[task][split][doc_id]

    def _image_of(self, doc_to_visual, task: str, split: str, doc_id: int):
        """The request's one image (or None): several images, a video or audio are refused, naming the request."""
        visuals = doc_to_visual(self._doc(task, split, doc_id)) if doc_to_visual is not None else None
        flat = []
        for visual in visuals or []:
            flat.extend(visual if isinstance(visual, (list, tuple)) else [visual])
        where = f"task {task!r}, doc {doc_id}"
        for visual in flat:
            if not isinstance(visual, Image.Image):
                kind = "a video or audio file" if isinstance(visual, (str, dict)) else type(visual).__name__
                raise HarnessInputError(f"{where} gives {kind} ({str(visual)[:80]!r}); the vlora backend takes "
                                        "images only (no video, no audio)")
        if len(flat) > 1:
            raise HarnessInputError(f"{where} gives {len(flat)} images; VLoRA applies one image per sequence, so "
                                    "the vlora backend takes at most one image per request")
        return flat[0].convert("RGB") if flat else None

    def _prompt(self, context: str, image, where: str) -> str:
        """The chat-templated prompt: the image first, as in training, unless the task's text places it."""
        placed = context.count(self.image_token)
        if placed > 1 or (placed and image is None):
            raise HarnessInputError(f"{where}: the prompt holds {placed} {self.image_token} placeholder(s) for "
                                    f"{int(image is not None)} image(s)")
        if image is None or placed:
            messages = [{"role": "user", "content": context}]
        else:
            messages = user_message(context)
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    # ------------------------------------------------------------------ generation
    def _generation_kwargs(self, gen_kwargs: dict, task: str) -> tuple[dict, list[str]]:
        """The task's generation_kwargs -> (generate keywords, stop strings)."""
        gen = dict(gen_kwargs or {})
        for key in sorted(set(gen) & IGNORED_KEYS - self._ignored_noted):
            logger.warning(f"vlora: task {task!r} sets {key}={gen[key]!r}; ignored (our image processor decides)")
            self._ignored_noted.add(key)
        unknown = sorted(set(gen) - GENERATION_KEYS - IGNORED_KEYS)
        if unknown:
            raise HarnessInputError(f"task {task!r} asks for generation settings {unknown} that the vlora backend "
                                    f"does not know (known: {sorted(GENERATION_KEYS)})")
        until = gen.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        kwargs = {"max_new_tokens": int(gen.pop("max_new_tokens", None) or self.max_new_tokens)}
        temperature = float(gen.pop("temperature", 0) or 0)
        sample = bool(gen.pop("do_sample", False)) or temperature > 0
        kwargs["do_sample"] = sample
        if sample:
            kwargs["temperature"] = temperature or 1.0
            for key in ("top_p", "top_k"):
                if gen.get(key) is not None:
                    kwargs[key] = gen[key]
        for key in ("num_beams", "repetition_penalty"):
            if gen.get(key) is not None:
                kwargs[key] = gen[key]
        if int(gen.get("num_return_sequences") or 1) != 1:
            raise HarnessInputError(f"task {task!r} asks for num_return_sequences={gen['num_return_sequences']}; "
                                    "the vlora backend returns one answer per request")
        return kwargs, until

    def generate_until(self, requests) -> list[str]:
        """Requests in their given order, batched by equal generation settings; the answer is cut at the first
        stop string (`until`)."""
        start = time.time()
        answers: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for k, request in enumerate(requests):
            groups.setdefault(repr(sorted((request.args[1] or {}).items())), []).append(k)
        for indices in groups.values():
            context, gen_kwargs, _, _, task, split = requests[indices[0]].args
            kwargs, until = self._generation_kwargs(gen_kwargs, task)
            prompts, images = [], []
            for k in indices:
                context, _, doc_to_visual, doc_id, task, split = requests[k].args
                image = self._image_of(doc_to_visual, task, split, doc_id)
                prompts.append(self._prompt(context, image, f"task {task!r}, doc {doc_id}"))
                images.append(image)
            if until:
                kwargs.update(stop_strings=until, tokenizer=self.tokenizer)
            texts = answer_prompts(self.model, self.processor, prompts, images, batch_size=self.batch_size,
                                   **kwargs)
            for k, text in zip(indices, texts):
                answers[k] = cut_at(text, until)
        if requests:
            seconds = time.time() - start
            logger.info(f"vlora: {len(requests)} answers in {seconds:.1f} s "
                        f"({1000 * seconds / len(requests):.1f} ms per request, batch size {self.batch_size})")
        return answers

    def generate_until_multi_round(self, requests):
        task = requests[0].args[-2] if requests else "?"
        raise HarnessInputError(f"task {task!r} needs multi-round generation (generate_until_multi_round), which the "
                                "vlora backend does not support")

    # ------------------------------------------------------------------ likelihood
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """(sum of log-probs of the continuation's tokens after the prompt, whether greedy decoding gives them).

        The prompt is tokenized alone; the continuation's tokens are those the whole text has after it."""
        rows = [self._likelihood_row(request.args) for request in requests]
        results: list[tuple[float, bool]] = []
        for start in range(0, len(rows), self.batch_size):
            results += self._score(rows[start : start + self.batch_size])
        return results

    def _likelihood_row(self, args) -> tuple[list[int], list[int], object]:
        if len(args) == 2:  # lmms-eval's unconditional requests (acc_mutual_info): text only, no prompt
            context, continuation, image, where = args[0], args[1], None, "an unconditional request"
        else:
            context, target, doc_to_visual, doc_id, task, split = args
            where = f"task {task!r}, doc {doc_id}"
            continuation = target if isinstance(target, str) else target(self._doc(task, split, doc_id))
            image = self._image_of(doc_to_visual, task, split, doc_id)
        if not isinstance(continuation, str) or not continuation:
            raise HarnessInputError(f"{where}: the continuation to score is {continuation!r}, not a non-empty text")
        prompt = self._prompt(context, image, where)
        ids = [self.processor(text=text, images=None if image is None else [image])["input_ids"][0]
               for text in (prompt, prompt + continuation)]
        context_ids, whole = list(ids[0]), list(ids[1])
        continuation_ids = whole[len(context_ids):] if len(whole) > len(context_ids) else whole[-1:]
        return context_ids, continuation_ids, image

    @torch.inference_mode()
    def _score(self, rows) -> list[tuple[float, bool]]:
        sequences = [c + t for c, t, _ in rows]
        width = max(map(len, sequences))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.tensor([[pad] * (width - len(s)) + s for s in sequences], device=self._device)
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in sequences], device=self._device)
        inputs = {"input_ids": input_ids, "attention_mask": mask,
                  "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}  # those of each row alone
        images = [image for _, _, image in rows if image is not None]
        if images:
            pixels = self.processor.image_processor(images, return_tensors="pt")["pixel_values"]
            inputs["pixel_values"] = pixels.to(self._device, self._dtype)
        logits = self.model(**inputs).logits.float()
        results = []
        for row, (_, target, _) in enumerate(rows):
            n = len(target)
            logprobs = torch.log_softmax(logits[row, width - n - 1 : width - 1], dim=-1)
            wanted = torch.tensor(target, device=logprobs.device)
            total = float(logprobs.gather(1, wanted[:, None]).sum())
            results.append((total, bool((logprobs.argmax(-1) == wanted).all())))
        return results


def cut_at(text: str, until: list[str]) -> str:
    """`text` up to the first of the stop strings (all of it when none occurs)."""
    end = min([text.find(s) for s in until if s and s in text] or [len(text)])
    return text[:end]


__all__ = ["HarnessInputError", "MODEL_ARGS", "VLoRA", "cut_at", "parse_model_args"]
