"""FusedLinearPreferenceLoss against a float64 reference that materializes the logits.

The reference here computes every sequence's log-prob as hidden @ weight.T (+ bias, soft-cap),
log_softmax, gather, sum (or mean) over scored tokens, in float64 and one sequence at a time, then
applies each loss's formula, written again below in plain torch (independently of
nash_fast.losses). The module runs in float32 (sequence_logprobs returns float32), so values and
gradients are compared at rtol 1e-4 with an absolute floor of 1e-4 x the reference's largest entry.
"""

from __future__ import annotations

import importlib.util
import os

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


def ref_pair_loss(name, hyper, pw, pl, given, aug_pw=None, aug_pl=None):
    rw, rl = given["ref_chosen_logps"], given["ref_rejected_logps"]
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
    return ref_pair_loss(name, hyper, pw, pl, given64, *aug), pw.detach(), pl.detach(), w64, b64


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


def run_case(name, hyper, seqs, weight, bias, g, *, layout, softcap, average, reduction, backend="torch", device="cpu"):
    """Runs the module on `layout` (on `device`) and checks loss, metrics and gradients against the
    float64 reference (on the CPU)."""
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
            assert_close(h.grad[r, :n], s["h64"].grad, f"d hidden of row {r}")
            assert torch.count_nonzero(h.grad[r, n:]) == 0  # padding

    dw, dl = pw64 - given["ref_chosen_logps"].double(), pl64 - given["ref_rejected_logps"].double()
    margin = (hyper["beta"] if name in BETA_LOSSES else 1.0) * (dw - dl)
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
    with pytest.raises(ValueError, match="loss_type='hinge' is not supported; supported: sigmoid, sppo_hard, ipo"):
        FusedLinearDPOLoss(loss_type="hinge")
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
                                         ("spce", "packed"), ("sppo", "all_responses"), ("dpo", "liger_ref_input")])
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
