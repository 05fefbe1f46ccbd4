"""Chat templates (jinja) reproducing the VLoRA release's conversation formats.

``VICUNA_V1_TEMPLATE`` renders exactly what the release's ``conv_templates["vicuna_v1"].get_prompt()``
returns (separator style TWO: ``system + " "``, then ``"USER: " + msg + " "`` and
``"ASSISTANT: " + msg + "</s>"``; the generation prompt is ``"ASSISTANT:"``).
``PLAIN_TEMPLATE`` is the caption pre-training format ``plain`` (each message followed by ``"\\n"``,
no system prompt, no roles).

Messages may carry plain string content or transformers-style content lists
(``[{"type": "image"}, {"type": "text", "text": "..."}]``); every image part renders as ``"<image>\\n"``
placed before the message's text, as the release does (``DEFAULT_IMAGE_TOKEN + "\\n" + question``).
A leading ``{"role": "system"}`` message replaces the default system prompt (vicuna_v1 only).
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
    "{%- elif message['role'] == 'assistant' -%}{%- set role = 'ASSISTANT' -%}{%- set sep = '</s>' -%}"
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

__all__ = ["VICUNA_V1_TEMPLATE", "PLAIN_TEMPLATE", "VICUNA_V1_SYSTEM", "CHAT_TEMPLATES"]
