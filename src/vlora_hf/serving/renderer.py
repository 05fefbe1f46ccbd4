"""The `vlora` tokenizer mode's renderer: vLLM's own, minus the `<image>` placeholder.

transformers never lets a token attend to the placeholder; vLLM cannot mask a token, so the served prompt drops
it (the text after it sits one position earlier; relative positions on each side are unchanged).
"""

from __future__ import annotations

from vllm.renderers.hf import HfRenderer


class VLoRARenderer(HfRenderer):
    def __init__(self, config, tokenizer):
        super().__init__(config, tokenizer)
        self.image_token_id = getattr(config.model_config.hf_config, "vlora_image_token_id", None)

    def _without_placeholder(self, prompt):
        ids = prompt["prompt_token_ids"]
        keep = [i for i, token in enumerate(ids) if token != self.image_token_id]
        if len(keep) < len(ids):
            prompt["prompt_token_ids"] = [ids[i] for i in keep]
            offsets = prompt.get("prompt_token_offsets")
            if offsets is not None:
                prompt["prompt_token_offsets"] = [offsets[i] for i in keep]
        return prompt

    def _process_tokens(self, prompt, **kwargs):
        return super()._process_tokens(self._without_placeholder(prompt), **kwargs)

    async def _process_tokens_async(self, prompt, **kwargs):
        return await super()._process_tokens_async(self._without_placeholder(prompt), **kwargs)
