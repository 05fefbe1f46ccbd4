"""LLaVA-format records: validation, chat messages, and tokens with labels on the assistant turns.

Records (a json list, a ``.jsonl`` file, or a Python list)::

    {"id": "...", "image": "relative/path.png",            # "image" optional: text-only sample when absent
     "conversations": [{"from": "human", "value": "<image>\\nQuestion"}, {"from": "gpt", "value": "Answer"}, ...]}

Modes (the release's two training formats):

- ``"vicuna_v1"`` (instruction tuning): the conversation is rendered with the ``VICUNA_V1_TEMPLATE`` chat
  template; labels are the tokens of every assistant turn including its closing ``</s>``, ``-100`` elsewhere.
  As in the release, the ``<image>`` placeholder is moved to the front of its turn: ``"<image>\\n" + text``.
- ``"plain"`` (caption pre-training): exactly one human + one gpt turn; as in the release the human turn is
  replaced by the bare placeholder, and the text is rendered with ``PLAIN_TEMPLATE``:
  ``"<image>\\n" + caption + "\\n"`` (bos first); labels are the caption tokens and the final ``"\\n"``.
  (The release's ``preprocess_plain`` concatenates ``"<image>" + caption + "\\n"`` without the template's
  newline after the placeholder; we keep the template single-sourced, which adds that one ``"\\n"`` token.)

Assistant spans are found without re-implementing the template: for each assistant turn ``j`` the template
renders ``messages[:j]`` with the generation prompt (``P``) and ``messages[:j+1]`` (``S``); the characters
``[len(P), len(S))`` of the full rendering are the turn, and every token whose offset (fast tokenizer offset
mapping) starts inside it is learned.

Every error in a record raises one ``ValueError`` naming the record's id.
"""

import json
import os
from collections.abc import Mapping
from pathlib import Path

from ..processing.chat_templates import PLAIN_TEMPLATE, VICUNA_V1_TEMPLATE

IGNORE_INDEX = -100
IMAGE_TOKEN = "<image>"
MODES = {"vicuna_v1": VICUNA_V1_TEMPLATE, "plain": PLAIN_TEMPLATE}
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

# ------------------------------------------------------------------------------------------------------------
# records


def load_records(data) -> list[dict]:
    """A json file (list of records), a ``.jsonl`` file (one record per line) or an in-memory list."""
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if not path.is_file():
            raise ValueError(f"LLaVA data file {path} does not exist")
        text = path.read_text(encoding="utf-8")
        try:
            if path.suffix == ".jsonl":
                records = [json.loads(line) for line in text.splitlines() if line.strip()]
            else:
                records = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"LLaVA data file {path} is not valid json: {e}") from None
    else:
        records = data
    if not isinstance(records, list):
        raise ValueError(f"LLaVA data must be a list of records, got {type(records).__name__}")
    return records


def record_id(record, index: int) -> str:
    rid = record.get("id") if isinstance(record, Mapping) else None
    return f"{rid!r} (index {index})" if rid is not None else f"at index {index} (no id)"


def to_messages(record, index: int, mode: str = "vicuna_v1") -> tuple[list[dict], str | None]:
    """Validate one record -> (chat messages for the template, image file or None). ValueError names the id."""
    if mode not in MODES:
        raise ValueError(f"unknown data mode {mode!r}; expected one of {sorted(MODES)}")
    rid = None

    def bad(problem: str) -> ValueError:
        return ValueError(f"LLaVA record {rid}: {problem}")

    rid = record_id(record, index)
    if not isinstance(record, Mapping):
        raise bad(f"a record must be a json object, got {type(record).__name__}")
    image = record.get("image")
    if image is not None and (not isinstance(image, str) or not image):
        raise bad(f"'image' must be one relative file path (a non-empty string), got {image!r}")
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise bad("'conversations' must be a non-empty list of {'from', 'value'} turns")
    messages = []
    for t, turn in enumerate(turns):
        if not isinstance(turn, Mapping) or "from" not in turn or "value" not in turn:
            raise bad(f"turn {t} must be an object with 'from' and 'value'")
        role = _ROLES.get(turn["from"])
        if role is None:
            raise bad(f"turn {t} has unknown speaker {turn['from']!r} (expected human or gpt)")
        if not isinstance(turn["value"], str):
            raise bad(f"turn {t} 'value' must be a string, got {type(turn['value']).__name__}")
        if role == "system" and t != 0:
            raise bad(f"turn {t}: a system turn may only come first")
        messages.append({"role": role, "content": turn["value"]})
    body = messages[1:] if messages[0]["role"] == "system" else messages
    for t, m in enumerate(body):
        expected = "user" if t % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise bad(f"turns must alternate human, gpt, human, ...; turn {t + len(messages) - len(body)} is "
                      f"{m['role']!r} where {expected!r} was expected")
    if not body or body[-1]["role"] != "assistant":
        raise bad("the conversation must end with a gpt turn (there is nothing to learn otherwise)")
    n_placeholders = sum(m["content"].count(IMAGE_TOKEN) for m in messages)
    if image is None and n_placeholders:
        raise bad(f"text-only record (no 'image') contains {n_placeholders} {IMAGE_TOKEN} placeholder(s)")
    if image is not None:
        if n_placeholders != 1:
            raise bad(f"an image record needs exactly one {IMAGE_TOKEN} placeholder, found {n_placeholders}")
        if any(m["role"] != "user" and IMAGE_TOKEN in m["content"] for m in messages):
            raise bad(f"the {IMAGE_TOKEN} placeholder must be in a human turn")
        for m in messages:  # the release's preprocess_multimodal: move the placeholder to the front
            if IMAGE_TOKEN in m["content"]:
                m["content"] = IMAGE_TOKEN + "\n" + m["content"].replace(IMAGE_TOKEN, "").strip()
    if mode == "plain":
        if image is None:
            raise bad("plain (caption pre-training) records need an image")
        if len(messages) != 2:
            raise bad(f"plain mode needs exactly one human and one gpt turn, got {len(messages)} turns")
        if IMAGE_TOKEN not in messages[0]["content"]:
            raise bad(f"plain mode needs the {IMAGE_TOKEN} placeholder in the human turn")
        messages[0]["content"] = IMAGE_TOKEN  # the release drops the question: "<image>" + caption
    return messages, image


# ------------------------------------------------------------------------------------------------------------
# tokenisation


def image_token_id_of(tokenizer) -> int:
    """The tokenizer's single-token id for ``<image>``; ValueError when it has none."""
    tid = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    ids = tokenizer(IMAGE_TOKEN, add_special_tokens=False)["input_ids"]
    if tid is None or tid == tokenizer.unk_token_id or ids != [tid]:
        raise ValueError(
            f"the tokenizer has no single {IMAGE_TOKEN} token (got {ids}); add it first: "
            f"tokenizer.add_special_tokens({{'additional_special_tokens': ['{IMAGE_TOKEN}']}})"
        )
    return tid


def _render(tokenizer, messages, template: str, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def encode_messages(tokenizer, messages: list[dict], mode: str = "vicuna_v1",
                    chat_template: str | None = None) -> tuple[list[int], list[int], str]:
    """Render + tokenise a validated conversation -> (input_ids, labels, text). Labels: assistant turns only."""
    template = chat_template or MODES[mode]
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("LLaVA data needs a fast tokenizer (PreTrainedTokenizerFast) for offset mapping")
    text = _render(tokenizer, messages, template, False)
    spans = []
    for j, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = _render(tokenizer, messages[:j], template, True) if j else ""
        upto = _render(tokenizer, messages[: j + 1], template, False)
        if not (upto.startswith(prefix) and text.startswith(upto)):
            raise ValueError("the chat template does not render conversations prefix by prefix; cannot locate "
                             "the assistant turns")
        spans.append((len(prefix), len(upto)))
    bos = getattr(tokenizer, "bos_token", None)  # a template that writes bos itself (Llama-3) gets it once
    enc = tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)), return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [IGNORE_INDEX] * len(ids)
    for k, (start, end) in enumerate(enc["offset_mapping"]):
        if end > start and any(s <= start < e for s, e in spans):
            labels[k] = ids[k]
    return ids, labels, text


def conversation_rows(data) -> list[tuple[int, str, str]]:
    """The (human, gpt) turn pairs of LLaVA records as (0, question, answer) rows, the shape shapes-vqa rows have
    (for training a tokenizer on the text)."""
    rows = []
    for record in load_records(data):
        turns = [t.get("value", "") for t in record.get("conversations", [])]
        rows += [(0, q.replace(IMAGE_TOKEN, "").strip(), a) for q, a in zip(turns[0::2], turns[1::2])]
    return rows


__all__ = ["IGNORE_INDEX", "conversation_rows", "IMAGE_TOKEN", "MODES", "encode_messages", "image_token_id_of", "load_records",
           "record_id", "to_messages"]
