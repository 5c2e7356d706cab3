"""nash_fast.tiny and the shipped tiny data: offline, deterministic, usable by every model family."""

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nash_fast.data import make_tiny_data
from nash_fast.tiny import TOKENIZER_DIR, build_tiny_model, build_tiny_tokenizer

TOKENIZER = build_tiny_tokenizer()


@given(st.text(max_size=80))
def test_tokenizer_round_trips_any_text(text):
    # Byte-level BPE: no unknown token, decode(encode(x)) == x for any unicode string.
    assert TOKENIZER.decode(TOKENIZER(text, add_special_tokens=False)["input_ids"]) == text


def test_tokenizer_special_tokens_and_chat_template():
    assert len(TOKENIZER) == 512
    assert (TOKENIZER.pad_token, TOKENIZER.bos_token, TOKENIZER.eos_token) == ("<pad>", "<s>", "</s>")
    assert (TOKENIZER.pad_token_id, TOKENIZER.bos_token_id, TOKENIZER.eos_token_id) == (0, 1, 2)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert TOKENIZER.apply_chat_template(messages, tokenize=False) == "<s><|user|>\nhi</s><|assistant|>\nhello</s>"
    prompt = TOKENIZER.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<s><|user|>\nhi</s><|assistant|>\n"
    ids = TOKENIZER(prompt, add_special_tokens=False)["input_ids"]
    assert ids[0] == 1 and TOKENIZER.convert_tokens_to_ids("<|assistant|>") in ids


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma", "gemma2"])
def test_tiny_models_are_seeded_and_run(family):
    a = build_tiny_model(len(TOKENIZER), family=family, seed=1)
    b = build_tiny_model(len(TOKENIZER), family=family, seed=1)
    c = build_tiny_model(len(TOKENIZER), family=family, seed=2)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.get_output_embeddings().weight, c.get_output_embeddings().weight)
    assert a.config.hidden_size == 64 and a.config.num_hidden_layers == 2 and a.config.num_attention_heads == 4
    logits = a(input_ids=torch.tensor([[1, 5, 9, 2]])).logits
    assert logits.shape == (1, 4, len(TOKENIZER)) and torch.isfinite(logits).all()


def test_build_tiny_model_overrides_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    model = build_tiny_model(100, hidden_size=32, num_hidden_layers=1, attn_implementation="eager")
    assert torch.equal(torch.rand(3), expected)
    assert model.config.hidden_size == 32 and model.config._attn_implementation == "eager"
    with pytest.raises(ValueError, match="family"):
        build_tiny_model(100, family="gpt9")
    with pytest.raises(ValueError, match="vocab_size"):
        build_tiny_model(0)


def test_shipped_files_are_what_the_generator_makes(tmp_path):
    files = make_tiny_data.FILES
    assert [json.loads(line) for line in (files / "prefs.jsonl").read_text().splitlines()] == make_tiny_data.make_preferences()
    assert [json.loads(line) for line in (files / "prompts.jsonl").read_text().splitlines()] == make_tiny_data.make_prompts()
    texts = [r[k] for r in make_tiny_data.make_preferences() for k in ("prompt", "chosen", "rejected")]
    texts += [p["prompt"] for p in make_tiny_data.draw_prompts()]  # the tokenizer saw every draw, repeats included
    make_tiny_data.train_tokenizer(texts, tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert json.loads((tmp_path / name).read_text()) == json.loads((TOKENIZER_DIR / name).read_text())
