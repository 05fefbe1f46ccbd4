"""Answer questions about images with a loaded VLoRA model and processor.

The one batched generate loop that `vlora-hf generate`, the held-out evaluation after training and the apps
share: each (image, question) pair becomes a one-image user turn in the processor's chat template, rows are
padded on the left, and the answer is the decoded text after the prompt.
"""

import torch


def user_message(question: str) -> list[dict]:
    """The chat messages of a one-image question."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def answer_questions(model, processor, images, questions: list[str], max_new_tokens: int = 32,
                     batch_size: int = 64, **generate_kwargs) -> list[str]:
    """One answer per (image, question) pair, stripped of surrounding whitespace.

    images: PIL images, or a tensor of preprocessed pixel values [n, 3, H, W] (an evaluation set processed once).
    Decoding is greedy unless `generate_kwargs` say otherwise (do_sample, temperature, top_p, ...)."""
    if len(images) != len(questions):
        raise ValueError(f"got {len(images)} images but {len(questions)} questions")
    prompts = {q: processor.apply_chat_template(user_message(q), add_generation_prompt=True, tokenize=False)
               for q in dict.fromkeys(questions)}
    return answer_prompts(model, processor, [prompts[q] for q in questions], images, max_new_tokens, batch_size,
                          **generate_kwargs)


@torch.inference_mode()
def answer_prompts(model, processor, prompts: list[str], images, max_new_tokens: int = 32, batch_size: int = 64,
                   **generate_kwargs) -> list[str]:
    """The loop under `answer_questions`, for prompts already in the chat template (the lmms-eval backend's).

    images: a tensor of pixel values [n, 3, H, W], or a list with one PIL image per prompt, or None for a
    text-only prompt (that prompt then holds no `<image>`)."""
    tokenizer = processor.tokenizer
    param = next(model.parameters())
    kwargs = {"do_sample": False, "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
              **generate_kwargs}
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        texts = prompts[start : start + batch_size]
        batch_images = images[start : start + batch_size]
        if isinstance(batch_images, torch.Tensor):
            enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
            enc["pixel_values"] = batch_images
        else:
            given = [image is not None for image in batch_images]  # all: a flat list, as any processor takes
            row_images = (list(batch_images) if all(given) else
                          [[image] if image is not None else [] for image in batch_images] if any(given) else None)
            enc = processor(images=row_images, text=texts, return_tensors="pt", padding=True, padding_side="left")
        enc = {k: v.to(param.device) for k, v in enc.items()}
        if "pixel_values" in enc:
            enc["pixel_values"] = enc["pixel_values"].to(param.dtype)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, **kwargs)
        answers += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return [a.strip() for a in answers]


__all__ = ["answer_prompts", "answer_questions", "user_message"]
