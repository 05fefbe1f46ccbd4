"""lmms-eval's `lmms_eval.models` entry point: makes `--model vlora` resolve to our backend.

lmms-eval (0.7) reads this group when it builds its model registry (`ModelRegistryV2.load_entrypoint_manifests`);
the backend module, which imports torch and the model code, is imported only when `--model vlora` is asked for.
"""

BACKEND = "vlora_hf.evaluation.lmms_eval_vlora.VLoRA"


def manifest():
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="vlora", simple_class_path=BACKEND)


__all__ = ["BACKEND", "manifest"]
