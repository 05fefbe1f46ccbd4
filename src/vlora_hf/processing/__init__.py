"""Processing for VLoRA: image decoding, image processor (release `pad` mode), processor, chat templates."""

from .chat_templates import CHAT_TEMPLATES, PLAIN_TEMPLATE, VICUNA_V1_SYSTEM, VICUNA_V1_TEMPLATE
from .image_loading_vlora import REMOTE_IMAGES_ENV, ImageInputError, load_image, remote_images_allowed
from .image_processing_vlora import VLoRAImageProcessor, expand2square
from .processing_vlora import VLoRAProcessor

__all__ = [
    "VLoRAImageProcessor",
    "VLoRAProcessor",
    "VICUNA_V1_TEMPLATE",
    "PLAIN_TEMPLATE",
    "VICUNA_V1_SYSTEM",
    "CHAT_TEMPLATES",
    "expand2square",
    "ImageInputError",
    "load_image",
    "remote_images_allowed",
    "REMOTE_IMAGES_ENV",
]
