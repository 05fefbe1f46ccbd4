"""Remote-code pipeline that lets ``pipeline("image-to-text")`` caption a bare image with a VLoRA checkpoint.

transformers 5 redirects the removed ``image-to-text`` task to ``image-text-to-text``, which requires a text
prompt. ``pipeline()`` consults ``config.custom_pipelines`` *before* redirecting, so a checkpoint whose config
holds :data:`CUSTOM_PIPELINES` (and ships this file) serves ``image-to-text`` with
:class:`VLoRAImageToTextPipeline`:

- a bare image (or a list of images) is prompted with ``config.default_prompt`` (default
  ``"Describe the image."``) rendered through the processor's chat template with the generation prompt,
  e.g. ``"<system> USER: <image>\\nDescribe the image. ASSISTANT:"`` for vicuna_v1;
- a text without the ``<image>`` placeholder is treated as the question and rendered the same way;
- text with a placeholder, or chat messages, behave exactly as in ``image-text-to-text``;
- only the generated caption is returned unless ``return_full_text=True``.

It also rejects prompts longer than the model's ``max_position_embeddings`` with a clear ``ValueError``.
This file imports only transformers, so it ships flat with the model's remote code.
"""

from __future__ import annotations

import copy

from transformers.pipelines.image_text_to_text import ImageTextToTextPipeline

CUSTOM_PIPELINES = {
    "image-to-text": {
        "impl": "pipeline_vlora.VLoRAImageToTextPipeline",
        "pt": ["AutoModelForImageTextToText", "AutoModelForCausalLM"],
        "type": "multimodal",
    }
}

DEFAULT_PROMPT = "Describe the image."


def _is_chat(arg) -> bool:
    return isinstance(arg, (list, tuple)) and len(arg) > 0 and isinstance(arg[0], (list, tuple, dict))


def _max_positions(config) -> int | None:
    for cfg in (getattr(config, "text_config", None), config):
        n = getattr(cfg, "max_position_embeddings", None) if cfg is not None else None
        if isinstance(n, int) and n > 0:
            return n
    return None


class VLoRAImageToTextPipeline(ImageTextToTextPipeline):
    """``image-to-text`` for VLoRA: captions bare images with ``config.default_prompt`` (see module doc)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # `pipeline()` replaces the class names in config.custom_pipelines[...]["pt"] by classes (in place);
        # put the JSON-serialisable entry back so the model can still be saved.
        config = getattr(self.model, "config", None)
        custom = getattr(config, "custom_pipelines", None)
        if isinstance(custom, dict):
            for task, entry in CUSTOM_PIPELINES.items():
                if task in custom:
                    custom[task] = copy.deepcopy(entry)

    def check_model_type(self, supported_models):  # remote-code model: not in the static mapping
        return

    def _sanitize_parameters(self, return_full_text=None, return_type=None, return_tensors=None, **kwargs):
        if return_full_text is None and return_type is None and return_tensors is None:
            return_full_text = False  # a captioner returns the caption
        return super()._sanitize_parameters(
            return_full_text=return_full_text, return_type=return_type, return_tensors=return_tensors, **kwargs
        )

    def _render_question(self, question: str) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        if getattr(self.processor, "chat_template", None) is None:
            image_token = getattr(self.processor, "image_token", "<image>")
            return f"{image_token}\n{question}"
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def __call__(self, images=None, text=None, **kwargs):
        if text is None and "prompt" in kwargs:
            text = kwargs.pop("prompt")
        default_prompt = kwargs.pop("default_prompt", None)
        if images is not None and not _is_chat(images) and not isinstance(images, dict):
            image_token = getattr(self.processor, "image_token", "<image>")
            batched = isinstance(images, (list, tuple))
            n = len(images) if batched else 1
            if n == 0:
                raise ValueError("the pipeline got an empty list of images: give at least one image")
            if text is None:
                question = default_prompt or getattr(self.model.config, "default_prompt", None) or DEFAULT_PROMPT
                rendered = self._render_question(question)
                text = [rendered] * n if batched else rendered
            elif isinstance(text, str) and image_token not in text:
                text = [self._render_question(text)] * n if batched else self._render_question(text)
            elif isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text):
                text = [t if image_token in t else self._render_question(t) for t in text]
        return super().__call__(images, text=text, **kwargs)

    def preprocess(self, inputs=None, timeout=None, continue_final_message=None, **processing_kwargs):
        if isinstance(inputs, dict) and "images" in inputs:
            # Hand images to the processor as given: it decodes paths/bytes with clear errors and composites
            # transparency over the mean colour (transformers' load_images would drop alpha first).
            text = inputs["text"]
            processor_kwargs = processing_kwargs.pop("processor_kwargs", None) or processing_kwargs
            if isinstance(text, (list, tuple)) and len(text) > 1:
                processor_kwargs.setdefault("padding", True)
            model_inputs = self.processor(images=inputs["images"], text=text, return_tensors="pt", **processor_kwargs)
            model_inputs = model_inputs.to(dtype=self.dtype)
            model_inputs["text"] = text
        else:
            model_inputs = super().preprocess(
                inputs, timeout=timeout, continue_final_message=continue_final_message, **processing_kwargs
            )
        limit = _max_positions(self.model.config)
        if limit is not None and "input_ids" in model_inputs and model_inputs["input_ids"].shape[-1] > limit:
            raise ValueError(
                f"The prompt is {model_inputs['input_ids'].shape[-1]} tokens long, longer than the model's maximum "
                f"of {limit} positions (max_position_embeddings). Shorten the prompt."
            )
        return model_inputs


__all__ = ["VLoRAImageToTextPipeline", "CUSTOM_PIPELINES", "DEFAULT_PROMPT"]
