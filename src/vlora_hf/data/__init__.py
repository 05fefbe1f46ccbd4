"""Training data: the synthetic shapes-vqa set (`shapes`, `shapes_dataset`), LLaVA-format conversations
(`llava_format`: records and labels; `llava`: `LLaVADataset`, `LLaVACollator`) and the example images
shipped with the package (`example_images`).

Names are imported lazily so `vlora-hf make-shapes` does not import torch.
"""

_LLAVA = {"LLaVADataset", "LLaVACollator", "vision_feature_encoder", "IGNORE_INDEX", "load_records"}
_SHAPES = {"make_dataset", "make_samples", "make_rows", "heldout_samples", "draw_single", "draw_count",
           "ShapesSample"}


def __getattr__(name):
    if name in _LLAVA:
        from . import llava

        return getattr(llava, name)
    if name in _SHAPES:
        from . import shapes

        return getattr(shapes, name)
    raise AttributeError(f"module 'vlora_hf.data' has no attribute {name!r}")


__all__ = sorted(_LLAVA | _SHAPES)
