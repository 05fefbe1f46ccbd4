"""Training VLoRA models: `vlora-hf train` (transformers.Trainer + accelerate), recipes, evaluation.

    from vlora_hf.training import resolve_recipe, run
    run(resolve_recipe("recipes/demo.yaml"))
"""

from .recipe import DEFAULTS, STAGES, resolve_recipe

__all__ = ["DEFAULTS", "STAGES", "resolve_recipe", "run", "main", "exact_match"]


def __getattr__(name):  # keep `import vlora_hf.training` light: Trainer is imported on use
    if name in ("run", "main"):
        from . import train

        return getattr(train, name)
    if name == "exact_match":
        from .evaluate import exact_match

        return exact_match
    raise AttributeError(name)
