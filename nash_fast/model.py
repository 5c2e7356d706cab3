"""Padding-free forward of a Hugging Face causal LM over a packed preference batch.

    batch = PackedPreferenceCollator()(examples)
    logps = packed_sequence_logprobs(model, batch)             # [S] sum of log p(response | prompt)

Only the backbone runs over the packed row (model.model / get_decoder()); the LM head is never applied to all
tokens: the final hidden states [T, H] and the head weight go to nash_fast.sequence_logprobs, which scores the
labelled positions without materializing [T, V] logits.

Attention stays inside each sequence (`attention=` of packed_sequence_logprobs / packed_hidden_states: "auto",
"varlen" or "mask"); how, per attn_implementation, is nash_fast.attention's (packed_attention_kwargs).
The cache is disabled (use_cache=False): transformers 5.x detects packing from position_ids only when no cache
object exists, and with the default use_cache=True it builds one, so a bare packed forward lets every sequence
attend to the ones before it. The explicit mask / varlen kwargs make correctness independent of that detection.

Models that cannot be packed safely raise ValueError: multimodal rotary embeddings (M-RoPE, 3-D position
ids), chunked or linear-attention layers, non-causal (bidirectional) decoders, encoder-decoders.

Also here, what drives the model around the packed forward: the LM head's logit transforms
(head_logit_transform), torch.compile of the decoder layers and activation checkpointing.

DeepSpeed ZeRO-3: the LM-head weight is a partitioned parameter (an empty shard outside its module's forward).
Forward-only passes (under torch.no_grad()) gather it here; a pass that needs gradients must run its forward
*and* backward inside `with gathered_lm_head(model):` so the backward of the fused log-probs sees the full weight.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from nash_fast.attention import (
    PLAN_KWARG,
    VARLEN_IMPLEMENTATION,
    attn_implementation_for_forward,
    exclude_varlen_attention_from_compile,
    packed_attention_kwargs,
    text_config,
)
from nash_fast.logprobs import sequence_logprobs


# ----------------------------------------------------------------------------------------------- checks

def check_packable(model) -> None:
    """Raise ValueError when `model` cannot run a packed row correctly through this module."""
    config = text_config(model.config)
    name = type(model).__name__
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(f"{name}: encoder-decoder models cannot be packed (decoder-only causal LMs only)")
    for sub in ("vision_config", "audio_config"):
        if getattr(model.config, sub, None) is not None:
            raise ValueError(f"{name}: multimodal models ({sub}) are not supported by the packed forward")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_items = rope.values() if isinstance(rope, dict) and all(isinstance(v, dict) for v in rope.values()) else [rope]
    for params in rope_items:
        if isinstance(params, dict) and ("mrope_section" in params or params.get("rope_type") == "mrope"
                                         or params.get("type") == "mrope"):
            raise ValueError(
                f"{name}: multimodal rotary embeddings (M-RoPE, 3-D position ids) cannot be packed with "
                "per-sequence 1-D position ids"
            )
    # Some M-RoPE models (Qwen2-VL's text model) keep mrope_section only as a rotary-module default.
    if "mrope" in str(getattr(config, "model_type", "")) or any(
        hasattr(module, "mrope_section") for module in model.modules()
    ):
        raise ValueError(
            f"{name}: multimodal rotary embeddings (M-RoPE, 3-D position ids) cannot be packed with "
            "per-sequence 1-D position ids"
        )
    if getattr(config, "is_causal", True) is False or getattr(config, "use_bidirectional_attention", False):
        raise ValueError(f"{name}: bidirectional attention is not a causal LM; packing needs causal attention")
    if getattr(config, "attention_chunk_size", None):
        raise ValueError(f"{name}: chunked attention layers are not supported by the packed forward")
    for layer_type in set(getattr(config, "layer_types", None) or ()):
        if layer_type not in ("full_attention", "sliding_attention"):
            raise ValueError(f"{name}: layer type {layer_type!r} is not supported by the packed forward")


def _check_batch(batch: dict) -> tuple[torch.Tensor, ...]:
    for key in ("input_ids", "position_ids", "labels", "cu_seqlens"):
        if key not in batch:
            raise ValueError(f"batch is missing {key!r} (build it with nash_fast.data.PackedPreferenceCollator)")
        if not isinstance(batch[key], torch.Tensor):
            raise ValueError(f"batch[{key!r}] must be a tensor, got {type(batch[key]).__name__}")
    input_ids, position_ids, labels, cu_seqlens = (batch[k] for k in ("input_ids", "position_ids", "labels", "cu_seqlens"))
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"batch['input_ids'] must be one packed row [1, T], got shape {tuple(input_ids.shape)}")
    if position_ids.shape != input_ids.shape:
        raise ValueError(
            f"batch['position_ids'] must have shape {tuple(input_ids.shape)} (1-D positions per token), got "
            f"{tuple(position_ids.shape)}; 3-D (M-RoPE) position ids cannot be packed"
        )
    if labels.shape != input_ids.shape:
        raise ValueError(f"batch['labels'] must have shape {tuple(input_ids.shape)}, got {tuple(labels.shape)}")
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32 or cu_seqlens.numel() < 2:
        raise ValueError("batch['cu_seqlens'] must be a 1-D int32 tensor [S + 1] with S >= 1")
    cu = cu_seqlens.to("cpu", torch.long)
    lengths = cu.diff()
    if cu[0] != 0 or cu[-1] != input_ids.shape[1] or (lengths < 0).any():
        raise ValueError(
            f"batch['cu_seqlens'] must rise from 0 to T={input_ids.shape[1]}, got {cu.tolist()[:8]}...{cu[-1].item()}"
        )
    # Positions must restart at 0 for each sequence; a mismatch means the row and cu_seqlens disagree.
    expected = torch.arange(input_ids.shape[1]) - torch.repeat_interleave(cu[:-1], lengths)
    if not torch.equal(position_ids[0].to("cpu", torch.long), expected):
        raise ValueError("batch['position_ids'] do not restart at 0 at every cu_seqlens boundary")
    return input_ids, position_ids, labels, cu_seqlens, lengths


# ----------------------------------------------------------------------------------------------- layers

def backbone(model):
    """The decoder stack of a *ForCausalLM (model.model for Llama-like models), without the LM head."""
    prefix = getattr(model, "base_model_prefix", "model")
    inner = getattr(model, prefix, None)
    if isinstance(inner, torch.nn.Module) and inner is not model:
        return inner
    return model.get_decoder()


def compile_decoder_layers(model) -> None:
    """torch.compile every decoder layer in place (nn.Module.compile: state-dict keys unchanged), with dynamic
    shapes, since packed rows differ in length. Layers share one compiled graph (torch inlines module parameters
    as inputs), so the compile happens once. The packed attention (nash_fast.attention.varlen_attention_forward) is
    left to run eagerly: its bucket plan is Python data; what compiles is the rest of each layer (norms, projections,
    rotary, SwiGLU, residual adds), whose element-wise chains fuse."""
    exclude_varlen_attention_from_compile()
    for layer in backbone(model).layers:
        layer.compile(dynamic=True)


def enable_activation_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing of every layer (transformers 5 renamed the method)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


# ----------------------------------------------------------------------------------------------- LM head

def _zero3_partitioned(param: torch.Tensor | None) -> bool:
    return param is not None and hasattr(param, "ds_id") and hasattr(param, "ds_status")


def _zero3_available(param: torch.Tensor) -> bool:
    return getattr(param.ds_status, "name", str(param.ds_status)) == "AVAILABLE"


@contextlib.contextmanager
def gathered_lm_head(model) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Yield (weight, bias) of the LM head, gathered from its ZeRO-3 shards for the duration of the block.

    Outside DeepSpeed ZeRO-3 this yields the parameters as they are. Under ZeRO-3 it wraps
    deepspeed.zero.GatheredParameters(modifier_rank=None); run the loss forward and backward inside the block.
    """
    head = model.get_output_embeddings()
    params = [p for p in (head.weight, getattr(head, "bias", None)) if p is not None]
    if any(_zero3_partitioned(p) for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield head.weight, getattr(head, "bias", None)
    else:
        yield head.weight, getattr(head, "bias", None)


def head_logit_transform(model) -> tuple[float, float | None]:
    """(scale, softcap) with logits = softcap(scale * lm_head(h)): Cohere's logit_scale, Granite's
    logits_scaling, Gemma-2's final_logit_softcapping."""
    config = text_config(model.config)
    scale = 1.0
    if getattr(config, "logit_scale", None) is not None:
        scale *= float(config.logit_scale)
    if getattr(config, "logits_scaling", None) is not None:
        scale /= float(config.logits_scaling)
    softcap = getattr(config, "final_logit_softcapping", None)
    return scale, (float(softcap) if softcap else None)


# ----------------------------------------------------------------------------------------------- forward

def packed_hidden_states(model, batch: dict, *, attention: str = "auto") -> torch.Tensor:
    """Final hidden states [T, H] of the packed row, attention confined to each sequence
    (attention: "auto" | "varlen" | "mask", see packed_attention_kwargs)."""
    check_packable(model)
    input_ids, position_ids, _, cu_seqlens, lengths = _check_batch(batch)
    embeddings = model.get_input_embeddings().weight
    device, dtype = embeddings.device, embeddings.dtype
    max_seqlen = int(batch.get("max_seqlen", int(lengths.max())))
    kwargs = packed_attention_kwargs(model, cu_seqlens, max_seqlen, device, dtype, attention=attention)
    plan = kwargs.get(PLAN_KWARG)
    switch_to = None
    if plan is not None and text_config(model.config)._attn_implementation != "sdpa":
        # Eager models: the config names the registered varlen function for this forward only. Gradient
        # checkpointing would recompute the layers in backward, after the config is restored: refuse it.
        checkpointing = any(getattr(module, "gradient_checkpointing", False) for module in model.modules())
        if checkpointing and torch.is_grad_enabled():
            raise ValueError(
                "attention='varlen' on an eager model cannot be combined with gradient checkpointing "
                "(use attn_implementation='sdpa' where the model supports it, or attention='mask')"
            )
        switch_to = VARLEN_IMPLEMENTATION
    with attn_implementation_for_forward(model, switch_to):
        output = backbone(model)(
            input_ids=input_ids.to(device),
            position_ids=position_ids.to(device),
            use_cache=False,
            **kwargs,
        )
    if plan is not None and plan.calls == 0:
        raise ValueError(
            f"{type(model).__name__} does not run attention through transformers' AttentionInterface, so the "
            "varlen fallback never ran; use attention='mask'"
        )
    return output.last_hidden_state[0]


def packed_sequence_logprobs(
    model, batch: dict, *, average: bool = False, backend: str = "auto", attention: str = "auto"
) -> torch.Tensor:
    """Per-sequence log p(response | prompt) [S] (float32) for every sequence of a packed batch.

    logp_s = sum over scored positions t of sequence s of log softmax(softcap(scale * (W h_t + b)))[labels_t]
    (mean over the sequence's own scored tokens with average=True, as IPO uses; 0 for none), with h the
    backbone's final hidden states; W, b, scale and softcap are the model's LM head and logit transforms.
    attention chooses how sequences are kept apart (see packed_attention_kwargs); backend goes to sequence_logprobs.
    """
    hidden = packed_hidden_states(model, batch, attention=attention)
    labels = batch["labels"][0].to(hidden.device)
    cu_seqlens = batch["cu_seqlens"].to(hidden.device)
    scale, softcap = head_logit_transform(model)
    head = model.get_output_embeddings()
    params = [p for p in (head.weight, getattr(head, "bias", None)) if p is not None]
    needs_gather = any(_zero3_partitioned(p) and not _zero3_available(p) for p in params)
    if needs_gather and torch.is_grad_enabled():
        raise ValueError(
            "the LM-head weight is a ZeRO-3 shard; run forward and backward inside "
            "`with nash_fast.model.gathered_lm_head(model):` (or call under torch.no_grad())"
        )
    context = gathered_lm_head(model) if needs_gather else contextlib.nullcontext((head.weight, getattr(head, "bias", None)))
    with context as (weight, bias):
        if scale != 1.0:
            weight = weight * scale
            bias = bias * scale if bias is not None else None
        return sequence_logprobs(
            hidden, weight, labels, cu_seqlens=cu_seqlens, average=average, bias=bias, softcap=softcap, backend=backend
        )
