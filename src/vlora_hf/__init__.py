"""vlora_hf: VLoRA (visual perception by the LLM's weights) for Hugging Face transformers.

Importing the package registers the config, the model and the processor with the Auto classes.
"""

from __future__ import annotations

from pathlib import Path

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from .modeling import VLoRAConfig, VLoRAForCausalLM, VLoRAModel
from .processing import VLoRAImageProcessor, VLoRAProcessor

__version__ = "0.1.0"

AutoConfig.register(VLoRAConfig.model_type, VLoRAConfig, exist_ok=True)
# AutoModel gives a model that generates, like the remote-code auto_map written by save_pretrained.
for _auto in (AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText):
    _auto.register(VLoRAConfig, VLoRAForCausalLM, exist_ok=True)

AutoProcessor.register(VLoRAConfig, VLoRAProcessor, exist_ok=True)
AutoImageProcessor.register(VLoRAConfig, slow_image_processor_class=VLoRAImageProcessor, exist_ok=True)


def demo_model_path() -> Path:
    """Folder of the small demo checkpoint shipped inside the package (trained on shapes-vqa)."""
    path = Path(__file__).parent / "demo_model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"the demo model is missing from {path}; run `make demo-model` to train it")
    return path


__all__ = ["VLoRAConfig", "VLoRAForCausalLM", "VLoRAImageProcessor", "VLoRAModel", "VLoRAProcessor", "demo_model_path"]
