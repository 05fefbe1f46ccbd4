"""Any backbone with its own chat format: Qwen2 (ChatML) and Llama-3 (headers, GQA), built offline and trained."""

from __future__ import annotations

import pytest
import torch
import yaml
from tiny import clip_config, llama_config, qwen2_config, tiny_model
from transformers import (
    AutoModelForCausalLM,
    AutoProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from vlora_hf import VLoRAForCausalLM
from vlora_hf.data.shapes import make_rows
from vlora_hf.processing import VLoRAImageProcessor, VLoRAProcessor
from vlora_hf.training.arguments import parse_args
from vlora_hf.training.bpe_tokenizer import build_tokenizer
from vlora_hf.training.train import run

# Qwen2's ChatML template and Llama-3-Instruct's header template, as those tokenizers ship them.
CHATML = (
    "{%- for message in messages %}"
    "{%- if loop.first and messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
FORMATS = {
    # name: (template, special tokens, eos, generation eos ids by token, bos, pad)
    "qwen2": (CHATML, ["<|im_start|>", "<|im_end|>", "<|endoftext|>"], "<|im_end|>", ["<|im_end|>", "<|endoftext|>"],
              None, "<|endoftext|>"),
    "llama3": (LLAMA3, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                        "<|eot_id|>"], "<|eot_id|>", ["<|end_of_text|>", "<|eot_id|>"], "<|begin_of_text|>",
               "<|end_of_text|>"),
}
QUESTION = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape is this?"}]}]


def backbone_tokenizer(name: str, texts):
    """A byte-level BPE tokenizer with the backbone's special tokens, eos and chat template (built offline).

    Like the real ones, Llama-3's adds its bos itself and its template writes it too."""
    from tokenizers import processors

    template, specials, eos, _, bos, pad = FORMATS[name]
    tok = build_tokenizer(texts, vocab_size=320, add_bos=False, chat_template=template)
    tok.add_special_tokens({"additional_special_tokens": specials}, replace_extra_special_tokens=False)
    tok.eos_token, tok.pad_token, tok.bos_token = eos, pad, bos
    if bos:
        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.convert_tokens_to_ids(bos))])
        assert tok("a")["input_ids"][0] == tok.bos_token_id
    return tok


def test_vicuna_template_ends_turns_with_the_tokenizers_eos():
    tok = backbone_tokenizer("qwen2", ["a b c"])
    processor = VLoRAProcessor(image_processor=VLoRAImageProcessor(), tokenizer=tok, chat_template="vicuna_v1")
    turns = QUESTION + [{"role": "assistant", "content": "A circle."}]
    rendered = processor.apply_chat_template(turns)
    assert rendered.endswith("ASSISTANT: A circle.<|im_end|>") and "</s>" not in rendered
    vicuna = VLoRAProcessor(image_processor=VLoRAImageProcessor(), tokenizer=build_tokenizer(["a b c"]))
    assert vicuna.apply_chat_template(turns).endswith("ASSISTANT: A circle.</s>")  # the release's, for Vicuna


def test_processor_offers_the_backbones_own_template_with_the_image_placeholder():
    qwen = VLoRAProcessor(image_processor=VLoRAImageProcessor(), tokenizer=backbone_tokenizer("qwen2", ["a"]))
    assert qwen.apply_chat_template(QUESTION, chat_template="backbone", add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<image>\nWhat shape is this?<|im_end|>\n<|im_start|>assistant\n"
    )
    llama = VLoRAProcessor(image_processor=VLoRAImageProcessor(), tokenizer=backbone_tokenizer("llama3", ["a"]),
                           chat_template="backbone")  # the default from now on
    after_text = [{"role": "user", "content": [{"type": "text", "text": "Look: "}, {"type": "image"}]}]
    assert llama.apply_chat_template(after_text, add_generation_prompt=True) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nLook: <image><|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    ids = llama(images=torch.zeros(3, 28, 28), text=llama.apply_chat_template(QUESTION))["input_ids"][0]
    assert ids.count(llama.image_token_id) == 1 and ids[0] == llama.tokenizer.convert_tokens_to_ids("<|begin_of_text|>")
    assert ids.count(ids[0]) == 1  # the template's bos only, as in training:
    from vlora_hf.data.llava import encode_messages

    train_ids, _, _ = encode_messages(llama.tokenizer, [{"role": "user", "content": "<image>\nWhat shape is this?"},
                                                        {"role": "assistant", "content": "A circle."}],
                                      chat_template=llama.chat_template["default"])
    assert train_ids[:len(ids)] == ids and train_ids.count(ids[0]) == 1
    with pytest.raises(ValueError, match="own chat template"):
        tok = build_tokenizer(["a"])
        tok.chat_template = None
        VLoRAProcessor(image_processor=VLoRAImageProcessor(), tokenizer=tok, chat_template="backbone")


@pytest.mark.parametrize("text", [qwen2_config, llama_config])
def test_from_text_and_vision_pretrained_composes_two_folders(tmp_path, text):
    torch.manual_seed(0)
    lm_class = Qwen2ForCausalLM if text is qwen2_config else LlamaForCausalLM
    lm = lm_class(text()).eval()
    lm.generation_config = GenerationConfig(eos_token_id=[2, 5], pad_token_id=3)
    lm.save_pretrained(tmp_path / "lm")
    tower = CLIPVisionModel(clip_config())
    tower.save_pretrained(tmp_path / "tower")
    model = VLoRAForCausalLM.from_text_and_vision_pretrained(
        tmp_path / "lm", tmp_path / "tower", generator_hidden_size=16, generator_depth=1, generator_num_heads=4,
        lora_rank=4, skip_layers=2).eval()
    assert model.generation_config.eos_token_id == [2, 5]
    for k, v in tower.state_dict().items():
        assert torch.equal(model.model.vision_tower.state_dict()[k], v), k
    ids = torch.tensor([[1, 7, model.config.image_token_id, 9, 10, 11]])
    keep = ids[0] != model.config.image_token_id
    with torch.no_grad():  # B = 0: the new model answers as the text model until trained
        ours = model(input_ids=ids, pixel_values=torch.randn(1, 3, 28, 28)).logits
        theirs = lm(input_ids=ids[:, keep], position_ids=torch.arange(6)[None, keep]).logits
    torch.testing.assert_close(ours[0, keep], theirs[0], atol=1e-5, rtol=0)


# ----- end to end: a few training steps, then generate stops at the backbone's eos ------------------------------
def backbone_folders(tmp_path, name: str):
    _, rows = make_rows(40)
    tok = backbone_tokenizer(name, [f"{q} {a}" for _, q, a in rows])
    gqa = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=name == "qwen2",
               eos_token_id=tok.convert_tokens_to_ids(FORMATS[name][3]), pad_token_id=tok.pad_token_id,
               bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    lm = (Qwen2ForCausalLM(Qwen2Config(**gqa)) if name == "qwen2"
          else LlamaForCausalLM(LlamaConfig(**gqa, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})))
    lm.generation_config = GenerationConfig(eos_token_id=gqa["eos_token_id"], pad_token_id=tok.pad_token_id,
                                            bos_token_id=tok.bos_token_id)
    lm.save_pretrained(tmp_path / name)
    tok.save_pretrained(tmp_path / name)
    CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     image_size=32, patch_size=16)).save_pretrained(tmp_path / "clip")
    return tok


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen2", "llama3"])
def test_backbone_trains_on_its_own_template_and_stops_at_its_eos(tmp_path, name):
    tok = backbone_folders(tmp_path, name)
    recipe = {
        "stage": "finetune", "seed": 0, "output_dir": str(tmp_path / "run"), "export_dir": str(tmp_path / "out"),
        "text_model": str(tmp_path / name), "vision_tower": str(tmp_path / "clip"),
        "vlora": {"generator_hidden_size": 16, "generator_depth": 1, "generator_num_heads": 4, "lora_rank": 4,
                  "skip_layers": 1, "vision_feature_layer": -1},
        "init_lora_B_std": 0.02, "chat_template": "backbone",
        "image_processor": {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},
        "dataset": "shapes", "num_images": 4, "precompute_image_features": True,
        "max_steps": 60, "per_device_train_batch_size": 8, "learning_rate": 5e-3, "lr_scheduler_type": "constant",
        "logging_steps": 20, "save_strategy": "no", "torch_threads": 2,
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    run(*parse_args(["--recipe", str(tmp_path / "recipe.yaml")])[:4])

    out = tmp_path / "out"
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    eos_ids = {tok.convert_tokens_to_ids(t) for t in FORMATS[name][3]}
    assert set(model.generation_config.eos_token_id) == eos_ids
    prompt = processor.apply_chat_template(QUESTION, add_generation_prompt=True)
    assert prompt == tok.apply_chat_template(
        [{"role": "user", "content": "<image>\nWhat shape is this?"}], tokenize=False, add_generation_prompt=True)

    images, rows = make_rows(4)
    image, question, answer = next(r for r in rows if r[1] == "What shape is this?")
    inputs = processor(images=images[image], text=prompt, return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=16, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    assert generated[-1].item() == tok.convert_tokens_to_ids(FORMATS[name][2])  # stopped at the turn's end
    assert len(generated) < 16
    assert processor.decode(generated, skip_special_tokens=True) == answer  # a training image, learnt

    from transformers import pipeline

    pipe = pipeline("image-text-to-text", model=str(out))
    chat = [{"role": "user", "content": [{"type": "image", "image": images[image]},
                                         {"type": "text", "text": question}]}]
    assert pipe(text=chat, max_new_tokens=16, return_full_text=False)[0]["generated_text"] == answer
