"""Official checkpoint -> vlora_hf conversion, Hub-ready export and upload.

- `convert_official.convert(checkpoint, output, ...)` / `vlora-hf convert`: the authors' release -> our folder.
- `export.export_folder(model, processor, out_dir, ...)` / `vlora-hf export`: one of our models -> Hub folder.
- `push.push_folder(folder, repo_id, ...)` / `vlora-hf push`: checked upload with huggingface_hub.
"""

from .io import ConversionError

__all__ = ["ConversionError", "convert", "export_folder", "push_folder", "build_model_card"]


def __getattr__(name):  # lazy: `python -m vlora_hf.conversion.X` must not import the siblings twice
    if name == "convert":
        from .convert_official import convert

        return convert
    if name == "export_folder":
        from .export import export_folder

        return export_folder
    if name == "push_folder":
        from .push import push_folder

        return push_folder
    if name == "build_model_card":
        from .model_card import build_model_card

        return build_model_card
    raise AttributeError(name)
