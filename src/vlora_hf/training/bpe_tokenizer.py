"""Train a small byte-level BPE tokenizer, for models trained from scratch (the demo model) and for tests.

A real backbone brings its own tokenizer; a scratch model needs one whose vocabulary fits the training text.
"""

import re
from collections.abc import Iterable

from ..answering import user_message
from ..processing.chat_templates import VICUNA_V1_TEMPLATE

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]


def build_tokenizer(texts: Iterable[str], vocab_size: int = 320, add_bos: bool = True, chat_template=None,
                    model_max_length: int = 2048, added_phrases: Iterable[str] = ()):
    """Train a byte-level BPE tokenizer on ``texts`` -> a ``PreTrainedTokenizerFast``.

    Special tokens (ids 0..4) ``<unk> <s> </s> <pad> <image>``: bos ``<s>`` (prepended with ``add_bos``), eos
    ``</s>``, pad ``<pad>``, ``<image>`` the placeholder. Decoding round-trips the text exactly. The vicuna_v1
    template is attached unless ``chat_template`` is given; ``model_max_length`` should be the model's
    ``max_position_embeddings`` so the processor rejects over-long prompts. Each of ``added_phrases`` (a
    template's fixed text, see ``template_phrases``) becomes one added token and stays out of the BPE text.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    phrases = sorted({p for p in added_phrases if p}, key=len, reverse=True)
    texts = list(texts)
    if phrases:
        pattern = re.compile("|".join(re.escape(p) for p in phrases))
        texts = [piece for t in texts for piece in pattern.split(t) if piece]
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"build_tokenizer: vocab_size must be at least {256 + len(SPECIAL_TOKENS)} "
                         f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens), got {vocab_size}")
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), min_frequency=1,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts or [""], trainer=trainer)
    if add_bos:
        bos_id = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
        )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", extra_special_tokens=["<image>"], padding_side="left",
                                   clean_up_tokenization_spaces=False, model_max_length=model_max_length)
    fast.add_tokens([AddedToken(p, normalized=False, special=False) for p in phrases])
    fast.chat_template = VICUNA_V1_TEMPLATE if chat_template is None else chat_template
    return fast


def template_phrases(chat_template: str, image_token: str = "<image>", follow_up: bool = False,
                     eos_token: str = "</s>") -> list[str]:
    """The fixed text a chat template puts around a one-image question: for vicuna_v1, the system sentence +
    ``" USER: "`` and ``" ASSISTANT:"`` (what every prompt repeats; see ``build_tokenizer(added_phrases=)``),
    and, with ``follow_up`` (multi-turn training data), what opens a further question after an answer's
    ``eos_token`` (vicuna_v1: ``"USER: "``)."""
    from jinja2 import Template

    marker = "\x00"
    first = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": marker}]}]
    rendered = Template(chat_template).render(messages=first, add_generation_prompt=True)
    pieces = [p for p in rendered.replace(image_token, marker).split(marker) if p.strip()]
    if not follow_up:
        return pieces
    turns = first + [{"role": "assistant", "content": marker}, {"role": "user", "content": marker}]
    parts = Template(chat_template).render(messages=turns).replace(image_token, marker).split(marker)
    opener = parts[3].removeprefix(eos_token) if len(parts) > 3 else ""  # image, question, answer, *opener*
    return pieces + [opener] if opener.strip() and opener not in pieces else pieces


def tokenizer_corpus(template: str, rows) -> list[str]:
    """The training conversations as the model will read them (template included): one text per row
    (image index, question, answer), so the template's fixed text is as frequent in the corpus as in training."""
    from jinja2 import Template

    def fail(message):
        raise ValueError(message)

    rows = rows or [(0, "Describe the image.", "")]
    render = Template(template).render
    rendered: dict[tuple[str, str], str] = {}
    for _, q, a in rows:
        if (q, a) not in rendered:
            messages = user_message(q) + [{"role": "assistant", "content": a}]
            rendered[(q, a)] = render(messages=messages, add_generation_prompt=False, raise_exception=fail)
    return [rendered[(q, a)] for _, q, a in rows]


__all__ = ["build_tokenizer", "template_phrases", "tokenizer_corpus", "SPECIAL_TOKENS"]
