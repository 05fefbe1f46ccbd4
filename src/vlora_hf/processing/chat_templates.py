"""Chat templates (jinja) reproducing the VLoRA release's conversation formats.

``VICUNA_V1_TEMPLATE`` renders exactly what the release's ``conv_templates["vicuna_v1"].get_prompt()``
returns (separator style TWO: ``system + " "``, then ``"USER: " + msg + " "`` and
``"ASSISTANT: " + msg + eos``; the generation prompt is ``"ASSISTANT:"``). The turn ends with the tokenizer's
own eos token (``</s>`` for Vicuna, and when rendered without a tokenizer), so any backbone learns to stop.
``PLAIN_TEMPLATE`` is the caption pre-training format ``plain`` (each message followed by ``"\\n"``,
no system prompt, no roles).

Messages may carry plain string content or transformers-style content lists
(``[{"type": "image"}, {"type": "text", "text": "..."}]``); every image part renders as ``"<image>\\n"``
placed before the message's text, as the release does (``DEFAULT_IMAGE_TOKEN + "\\n" + question``).
A leading ``{"role": "system"}`` message replaces the default system prompt (vicuna_v1 only).

``with_image_placeholder(template)`` adapts a backbone tokenizer's own template (Qwen2's ChatML, Llama-3's
headers, ...), which reads string contents only: content lists are first joined into strings, each image part
becoming ``"<image>\n"`` where it stands.
"""

VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

# Shared macro: render one message's content (string, None, or a list of typed parts).
_CONTENT_MACRO = (
    "{%- macro render_content(content) -%}"
    "{%- if content is none -%}"
    "{%- elif content is string -%}{{- content -}}"
    "{%- else -%}"
    "{%- for part in content -%}"
    "{%- if part['type'] in ['image', 'image_url'] -%}{{- '<image>\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- for part in content -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- endmacro -%}"
)

VICUNA_V1_TEMPLATE = (
    _CONTENT_MACRO
    + "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system_text = render_content(messages[0]['content']) -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system_text = '" + VICUNA_V1_SYSTEM.replace("'", "\\'") + "' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{{- system_text + ' ' -}}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'user' -%}{%- set role = 'USER' -%}{%- set sep = ' ' -%}"
    "{%- elif message['role'] == 'assistant' -%}{%- set role = 'ASSISTANT' -%}"
    "{%- set sep = eos_token if eos_token is defined and eos_token else '</s>' -%}"
    "{%- else -%}{{- raise_exception('vicuna_v1 chat template: unsupported role ' ~ message['role'] ~ "
    "' (expected system first, then user/assistant)') -}}"
    "{%- endif -%}"
    "{%- if message['content'] is not defined or message['content'] is none -%}{{- role + ':' -}}"
    "{%- else -%}{{- role + ': ' + render_content(message['content']) + sep -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)

PLAIN_TEMPLATE = (
    _CONTENT_MACRO
    + "{%- for message in messages -%}"
    "{%- if message['role'] != 'system' and message['content'] is defined and message['content'] is not none -%}"
    "{{- render_content(message['content']) + '\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

CHAT_TEMPLATES = {"default": VICUNA_V1_TEMPLATE, "vicuna_v1": VICUNA_V1_TEMPLATE, "plain": PLAIN_TEMPLATE}

# Rebinds `messages` with every content list joined into one string, for templates that read strings only.
_JOIN_CONTENT_PARTS = (
    "{%- set joined = namespace(messages=[]) -%}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string or message['content'] is none -%}"
    "{%- set joined.messages = joined.messages + [message] -%}"
    "{%- else -%}"
    "{%- set parts = namespace(text='') -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] in ['image', 'image_url'] -%}{%- set parts.text = parts.text + '<image>\n' -%}"
    "{%- elif part['type'] == 'text' -%}{%- set parts.text = parts.text + part['text'] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set joined.messages = joined.messages + [{'role': message['role'], 'content': parts.text}] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set messages = joined.messages -%}"
)

BACKBONE = "backbone"  # the name under which a processor offers its tokenizer's own template


def with_image_placeholder(template: str) -> str:
    """A backbone's own chat template, taking transformers-style content lists with images."""
    return _JOIN_CONTENT_PARTS + template


def backbone_template(tokenizer) -> str | None:
    """The tokenizer's own chat template adapted to images, or None when it has none."""
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):
        own = own.get("default")
    return with_image_placeholder(own) if own else None


__all__ = ["VICUNA_V1_TEMPLATE", "PLAIN_TEMPLATE", "VICUNA_V1_SYSTEM", "CHAT_TEMPLATES", "BACKBONE",
           "with_image_placeholder", "backbone_template"]
