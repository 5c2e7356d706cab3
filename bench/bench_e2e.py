"""Group "e2e": one training step (backbone forward + backward through an SPPO loss) of a
Qwen2-0.5B-like model (random init) on a batch of preference pairs with realistic lengths.

  padded_materialized  the usual trainer (TRL): pairs padded to the longest sequence, model(...).logits
                       over every position ([2P, T_max, V] bf16), TRL's selective_log_softmax (a bf16
                       log_softmax row by row, gather), sum over the response tokens; sdpa attention
  padded_fused         the same padded batch, backbone only, then nash_fast.sequence_logprobs on the
                       [2P, T_max, H] hidden states (isolates the fused LM head)
  packed_fused         nash_fast.data.PackedPreferenceCollator (one row, no padding) and
                       nash_fast.model.packed_sequence_logprobs (backbone + fused LM head), attention
                       flash_attention_2 when flash-attn is installed, else sdpa with a dense
                       block-diagonal mask (O(T^2): every query still visits every key block)
  packed_fused_flex    the same with flex_attention (block-sparse: masked-out blocks are skipped;
                       CUDA only: FlexAttention has no CPU backward)

Every layer is activation-checkpointed (nash_fast.model.enable_activation_checkpointing) in all methods.
All of them compute the same per-sequence log-probs and the same loss (SPPO pairwise, eq. 4.8, with
precomputed reference log-probs and win rates); the optimizer step is left out (identical for all).
tokens_per_s counts real tokens (prompt + response, no padding) per second of the step; peak memory
is above the model's weights and the batch (it includes the parameter gradients). err_out_* compare
each method's per-sequence log-probs with padded_materialized's in the same run, err_grad_weight_rel
the gradient of the (tied) LM-head / embedding weight (bf16 model: these measure kernel, attention
and bf16 log-softmax rounding, not a bug unless large).
"""

from __future__ import annotations

import math

import torch

from common import (
    IGNORE_INDEX, PeakMemory, free_memory, grad_rel_err, is_oom, max_rel_err, set_repo_on_path, short_error, sync, time_call,
)

E2E_METHODS = ("padded_materialized", "padded_fused", "packed_fused", "packed_fused_flex")
ETA = 10.0


def model_config(quick: bool):
    from transformers import Qwen2Config

    if quick:
        return Qwen2Config(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                           tie_word_embeddings=True)
    # Qwen2-0.5B's architecture (494M parameters with tied embeddings).
    return Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                       tie_word_embeddings=True, rms_norm_eps=1e-6)


def make_examples(token_budget: int, vocab: int, seed: int, quick: bool) -> list[dict]:
    """Pairs with log-normal prompt (median 120) and response (median 250) lengths, like chat
    preference data (UltraFeedback-style), until the batch holds token_budget tokens."""
    gen = torch.Generator().manual_seed(seed)
    scale = 0.1 if quick else 1.0

    def draw(median, sigma, lo, hi):
        z = torch.randn((), generator=gen).item()
        return int(min(hi, max(lo, median * scale * math.exp(sigma * z))))

    examples, total = [], 0
    while True:
        p, c, r = draw(120, 0.7, 4, 1024), draw(250, 0.8, 2, 1536), draw(250, 0.8, 2, 1536)
        if total + 2 * p + c + r > token_budget and examples:
            break
        ids = lambda n: torch.randint(0, vocab, (n,), generator=gen).tolist()  # noqa: E731
        examples.append(dict(prompt_ids=ids(p), chosen_ids=ids(c), rejected_ids=ids(r)))
        total += 2 * p + c + r
    return examples


def padded_batch(examples, device):
    """[2P, T_max] right-padded rows, chosen rows first; labels[t] = token t+1 when it is a
    response token of the row (the collator's rule), else IGNORE_INDEX."""
    rows = [e["prompt_ids"] + e["chosen_ids"] for e in examples] + [e["prompt_ids"] + e["rejected_ids"] for e in examples]
    prompts = [len(e["prompt_ids"]) for e in examples] * 2
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    for i, (row, p) in enumerate(zip(rows, prompts)):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        labels[i, p - 1: len(row) - 1] = torch.tensor(row[p:])
    real = sum(len(r) for r in rows)
    return dict(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device)), real, T


def sppo_loss(lp, ctx):
    P = lp.shape[0] // 2
    pw, pl, p = lp[:P], lp[P:], ctx["winrate"]
    return ((pw - ctx["ref_w"] - ETA * (p - 0.5)) ** 2 + (pl - ctx["ref_l"] - ETA * (0.5 - p)) ** 2).mean()


def load(method: str, model):
    """(fn(batches) -> per-sequence log-probs [2P] chosen first, None) or (None, reason)."""
    if method == "padded_materialized":
        return _materialized(model), None
    try:
        set_repo_on_path()
        if method == "padded_fused":
            from nash_fast import sequence_logprobs

            backbone = model.get_decoder() if hasattr(model, "get_decoder") else model.model
            head = model.get_output_embeddings().weight

            def fn(b):
                pb = b["padded"]
                hidden = backbone(input_ids=pb["input_ids"], attention_mask=pb["attention_mask"]).last_hidden_state
                return sequence_logprobs(hidden, head, pb["labels"])

            return fn, None
        if method.startswith("packed_fused"):
            from nash_fast.model import packed_sequence_logprobs

            def fn(b):
                lp = packed_sequence_logprobs(model, b["packed"])
                return lp.index_select(0, b["packed_order"])

            return fn, None
    except Exception as exc:  # noqa: BLE001 -- missing module = reported skip
        return None, f"import failed: {type(exc).__name__}: {exc}".replace("\n", " ")[:300]
    raise ValueError(f"unknown e2e method {method!r}; choose from {E2E_METHODS}")


def selective_log_softmax(logits, index):
    """TRL's trl.trainer.utils.selective_log_softmax: log_softmax(logits).gather(index), row by row
    for bf16/fp16 logits so that only one row's [T, V] log-softmax exists at a time."""
    if logits.dtype in (torch.float32, torch.float64):
        selected = torch.gather(logits, -1, index.unsqueeze(-1)).squeeze(-1)
        return selected - torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
    rows = []
    for row_logits, row_labels in zip(logits, index):
        row_logps = torch.log_softmax(row_logits, dim=-1)
        rows.append(row_logps.gather(-1, row_labels.unsqueeze(-1)).squeeze(-1))
    return torch.stack(rows)


def _materialized(model):
    def fn(b):
        pb = b["padded"]
        logits = model(input_ids=pb["input_ids"], attention_mask=pb["attention_mask"]).logits  # [2P, T, V]
        labels = pb["labels"]
        tok = selective_log_softmax(logits, labels.clamp_min(0))
        return torch.where(labels != IGNORE_INDEX, tok, torch.zeros_like(tok)).float().sum(1)
    return fn


def attention_for(method: str, device) -> tuple[str | None, str | None]:
    """(attention implementation, None) for a method, or (None, reason it cannot run here)."""
    import importlib.util

    if method == "packed_fused_flex":
        if device.type != "cuda":
            return None, "flex_attention has no CPU backward (torch: 'FlexAttention does not support backward on CPU')"
        return "flex_attention", None
    if method == "packed_fused" and device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2", None
    return "sdpa", None


def _set_attention(model, implementation: str):
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(implementation)
    else:
        model.config._attn_implementation = implementation


def run(args, device, dtype, log, peak_tflops: float, deadline, methods):
    methods = methods or list(E2E_METHODS)
    for m in methods:
        if m not in E2E_METHODS:
            raise SystemExit(f"--e2e-methods: unknown method {m!r}; choose from {E2E_METHODS}")
    budget = args.e2e_tokens or (400 if args.quick else 16384)
    cfg_name = "qwen2-tiny" if args.quick else "qwen2-0.5b"
    base = dict(shape=cfg_name, dtype=args.dtype, mode="train_step", matmul_peak_tflops=peak_tflops)

    def skip_all(reason):
        for m in methods:
            log.write("e2e", method=m, status="skipped", reason=reason, **base)

    if deadline.passed():
        return skip_all(deadline.reason())
    try:
        from transformers import Qwen2ForCausalLM

        cfg = model_config(args.quick)
        torch.manual_seed(args.seed)
        with torch.device(device):
            model = Qwen2ForCausalLM(cfg)
        model = model.to(dtype)
        model.train()
        # Activation checkpointing per layer, as preference trainers run 0.5B+ models: without it the
        # padded baseline's activations alone (2-3x the real tokens) would not fit at this batch size.
        from nash_fast.model import enable_activation_checkpointing

        enable_activation_checkpointing(model)
        model.config.use_cache = False
        _set_attention(model, "sdpa")
    except Exception as exc:  # noqa: BLE001
        free_memory(device)
        return skip_all(f"model could not be built: {short_error(exc)}")
    base.update(H=cfg.hidden_size, V=cfg.vocab_size)

    examples = make_examples(budget, cfg.vocab_size, args.seed, args.quick)
    padded, real_tokens, T_max = padded_batch(examples, device)
    P = len(examples)
    batches = {"padded": padded}
    gen = torch.Generator().manual_seed(args.seed + 5)
    ctx = dict(ref_w=-300 + 20 * torch.randn(P, generator=gen), ref_l=-300 + 20 * torch.randn(P, generator=gen),
               winrate=torch.rand(P, generator=gen))
    ctx = {k: v.to(device) for k, v in ctx.items()}
    collate_reason = None
    try:
        set_repo_on_path()
        from nash_fast.data import PackedPreferenceCollator

        packed = PackedPreferenceCollator()(examples)
        packed = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in packed.items()}
        role, pair = packed["role"], packed["pair_index"]
        order = torch.cat([(role == 0).nonzero().squeeze(1)[torch.argsort(pair[role == 0])],
                           (role == 1).nonzero().squeeze(1)[torch.argsort(pair[role == 1])]])
        batches["packed"], batches["packed_order"] = packed, order
    except Exception as exc:  # noqa: BLE001
        collate_reason = f"PackedPreferenceCollator failed: {short_error(exc)}"
    n_scored = int((padded["labels"] != IGNORE_INDEX).sum())
    pad_frac = 1 - real_tokens / (2 * P * T_max)
    base.update(N=real_tokens, n_scored=n_scored, n_seqs=2 * P,
                notes=f"{P} pairs; padded layout {2 * P}x{T_max} ({pad_frac:.0%} padding)")
    params = [p for p in model.parameters() if p.requires_grad]

    reference_lp = None
    for method in methods:
        row = dict(base, method=method)
        if deadline.passed():
            log.write("e2e", status="skipped", reason=deadline.reason(), **row)
            continue
        if method.startswith("packed") and collate_reason:
            log.write("e2e", status="skipped", reason=collate_reason, **row)
            continue
        attention, reason = attention_for(method, device)
        if reason is None:
            fn, reason = load(method, model)
        if reason is not None:
            log.write("e2e", status="skipped", reason=reason, **row)
            continue
        row["notes"] = f"{base['notes']}; attention {attention}"

        def step():
            sppo_loss(fn(batches), ctx).backward()

        try:
            _set_attention(model, attention)
            step()  # warm-up (flex_attention compiles here)
            for p in params:
                p.grad = None
            sync(device)
            free_memory(device)
            with PeakMemory(device) as mem:
                lp = fn(batches)
                loss = sppo_loss(lp, ctx)
                loss.backward()
            lp = lp.detach().float()
            if not torch.isfinite(lp).all() or not torch.isfinite(loss):
                raise RuntimeError("non-finite log-probs or loss")
            head_grad = model.get_output_embeddings().weight.grad
            if head_grad is None or not torch.isfinite(head_grad).all():
                raise RuntimeError("the LM-head / embedding weight got no finite gradient")
            res = {"mem_peak_gib": mem.gib}
            if method == "padded_materialized":
                reference_lp, reference_grad = lp, head_grad.float().cpu()
            elif reference_lp is not None:
                res["err_out_abs"], res["err_out_rel"] = max_rel_err(lp, reference_lp)
                res["err_grad_weight_rel"] = grad_rel_err(head_grad.float().cpu(), reference_grad)
            del head_grad
            del lp, loss
            for p in params:
                p.grad = None
            free_memory(device)
            ms, p20, p80 = time_call(step, device, grad_to_none=params, quick=args.quick)
            for p in params:
                p.grad = None
        except Exception as exc:  # noqa: BLE001 -- one failing case must not end the run
            oom = is_oom(exc)
            for p in params:
                p.grad = None
            free_memory(device)
            log.write("e2e", status="skipped" if oom else "error",
                      reason=("out of memory: " if oom else "") + short_error(exc), **row)
            continue
        finally:
            _set_attention(model, "sdpa")
        log.write("e2e", status="ok", ms_median=ms, ms_p20=p20, ms_p80=p80,
                  tokens_per_s=real_tokens / (ms * 1e-3), **row, **res)
        free_memory(device)
    del model, batches, params
    free_memory(device)
