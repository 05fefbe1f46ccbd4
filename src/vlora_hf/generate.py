"""`vlora-hf generate`: answer a question about one or more images with a VLoRA checkpoint.

  vlora-hf generate --image shapes.png --prompt "Describe the image."
  vlora-hf generate --image a.png --image b.png --prompt "What color is the shape?" --model ORG/REPO

Several --image give one answer each (one batch, padded on the left), printed one per line in order (with the
image name in front when there are several). The default model is the shipped demo model.
"""

from __future__ import annotations

import argparse
import sys

DTYPES = ("auto", "float32", "bfloat16", "float16")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlora-hf generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--image", action="append", required=True, help="an image file (repeat for several)")
    p.add_argument("--prompt", default=None,
                   help="the question (default: the model's default prompt, usually 'Describe the image.')")
    p.add_argument("--model", default=None,
                   help="one of our checkpoint folders or a Hub id (default: the shipped demo model)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (with --do-sample)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling (with --do-sample)")
    p.add_argument("--seed", type=int, default=None, help="random seed (sampling)")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="weights dtype (auto: bfloat16 on a GPU that supports it, else float32)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps ... (default: cuda if available)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow a Hub checkpoint's own code (not needed for this package's checkpoints)")
    return p


def _device_and_dtype(device_arg, dtype_arg):
    import torch

    device = device_arg or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"--device {device_arg!r} is not a valid device: {err}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device_arg} asked for CUDA but no CUDA device is available")
    if dtype_arg == "auto":
        use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        dtype = torch.bfloat16 if use_bf16 else torch.float32
    else:
        dtype = getattr(torch, dtype_arg)
    return device, dtype


def load(model_id, device, dtype, trust_remote_code: bool = False):
    """-> (model, processor) from one of our checkpoint folders or a Hub id."""
    from transformers.utils import logging as hf_logging

    from . import VLoRAForCausalLM
    from .processing import VLoRAProcessor

    hf_logging.disable_progress_bar()  # keep the output to the answers

    model = VLoRAForCausalLM.from_pretrained(model_id, dtype=dtype).to(device).eval()
    try:
        processor = VLoRAProcessor.from_pretrained(model_id)
    except Exception as err:  # noqa: BLE001 - turn any loading failure into one clear message
        raise ValueError(f"{model_id} has no usable processor (tokenizer + image processor): {err}") from err
    if not hasattr(processor, "tokenizer"):
        raise ValueError(f"{model_id} has no tokenizer: it cannot turn prompts into tokens")
    return model, processor


def generate_answers(model, processor, images, prompt: str, max_new_tokens: int = 64, do_sample: bool = False,
                     temperature=None, top_p=None) -> list[str]:
    """One answer per image (PIL images or paths), batched with left padding."""
    import torch

    from .training.data import user_message

    text = processor.apply_chat_template(user_message(prompt), add_generation_prompt=True, tokenize=False)
    enc = processor(images=list(images), text=[text] * len(images), return_tensors="pt", padding=True,
                    padding_side="left")
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items()}
    enc["pixel_values"] = enc["pixel_values"].to(model.dtype)
    tok = processor.tokenizer
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=tok.pad_token_id,
                  eos_token_id=tok.eos_token_id)
    if do_sample:
        if temperature is not None:
            kwargs["temperature"] = temperature
        if top_p is not None:
            kwargs["top_p"] = top_p
    with torch.inference_mode():
        out = model.generate(**enc, **kwargs)
    answers = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return [a.strip() for a in answers]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_new_tokens <= 0:
        parser.error("--max-new-tokens must be positive")
    if (args.temperature is not None or args.top_p is not None) and not args.do_sample:
        parser.error("--temperature / --top-p only apply with --do-sample")
    if args.temperature is not None and args.temperature <= 0:
        parser.error("--temperature must be positive")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        parser.error("--top-p must be in (0, 1]")
    try:
        from pathlib import Path

        from .processing.image_processing_vlora import open_image_file

        images = [open_image_file(Path(p)) for p in args.image]
        device, dtype = _device_and_dtype(args.device, args.dtype)
        if args.model is None:
            from . import demo_model_path

            model_id = str(demo_model_path())
        else:
            model_id = args.model
        if args.seed is not None:
            from transformers import set_seed

            set_seed(args.seed)
        model, processor = load(model_id, device, dtype, args.trust_remote_code)
        prompt = args.prompt if args.prompt is not None else getattr(model.config, "default_prompt", None)
        if not prompt or not prompt.strip():
            raise ValueError("--prompt is empty")
        answers = generate_answers(model, processor, images, prompt, args.max_new_tokens, args.do_sample,
                                   args.temperature, args.top_p)
    except (ValueError, OSError, FileNotFoundError) as err:
        print(f"vlora-hf generate: error: {err}", file=sys.stderr)
        return 1
    for path, answer in zip(args.image, answers):
        print(f"{path}: {answer}" if len(answers) > 1 else answer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
