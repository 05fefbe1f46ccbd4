"""Training VLoRA models: `vlora-hf train` (transformers' Trainer + accelerate), its arguments, evaluation.

    from vlora_hf.training import parse_args, run
    model_args, data_args, heldout_args, training_args, *_ = parse_args(["--recipe", "recipes/demo.yaml"])
    run(model_args, data_args, heldout_args, training_args)
"""

from .stages import STAGES

__all__ = ["STAGES", "exact_match", "main", "parse_args", "run"]


def __getattr__(name):  # keep `import vlora_hf.training` light: the Trainer is imported on use
    if name in ("run", "main"):
        from . import train

        return getattr(train, name)
    if name == "parse_args":
        from .arguments import parse_args

        return parse_args
    if name == "exact_match":
        from .evaluate import exact_match

        return exact_match
    raise AttributeError(name)
