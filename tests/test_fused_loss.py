"""FusedLinearPreferenceLoss against a float64 reference that materializes the logits.

The reference here computes every sequence's log-prob as hidden @ weight.T (+ bias, soft-cap),
log_softmax, gather, sum (or mean) over scored tokens, in float64 and one sequence at a time, then
applies each loss's formula, written again below in plain torch (independently of
nash_fast.losses). The module runs in float32 (sequence_logprobs returns float32), so values and
gradients are compared at rtol 1e-4 with an absolute floor of 1e-4 x the reference's largest entry.
"""

from __future__ import annotations

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
        hyper["lam"] = draw(st.floats(-1.0, 1.0))
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
