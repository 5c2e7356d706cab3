"""FusedLinearPreferenceLoss against a float64 reference that materializes the logits.

The reference here computes every sequence's log-prob as hidden @ weight.T (+ bias, soft-cap),
log_softmax, gather, sum (or mean) over scored tokens, in float64 and one sequence at a time, then
applies each loss's formula, written again below in plain torch (independently of
nash_fast.losses). The module runs in float32 (sequence_logprobs returns float32), so values and
gradients are compared at rtol 1e-4 with an absolute floor of 1e-4 x the reference's largest entry.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import nash_fast.fused_loss as fused_module
from nash_fast import FusedLinearPreferenceLoss
from reference import reference_sequence_logprobs

IGNORE = -100
PAIR_LOSSES = ["sppo", "inpo", "ipo", "dpo", "sr_dpo", "sr_ipo", "spce"]
AUGMENTED = ("sr_dpo", "sr_ipo")
BETA_LOSSES = ("ipo", "dpo", "sr_dpo", "sr_ipo", "spce")
VOCABS = [2, 7, 31, 97]


# ----------------------------------------------------------------------------- data

def make_problem(seed, num_pairs, H, V, *, augmented, bias, max_len=6, roles=None):
    """Sequences (float32 hidden, labels, role, pair) of `num_pairs` pairs, plus weight and bias."""
    g = torch.Generator().manual_seed(seed)
    roles = roles if roles is not None else ((0, 1, 2, 3) if augmented else (0, 1))
    seqs = []
    for pair in range(num_pairs):
        for role in roles:
            length = int(torch.randint(1, max_len + 1, (), generator=g))
            labels = torch.randint(0, V, (length,), generator=g)
            prompt = int(torch.randint(0, length + 1, (), generator=g))  # sometimes nothing is scored
            labels[:prompt] = IGNORE
            seqs.append(dict(role=role, pair=pair, hidden=torch.randn(length, H, generator=g), labels=labels))
    weight = torch.randn(V, H, generator=g) * 0.3
    b = torch.randn(V, generator=g) * 0.1 if bias else None
    return seqs, weight, b, g


def packed(seqs, g):
    """Shuffled packed layout: hidden [N, H], labels [N], cu_seqlens, role, pair_index."""
    order = torch.randperm(len(seqs), generator=g).tolist()
    lengths = [seqs[i]["labels"].numel() for i in order]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    return dict(
        hidden=torch.cat([seqs[i]["hidden"] for i in order]),
        labels=torch.cat([seqs[i]["labels"] for i in order]),
        cu_seqlens=cu,
        role=torch.tensor([seqs[i]["role"] for i in order]),
        pair_index=torch.tensor([seqs[i]["pair"] for i in order]),
        order=order,
    )


def padded(rows, H, g):
    """Rows padded to the longest; padding positions get random hidden states and ignored labels."""
    T = max(r["labels"].numel() for r in rows)
    hidden = torch.randn(len(rows), T, H, generator=g)
    labels = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    for i, r in enumerate(rows):
        n = r["labels"].numel()
        hidden[i, :n] = r["hidden"]
        labels[i, :n] = r["labels"]
    return hidden, labels


def liger(seqs, H, g, augmented):
    """Liger layout: [2B, T, H] with chosen rows (pairs 0..B-1) first, then rejected."""
    by_role = lambda role: sorted((s for s in seqs if s["role"] == role), key=lambda s: s["pair"])  # noqa: E731
    hidden, labels = padded(by_role(0) + by_role(1), H, g)
    out = dict(hidden=hidden, labels=labels)
    if augmented:
        out["aug_hidden"], out["aug_labels"] = padded(by_role(2) + by_role(3), H, g)
    return out


# ----------------------------------------------------------------------------- float64 reference

def ref_logp(hidden64, labels, weight64, bias64, softcap, average):
    """float64 log p of one sequence, through the shared materialized-logits reference."""
    return reference_sequence_logprobs(hidden64, weight64, labels, None, ignore_index=IGNORE, average=average,
                                       bias=bias64, softcap=softcap)[0]


TRL_TYPES = ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
             "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]
SMOOTHED = ("exo_pair", "robust", "aot", "aot_unpaired")


def trl_per_pair(types, hyper, pw, pl, rw, rl, nw, nl, average):
    """TRL 1.16's DPOTrainer._compute_loss (trl/trainer/dpo_trainer.py) in float64 on per-sequence log-probs:
    sum_k w_k loss_k per pair (TRL: sum_k w_k mean(loss_k)). pw, pl are the policy's log-probs as the module
    computes them (sums, or per-token means with average); nw, nl the responses' scored tokens. TRL's ipo and
    sigmoid_norm divide the summed log-ratios by completion_mask.sum(1).clamp(min=1) (means: already divided);
    its sft is -mean of every chosen token's log-prob."""
    beta, eps = hyper.get("beta", 0.1), hyper.get("label_smoothing", 0.0)
    tau = hyper.get("discopop_tau", 0.05)
    weights = hyper.get("loss_weights") or [1.0] * len(types)
    a, b = pw - rw, pl - rl  # chosen_logratios, rejected_logratios
    d = a - b  # delta_score
    norm_w, norm_l = (torch.ones_like(nw), torch.ones_like(nl)) if average else (nw.clamp(min=1), nl.clamp(min=1))
    total = 0.0
    for name, weight in zip(types, weights):
        if name == "sigmoid":
            loss = -F.logsigmoid(beta * d)
        elif name == "hinge":
            loss = torch.relu(1 - beta * d)
        elif name == "ipo":
            loss = (a / norm_w - b / norm_l - 1 / (2 * beta)) ** 2
        elif name == "exo_pair":
            z = beta * d
            loss = torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps)) + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps))
        elif name == "nca_pair":
            loss = -F.logsigmoid(beta * a) - 0.5 * F.logsigmoid(-beta * a) - 0.5 * F.logsigmoid(-beta * b)
        elif name == "robust":
            loss = (-(1 - eps) * F.logsigmoid(beta * d) + eps * F.logsigmoid(-beta * d)) / (1 - 2 * eps)
        elif name == "bco_pair":
            loss = -F.logsigmoid(beta * a) - F.logsigmoid(-beta * b)
        elif name == "sppo_hard":
            loss = (a - 0.5 / beta) ** 2 + (b + 0.5 / beta) ** 2
        elif name in ("aot", "aot_unpaired"):
            delta = (torch.sort(pw - pl)[0] - torch.sort(rw - rl)[0] if name == "aot"
                     else torch.sort(a)[0] - torch.sort(b)[0])
            loss = -F.logsigmoid(beta * delta) * (1 - eps) - F.logsigmoid(-beta * delta) * eps
        elif name == "apo_zero":
            loss = 1 - torch.sigmoid(beta * a) + torch.sigmoid(beta * b)
        elif name == "apo_down":
            loss = torch.sigmoid(beta * a) + 1 - torch.sigmoid(beta * d)
        elif name == "discopop":
            logits = beta * d
            m = torch.sigmoid(logits / tau)
            loss = -F.logsigmoid(logits) * (1 - m) + torch.exp(-logits) * m
        elif name == "sft":
            sums = pw * nw if average else pw
            loss = (-sums.sum() / nw.sum().clamp(min=1)).expand(pw.shape)
        else:  # sigmoid_norm
            loss = -F.logsigmoid(beta * (a / norm_w - b / norm_l))
        total = total + weight * loss
    return total


def ref_pair_loss(name, hyper, pw, pl, given, aug_pw=None, aug_pl=None, counts=None, average=False):
    rw, rl = given["ref_chosen_logps"], given["ref_rejected_logps"]
    if isinstance(name, (list, tuple)):
        return trl_per_pair(name, hyper, pw, pl, rw, rl, *counts, average)
    dw, dl = pw - rw, pl - rl
    beta, eta, tau, lam = (hyper.get(k) for k in ("beta", "eta", "tau", "lam"))
    if name == "dpo":
        return -F.logsigmoid(beta * (dw - dl))
    if name == "ipo":
        return (dw - dl - 1 / (2 * beta)) ** 2
    if name == "sppo":
        p = given["winrate"]
        return (dw - eta * (p - 0.5)) ** 2 + (dl - eta * (0.5 - p)) ** 2
    if name == "inpo":
        qw, ql = given["prev_chosen_logps"], given["prev_rejected_logps"]
        h = (pw - pl) - tau / eta * (rw - rl) - (eta - tau) / eta * (qw - ql)
        return (h - 1 / (2 * eta)) ** 2
    if name == "spce":
        t, z = given["target_prob"], beta * (dw - dl)
        return -(t * F.logsigmoid(z) + (1 - t) * F.logsigmoid(-z))
    d = beta * ((aug_pw - given["aug_ref_chosen_logps"]) - (aug_pl - given["aug_ref_rejected_logps"]))
    if name == "sr_dpo":
        return -F.logsigmoid(beta * (dw - dl) - lam * d)
    return (dw - dl - lam * d - 1 / (2 * beta)) ** 2


def reference(name, hyper, seqs, weight, bias, *, softcap, average, given):
    """float64 per-pair losses, leaf tensors (per-sequence hidden, weight, bias) for their grads."""
    w64 = weight.double().requires_grad_()
    b64 = None if bias is None else bias.double().requires_grad_()
    num_pairs = 1 + max(s["pair"] for s in seqs)
    logps = {r: [None] * num_pairs for r in range(4)}
    for s in seqs:
        s["h64"] = s["hidden"].double().requires_grad_()
        if s["role"] < 2:
            logps[s["role"]][s["pair"]] = ref_logp(s["h64"], s["labels"], w64, b64, softcap, average)
        else:
            with torch.no_grad():
                logps[s["role"]][s["pair"]] = ref_logp(s["h64"], s["labels"], w64, b64, softcap, average)
    pw, pl = torch.stack(logps[0]), torch.stack(logps[1])
    aug = (torch.stack(logps[2]), torch.stack(logps[3])) if name in AUGMENTED else (None, None)
    given64 = {k: v.double() for k, v in given.items()}
    counts = {r: [0.0] * num_pairs for r in range(2)}
    for s in seqs:
        if s["role"] < 2:
            counts[s["role"]][s["pair"]] = float((s["labels"] != IGNORE).sum())
    counts = (torch.tensor(counts[0], dtype=torch.float64), torch.tensor(counts[1], dtype=torch.float64))
    return (ref_pair_loss(name, hyper, pw, pl, given64, *aug, counts=counts, average=average), pw.detach(), pl.detach(),
            w64, b64)


def draw_hyper(draw, name):
    if name == "sppo":
        return dict(eta=draw(st.floats(0.5, 20.0)))
    if name == "inpo":
        eta = draw(st.floats(0.5, 20.0))
        return dict(eta=eta, tau=eta * draw(st.floats(0.0, 0.9)))
    hyper = dict(beta=draw(st.floats(0.05, 2.0)))
    if name in AUGMENTED:
        hyper["lam"] = draw(st.floats(0.0, 1.0))  # lam >= 0 (Sr-DPO eq. 9), one rule with the CLI
    return hyper


def make_given(name, g, policy_w, policy_l):
    """Precomputed per-pair inputs: reference log-probs near the policy's, probabilities in [0, 1]."""
    P = policy_w.numel()
    near = lambda x: (x + torch.randn(P, generator=g, dtype=torch.float64)).float()  # noqa: E731
    given = dict(ref_chosen_logps=near(policy_w), ref_rejected_logps=near(policy_l))
    if name == "sppo":
        given["winrate"] = torch.rand(P, generator=g)
    if name == "inpo":
        given["prev_chosen_logps"], given["prev_rejected_logps"] = near(policy_w), near(policy_l)
    if name == "spce":
        given["target_prob"] = torch.rand(P, generator=g)
    if name in AUGMENTED:
        given["aug_ref_chosen_logps"], given["aug_ref_rejected_logps"] = near(policy_w), near(policy_l)
    return given


def assert_close(ours, ref, what):
    ref = ref.detach()
    floor = 1e-4 * (1.0 + float(ref.abs().max())) if ref.numel() else 1e-4
    torch.testing.assert_close(ours.detach().cpu().double(), ref, rtol=1e-4, atol=floor, msg=lambda m: f"{what}: {m}")


def run_case(name, hyper, seqs, weight, bias, g, *, layout, softcap, average, reduction, backend="torch", device="cpu",
             check_grads=True):
    """Runs the module on `layout` (on `device`) and checks loss, metrics and gradients against the
    float64 reference (on the CPU). name: a loss, or a list of TRL's loss types."""
    to_dev = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t
    with torch.no_grad():  # the policy's own log-probs, only to place the reference log-probs nearby
        probe = {(s["role"], s["pair"]): ref_logp(s["hidden"].double(), s["labels"], weight.double(),
                                                   None if bias is None else bias.double(), softcap, average)
                 for s in seqs}
    num_pairs = 1 + max(s["pair"] for s in seqs)
    given = make_given(name, g, torch.stack([probe[0, p] for p in range(num_pairs)]),
                       torch.stack([probe[1, p] for p in range(num_pairs)]))
    per_pair64, pw64, pl64, w64, b64 = reference(name, hyper, seqs, weight, bias, softcap=softcap, average=average, given=given)
    expected = {"mean": per_pair64.mean(), "sum": per_pair64.sum(), "none": per_pair64}[reduction]

    module = FusedLinearPreferenceLoss(name, **hyper, average_log_prob=average, softcap=softcap,
                                       reduction=reduction, backend=backend)
    w = weight.to(device, copy=True).requires_grad_()
    b = None if bias is None else bias.to(device, copy=True).requires_grad_()
    given_dev = {k: to_dev(v) for k, v in given.items()}
    if layout == "packed":
        batch = packed(seqs, g)
        h = batch["hidden"].to(device, copy=True).requires_grad_()
        loss, metrics = module(w, h, to_dev(batch["labels"]), bias=b, cu_seqlens=to_dev(batch["cu_seqlens"]),
                               role=to_dev(batch["role"]), pair_index=to_dev(batch["pair_index"]), **given_dev)
    else:
        batch = liger(seqs, weight.shape[1], g, name in AUGMENTED)
        h = batch["hidden"].to(device, copy=True).requires_grad_()
        aug = dict(aug_hidden=to_dev(batch["aug_hidden"]), aug_labels=to_dev(batch["aug_labels"])) if name in AUGMENTED else {}
        loss, metrics = module(w, h, to_dev(batch["labels"]), bias=b, **aug, **given_dev)

    assert_close(loss, expected, "loss")
    if not check_grads:
        return loss
    (loss.sum() if reduction == "none" else loss).backward()
    (expected.sum() if reduction == "none" else expected).backward()
    assert_close(w.grad, w64.grad, "d weight")
    if b is not None:
        assert_close(b.grad, b64.grad, "d bias")
    if layout == "packed":
        starts = batch["cu_seqlens"].tolist()
        for k, i in enumerate(batch["order"]):
            ref_grad = seqs[i]["h64"].grad
            ref_grad = torch.zeros_like(seqs[i]["h64"]) if ref_grad is None else ref_grad
            assert_close(h.grad[starts[k]:starts[k + 1]], ref_grad, f"d hidden of sequence {i} (role {seqs[i]['role']})")
    else:
        rows = sorted((s for s in seqs if s["role"] < 2), key=lambda s: (s["role"], s["pair"]))
        for r, s in enumerate(rows):
            n = s["labels"].numel()
            ref_grad = s["h64"].grad if s["h64"].grad is not None else torch.zeros_like(s["h64"])  # e.g. sft: chosen only
            assert_close(h.grad[r, :n], ref_grad, f"d hidden of row {r}")
            assert torch.count_nonzero(h.grad[r, n:]) == 0  # padding

    dw, dl = pw64 - given["ref_chosen_logps"].double(), pl64 - given["ref_rejected_logps"].double()
    trl = isinstance(name, (list, tuple))
    margin = ((hyper.get("beta", 0.1) if trl else hyper["beta"]) if trl or name in BETA_LOSSES else 1.0) * (dw - dl)
    assert_close(metrics["loss"], per_pair64.mean(), "metric loss")
    assert_close(metrics["chosen_logratio"], dw.mean(), "chosen_logratio")
    assert_close(metrics["rejected_logratio"], dl.mean(), "rejected_logratio")
    assert_close(metrics["reward_margin"], margin.mean(), "reward_margin")
    assert_close(metrics["policy_chosen_logps"], pw64.mean(), "policy_chosen_logps")
    assert_close(metrics["policy_rejected_logps"], pl64.mean(), "policy_rejected_logps")
    if bool(((dw - dl).abs() > 1e-3).all()):  # a float32 near-tie may legitimately flip
        assert metrics["reward_accuracy"].item() == pytest.approx(float((dw > dl).double().mean()))
    assert metrics["num_pairs"].item() == num_pairs
    assert metrics["num_tokens"].item() == sum(int((s["labels"] != IGNORE).sum()) for s in seqs if s["role"] < 2)
    assert all(not v.requires_grad for v in metrics.values())
    return loss


# ----------------------------------------------------------------------------- exactness

TRL_MIXES = [("sigmoid", "sft"), ("sigmoid", "bco_pair", "sft"), ("ipo", "hinge", "discopop", "aot_unpaired")]


@pytest.mark.parametrize("types", [(t,) for t in TRL_TYPES] + TRL_MIXES, ids=lambda t: "+".join(t))
@settings(max_examples=8, deadline=None)
@given(data=st.data())
def test_trl_loss_types_match_float64_reference(types, data):
    """Each TRL loss type, and TRL's loss_type=[...] lists with loss_weights, through FusedLinearPreferenceLoss on
    both layouts, against TRL 1.16's formulas in float64 on logits materialized in float64 (loss, metrics,
    gradients of weight, bias and every hidden state)."""
    hyper = dict(beta=data.draw(st.floats(0.05, 2.0), label="beta"))
    if set(types) & set(SMOOTHED):  # in every smoothed loss's domain: exo (0, 1), robust [0, 1/2), aot [0, 1]
        hyper["label_smoothing"] = data.draw(st.floats(1e-3, 0.4), label="label_smoothing")
    if "discopop" in types:
        hyper["discopop_tau"] = data.draw(st.floats(0.02, 1.0), label="discopop_tau")
    if len(types) > 1:
        hyper["loss_weights"] = data.draw(st.lists(st.floats(0.0, 2.0), min_size=len(types), max_size=len(types)),
                                          label="loss_weights")
    seqs, weight, bias, g = make_problem(
        data.draw(st.integers(0, 2**16), label="seed"), data.draw(st.integers(1, 3), label="pairs"),
        data.draw(st.integers(1, 32), label="H"), data.draw(st.sampled_from(VOCABS), label="V"),
        augmented=False, bias=data.draw(st.booleans(), label="bias"),
    )
    check_grads = True
    if {"aot", "aot_unpaired"} & set(types):
        # AOT sorts the batch: the gradient of a sorted vector is a permutation, and a float32 near-tie (two keys
        # within float32's rounding of the log-probs, <= 1e-4 relative here) may sort the other way than in
        # float64 and send each quantile's gradient to the other pair. The values agree either way (sorting is
        # continuous); gradients are compared when the float64 keys are 1e-2 apart.
        with torch.no_grad():
            pl = {(s["role"], s["pair"]): ref_logp(s["hidden"].double(), s["labels"], weight.double(),
                                                   None if bias is None else bias.double(), None, False) for s in seqs}
        pairs = 1 + max(s["pair"] for s in seqs)
        keys = torch.stack([pl[0, p] - pl[1, p] for p in range(pairs)])
        check_grads = pairs == 1 or bool((keys.sort()[0].diff() > 1e-2 * (1 + keys.abs().max())).all())
    run_case(
        list(types), hyper, seqs, weight, bias, g,
        layout=data.draw(st.sampled_from(["packed", "liger"]), label="layout"),
        softcap=data.draw(st.sampled_from([None, 3.0]), label="softcap"),
        average=data.draw(st.booleans(), label="average"),
        reduction=data.draw(st.sampled_from(["mean", "sum", "none"]), label="reduction"),
        check_grads=check_grads,
    )


@pytest.mark.parametrize("name", PAIR_LOSSES)
@settings(max_examples=12, deadline=None)
@given(data=st.data())
def test_matches_float64_reference(name, data):
    hyper = draw_hyper(data.draw, name)
    seqs, weight, bias, g = make_problem(
        data.draw(st.integers(0, 2**16), label="seed"), data.draw(st.integers(1, 3), label="pairs"),
        data.draw(st.integers(1, 32), label="H"), data.draw(st.sampled_from(VOCABS), label="V"),
        augmented=name in AUGMENTED, bias=data.draw(st.booleans(), label="bias"),
    )
    run_case(
        name, hyper, seqs, weight, bias, g,
        layout=data.draw(st.sampled_from(["packed", "liger"]), label="layout"),
        softcap=data.draw(st.sampled_from([None, 3.0]), label="softcap"),
        average=data.draw(st.booleans(), label="average"),
        reduction=data.draw(st.sampled_from(["mean", "sum", "none"]), label="reduction"),
    )


@pytest.mark.parametrize("name", PAIR_LOSSES)
def test_liger_and_packed_layouts_agree(name):
    hyper = dict(eta=4.0, tau=1.0) if name == "inpo" else dict(eta=4.0) if name == "sppo" else dict(beta=0.5)
    if name in AUGMENTED:
        hyper["lam"] = 0.4
    seqs, weight, bias, g = make_problem(7, 3, 16, 31, augmented=name in AUGMENTED, bias=False)
    with torch.no_grad():
        probe = {(s["role"], s["pair"]): ref_logp(s["hidden"].double(), s["labels"], weight.double(), None, None, False)
                 for s in seqs}
    given = make_given(name, g, torch.stack([probe[0, p] for p in range(3)]), torch.stack([probe[1, p] for p in range(3)]))
    module = FusedLinearPreferenceLoss(name, **hyper, backend="torch", reduction="none")
    results = []
    for layout in ("packed", "liger"):
        w = weight.clone().requires_grad_()
        if layout == "packed":
            b = packed(seqs, g)
            loss, metrics = module(w, b["hidden"], b["labels"], cu_seqlens=b["cu_seqlens"], role=b["role"],
                                   pair_index=b["pair_index"], **given)
        else:
            b = liger(seqs, 16, g, name in AUGMENTED)
            aug = dict(aug_hidden=b["aug_hidden"], aug_labels=b["aug_labels"]) if name in AUGMENTED else {}
            loss, metrics = module(w, b["hidden"], b["labels"], **aug, **given)
        loss.sum().backward()
        results.append((loss.detach(), w.grad, metrics))
    (l1, g1, m1), (l2, g2, m2) = results
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-5)
    assert m1.keys() == m2.keys()
    for k in m1:
        if k in ("mean_chosen_logits", "mean_rejected_logits"):
            continue  # Liger's logits means count the padding positions of the [2B, T] layout (checked below)
        torch.testing.assert_close(m1[k], m2[k], rtol=1e-5, atol=1e-5)


def test_packed_accepts_leading_batch_dim():
    seqs, weight, _, g = make_problem(3, 2, 8, 7, augmented=False, bias=False)
    b = packed(seqs, g)
    module = FusedLinearPreferenceLoss("ipo", beta=0.2, backend="torch")
    given = dict(ref_chosen_logps=torch.zeros(2), ref_rejected_logps=torch.zeros(2))
    flat, _ = module(weight, b["hidden"], b["labels"], cu_seqlens=b["cu_seqlens"], role=b["role"],
                     pair_index=b["pair_index"], **given)
    batched, _ = module(weight, b["hidden"][None], b["labels"][None], cu_seqlens=b["cu_seqlens"], role=b["role"],
                        pair_index=b["pair_index"], **given)
    assert torch.equal(flat, batched)


def test_narrow_label_dtypes_count_tokens_by_value():
    """uint8 labels: ignore_index -100 is not a uint8 value (it once wrapped to 156 and class 156 went unscored);
    the loss, its token counts and its metrics equal those of the same labels in int64."""
    seqs, weight, _, g = make_problem(5, 2, 8, 200, augmented=False, bias=False)
    for s in seqs:
        s["labels"][s["labels"] != IGNORE] = 156
        s["labels"][-1] = 156  # every sequence scores class 156
    b = packed(seqs, g)
    scored = b["labels"] != IGNORE
    module = FusedLinearPreferenceLoss("ipo", beta=0.2, backend="torch")
    wide, wide_metrics = module(weight, b["hidden"], torch.where(scored, b["labels"], 0), cu_seqlens=b["cu_seqlens"],
                                role=b["role"], pair_index=b["pair_index"], **REF2)
    narrow_labels = torch.where(scored, b["labels"], 0).to(torch.uint8)
    narrow, narrow_metrics = module(weight, b["hidden"], narrow_labels, cu_seqlens=b["cu_seqlens"], role=b["role"],
                                    pair_index=b["pair_index"], **REF2)
    assert torch.equal(wide, narrow)
    assert all(torch.equal(wide_metrics[k], narrow_metrics[k]) for k in wide_metrics)


# ----------------------------------------------------------------------------- augmented passes

def test_augmented_tokens_get_no_gradient_and_are_scored_without_grad(monkeypatch):
    seqs, weight, _, g = make_problem(11, 3, 12, 31, augmented=True, bias=False, max_len=5)
    for s in seqs:  # every sequence scores at least one token, so the checks below are not vacuous
        s["labels"][-1] = 1
    b = packed(seqs, g)
    calls = []
    real = fused_module.sequence_logprobs

    def spy(hidden, weight, labels, **kw):
        calls.append(dict(grad_enabled=torch.is_grad_enabled(), labels=labels.clone()))
        return real(hidden, weight, labels, **kw)

    monkeypatch.setattr(fused_module, "sequence_logprobs", spy)
    h = b["hidden"].clone().requires_grad_()
    w = weight.clone().requires_grad_()
    given = {k: torch.randn(3, generator=g) - 10 for k in
             ("ref_chosen_logps", "ref_rejected_logps", "aug_ref_chosen_logps", "aug_ref_rejected_logps")}
    loss, _ = FusedLinearPreferenceLoss("sr_dpo", beta=0.3, lam=0.8, backend="torch")(
        w, h, b["labels"], cu_seqlens=b["cu_seqlens"], role=b["role"], pair_index=b["pair_index"], **given)
    loss.backward()

    token_role = torch.repeat_interleave(b["role"], b["cu_seqlens"].diff().long())
    is_aug = token_role >= 2
    scored = b["labels"] != IGNORE
    assert len(calls) == 2
    grad_call, aug_call = calls
    assert grad_call["grad_enabled"] and not aug_call["grad_enabled"]
    assert torch.equal(grad_call["labels"] != IGNORE, scored & ~is_aug)  # augmented tokens skipped
    assert torch.equal(aug_call["labels"] != IGNORE, scored & is_aug)  # only augmented tokens scored
    assert torch.count_nonzero(h.grad[is_aug]) == 0
    assert torch.count_nonzero(h.grad[~is_aug & scored].abs().sum(-1)) == int((~is_aug & scored).sum())


def test_liger_augmented_hidden_gets_no_gradient():
    seqs, weight, _, g = make_problem(5, 2, 8, 7, augmented=True, bias=False)
    b = liger(seqs, 8, g, augmented=True)
    aug_hidden = b["aug_hidden"].clone().requires_grad_()
    h = b["hidden"].clone().requires_grad_()
    given = {k: torch.randn(2, generator=g) for k in
             ("ref_chosen_logps", "ref_rejected_logps", "aug_ref_chosen_logps", "aug_ref_rejected_logps")}
    loss, _ = FusedLinearPreferenceLoss("sr_ipo", beta=0.3, lam=0.8, backend="torch")(
        weight, h, b["labels"], aug_hidden=aug_hidden, aug_labels=b["aug_labels"], **given)
    loss.backward()
    assert aug_hidden.grad is None
    assert h.grad is not None


# ----------------------------------------------------------------------------- SPPO forms

@pytest.mark.parametrize("layout", ["packed", "rows"])
def test_sppo_all_responses_matches_reference(layout):
    seqs, weight, _, g = make_problem(13, 3, 10, 31, augmented=False, bias=False, roles=(0, 0, 0, 0))  # K = 4
    with torch.no_grad():
        probe = torch.stack([ref_logp(s["hidden"].double(), s["labels"], weight.double(), None, None, False) for s in seqs])
    S = len(seqs)
    ref_logps = (probe + torch.randn(S, generator=g, dtype=torch.float64)).float()
    winrate = torch.rand(S, generator=g)
    module = FusedLinearPreferenceLoss("sppo", eta=3.0, backend="torch")
    w = weight.clone().requires_grad_()
    if layout == "packed":
        b = packed(seqs, g)
        order = b["order"]
        loss, metrics = module(w, b["hidden"], b["labels"], cu_seqlens=b["cu_seqlens"], pair_index=b["pair_index"],
                               role=b["role"], ref_logps=ref_logps[order], winrate=winrate[order])
    else:
        hidden, labels = padded(seqs, 10, g)
        loss, metrics = module(w, hidden, labels, ref_logps=ref_logps, winrate=winrate)
    loss.backward()
    w64 = weight.double().requires_grad_()
    pi = torch.stack([ref_logp(s["hidden"].double(), s["labels"], w64, None, None, False) for s in seqs])
    expected = ((pi - ref_logps.double() - 3.0 * (winrate.double() - 0.5)) ** 2).mean()
    expected.backward()
    assert_close(loss, expected, "loss")
    assert_close(w.grad, w64.grad, "d weight")
    assert metrics["num_responses"].item() == S
    assert_close(metrics["logratio"], (pi - ref_logps.double()).mean(), "logratio")
    if layout == "packed":
        assert metrics["num_prompts"].item() == 3


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), beta=st.floats(0.05, 2.0))
def test_sppo_hard_labels_match_trl_through_the_module(seed, beta):
    # TRL sppo_hard: (a - 0.5 / beta)^2 + (b + 0.5 / beta)^2, a/b the chosen/rejected log-ratios.
    seqs, weight, _, g = make_problem(seed, 2, 8, 7, augmented=False, bias=False)
    b = liger(seqs, 8, g, augmented=False)
    ref_w, ref_l = torch.randn(2, generator=g) - 8, torch.randn(2, generator=g) - 8
    loss, metrics = FusedLinearPreferenceLoss("sppo", beta=beta, backend="torch", reduction="none")(
        weight, b["hidden"], b["labels"], ref_chosen_logps=ref_w, ref_rejected_logps=ref_l, winrate=torch.ones(2))
    with torch.no_grad():
        rows = sorted(seqs, key=lambda s: (s["role"], s["pair"]))
        pi = torch.stack([ref_logp(s["hidden"].double(), s["labels"], weight.double(), None, None, False) for s in rows])
    a, bb = pi[:2] - ref_w.double(), pi[2:] - ref_l.double()
    assert_close(loss, (a - 0.5 / beta) ** 2 + (bb + 0.5 / beta) ** 2, "sppo_hard")


def test_sppo_eta_defaults():
    assert FusedLinearPreferenceLoss("sppo").eta == pytest.approx(10.0)
    assert FusedLinearPreferenceLoss("sppo", beta=0.5).eta == pytest.approx(2.0)
    assert FusedLinearPreferenceLoss("sppo", eta=3.0).eta == 3.0


# ----------------------------------------------------------------------------- triton backend

def test_triton_backend_matches_reference():
    """Compiled on a GPU machine; under the interpreter elsewhere (tests/conftest.py sets it)."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton on CPU needs TRITON_INTERPRET=1 (the caller explicitly chose otherwise)")
    seqs, weight, bias, g = make_problem(17, 2, 16, 37, augmented=True, bias=True, max_len=5)
    run_case("sr_dpo", dict(beta=0.4, lam=0.5), seqs, weight, bias, g, layout="packed", softcap=None,
             average=False, reduction="mean", backend="triton", device="cuda" if torch.cuda.is_available() else "cpu")


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(loss="orpo"), "loss must be one of"),
        (dict(loss="dpo", lam=0.1), "lam not used"),
        (dict(loss="dpo", eta=1.0), "eta not used"),
        (dict(loss="inpo", eta=2.0), "needs tau"),
        (dict(loss="inpo", tau=0.1), "needs eta"),
        (dict(loss="inpo", eta=2.0, tau=2.0), "tau must satisfy"),
        (dict(loss="inpo", eta=2.0, tau=0.1, beta=0.1), "beta not used"),
        (dict(loss="sr_dpo"), "needs lam"),
        (dict(loss="sr_ipo", lam=float("nan")), "lam must be finite"),
        (dict(loss="ipo", beta=0.0), "beta must be > 0"),
        (dict(loss="sppo", beta=0.1, eta=10.0), "eta or beta"),
        (dict(loss="sppo", eta=-1.0), "eta must be > 0"),
        (dict(loss="sppo", tau=0.1), "tau not used"),
        (dict(loss="dpo", reduction="avg"), "reduction"),
        (dict(loss="dpo", backend="cuda"), "backend"),
        (dict(loss="dpo", softcap=0.0), "softcap"),
        (dict(loss="dpo", compute_nll_loss=True), "compute_nll_loss"),
        (dict(loss="dpo", use_ref_model=True), "use_ref_model.*ref_chosen_logps"),
        (dict(loss="dpo", gamma=0.5), "unknown argument.*gamma"),
    ],
)
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FusedLinearPreferenceLoss(**kwargs)


def _packed_batch(augmented=False, num_pairs=2):
    seqs, weight, _, g = make_problem(21, num_pairs, 8, 7, augmented=augmented, bias=False)
    b = packed(seqs, g)
    return weight, b


def _call_packed(module, weight, b, **overrides):
    args = dict(cu_seqlens=b["cu_seqlens"], role=b["role"], pair_index=b["pair_index"])
    args.update(overrides)
    return module(weight, args.pop("hidden", b["hidden"]), args.pop("labels", b["labels"]), **args)


REF2 = dict(ref_chosen_logps=torch.zeros(2), ref_rejected_logps=torch.zeros(2))


def test_missing_and_unused_precomputed_inputs_are_named():
    weight, b = _packed_batch()
    dpo = FusedLinearPreferenceLoss("dpo", backend="torch")
    with pytest.raises(ValueError, match="needs ref_rejected_logps"):
        _call_packed(dpo, weight, b, ref_chosen_logps=torch.zeros(2))
    with pytest.raises(ValueError, match="winrate is not used"):
        _call_packed(dpo, weight, b, winrate=torch.ones(2), **REF2)
    with pytest.raises(ValueError, match="ref_logps is not used"):
        _call_packed(dpo, weight, b, ref_logps=torch.zeros(4), **REF2)
    with pytest.raises(ValueError, match="needs winrate"):
        _call_packed(FusedLinearPreferenceLoss("sppo", backend="torch"), weight, b, **REF2)
    with pytest.raises(ValueError, match="needs prev_chosen_logps"):
        _call_packed(FusedLinearPreferenceLoss("inpo", eta=1.0, tau=0.1, backend="torch"), weight, b, **REF2)
    with pytest.raises(ValueError, match="needs target_prob"):
        _call_packed(FusedLinearPreferenceLoss("spce", backend="torch"), weight, b, **REF2)
    with pytest.raises(ValueError, match="ref_chosen_logps is not used.*all-responses"):
        _call_packed(FusedLinearPreferenceLoss("sppo", backend="torch"), weight, b, ref_logps=torch.zeros(4),
                     winrate=torch.ones(4), **REF2)
    with pytest.raises(ValueError, match="aug_hidden is only used"):
        dpo(weight, torch.zeros(2, 3, 8), torch.zeros(2, 3, dtype=torch.long), aug_hidden=torch.zeros(2, 3, 8), **REF1)


REF1 = dict(ref_chosen_logps=torch.zeros(1), ref_rejected_logps=torch.zeros(1))


def test_bad_precomputed_values_are_named():
    weight, b = _packed_batch()
    dpo = FusedLinearPreferenceLoss("dpo", backend="torch")
    with pytest.raises(ValueError, match=r"ref_chosen_logps must have shape \[2\]"):
        _call_packed(dpo, weight, b, ref_chosen_logps=torch.zeros(3), ref_rejected_logps=torch.zeros(2))
    with pytest.raises(ValueError, match="ref_rejected_logps must be a floating-point"):
        _call_packed(dpo, weight, b, ref_chosen_logps=torch.zeros(2), ref_rejected_logps=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="ref_rejected_logps is on meta"):
        _call_packed(dpo, weight, b, ref_chosen_logps=torch.zeros(2), ref_rejected_logps=torch.zeros(2, device="meta"))
    sppo = FusedLinearPreferenceLoss("sppo", backend="torch")
    for bad in (1.5, -0.5, float("nan")):
        with pytest.raises(ValueError, match=r"winrate must hold probabilities in \[0, 1\]"):
            _call_packed(sppo, weight, b, winrate=torch.tensor([0.5, bad]), **REF2)
    spce = FusedLinearPreferenceLoss("spce", backend="torch")
    with pytest.raises(ValueError, match="target_prob must hold probabilities"):
        _call_packed(spce, weight, b, target_prob=torch.tensor([2.0, 0.5]), **REF2)
    with pytest.raises(ValueError, match=r"winrate must have shape \[4\]"):
        _call_packed(sppo, weight, b, ref_logps=torch.zeros(4), winrate=torch.ones(2), role=None)


def test_bad_packed_layout_is_named():
    weight, b = _packed_batch()
    dpo = FusedLinearPreferenceLoss("dpo", backend="torch")
    role, pair = b["role"], b["pair_index"]
    with pytest.raises(ValueError, match="role values must be 0..3"):
        _call_packed(dpo, weight, b, role=torch.where(role == 1, 5, role), **REF2)
    with pytest.raises(ValueError, match="role has augmented sequences"):
        _call_packed(dpo, weight, b, role=torch.where(role == 1, 3, role), **REF2)
    with pytest.raises(ValueError, match="role must be an integer tensor"):
        _call_packed(dpo, weight, b, role=role.float(), **REF2)
    with pytest.raises(ValueError, match=r"role must be \[S\] = \[4\]"):
        _call_packed(dpo, weight, b, role=role[:3], **REF2)
    with pytest.raises(ValueError, match="needs pair_index"):
        _call_packed(dpo, weight, b, pair_index=None, **REF2)
    with pytest.raises(ValueError, match="pair_index must be in 0..P-1"):
        _call_packed(dpo, weight, b, pair_index=torch.where(pair == 1, 7, pair), **REF2)
    # Both rejected sequences claim pair 0: pair 0 has two, pair 1 none.
    with pytest.raises(ValueError, match="pair 0 has 2 rejected sequences"):
        _call_packed(dpo, weight, b, pair_index=torch.where(role == 1, 0, pair), **REF2)
    with pytest.raises(ValueError, match="no chosen sequence"):
        _call_packed(dpo, weight, b, role=torch.ones_like(role), **REF2)
    with pytest.raises(ValueError, match="cu_seqlens must be non-decreasing"):
        _call_packed(dpo, weight, b, cu_seqlens=b["cu_seqlens"].flip(0), **REF2)
    with pytest.raises(ValueError, match="cu_seqlens must be a 1-D int32"):
        _call_packed(dpo, weight, b, cu_seqlens=b["cu_seqlens"].float(), **REF2)
    with pytest.raises(ValueError, match=r"labels must be \[N\]"):
        _call_packed(dpo, weight, b, labels=b["labels"][:-1], **REF2)
    with pytest.raises(ValueError, match="packed hidden must be"):
        _call_packed(dpo, weight, b, hidden=b["hidden"][None].expand(2, -1, -1), **REF2)
    with pytest.raises(ValueError, match="aug_hidden is for the Liger layout"):
        _call_packed(FusedLinearPreferenceLoss("sr_dpo", lam=0.1, backend="torch"), weight, b,
                     aug_hidden=b["hidden"], aug_ref_chosen_logps=torch.zeros(2), aug_ref_rejected_logps=torch.zeros(2),
                     **REF2)
    with pytest.raises(ValueError, match="role must be None or all 0"):
        _call_packed(FusedLinearPreferenceLoss("sppo", backend="torch"), weight, b, ref_logps=torch.zeros(4),
                     winrate=torch.ones(4))


def test_sr_packed_batch_needs_every_augmented_role():
    weight, b = _packed_batch(augmented=True)
    role = b["role"]
    module = FusedLinearPreferenceLoss("sr_ipo", lam=0.5, backend="torch")
    aug = dict(aug_ref_chosen_logps=torch.zeros(2), aug_ref_rejected_logps=torch.zeros(2))
    with pytest.raises(ValueError, match=r"pair 0 has 2 augmented chosen sequences \(role 2\)"):
        _call_packed(module, weight, b, role=torch.where(role == 3, 2, role), **aug, **REF2)
    # Pair 1's augmented rejected sequence moved to pair 0.
    pair = torch.where(role == 3, 0, b["pair_index"])
    with pytest.raises(ValueError, match=r"pair 0 has 2 augmented rejected sequences \(role 3\)"):
        _call_packed(module, weight, b, pair_index=pair, **aug, **REF2)
    with pytest.raises(ValueError, match="needs aug_ref_rejected_logps"):
        _call_packed(module, weight, b, aug_ref_chosen_logps=torch.zeros(2), **REF2)


def test_bad_liger_layout_is_named():
    weight = torch.randn(7, 8)
    dpo = FusedLinearPreferenceLoss("dpo", backend="torch")
    labels = torch.zeros(3, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="even, non-zero number of rows"):
        dpo(weight, torch.zeros(3, 4, 8), labels, **REF1)
    with pytest.raises(ValueError, match=r"hidden must be \[2B, T, H\]"):
        dpo(weight, torch.zeros(8, 8), labels[0], **REF1)
    with pytest.raises(ValueError, match="role is only used with the packed layout"):
        dpo(weight, torch.zeros(2, 4, 8), labels[:2], role=torch.tensor([0, 1]), **REF1)
    sr = FusedLinearPreferenceLoss("sr_dpo", lam=0.5, backend="torch")
    aug = dict(aug_ref_chosen_logps=torch.zeros(1), aug_ref_rejected_logps=torch.zeros(1))
    with pytest.raises(ValueError, match="needs aug_hidden"):
        sr(weight, torch.zeros(2, 4, 8), labels[:2], **aug, **REF1)
    with pytest.raises(ValueError, match=r"aug_hidden must be \[2B, T', H\]"):
        sr(weight, torch.zeros(2, 4, 8), labels[:2], aug_hidden=torch.zeros(4, 4, 8), aug_labels=labels[:1].repeat(4, 1),
           **aug, **REF1)
    with pytest.raises(ValueError, match=r"ref_chosen_logps must have shape \[1\]"):
        dpo(weight, torch.zeros(2, 4, 8), labels[:2], ref_chosen_logps=torch.zeros(2), ref_rejected_logps=torch.zeros(1))


# ----------------------------------------------------------------------------- Liger's call

def liger_reference(lin_weight, _input, target, bias, ref_input, ref_weight, ref_bias, *, beta=0.1, loss_type="sigmoid",
                    average_log_prob=False, compute_nll_loss=False, alpha=1.0, use_ref_model=True):
    """LigerFusedLinearDPOLoss (liger-kernel 0.8.5, chunked_loss/fused_linear_preference.py and dpo_loss.py) written
    out in float64 with the logits materialized: (loss, its 7-tuple)."""
    B = target.shape[0] // 2

    def logps(hidden, weight, b):
        logits = hidden.double() @ weight.double().T + (0 if b is None else b.double())
        mask = target != IGNORE
        per_token = torch.log_softmax(logits, -1).gather(-1, torch.where(mask, target, 0)[..., None])[..., 0]
        summed = (per_token * mask).sum(-1)
        return (summed / mask.sum(-1) if average_log_prob else summed), logits, per_token, mask

    policy, logits, per_token, mask = logps(_input, lin_weight, bias)
    with torch.no_grad():
        ref = logps(ref_input, ref_weight, ref_bias)[0] if use_ref_model else torch.zeros_like(policy)
    a, b = policy[:B] - ref[:B], policy[B:] - ref[B:]
    if loss_type == "sigmoid":
        loss = -F.logsigmoid(beta * (a - b)).sum() / B
    else:  # sppo_hard
        loss = ((a - 0.5 / beta) ** 2 + (b + 0.5 / beta) ** 2).sum() / B
    nll = -(per_token[:B] * mask[:B]).sum() / mask[:B].sum() if compute_nll_loss else torch.zeros((), dtype=torch.float64)
    loss = loss + alpha * nll
    mean_logits = logits[:B].sum() / logits[:B].numel(), logits[B:].sum() / logits[B:].numel()
    return loss, (policy[:B], policy[B:], *mean_logits, nll, beta * a, beta * b)


def liger_problem(seed, B=3, T=6, H=8, V=13, bias=False):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, V, (2 * B, T), generator=g)
    for row in range(2 * B):  # a prompt, a response, padding
        start = int(torch.randint(0, T - 1, (), generator=g))
        end = int(torch.randint(start + 1, T + 1, (), generator=g))
        target[row, :start] = IGNORE
        target[row, end:] = IGNORE
    make = lambda *shape: torch.randn(*shape, generator=g) * 0.5  # noqa: E731
    return dict(lin_weight=make(V, H), _input=make(2 * B, T, H), target=target, bias=make(V) if bias else None,
                ref_input=make(2 * B, T, H), ref_weight=make(V, H), ref_bias=make(V) if bias else None)


LIGER_CASES = [dict(), dict(average_log_prob=True), dict(compute_nll_loss=True, alpha=0.5), dict(loss_type="sppo_hard"),
               dict(use_ref_model=False), dict(beta=0.7, average_log_prob=True, compute_nll_loss=True)]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("options", LIGER_CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults")
def test_liger_positional_call_and_outputs(options, bias):
    """FusedLinearDPOLoss(**Liger's arguments)(lin_weight, _input, target, bias, ref_input, ref_weight, ref_bias) gives
    Liger's loss, gradients and 7-tuple; FusedLinearPreferenceLoss takes the same positional call."""
    problem = liger_problem(3, bias=bias)
    expected_loss, expected_aux = liger_reference(**problem, **options)
    leaves = {k: problem[k].clone().requires_grad_() for k in ("lin_weight", "_input", "bias") if problem[k] is not None}
    args = [leaves.get(k, problem[k]) for k in ("lin_weight", "_input", "target", "bias", "ref_input", "ref_weight", "ref_bias")]
    if options.get("use_ref_model") is False:
        args[4:] = [None, None, None]
    from nash_fast import FusedLinearDPOLoss

    loss, aux = FusedLinearDPOLoss(**options, backend="torch")(*args)
    assert_close(loss, expected_loss, "loss")
    assert isinstance(aux, tuple) and len(aux) == 7
    chosen_logps, rejected_logps, chosen_logits_mean, rejected_logits_mean, nll_loss, *rewards = aux  # as TRL unpacks
    for what, ours, ref in zip(fused_module._LIGER_AUX, aux, expected_aux):
        assert_close(ours, ref, what)
        assert torch.equal(getattr(aux, what), ours) and torch.equal(aux.metrics[what], ours)
    loss.backward()
    leaves64 = {}
    for name, leaf in leaves.items():  # float64 gradients of the same reference
        leaves64[name] = problem[name].double().requires_grad_()
    loss64, _ = liger_reference(**{**problem, **leaves64}, **options)
    loss64.backward()
    for name, leaf in leaves.items():
        assert_close(leaf.grad, leaves64[name].grad, f"d {name}")
    if "loss_type" not in options and "use_ref_model" not in options and "compute_nll_loss" not in options:
        plain = FusedLinearPreferenceLoss("dpo", beta=options.get("beta", 0.1), backend="torch",
                                          average_log_prob=options.get("average_log_prob", False))
        loss2, metrics = plain(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
        assert_close(loss2, expected_loss, "FusedLinearPreferenceLoss positional call")
        for what, ref in zip(fused_module._LIGER_AUX, expected_aux):
            assert_close(metrics[what], ref, what)


def test_liger_reference_pass_is_forward_only_through_the_fused_op(monkeypatch):
    calls = []
    real = fused_module.sequence_logprobs

    def spy(hidden, weight, labels, **kwargs):
        calls.append((hidden, weight, torch.is_grad_enabled()))
        return real(hidden, weight, labels, **kwargs)

    monkeypatch.setattr(fused_module, "sequence_logprobs", spy)
    p = liger_problem(5)
    ref_input = p["ref_input"].requires_grad_()
    ref_weight = p["ref_weight"].requires_grad_()
    loss, _ = FusedLinearPreferenceLoss("dpo", backend="torch")(p["lin_weight"].requires_grad_(), p["_input"],
                                                                p["target"], None, ref_input, ref_weight)
    assert [(h is ref_input, w is ref_weight, grad) for h, w, grad in calls] == [(True, True, False), (False, False, True)]
    loss.backward()
    assert ref_input.grad is None and ref_weight.grad is None


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="liger-kernel not installed (bench extra)")
@pytest.mark.parametrize("options", LIGER_CASES[:5], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults")
def test_matches_liger_kernel_itself(options):
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    from nash_fast import FusedLinearDPOLoss

    problem = liger_problem(11, bias=True)
    args = [problem[k] for k in ("lin_weight", "_input", "target", "bias", "ref_input", "ref_weight", "ref_bias")]
    if options.get("use_ref_model") is False:
        args[4:] = [None, None, None]
    results = []
    for cls in (LigerFusedLinearDPOLoss, FusedLinearDPOLoss):
        leaves = [a.clone().requires_grad_() if i in (0, 1) else a for i, a in enumerate(args)]
        loss, aux = cls(**options, compiled=False)(*leaves)
        loss.backward()
        results.append((loss.detach(), [a.detach() for a in aux], leaves[0].grad, leaves[1].grad))
    (l1, a1, w1, h1), (l2, a2, w2, h2) = results
    torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-6)
    for x, y in zip(a2, a1, strict=True):
        torch.testing.assert_close(x.reshape(y.shape), y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w2, w1, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(h2, h1, rtol=1e-4, atol=1e-6)


TRL_OPTIONS = {"exo_pair": dict(label_smoothing=1e-3), "robust": dict(label_smoothing=0.1), "aot": dict(label_smoothing=0.2),
               "aot_unpaired": dict(label_smoothing=0.2), "discopop": dict(discopop_tau=0.1)}
TRL_CALLS = ([dict(loss_type=t, **TRL_OPTIONS.get(t, {})) for t in TRL_TYPES]
             + [dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]),  # MPO's mix
                dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], average_log_prob=True),
                dict(loss_type=["ipo", "robust"], label_smoothing=0.1, beta=0.5)])
LIGER_TYPES = ["sigmoid", "sppo_hard", "bco_pair", "exo_pair", "discopop", "nca_pair", "apo_down", "apo_zero", "robust",
               "hinge"]  # LigerFusedLinearDPOLoss's (liger-kernel 0.8.5)


def _options_id(options):
    return ",".join(f"{k}={v}" for k, v in options.items())


def _trl_liger_problem(seed):
    p = liger_problem(seed, bias=True)
    p["target"][:, -1] = 3  # every row scores at least one token (TRL's and Liger's means are over them)
    return p


@pytest.mark.parametrize("options", TRL_CALLS, ids=_options_id)
def test_trl_loss_types_through_ligers_call(options):
    """FusedLinearDPOLoss(loss_type=..., Liger's other arguments)(lin_weight, _input, target, bias, ref_input,
    ref_weight, ref_bias): loss and gradients against TRL 1.16's formulas in float64 on float64 logits, and the
    7-tuple (rewards beta (log pi - log pi_ref) as TRL logs them)."""
    from nash_fast import FusedLinearDPOLoss

    problem = _trl_liger_problem(7)
    B = problem["target"].shape[0] // 2
    average = options.get("average_log_prob", False)
    types = options["loss_type"] if isinstance(options["loss_type"], list) else [options["loss_type"]]
    hyper = {k: v for k, v in options.items() if k in ("beta", "label_smoothing", "discopop_tau", "loss_weights")}
    leaves = {k: problem[k].clone().requires_grad_() for k in ("lin_weight", "_input", "bias")}
    args = [leaves.get(k, problem[k]) for k in ("lin_weight", "_input", "target", "bias", "ref_input", "ref_weight", "ref_bias")]
    loss, aux = FusedLinearDPOLoss(**options, backend="torch")(*args)
    loss.backward()

    leaves64 = {k: problem[k].double().requires_grad_() for k in leaves}
    mask = problem["target"] != IGNORE
    counts = mask.sum(-1).double()

    def logps(hidden, weight, bias):
        logits = hidden.double() @ weight.double().T + bias.double()
        per_token = torch.log_softmax(logits, -1).gather(-1, torch.where(mask, problem["target"], 0)[..., None])[..., 0]
        summed = (per_token * mask).sum(-1)
        return summed / counts if average else summed

    policy = logps(leaves64["_input"], leaves64["lin_weight"], leaves64["bias"])
    with torch.no_grad():
        ref = logps(problem["ref_input"], problem["ref_weight"], problem["ref_bias"])
    expected = trl_per_pair(types, hyper, policy[:B], policy[B:], ref[:B], ref[B:], counts[:B], counts[B:], average).mean()
    expected.backward()
    assert_close(loss, expected, "loss")
    for name in leaves:
        assert_close(leaves[name].grad, leaves64[name].grad, f"d {name}")
    beta = options.get("beta", 0.1)
    assert_close(aux.chosen_rewards, beta * (policy[:B] - ref[:B]), "chosen_rewards")
    assert_close(aux.rejected_rewards, beta * (policy[B:] - ref[B:]), "rejected_rewards")
    assert_close(aux.chosen_logps, policy[:B], "chosen_logps")


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="liger-kernel not installed (bench extra)")
@pytest.mark.parametrize("loss_type", LIGER_TYPES)
@pytest.mark.parametrize("average_log_prob", [False, True])
def test_every_liger_loss_type_matches_liger_kernel_itself(loss_type, average_log_prob):
    """The one-import swap for each of LigerFusedLinearDPOLoss's ten loss types: the same constructor arguments and
    positional call give Liger's loss, 7-tuple and gradients (float32 both; tolerances as in
    test_matches_liger_kernel_itself)."""
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    from nash_fast import FusedLinearDPOLoss

    options = dict(loss_type=loss_type, average_log_prob=average_log_prob, **TRL_OPTIONS.get(loss_type, {}))
    problem = _trl_liger_problem(13)
    args = [problem[k] for k in ("lin_weight", "_input", "target", "bias", "ref_input", "ref_weight", "ref_bias")]
    results = []
    for cls in (LigerFusedLinearDPOLoss, FusedLinearDPOLoss):
        leaves = [a.clone().requires_grad_() if i in (0, 1, 3) else a for i, a in enumerate(args)]
        loss, aux = cls(**options, compiled=False)(*leaves)
        loss.backward()
        results.append((loss.detach(), [a.detach() for a in aux], leaves[0].grad, leaves[1].grad, leaves[3].grad))
    (l1, a1, w1, h1, b1), (l2, a2, w2, h2, b2) = results
    torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-6)
    for x, y in zip(a2, a1, strict=True):
        torch.testing.assert_close(x.reshape(y.shape), y, rtol=1e-5, atol=1e-5)
    for ours, theirs in ((w2, w1), (h2, h1), (b2, b1)):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


def _trl_compute_loss(loss_types, loss_weights, beta, label_smoothing, discopop_tau, per_token_logps, completion_mask,
                      ref_chosen_logps, ref_rejected_logps):
    """TRL's own DPOTrainer._compute_loss (the installed trl), run on given per-token log-probs: the trainer object
    and model are stand-ins holding what that method reads (precompute_ref_log_probs=True, the default
    f_divergence_type, no ld_alpha, no WPO weighting, no MoE aux loss)."""
    import collections
    import types as pytypes

    from trl.trainer.dpo_trainer import DPOTrainer

    class Accelerator:
        device = per_token_logps.device
        gather_for_metrics = gather = staticmethod(lambda t: t)

    rows, width = per_token_logps.shape
    outputs = pytypes.SimpleNamespace(
        log_probs=per_token_logps, entropy=torch.zeros(rows, width), mean_logits=torch.zeros(rows, width),
        is_top1=torch.zeros(rows, width, dtype=torch.bool), aux_loss=None)

    def model(**kwargs):
        return outputs

    model.training = True
    trainer = pytypes.SimpleNamespace(
        model=model, accelerator=Accelerator(), aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5, loss_types=loss_types, loss_weights=loss_weights,
        beta=beta, label_smoothing=label_smoothing, args=pytypes.SimpleNamespace(discopop_tau=discopop_tau),
        use_weighting=False, _metrics={"train": collections.defaultdict(list), "eval": collections.defaultdict(list)},
        _total_train_tokens=0, _tp_size=1)
    inputs = dict(input_ids=torch.zeros(rows, width + 1, dtype=torch.long), attention_mask=torch.ones(rows, width + 1),
                  completion_mask=completion_mask, ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    return DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)


def _trl_available():
    try:
        from trl.trainer.dpo_trainer import DPOTrainer  # noqa: F401
        return True
    except Exception:  # not installed, or an incompatible transformers
        return False


@pytest.mark.skipif(not _trl_available(), reason="trl not installed")
@pytest.mark.parametrize("options", TRL_CALLS[:-2] + [
    dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]),
    dict(loss_type=["ipo", "robust", "discopop", "aot"], loss_weights=[0.3, 1.5, 0.7, 1.0], label_smoothing=0.1)],
    ids=_options_id)
def test_matches_trl_itself(options):
    """TRL's DPOTrainer loss (its own _compute_loss, loss_type as a name or a list with loss_weights) and
    FusedLinearDPOLoss on the same model outputs: the same loss and the same gradient of the hidden states. TRL gets
    per-token log-probs of float64 logits (as its fused LM head returns them), the reference precomputed."""
    from nash_fast import FusedLinearDPOLoss

    problem = _trl_liger_problem(21)
    target, B = problem["target"], problem["target"].shape[0] // 2
    types = options["loss_type"] if isinstance(options["loss_type"], list) else [options["loss_type"]]
    weights = options.get("loss_weights") or [1.0] * len(types)
    mask = target != IGNORE
    # TRL's layout: completion_mask over input_ids [2B, T + 1]; the token at t + 1 is target[:, t] (position 0 is
    # the prompt), so completion_mask[:, 1:] is our scored mask and the token counts agree.
    completion_mask = torch.cat([torch.zeros(2 * B, 1, dtype=torch.long), mask.long()], 1)
    with torch.no_grad():
        ref_logits = problem["ref_input"].double() @ problem["ref_weight"].double().T + problem["ref_bias"].double()
        ref_tok = torch.log_softmax(ref_logits, -1).gather(-1, torch.where(mask, target, 0)[..., None])[..., 0] * mask
        ref = ref_tok.sum(-1)
    h64 = problem["_input"].double().requires_grad_()
    logits = h64 @ problem["lin_weight"].double().T + problem["bias"].double()
    per_token = torch.log_softmax(logits, -1).gather(-1, torch.where(mask, target, 0)[..., None])[..., 0] * mask
    trl_loss = _trl_compute_loss(types, weights, options.get("beta", 0.1), options.get("label_smoothing", 0.0),
                                 options.get("discopop_tau", 0.05), per_token, completion_mask, ref[:B], ref[B:])
    trl_loss.backward()

    h = problem["_input"].clone().requires_grad_()
    ours, _ = FusedLinearDPOLoss(**options, backend="torch")(problem["lin_weight"], h, target, problem["bias"],
                                                             ref_chosen_logps=ref[:B].float(),
                                                             ref_rejected_logps=ref[B:].float())
    ours.backward()
    assert_close(ours, trl_loss, "loss")
    assert_close(h.grad, h64.grad, "d hidden")


def test_bco_running_mean_is_trls_state_and_round_trips():
    """bco_running_mean=True: TRL 0.x's bco_pair, delta = the running mean of the batches' mean rewards, updated with
    each batch before use (trl 0.19 DPOTrainer.dpo_loss); the state is loss_state() (plain floats) and a module loaded
    with it continues bitwise like the original."""
    import json

    from nash_fast import FusedLinearDPOLoss
    from nash_fast.losses import RunningMoments

    module = FusedLinearDPOLoss(loss_type="bco_pair", beta=0.3, bco_running_mean=True, backend="torch")
    assert module.loss_state() == {"bco_running_moments": {"mean": 0.0, "std": 1.0, "var": 1.0, "count": 1e-24}}
    running, resumed = RunningMoments(), None
    for step in range(4):
        problem = _trl_liger_problem(30 + step)
        args = [problem[k] for k in ("lin_weight", "_input", "target", "bias", "ref_input", "ref_weight", "ref_bias")]
        if step == 2:  # a "resumed" module from the JSON of the state after two batches
            resumed = FusedLinearDPOLoss(loss_type="bco_pair", beta=0.3, bco_running_mean=True, backend="torch")
            resumed.load_loss_state(json.loads(json.dumps(module.loss_state())))
        loss, aux = module(*args)
        if resumed is not None:
            again, _ = resumed(*args)
            assert torch.equal(again, loss) and resumed.loss_state() == module.loss_state()
        running.update(torch.cat([aux.chosen_rewards, aux.rejected_rewards]).mean())  # TRL 0.x: rewards.mean()
        delta = running.mean
        expected = (-F.logsigmoid(aux.chosen_rewards.double() - delta) - F.logsigmoid(-(aux.rejected_rewards.double() - delta))).mean()
        assert_close(loss, expected, f"loss at step {step}")
        assert module.loss_state()["bco_running_moments"] == running.state_dict()
    assert running.count == pytest.approx(4.0) and running.mean != 0.0
    with pytest.raises(ValueError, match="loss state must hold"):
        module.load_loss_state({})
    with pytest.raises(ValueError, match="bco_running_mean is only used by the bco_pair loss"):
        FusedLinearPreferenceLoss("hinge", bco_running_mean=True)
    assert FusedLinearPreferenceLoss("hinge").loss_state() == {} and FusedLinearDPOLoss(loss_type="bco_pair").loss_state() == {}


def test_trl_options_that_are_refused_say_why():
    from nash_fast import FusedLinearDPOLoss

    with pytest.raises(ValueError, match=r"label_smoothing not used by loss=\['hinge'\]"):
        FusedLinearPreferenceLoss("hinge", label_smoothing=0.1)
    with pytest.raises(ValueError, match=r"discopop_tau not used"):
        FusedLinearPreferenceLoss(["sigmoid", "sft"], discopop_tau=0.1)
    with pytest.raises(ValueError, match=r"eta not used"):
        FusedLinearPreferenceLoss("apo_zero", eta=1.0)
    with pytest.raises(ValueError, match=r"loss_weights must be a list of 2 numbers"):
        FusedLinearPreferenceLoss(["sigmoid", "sft"], loss_weights=[1.0])
    with pytest.raises(ValueError, match=r"loss_weights must be finite"):
        FusedLinearPreferenceLoss(["sigmoid", "sft"], loss_weights=[1.0, math.nan])
    with pytest.raises(ValueError, match=r"lists a loss twice"):
        FusedLinearPreferenceLoss(["sigmoid", "dpo"])
    with pytest.raises(ValueError, match=r"exo_pair loss needs label_smoothing > 0"):
        FusedLinearPreferenceLoss("exo_pair")
    with pytest.raises(ValueError, match=r"loss_type exo_pair needs label_smoothing > 0"):
        FusedLinearDPOLoss(loss_type="exo_pair")  # TRL and Liger refuse it too
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 0.5\) for the robust loss"):
        FusedLinearDPOLoss(loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match=r"label_smoothing=0.1 is not read by loss_type='hinge'"):
        FusedLinearDPOLoss(loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(ValueError, match=r"loss_weights is only used by TRL's loss types"):
        FusedLinearPreferenceLoss("sppo", loss_weights=[1.0])
    assert FusedLinearDPOLoss(loss_type="hinge", discopop_tau=0.3).loss == "hinge"  # Liger ignores it there too
    assert FusedLinearPreferenceLoss("sigmoid").loss == "dpo" and FusedLinearPreferenceLoss("aot_pair").loss == "aot_unpaired"
    assert FusedLinearPreferenceLoss("sigmoid,sft", loss_weights=[1.0, 0.1]).loss_types == ("sigmoid", "sft")


@pytest.mark.parametrize("name", PAIR_LOSSES)
def test_reference_hidden_states_equal_precomputed_reference(name):
    """Packed layout (Sr-*: augmented roles too), Liger layout, and SPPO's all-responses form: the reference from
    ref_input/ref_weight gives the loss and gradients of its log-probs passed precomputed (bitwise: the same
    backend computes both)."""
    hyper = dict(eta=4.0, tau=1.0) if name == "inpo" else dict(eta=4.0) if name == "sppo" else dict(beta=0.5)
    if name in AUGMENTED:
        hyper["lam"] = 0.4
    seqs, weight, bias, g = make_problem(9, 3, 16, 31, augmented=name in AUGMENTED, bias=True)
    module = FusedLinearPreferenceLoss(name, **hyper, backend="torch")
    ref_weight, ref_bias = torch.randn_like(weight), torch.randn_like(bias)
    extra = dict(winrate=torch.rand(3, generator=g)) if name == "sppo" else dict(target_prob=torch.rand(3, generator=g)) \
        if name == "spce" else dict(prev_chosen_logps=torch.randn(3, generator=g), prev_rejected_logps=torch.randn(3, generator=g)) \
        if name == "inpo" else {}
    b = packed(seqs, g)
    ref_hidden = torch.randn(b["hidden"].shape, generator=g)
    ref = fused_module.sequence_logprobs(ref_hidden, ref_weight, b["labels"], cu_seqlens=b["cu_seqlens"], bias=ref_bias,
                                         backend="torch")
    per_pair = {r: torch.empty(3) for r in range(4)}
    for s, (role, pair) in enumerate(zip(b["role"].tolist(), b["pair_index"].tolist())):
        per_pair[role][pair] = ref[s]
    precomputed = dict(ref_chosen_logps=per_pair[0], ref_rejected_logps=per_pair[1])
    if name in AUGMENTED:
        precomputed.update(aug_ref_chosen_logps=per_pair[2], aug_ref_rejected_logps=per_pair[3])
    layout = dict(cu_seqlens=b["cu_seqlens"], role=b["role"], pair_index=b["pair_index"])
    results = []
    for reference in (dict(ref_input=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias), precomputed):
        w = weight.clone().requires_grad_()
        loss, metrics = module(w, b["hidden"], b["labels"], bias, **reference, **layout, **extra)
        loss.backward()
        results.append((loss, w.grad, metrics["chosen_rewards"]))
    for x, y in zip(*results):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    if name == "sppo":  # all responses: winrate has one entry per sequence
        winrate = torch.rand(len(seqs), generator=g)
        ours, _ = module(weight, b["hidden"], b["labels"], None, ref_hidden, ref_weight, ref_bias,
                         cu_seqlens=b["cu_seqlens"], winrate=winrate)
        theirs, _ = module(weight, b["hidden"], b["labels"], cu_seqlens=b["cu_seqlens"], winrate=winrate,
                           ref_logps=fused_module.sequence_logprobs(ref_hidden, ref_weight, b["labels"],
                                                                    cu_seqlens=b["cu_seqlens"], bias=ref_bias,
                                                                    backend="torch"))
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    if name in AUGMENTED:  # Liger layout: the augmented rows' reference from aug_ref_input
        lb = liger(seqs, 16, g, True)
        aug_ref = torch.randn(lb["aug_hidden"].shape, generator=g)
        row_ref = fused_module.sequence_logprobs(lb["hidden"], ref_weight, lb["labels"], bias=ref_bias, backend="torch")
        aug_row_ref = fused_module.sequence_logprobs(aug_ref, ref_weight, lb["aug_labels"], bias=ref_bias,
                                                     backend="torch")
        ours, _ = module(weight, lb["hidden"], lb["labels"], bias, lb["hidden"], ref_weight, ref_bias,  # ref = policy
                         aug_hidden=lb["aug_hidden"], aug_labels=lb["aug_labels"], aug_ref_input=aug_ref)
        theirs, _ = module(weight, lb["hidden"], lb["labels"], bias, aug_hidden=lb["aug_hidden"], aug_labels=lb["aug_labels"],
                           ref_chosen_logps=row_ref[:3], ref_rejected_logps=row_ref[3:],
                           aug_ref_chosen_logps=aug_row_ref[:3], aug_ref_rejected_logps=aug_row_ref[3:])
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
        with pytest.raises(ValueError, match="needs aug_ref_input"):
            module(weight, lb["hidden"], lb["labels"], bias, lb["hidden"], ref_weight, aug_hidden=lb["aug_hidden"],
                   aug_labels=lb["aug_labels"])


def test_mean_logits_in_the_packed_layout():
    seqs, weight, bias, g = make_problem(4, 2, 8, 11, augmented=False, bias=True)
    b = packed(seqs, g)
    _, metrics = FusedLinearPreferenceLoss("dpo", backend="torch")(weight, b["hidden"], b["labels"], bias, **REF2,
                                                                  cu_seqlens=b["cu_seqlens"], role=b["role"],
                                                                  pair_index=b["pair_index"])
    logits = (b["hidden"].double() @ weight.double().T + bias.double())
    cu = b["cu_seqlens"].tolist()
    for role, key in ((0, "mean_chosen_logits"), (1, "mean_rejected_logits")):
        rows = torch.cat([logits[cu[s]:cu[s + 1]] for s in range(len(cu) - 1) if b["role"][s] == role])
        assert_close(metrics[key], rows.mean(), key)


def test_liger_arguments_that_are_refused_say_why():
    from nash_fast import FusedLinearDPOLoss

    p = liger_problem(1)
    call = [p[k] for k in ("lin_weight", "_input", "target", "bias", "ref_input", "ref_weight", "ref_bias")]
    supported = ("sigmoid, hinge, ipo, exo_pair, nca_pair, robust, bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, "
                 "apo_down, discopop, sft, sigmoid_norm (and aot_pair = aot_unpaired)")
    for bad in ("hinge_v2", ["sigmoid", "kto"]):  # one line listing every supported loss type
        with pytest.raises(ValueError, match=r"^loss_type '(hinge_v2|kto)' is not supported; supported: " + re.escape(supported) + "$"):
            FusedLinearDPOLoss(loss_type=bad)
    with pytest.raises(ValueError, match="label_smoothing"):
        FusedLinearDPOLoss(label_smoothing=0.1)
    with pytest.raises(ValueError, match="compute_nll_loss.*reduction='mean'"):
        FusedLinearDPOLoss(compute_nll_loss=True, reduction="none")
    with pytest.raises(ValueError, match="use_ref_model=False.*ref_input"):
        FusedLinearDPOLoss(use_ref_model=False)(*call)
    dpo = FusedLinearPreferenceLoss("dpo", backend="torch")
    with pytest.raises(ValueError, match="ref_input needs ref_weight"):
        dpo(*call[:5])
    with pytest.raises(ValueError, match="ref_weight given without ref_input"):
        dpo(*call[:4], None, p["ref_weight"], **REF_B3)
    with pytest.raises(ValueError, match="reference is given twice"):
        dpo(*call, **REF_B3)
    with pytest.raises(ValueError, match=r"ref_input must hold .* shape \(6, 6\)"):
        dpo(*call[:4], p["ref_input"][:, :5], p["ref_weight"])
    with pytest.raises(ValueError, match=r"needs ref_chosen_logps \(or ref_input and ref_weight\)"):
        dpo(*call[:4])
    assert FusedLinearDPOLoss(compiled=False, chunk_size=4).loss == "dpo"  # accepted: no effect on the result
    # LigerFusedLinearDPOLoss averages no log-probs by default (liger-kernel 0.8.5); neither do we
    assert FusedLinearDPOLoss().average_log_prob is False and FusedLinearPreferenceLoss("dpo").average_log_prob is False


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="liger-kernel not installed (bench extra)")
def test_constructor_and_call_signatures_are_ligers():
    import inspect

    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    from nash_fast import FusedLinearDPOLoss

    def parameters(function):
        return [(p.name, p.default) for p in inspect.signature(function).parameters.values()
                if p.kind is not p.VAR_KEYWORD and p.name != "self"]

    assert parameters(FusedLinearDPOLoss.__init__) == parameters(LigerFusedLinearDPOLoss.__init__)
    assert parameters(FusedLinearDPOLoss.forward) == parameters(LigerFusedLinearDPOLoss.forward)


REF_B3 = dict(ref_chosen_logps=torch.zeros(3), ref_rejected_logps=torch.zeros(3))


# ----------------------------------------------------------------------------- torch.compile

def _compile_backends():
    from nash_fast.logprobs import native_status

    names = ["torch"] + (["native"] if native_status()[0] else [])
    if importlib.util.find_spec("triton") is not None and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        names.append("triton")
    return names


@pytest.mark.parametrize("backend", _compile_backends())
@pytest.mark.parametrize("name,layout", [("sppo", "liger"), ("inpo", "packed"), ("sr_ipo", "liger"), ("sr_dpo", "packed"),
                                         ("spce", "packed"), ("sppo", "all_responses"), ("dpo", "liger_ref_input"),
                                         # TRL's loss types, every stateless one in one of two weighted-equal lists
                                         ("hinge,ipo,sft,aot_unpaired,discopop,sigmoid_norm", "packed"),
                                         ("apo_zero,nca_pair,robust,bco_pair,sppo_hard,apo_down,aot", "liger")])
def test_compile_fullgraph_equals_eager(name, layout, backend):
    """torch.compile(fullgraph=True) traces the module with no graph break on every backend: the value checks
    (probabilities, cu_seqlens, role / pair_index, whose pair count is known only at run time) are custom
    operators; loss, gradients and every metric equal eager's. aot_eager keeps CI fast (test_logprobs
    compiles the op with Inductor)."""
    torch._dynamo.reset()
    dev = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    hyper = dict(eta=4.0, tau=1.0) if name == "inpo" else dict(eta=4.0) if name == "sppo" else dict(beta=0.5)
    if name in AUGMENTED:
        hyper["lam"] = 0.4
    seqs, weight, bias, g = make_problem(11, 3, 16, 31, augmented=name in AUGMENTED, bias=True)
    module = FusedLinearPreferenceLoss(name, **hyper, backend=backend)
    P = 3
    if layout == "all_responses":
        b = packed(seqs, g)
        kwargs = dict(cu_seqlens=b["cu_seqlens"].to(dev), pair_index=b["pair_index"].to(dev),
                      role=torch.zeros_like(b["role"]).to(dev),
                      ref_logps=torch.randn(2 * P, generator=g).to(dev), winrate=torch.rand(2 * P, generator=g).to(dev))
        hidden, labels = b["hidden"], b["labels"]
    elif layout == "packed":
        b = packed(seqs, g)
        kwargs = dict(cu_seqlens=b["cu_seqlens"].to(dev), role=b["role"].to(dev), pair_index=b["pair_index"].to(dev),
                      **{k: v.to(dev) for k, v in make_given(name, g, torch.zeros(P), torch.zeros(P)).items()})
        hidden, labels = b["hidden"], b["labels"]
    else:
        b = liger(seqs, 16, g, name in AUGMENTED)
        hidden, labels = b["hidden"], b["labels"]
        if layout == "liger_ref_input":
            kwargs = dict(ref_input=torch.randn(hidden.shape, generator=g).to(dev), ref_weight=weight.to(dev))
        else:
            kwargs = {k: v.to(dev) for k, v in make_given(name, g, torch.zeros(P), torch.zeros(P)).items()}
        if name in AUGMENTED:
            kwargs.update(aug_hidden=b["aug_hidden"].to(dev), aug_labels=b["aug_labels"].to(dev))
    hidden, labels, bias = hidden.to(dev), labels.to(dev), bias.to(dev)

    def step(w, h):
        return module(w, h, labels, bias=bias, **kwargs)

    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        w, h = weight.to(dev).requires_grad_(), hidden.clone().requires_grad_()
        loss, metrics = fn(w, h)
        loss.backward()
        results.append((loss.detach(), w.grad, h.grad, metrics))
    (l1, w1, h1, m1), (l2, w2, h2, m2) = results
    for a, b2 in ((l1, l2), (w1, w2), (h1, h2)):
        torch.testing.assert_close(a, b2, rtol=1e-6, atol=1e-6)
    assert m1.keys() == m2.keys()
    for key in m1:
        torch.testing.assert_close(m1[key], m2[key], rtol=1e-6, atol=1e-6, msg=key)


def test_compiled_module_still_checks_values():
    """Under torch.compile the value checks still run: a win rate outside [0, 1] and a pair without its
    rejected sequence are refused, as in eager."""
    torch._dynamo.reset()
    module = FusedLinearPreferenceLoss("sppo", eta=2.0, backend="torch")
    seqs, weight, _, g = make_problem(5, 2, 8, 7, augmented=False, bias=False)
    b = packed(seqs, g)
    step = torch.compile(lambda w, h, role, p: module(w, h, b["labels"], cu_seqlens=b["cu_seqlens"], role=role,
                                                     pair_index=b["pair_index"], ref_chosen_logps=torch.zeros(2),
                                                     ref_rejected_logps=torch.zeros(2), winrate=p)[0],
                         fullgraph=True, backend="aot_eager")
    step(weight, b["hidden"], b["role"], torch.full((2,), 0.5))
    with pytest.raises(Exception, match=r"winrate must hold probabilities in \[0, 1\]"):
        step(weight, b["hidden"], b["role"], torch.full((2,), 1.5))
    with pytest.raises(Exception, match="every pair needs exactly one"):
        step(weight, b["hidden"], torch.zeros_like(b["role"]), torch.full((2,), 0.5))
