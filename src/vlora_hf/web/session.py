"""The model side of the web page, without gradio: decode an upload with the processor's image policy, compute
its perceptual weights once, answer any number of questions with them, plot what they change.

Every bad input (not an image, a corrupt or oversized file, an empty question, a conversation longer than the
model's context) raises a `ValueError` whose message the page shows in place of the answer.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ..processing.image_loading_vlora import load_image, open_image_file
from ..visualize import delta_norms, plot_delta_norms


@dataclass(frozen=True)
class ImageWeights:
    """One image and its perceptual weights [1, D], computed once and reused by every question about it."""

    name: str
    image: Image.Image
    weights: torch.Tensor
    seconds: float  # vision tower + generator


@dataclass(frozen=True)
class Answer:
    text: str
    seconds: float  # the LLM's prefill and decoding
    prompt_tokens: int
    new_tokens: int


def _elapsed(start: float, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


class DemoSession:
    """A loaded checkpoint and its processor, as the page uses them (shared by all visitors: no per-user state)."""

    def __init__(self, model, processor):
        self.model, self.processor = model.eval(), processor
        self.device = next(model.parameters()).device
        self.default_prompt = getattr(model.config, "default_prompt", None) or "Describe the image."
        # The processor rejects prompts past the tokenizer's limit; make that limit the model's real context, so an
        # over-long conversation gets the processor's error instead of positions the model never learnt.
        context = getattr(model.config.text_config, "max_position_embeddings", None)
        limit = processor.model_max_length
        if context and (limit is None or limit > context):
            processor.tokenizer.model_max_length = limit = context
        self.context = limit

    @classmethod
    def load(cls, model_id: str | None = None, device: str | None = None, dtype: str = "auto") -> DemoSession:
        """From one of our checkpoint folders or a Hub id (default: the shipped demo model)."""
        from .. import demo_model_path
        from ..dtypes import pick_device_and_dtype
        from ..generate import load

        return cls(*load(model_id or str(demo_model_path()), *pick_device_and_dtype(device, dtype)))

    def image_weights(self, path, name: str | None = None) -> ImageWeights:
        """Decode an image file and compute its perceptual weights (the only time the tower and generator run).

        Errors name the file as the visitor called it; `load_image` turns it upright as the processor would."""
        name = name or Path(path).name
        image = load_image(open_image_file(path, what=name))
        pixel_values = self.processor.image_processor([image], return_tensors="pt")["pixel_values"]
        start = time.perf_counter()
        with torch.inference_mode():
            weights = self.model.get_image_features(pixel_values=pixel_values.to(self.device, self.model.dtype))
        return ImageWeights(name, image, weights, _elapsed(start, self.device))

    def answer(self, image: ImageWeights, question: str, history: list[tuple[str, str]] = (),
               max_new_tokens: int = 64, do_sample: bool = False, temperature: float = 1.0) -> Answer:
        """Answer `question` about `image`, after the earlier (question, answer) turns of a chat about it."""
        if not question or not question.strip():
            raise ValueError("The question is empty: type a question about the image.")
        messages = []
        for i, (asked, answered) in enumerate([*history, (question.strip(), None)]):
            text = [{"type": "text", "text": asked}]
            messages.append({"role": "user", "content": ([{"type": "image"}] if i == 0 else []) + text})
            if answered is not None:
                messages.append({"role": "assistant", "content": answered})
        prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        enc = self.processor(images=[image.image], text=[prompt], return_tensors="pt")
        prompt_tokens = enc["input_ids"].shape[1]
        room = self.context - prompt_tokens if self.context else max_new_tokens
        if room < 1:
            raise ValueError(f"The conversation fills the model's {self.context} positions, leaving no room for an "
                             "answer: shorten the question or clear the chat.")
        tok = self.processor.tokenizer
        options = dict(max_new_tokens=min(int(max_new_tokens), room), do_sample=bool(do_sample),
                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        if do_sample:
            options["temperature"] = float(temperature)
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(input_ids=enc["input_ids"].to(self.device),
                                      attention_mask=enc["attention_mask"].to(self.device),
                                      perceptual_weights=image.weights, **options)
        seconds = _elapsed(start, self.device)
        new = out[0, prompt_tokens:]
        return Answer(tok.decode(new, skip_special_tokens=True).strip(), seconds, prompt_tokens, len(new))

    def delta_plot(self, images: list[ImageWeights]) -> Image.Image:
        """The delta-norm heat maps of these images side by side, as a PNG-backed PIL image."""
        norms = delta_norms(self.model, perceptual_weights=torch.cat([i.weights for i in images]))
        buffer = io.BytesIO()
        plot_delta_norms(norms, titles=[i.name for i in images]).savefig(buffer, format="png", dpi=100)
        return Image.open(io.BytesIO(buffer.getvalue()))
