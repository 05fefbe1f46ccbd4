"""The `vlora-hf` console script: one subcommand per job, each implemented in its own module.

Every subcommand module exposes `main(argv: list[str] | None) -> int` with its own argparse parser, so
`vlora-hf SUB --help` shows that module's options and the module can also run on its own.
"""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "generate": ("vlora_hf.generate", "answer questions about images with a VLoRA checkpoint"),
    "convert": ("vlora_hf.conversion.convert_official", "convert an official VLoRA checkpoint"),
    "export": ("vlora_hf.conversion.export", "export one of our checkpoints as a Hub-ready folder"),
    "push": ("vlora_hf.conversion.push", "upload a Hub-ready folder to the Hugging Face Hub"),
    "train": ("vlora_hf.training.train", "train a VLoRA model (pretrain / finetune / scratch)"),
    "make-shapes": ("vlora_hf.data.shapes", "draw the shapes-vqa data set"),
    "compare": ("vlora_hf.comparison.run", "train VLoRA and LLaVA-1.5 on the same data and compare them"),
    "bench": ("vlora_hf.bench.run", "benchmark VLoRA against text-only, LLaVA and YOPO"),
    "web": ("vlora_hf.web", "serve the Gradio page (questions about an image, what it changed)"),
    "serve": ("vlora_hf.serving.server", "serve a checkpoint on vLLM (OpenAI API; each image becomes a LoRA adapter)"),
    "evaluate": ("vlora_hf.evaluation.own", "score a checkpoint on vlora_shapes_vqa's questions with our own loop"),
    "lmms-eval": ("vlora_hf.evaluation.cli", "lmms-eval's CLI with our task (vlora_shapes_vqa) on its include path"),
}


def _usage() -> str:
    lines = ["usage: vlora-hf COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<12} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "`vlora-hf COMMAND --help` shows a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"vlora-hf: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
