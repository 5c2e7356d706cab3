"""Tiny offline tokenizer and random-init models for tests, examples and CPU smoke runs (nothing is downloaded).

    tok = build_tiny_tokenizer()                  # byte-level BPE, vocab 512, <s> </s> <pad>, chat template
    model = build_tiny_model(len(tok))            # LlamaForCausalLM, hidden 64, 2 layers, 4 heads, seeded
    model = build_tiny_model(len(tok), family="qwen2", hidden_size=128)

The tokenizer files are shipped in nash_fast/data/files/tiny_tokenizer/ (regenerate them with
python -m nash_fast.data.make_tiny_data).
"""

from __future__ import annotations

from pathlib import Path

import torch

TOKENIZER_DIR = Path(__file__).resolve().parent / "data" / "files" / "tiny_tokenizer"

# Small shapes shared by every family; head_dim 16 keeps rotary embeddings non-trivial.
_TINY_SHAPES = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)


def build_tiny_tokenizer():
    """The shipped byte-level BPE tokenizer as a transformers PreTrainedTokenizerFast (any text round-trips)."""
    from transformers import PreTrainedTokenizerFast

    if not (TOKENIZER_DIR / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"tiny tokenizer files missing under {TOKENIZER_DIR}; run python -m nash_fast.data.make_tiny_data"
        )
    return PreTrainedTokenizerFast.from_pretrained(str(TOKENIZER_DIR))


def _config_class(family: str):
    import transformers

    classes = {
        "llama": ("LlamaConfig", "LlamaForCausalLM"),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
        "mistral": ("MistralConfig", "MistralForCausalLM"),
        "gemma": ("GemmaConfig", "GemmaForCausalLM"),
        "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
    }
    if family not in classes:
        raise ValueError(f"family={family!r} is not one of {sorted(classes)}")
    config_name, model_name = classes[family]
    return getattr(transformers, config_name), getattr(transformers, model_name)


def build_tiny_model(
    vocab_size: int,
    *,
    family: str = "llama",
    seed: int = 0,
    attn_implementation: str | None = None,
    dtype: torch.dtype = torch.float32,
    **overrides,
):
    """A small random-init causal LM built from a config (default LlamaForCausalLM: hidden 64, 2 layers, 4 heads).

    family: llama | qwen2 | mistral | gemma | gemma2. overrides go to the config (e.g. hidden_size=128,
    final_logit_softcapping=30.0). The weights depend only on `seed`.
    """
    if not isinstance(vocab_size, int) or vocab_size <= 0:
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
    config_cls, model_cls = _config_class(family)
    kwargs = dict(_TINY_SHAPES, vocab_size=vocab_size, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family in ("gemma", "gemma2"):
        kwargs["head_dim"] = 16
    kwargs.update(overrides)
    config = config_cls(**kwargs)
    if attn_implementation is not None:  # None lets transformers pick (sdpa where the family supports it, else eager)
        config._attn_implementation = attn_implementation
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model = model_cls(config)
    return model.to(dtype).eval()
