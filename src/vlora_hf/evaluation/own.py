"""`vlora-hf evaluate`: our own loop on `vlora_shapes_vqa`'s questions, to set beside lmms-eval's score.

  vlora-hf evaluate                                   # the shipped demo model
  vlora-hf evaluate --model runs/compare/llava-seed0/model --batch_size 1 --json out/eval/own_llava.json

The questions, answer length (12 tokens) and scoring are the task's; a VLoRA checkpoint answers from a pixel
bank (each image preprocessed once), a plain transformers LLaVA folder from the images, as after training
(`vlora_hf.comparison.along.HeldoutSet`). The JSON holds every answer, in the task's document order.
"""

import argparse
import json
import time

from ..atomic import atomic_file
from .shapes_task import CLASSIC_IMAGES, TASK_NAME, heldout_questions


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlora-hf evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model", default=None, help="one of our checkpoints or a LLaVA folder (default: the demo model)")
    p.add_argument("--batch_size", type=int, default=64, help="questions per generate call")
    p.add_argument("--max_new_tokens", type=int, default=12, help="answer length limit (the task's: 12)")
    p.add_argument("--classic_images", type=int, default=CLASSIC_IMAGES,
                   help=f"classic images (the task's: {CLASSIC_IMAGES}; the families keep their proportion)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", default=None, help="write the scores and every answer here")
    return p


def evaluate(model, processor, images, rows, batch_size: int, max_new_tokens: int) -> dict:
    """-> {"overall", "per_family", "answers", "seconds", "seconds_per_question"} (images preprocessing included)."""
    from ..comparison.along import family_scores
    from ..data.shapes_dataset import preprocess_bank
    from ..training.evaluate import exact_match
    from ..training.llava_baseline import is_llava

    start = time.perf_counter()
    bank = images if is_llava(model) else preprocess_bank(images, processor.image_processor)
    results = exact_match(model, processor, bank, rows, max_new_tokens=max_new_tokens, batch_size=batch_size)
    seconds = time.perf_counter() - start
    return {"overall": results["overall"], "per_family": family_scores(results), "answers": results["answers"],
            "seconds": seconds, "seconds_per_question": seconds / max(1, len(rows))}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from .. import demo_model_path
    from ..comparison.run import load_trained

    if args.threads:
        torch.set_num_threads(args.threads)
    folder = args.model or str(demo_model_path())
    model, processor = load_trained(folder)
    images, rows = heldout_questions(args.classic_images)
    scores = evaluate(model, processor, images, rows, args.batch_size, args.max_new_tokens)
    print(f"{TASK_NAME} (our own loop), {folder}: {100 * scores['overall']:.2f} % exact match over {len(rows)} "
          f"questions; {1000 * scores['seconds_per_question']:.2f} ms per question at batch size {args.batch_size}")
    for family, accuracy in scores["per_family"].items():
        print(f"  {family:<15} {100 * accuracy:6.2f} %")
    if args.json:
        with atomic_file(args.json) as tmp:
            tmp.write_text(json.dumps({"model": folder, "batch_size": args.batch_size, "questions": len(rows),
                                       **scores}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
