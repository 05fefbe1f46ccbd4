"""`vlora-hf generate`: answer a question about one or more images with a VLoRA checkpoint.

  vlora-hf generate --image shapes.png --prompt "Describe the image."
  vlora-hf generate --image a.png --image b.png --prompt "What color is the shape?" --model ORG/REPO

Several --image give one answer each (one batch, padded on the left), printed one per line in order (with the
image name in front when there are several). The default model is the shipped demo model.
"""

import argparse
import sys
from pathlib import Path

from .dtypes import DTYPES


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
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="weights dtype (auto: bfloat16 on a GPU that supports it, else float32)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps ... (default: cuda if available)")
    return p


def load(model_id, device, dtype):
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
        from .answering import answer_questions
        from .dtypes import pick_device_and_dtype
        from .processing.image_loading_vlora import open_image_file

        images = [open_image_file(Path(p)) for p in args.image]
        device, dtype = pick_device_and_dtype(args.device, args.dtype)
        if args.model is None:
            from . import demo_model_path

            model_id = str(demo_model_path())
        else:
            model_id = args.model
        if args.seed is not None:
            from transformers import set_seed

            set_seed(args.seed)
        model, processor = load(model_id, device, dtype)
        prompt = args.prompt if args.prompt is not None else getattr(model.config, "default_prompt", None)
        if not prompt or not prompt.strip():
            raise ValueError("--prompt is empty")
        sampling = {k: v for k, v in (("temperature", args.temperature), ("top_p", args.top_p)) if v is not None}
        answers = answer_questions(model, processor, images, [prompt] * len(images), batch_size=len(images),
                                   max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, **sampling)
    except (ValueError, OSError, FileNotFoundError) as err:
        print(f"vlora-hf generate: error: {err}", file=sys.stderr)
        return 1
    for path, answer in zip(args.image, answers):
        print(f"{path}: {answer}" if len(answers) > 1 else answer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
