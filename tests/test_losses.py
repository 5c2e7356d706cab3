"""nash_fast.losses against formulas written here independently, in float64 NumPy.

Tolerances: float64 inputs are compared at rtol 1e-9; float32 inputs (computed in float32, the
reference in float64 from the same rounded values) at rtol 1e-5. Both add an absolute term that
scales with the inputs' magnitude (the log-ratios reach |x| ~ 1e4 here, and squared losses then
reach ~1e9, where float rounding of the differences is the only error).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from nash_fast import losses as L


# ----------------------------------------------------------------------------- references (NumPy)

def _neg_logsigmoid(z):
    return np.logaddexp(0.0, -z)  # -log(1 / (1 + e^-z)) = log(1 + e^-z)


def ref_dpo(pi_w, pi_l, ref_w, ref_l, beta):
    return _neg_logsigmoid(beta * ((pi_w - ref_w) - (pi_l - ref_l)))


def ref_ipo(pi_w, pi_l, ref_w, ref_l, beta):
    return ((pi_w - ref_w) - (pi_l - ref_l) - 1 / (2 * beta)) ** 2


def ref_sppo(pi, ref, winrate, eta):
    return (pi - ref - eta * (winrate - 0.5)) ** 2


def ref_sppo_pair(pi_w, pi_l, ref_w, ref_l, p, eta):
    # SPPO eq. 4.8: the rejected response's win probability is P(y_l > y_w) = 1 - p.
    return (pi_w - ref_w - eta * (p - 0.5)) ** 2 + (pi_l - ref_l - eta * ((1 - p) - 0.5)) ** 2


def ref_inpo(pi_w, pi_l, ref_w, ref_l, prev_w, prev_l, eta, tau):
    h = (pi_w - pi_l) - tau / eta * (ref_w - ref_l) - (eta - tau) / eta * (prev_w - prev_l)
    return (h - 1 / (2 * eta)) ** 2


def _refinement(a_pw, a_pl, a_rw, a_rl, beta):
    return beta * ((a_pw - a_rw) - (a_pl - a_rl))


def ref_sr_dpo(pi_w, pi_l, ref_w, ref_l, a_pw, a_pl, a_rw, a_rl, beta, lam):
    d = _refinement(a_pw, a_pl, a_rw, a_rl, beta)
    return _neg_logsigmoid(beta * (pi_w - ref_w) - beta * (pi_l - ref_l) - lam * d)


def ref_sr_ipo(pi_w, pi_l, ref_w, ref_l, a_pw, a_pl, a_rw, a_rl, beta, lam):
    d = _refinement(a_pw, a_pl, a_rw, a_rl, beta)
    return ((pi_w - ref_w) - (pi_l - ref_l) - lam * d - 1 / (2 * beta)) ** 2


def ref_spce(pi_w, pi_l, ref_w, ref_l, t, beta):
    z = beta * ((pi_w - ref_w) - (pi_l - ref_l))
    return t * np.logaddexp(0.0, -z) + (1 - t) * np.logaddexp(0.0, z)


# TRL's loss types, transcribed from trl 1.16.0 (trl/trainer/dpo_trainer.py, DPOTrainer._compute_loss) into float64
# NumPy: chosen_logratios = pi_w - ref_w, rejected_logratios = pi_l - ref_l, delta_score = their difference.
# sigmoid(z) and log sigmoid(z) are written as exp(-logaddexp(0, -z)) and -logaddexp(0, -z): the same values,
# without NumPy's overflow of exp at |z| ~ 1e5.

def _logsigmoid(z):
    return -np.logaddexp(0.0, -z)


def _sigmoid(z):
    return np.exp(_logsigmoid(z))


def ref_hinge(pi_w, pi_l, ref_w, ref_l, beta):
    return np.maximum(0.0, 1 - beta * ((pi_w - ref_w) - (pi_l - ref_l)))


def ref_exo_pair(pi_w, pi_l, ref_w, ref_l, beta, label_smoothing):
    z = beta * ((pi_w - ref_w) - (pi_l - ref_l))
    eps = label_smoothing
    return _sigmoid(z) * (_logsigmoid(z) - np.log1p(-eps)) + _sigmoid(-z) * (_logsigmoid(-z) - np.log(eps))


def ref_nca_pair(pi_w, pi_l, ref_w, ref_l, beta):
    r_w, r_l = beta * (pi_w - ref_w), beta * (pi_l - ref_l)
    return -_logsigmoid(r_w) - 0.5 * _logsigmoid(-r_w) - 0.5 * _logsigmoid(-r_l)


def ref_robust(pi_w, pi_l, ref_w, ref_l, beta, label_smoothing):
    z = beta * ((pi_w - ref_w) - (pi_l - ref_l))
    clean = -(1 - label_smoothing) * _logsigmoid(z)
    flipped = -label_smoothing * _logsigmoid(-z)
    return (clean - flipped) / (1 - 2 * label_smoothing)


def ref_bco_pair(pi_w, pi_l, ref_w, ref_l, beta, delta):
    # TRL 1.x: delta = 0; TRL 0.x: delta = self.running.mean, -logsigmoid(beta a - delta) - logsigmoid(-(beta b - delta))
    return -_logsigmoid(beta * (pi_w - ref_w) - delta) - _logsigmoid(-(beta * (pi_l - ref_l) - delta))


def ref_sppo_hard(pi_w, pi_l, ref_w, ref_l, beta):
    return (pi_w - ref_w - 0.5 / beta) ** 2 + (pi_l - ref_l + 0.5 / beta) ** 2


def _ref_smoothed(delta, beta, eps):
    return -_logsigmoid(beta * delta) * (1 - eps) - _logsigmoid(-beta * delta) * eps


def ref_aot(pi_w, pi_l, ref_w, ref_l, beta, label_smoothing):
    return _ref_smoothed(np.sort(pi_w - pi_l) - np.sort(ref_w - ref_l), beta, label_smoothing)


def ref_aot_unpaired(pi_w, pi_l, ref_w, ref_l, beta, label_smoothing):
    return _ref_smoothed(np.sort(pi_w - ref_w) - np.sort(pi_l - ref_l), beta, label_smoothing)


def ref_apo_zero(pi_w, pi_l, ref_w, ref_l, beta):
    return (1 - _sigmoid(beta * (pi_w - ref_w))) + _sigmoid(beta * (pi_l - ref_l))


def ref_apo_down(pi_w, pi_l, ref_w, ref_l, beta):
    return _sigmoid(beta * (pi_w - ref_w)) + (1 - _sigmoid(beta * ((pi_w - ref_w) - (pi_l - ref_l))))


def ref_discopop(pi_w, pi_l, ref_w, ref_l, beta, discopop_tau):
    logits = beta * ((pi_w - ref_w) - (pi_l - ref_l))
    modulation = _sigmoid(logits / discopop_tau)
    # TRL: exp(-logits) * modulation; the same product written as one exp, so that float64's exp(-logits) overflow
    # at logits < -709 does not meet modulation = 0 (inf * 0).
    exp_component_times_modulation = np.exp(-logits + _logsigmoid(logits / discopop_tau))
    return -_logsigmoid(logits) * (1 - modulation) + exp_component_times_modulation


def ref_sigmoid_norm(pi_w, pi_l, ref_w, ref_l, num_tokens_w, num_tokens_l, beta):
    chosen = (pi_w - ref_w) / np.maximum(num_tokens_w, 1.0)  # completion_mask.sum(dim=1).clamp(min=1.0)
    rejected = (pi_l - ref_l) / np.maximum(num_tokens_l, 1.0)
    return -_logsigmoid(beta * (chosen - rejected))


def ref_sft(pi_w, num_tokens_w):
    # -chosen_per_token_logps[chosen_mask].mean(), expanded to the batch: the summed log-probs over the tokens
    return np.full(pi_w.shape, -pi_w.sum() / max(num_tokens_w.sum(), 1.0))


PAIR = ("pi_w", "pi_l", "ref_w", "ref_l")
# name -> (function, reference, tensor argument names, probability arguments, power of the loss
#          in its inputs: 2 for the squared losses, 1 for the log-sigmoid ones)
SPECS = {
    "dpo": (L.dpo_loss, ref_dpo, ("pi_w", "pi_l", "ref_w", "ref_l"), (), 1),
    "ipo": (L.ipo_loss, ref_ipo, ("pi_w", "pi_l", "ref_w", "ref_l"), (), 2),
    "sppo": (L.sppo_loss, ref_sppo, ("pi", "ref", "winrate"), ("winrate",), 2),
    "sppo_pair": (L.sppo_pair_loss, ref_sppo_pair, ("pi_w", "pi_l", "ref_w", "ref_l", "winrate_w"), ("winrate_w",), 2),
    "inpo": (L.inpo_loss, ref_inpo, ("pi_w", "pi_l", "ref_w", "ref_l", "prev_w", "prev_l"), (), 2),
    "sr_dpo": (
        L.sr_dpo_loss, ref_sr_dpo,
        ("pi_w", "pi_l", "ref_w", "ref_l", "aug_pi_w", "aug_pi_l", "aug_ref_w", "aug_ref_l"), (), 1,
    ),
    "sr_ipo": (
        L.sr_ipo_loss, ref_sr_ipo,
        ("pi_w", "pi_l", "ref_w", "ref_l", "aug_pi_w", "aug_pi_l", "aug_ref_w", "aug_ref_l"), (), 2,
    ),
    "spce": (L.spce_loss, ref_spce, ("pi_w", "pi_l", "ref_w", "ref_l", "target_prob"), ("target_prob",), 1),
    **{name: (getattr(L, f"{name}_loss"), globals()[f"ref_{name}"], PAIR, (), 2 if name == "sppo_hard" else 1)
       for name in ("hinge", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
                    "apo_zero", "apo_down", "discopop")},
    "sigmoid_norm": (L.sigmoid_norm_loss, ref_sigmoid_norm, PAIR + ("num_tokens_w", "num_tokens_l"), (), 1),
    "sft": (L.sft_loss, ref_sft, ("pi_w", "num_tokens_w"), (), 1),
}
HYPER_NAMES = {
    "dpo": ("beta",), "ipo": ("beta",), "sppo": ("eta",), "sppo_pair": ("eta",), "inpo": ("eta", "tau"),
    "sr_dpo": ("beta", "lam"), "sr_ipo": ("beta", "lam"), "spce": ("beta",),
    "hinge": ("beta",), "exo_pair": ("beta", "label_smoothing"), "nca_pair": ("beta",),
    "robust": ("beta", "label_smoothing"), "bco_pair": ("beta", "delta"), "sppo_hard": ("beta",),
    "aot": ("beta", "label_smoothing"), "aot_unpaired": ("beta", "label_smoothing"), "apo_zero": ("beta",),
    "apo_down": ("beta",), "discopop": ("beta", "discopop_tau"), "sigmoid_norm": ("beta",), "sft": (),
}
DEFAULT_HYPER = {"beta": 0.1, "eta": 2.0, "tau": 0.5, "lam": 0.3, "label_smoothing": 0.1, "discopop_tau": 0.05,
                 "delta": 0.3}
# label_smoothing's domain per loss (TRL / Liger: exo_pair's eps > 0, robust's flip rate < 1/2; AOT's weights in [0, 1])
SMOOTHING_RANGE = {"exo_pair": (1e-4, 0.9), "robust": (0.0, 0.45), "aot": (0.0, 1.0), "aot_unpaired": (0.0, 1.0)}

logratio = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False)
probability = st.floats(min_value=0.0, max_value=1.0)


@st.composite
def loss_case(draw, name):
    """(tensor values as float64 arrays, hyperparameters) for loss `name`."""
    _, _, args, probs, _ = SPECS[name]
    n = draw(st.integers(1, 6))
    count = st.integers(0, 4096).map(float)  # a response's scored tokens
    values = {a: np.array(draw(st.lists(probability if a in probs else count if a.startswith("num_tokens") else logratio,
                                        min_size=n, max_size=n))) for a in args}
    hyper = {}
    if "beta" in HYPER_NAMES[name]:
        hyper["beta"] = draw(st.floats(1e-3, 10.0))
    if "eta" in HYPER_NAMES[name]:
        hyper["eta"] = draw(st.floats(1e-2, 100.0))
    if "tau" in HYPER_NAMES[name]:
        hyper["tau"] = hyper["eta"] * draw(st.floats(0.0, 0.999))
    if "lam" in HYPER_NAMES[name]:
        hyper["lam"] = draw(st.floats(0.0, 2.0))  # lam >= 0 (Sr-DPO eq. 9), in the API as in the CLI
    if "label_smoothing" in HYPER_NAMES[name]:
        hyper["label_smoothing"] = draw(st.floats(*SMOOTHING_RANGE[name]))
    if "discopop_tau" in HYPER_NAMES[name]:
        hyper["discopop_tau"] = draw(st.floats(0.01, 1.0))
    if "delta" in HYPER_NAMES[name]:
        hyper["delta"] = draw(st.floats(-10.0, 10.0))
    return values, hyper


def _scale(values, hyper, probs):
    """The size of the loss's terms, which the roundings are relative to: the inputs' magnitude times the
    hyperparameters' (a rounding of relative size u in any input or product moves the loss by u x this, to first
    order), plus the constant margins 1/(2 beta), 1/(2 eta) and EXO's |log eps|. Two factors bound derivatives
    larger than 1: DiscoPOP's e^-l s(l/tau) has |d/dl| <= 1 + 1/tau (for l < 0 it is at most e^{l (1/tau - 1)} <= 1
    with tau <= 1), and robust DPO divides by 1 - 2 eps."""
    big = max(float(np.abs(v).max()) for a, v in values.items() if a not in probs and not a.startswith("num_tokens"))
    scale = (1.0 + big) * (1.0 + max((abs(v) for v in hyper.values()), default=0.0))
    scale += max(1.0 / hyper.get("beta", 1.0), 1.0 / hyper.get("eta", 1.0))
    if "discopop_tau" in hyper:
        scale *= 1.0 + 1.0 / hyper["discopop_tau"]
    if "label_smoothing" in hyper:
        eps = hyper["label_smoothing"]
        scale += abs(math.log(eps)) if eps > 0 else 0.0
        if eps < 0.5:
            scale /= 1.0 - 2.0 * eps
    return scale


def _check_against_reference(name, values, hyper, dtype, rtol, atol_per_unit):
    fn, ref, args, probs, power = SPECS[name]
    tensors = [torch.tensor(values[a], dtype=dtype) for a in args]
    out = fn(*tensors, **hyper)
    assert out.shape == tensors[0].shape
    assert out.dtype == torch.promote_types(dtype, torch.float32)
    rounded = [t.double().numpy() for t in tensors]  # the reference sees exactly the values we passed
    expected = ref(*rounded, **hyper)
    assert np.isfinite(out.double().numpy()).all()
    atol = atol_per_unit * _scale(values, hyper, probs) ** power
    np.testing.assert_allclose(out.double().numpy(), expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", sorted(SPECS))
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_matches_reference_float64(name, data):
    values, hyper = data.draw(loss_case(name))
    _check_against_reference(name, values, hyper, torch.float64, rtol=1e-9, atol_per_unit=1e-13)


@pytest.mark.parametrize("name", sorted(SPECS))
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_matches_reference_float32(name, data):
    values, hyper = data.draw(loss_case(name))
    _check_against_reference(name, values, hyper, torch.float32, rtol=1e-5, atol_per_unit=2e-6)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_bfloat16_inputs_are_upcast(name):
    fn, ref, args, probs, _ = SPECS[name]
    gen = torch.Generator().manual_seed(0)
    tensors = [
        (torch.rand(5, generator=gen) if a in probs else torch.randn(5, generator=gen) * 3).to(torch.bfloat16) for a in args
    ]
    hyper = {h: DEFAULT_HYPER[h] for h in HYPER_NAMES[name]}
    out = fn(*tensors, **hyper)
    assert out.dtype == torch.float32
    expected = ref(*[t.double().numpy() for t in tensors], **hyper)
    np.testing.assert_allclose(out.double().numpy(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(SPECS))
def test_finite_at_extreme_logratios(name, dtype):
    fn, _, args, probs, _ = SPECS[name]
    hyper = {h: DEFAULT_HYPER[h] for h in HYPER_NAMES[name]}
    signs = torch.tensor([1.0, -1.0, 1.0, -1.0])
    for flip in (1.0, -1.0):
        tensors = []
        for i, a in enumerate(args):
            if a in probs:
                t = torch.tensor([0.0, 1.0, 1.0, 0.0])
            else:  # chosen and rejected pushed 1e4 apart in both directions
                t = flip * signs * 1e4 * (1 if i % 2 == 0 else -1)
            tensors.append(t.to(dtype).requires_grad_())
        out = fn(*tensors, **hyper)
        assert torch.isfinite(out).all(), out
        out.sum().backward()
        for a, t in zip(args, tensors):
            assert t.grad is None or torch.isfinite(t.grad).all(), a


def test_spce_large_logits_matches_linear_asymptote():
    # For z -> -inf with t = 1, -log sigmoid(z) = -z + log(1 + e^z) ~ -z: finite and exact.
    pi_w, pi_l = torch.tensor([-1e4], dtype=torch.float64), torch.tensor([1e4], dtype=torch.float64)
    zero = torch.zeros(1, dtype=torch.float64)
    out = L.spce_loss(pi_w, pi_l, zero, zero, torch.ones(1, dtype=torch.float64), beta=1.0)
    assert out.item() == pytest.approx(2e4, rel=1e-12)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_gradcheck_float64(name):
    fn, _, args, probs, _ = SPECS[name]
    hyper = {h: DEFAULT_HYPER[h] for h in HYPER_NAMES[name]}
    gen = torch.Generator().manual_seed(1)
    tensors = [
        (torch.rand(4, generator=gen, dtype=torch.float64) * 0.8 + 0.1 if a in probs
         else torch.randn(4, generator=gen, dtype=torch.float64))
        for a in args
    ]
    # The aug_* inputs of Sr-DPO / Sr-IPO are under stop-gradient, so their analytic gradient is
    # deliberately 0 (tested below); check the others.
    differentiable = [i for i, a in enumerate(args) if not a.startswith("aug_")]

    def f(*diff):
        full = list(tensors)
        for i, t in zip(differentiable, diff):
            full[i] = t
        return fn(*full, **hyper)

    inputs = tuple(tensors[i].clone().requires_grad_() for i in differentiable)
    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("name", ["sr_dpo", "sr_ipo"])
def test_refinement_is_stop_gradient(name):
    fn, _, args, _, _ = SPECS[name]
    beta, lam = 0.2, 0.7
    gen = torch.Generator().manual_seed(2)
    tensors = [torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True) for _ in args]
    out = fn(*tensors, beta=beta, lam=lam)
    grads = torch.autograd.grad(out.sum(), tensors, allow_unused=True)
    for a, g in zip(args, grads):
        if a.startswith("aug_"):
            assert g is None or torch.count_nonzero(g) == 0, a
    # d loss / d pi_w with D held constant, by hand.
    pw, pl, rw, rl, apw, apl, arw, arl = (t.detach().numpy() for t in tensors)
    d = beta * ((apw - arw) - (apl - arl))
    if name == "sr_dpo":
        z = beta * ((pw - rw) - (pl - rl)) - lam * d
        expected = -beta / (1 + np.exp(z))  # d/dz [-log sigmoid(z)] = -sigmoid(-z)
    else:
        expected = 2 * ((pw - rw) - (pl - rl) - lam * d - 1 / (2 * beta))
    np.testing.assert_allclose(grads[0].numpy(), expected, rtol=1e-10)
    np.testing.assert_allclose(grads[1].numpy(), -expected, rtol=1e-10)


@settings(max_examples=60, deadline=None)
@given(
    data=st.lists(st.tuples(logratio, logratio, logratio, logratio), min_size=1, max_size=6),
    beta=st.floats(1e-3, 10.0),
)
def test_sppo_hard_labels_equal_trl_sppo_hard(data, beta):
    # TRL DPOTrainer, loss_type="sppo_hard": a = pi_w - ref_w, b = pi_l - ref_l,
    # losses = (a - 0.5 / beta) ** 2 + (b + 0.5 / beta) ** 2. Ours with P = 1 and eta = 1 / beta.
    pi_w, pi_l, ref_w, ref_l = (torch.tensor(col, dtype=torch.float64) for col in zip(*data))
    a, b = pi_w - ref_w, pi_l - ref_l
    trl = [(ai - 0.5 / beta) ** 2 + (bi + 0.5 / beta) ** 2 for ai, bi in zip(a.tolist(), b.tolist())]
    ours = L.sppo_pair_loss(pi_w, pi_l, ref_w, ref_l, torch.ones_like(pi_w), eta=1.0 / beta)
    scale = 1 + max(abs(x) for row in data for x in row) + 1 / beta
    np.testing.assert_allclose(ours.numpy(), trl, rtol=1e-9, atol=1e-13 * scale**2)


def test_sppo_pair_is_two_per_response_terms_and_all_k_shapes():
    gen = torch.Generator().manual_seed(3)
    pi, ref = torch.randn(2, 2, 3, 4, generator=gen, dtype=torch.float64)
    p = torch.rand(3, 4, generator=gen, dtype=torch.float64)
    per_response = L.sppo_loss(pi, ref, torch.stack([p, 1 - p]), eta=3.0)
    assert per_response.shape == (2, 3, 4)  # [2 responses, P prompts, K] works on any shape
    pair = L.sppo_pair_loss(pi[0], pi[1], ref[0], ref[1], p, eta=3.0)
    torch.testing.assert_close(pair, per_response.sum(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(per_response.numpy(), ref_sppo(pi.numpy(), ref.numpy(), np.stack([p, 1 - p]), 3.0))


def test_special_cases_reduce_to_parents():
    gen = torch.Generator().manual_seed(4)
    pw, pl, rw, rl, a1, a2, a3, a4 = torch.randn(8, 5, generator=gen, dtype=torch.float64)
    dpo = L.dpo_loss(pw, pl, rw, rl, beta=0.3)
    torch.testing.assert_close(L.sr_dpo_loss(pw, pl, rw, rl, a1, a2, a3, a4, beta=0.3, lam=0.0), dpo)
    torch.testing.assert_close(L.spce_loss(pw, pl, rw, rl, torch.ones(5, dtype=torch.float64), beta=0.3), dpo)
    ipo = L.ipo_loss(pw, pl, rw, rl, beta=0.3)
    torch.testing.assert_close(L.sr_ipo_loss(pw, pl, rw, rl, a1, a2, a3, a4, beta=0.3, lam=0.0), ipo)
    # INPO with tau = 0 is IPO against the previous iterate, with beta = eta.
    torch.testing.assert_close(L.inpo_loss(pw, pl, rw, rl, a1, a2, eta=0.3, tau=0.0), L.ipo_loss(pw, pl, a1, a2, beta=0.3))
    # SPCE with t = 0 is DPO with chosen and rejected swapped.
    torch.testing.assert_close(
        L.spce_loss(pw, pl, rw, rl, torch.zeros(5, dtype=torch.float64), beta=0.3), L.dpo_loss(pl, pw, rl, rw, beta=0.3)
    )


# ----------------------------------------------------------------------------- validation

def _valid_call(name, n=3, dtype=torch.float32):
    fn, _, args, probs, _ = SPECS[name]
    tensors = {a: (torch.full((n,), 0.5, dtype=dtype) if a in probs else torch.zeros(n, dtype=dtype)) for a in args}
    hyper = {h: DEFAULT_HYPER[h] for h in HYPER_NAMES[name]}
    return fn, tensors, hyper


def _call(fn, tensors, hyper):
    return fn(*tensors.values(), **hyper)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_valid_call_passes(name):
    fn, tensors, hyper = _valid_call(name)
    assert torch.isfinite(_call(fn, tensors, hyper)).all()


@pytest.mark.parametrize("name", sorted(SPECS))
def test_shape_dtype_device_mismatch_names_argument(name):
    _, _, args, _, _ = SPECS[name]
    for arg in args[1:]:
        fn, tensors, hyper = _valid_call(name)
        tensors[arg] = torch.zeros(4, dtype=tensors[arg].dtype)
        with pytest.raises(ValueError, match=rf"{arg}\b.*shape"):
            _call(fn, tensors, hyper)
        fn, tensors, hyper = _valid_call(name)
        tensors[arg] = tensors[arg].double()
        with pytest.raises(ValueError, match=rf"{arg}\b.*dtype"):
            _call(fn, tensors, hyper)
        fn, tensors, hyper = _valid_call(name)
        tensors[arg] = torch.empty(3, device="meta")
        with pytest.raises(ValueError, match=rf"{arg}\b.*meta"):
            _call(fn, tensors, hyper)
    for arg in args:
        fn, tensors, hyper = _valid_call(name)
        tensors[arg] = torch.zeros(3, dtype=torch.long)
        with pytest.raises(ValueError, match=rf"{arg}\b.*floating"):
            _call(fn, tensors, hyper)
        fn, tensors, hyper = _valid_call(name)
        tensors[arg] = [0.0, 0.0, 0.0]
        with pytest.raises(ValueError, match=rf"{arg}\b.*Tensor"):
            _call(fn, tensors, hyper)


@pytest.mark.parametrize("bad", [1.5, -0.1, math.nan, math.inf])
@pytest.mark.parametrize("name", [n for n in sorted(SPECS) if SPECS[n][3]])
def test_probability_out_of_range_names_argument(name, bad):
    fn, tensors, hyper = _valid_call(name)
    (prob,) = SPECS[name][3]
    tensors[prob] = torch.tensor([0.5, bad, 0.5])
    with pytest.raises(ValueError, match=rf"{prob}\b.*\[0, 1\]"):
        _call(fn, tensors, hyper)


BAD_HYPER = {
    "beta": [0.0, -1.0, math.nan, math.inf, True, "0.1", None],
    "eta": [0.0, -2.0, math.nan, math.inf, None],
    "tau": [-0.1, 2.0, 5.0, math.nan, None],  # eta = 2.0 in the valid call: tau must be < eta
    "lam": [math.nan, math.inf, -math.inf, None, "1", -5.0, -1e-9],
    "label_smoothing": [math.nan, math.inf, None, "0.1", -0.1, 1.5],  # outside every loss's domain
    "discopop_tau": [0.0, -1.0, math.nan, math.inf, None],
    "delta": [math.nan, math.inf, None, "1"],
}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_bad_hyperparameter_names_it(name):
    for h in HYPER_NAMES[name]:
        for bad in BAD_HYPER[h]:
            fn, tensors, hyper = _valid_call(name)
            hyper[h] = bad
            with pytest.raises(ValueError, match=rf"\b{h}\b"):
                _call(fn, tensors, hyper)


def test_hyperparameters_are_keyword_only():
    z = torch.zeros(2)
    with pytest.raises(TypeError):
        L.dpo_loss(z, z, z, z, 0.1)
    with pytest.raises(TypeError):
        L.inpo_loss(z, z, z, z, z, z, 1.0, 0.1)


# ----------------------------------------------------------------------------- one rule for the API and the CLI

def test_hyperparameters_must_be_finite_in_the_compute_dtype():
    z32, z64 = torch.zeros(3), torch.zeros(3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"beta must be finite in float32 \(\|beta\| <= 3.4e\+38\), got 1e\+300"):
        L.dpo_loss(z32, z32, z32, z32, beta=1e300)
    assert torch.isfinite(L.dpo_loss(z64, z64, z64, z64, beta=1e300)).all()  # float64 holds it
    # IPO's margin 1/(2 beta) squared overflows float32 for beta = 1e-30 (2.5e59 > 3.4e38): refused, not inf.
    with pytest.raises(ValueError, match=r"beta=1e-30: the ipo loss is not finite in float32 at the reference point"):
        L.ipo_loss(z32, z32, z32, z32, beta=1e-30)
    assert torch.isfinite(L.ipo_loss(z64, z64, z64, z64, beta=1e-30)).all()
    with pytest.raises(ValueError, match=r"beta must be > 0 in float32 \(it rounds to 0 there\)"):
        L.spce_loss(z32, z32, z32, z32, torch.full((3,), 0.5), beta=1e-50)
    with pytest.raises(ValueError, match=r"eta=1e\+20: the sppo loss is not finite in float32"):
        L.sppo_loss(z32, z32, torch.ones(3), eta=1e20)
    with pytest.raises(ValueError, match=r"lam must be >= 0, got -5.0"):
        L.sr_dpo_loss(*[z32] * 8, beta=0.1, lam=-5)


def test_fused_loss_follows_the_same_rule():
    from nash_fast import FusedLinearPreferenceLoss

    for kwargs, message in (({"loss": "sr_dpo", "lam": -5.0}, "lam must be >= 0"),
                            ({"loss": "ipo", "beta": 1e-30}, "not finite in float32"),
                            ({"loss": "sppo", "beta": 1e-20}, r"eta \(= 1 / beta\)=1e\+20"),
                            ({"loss": "dpo", "softcap": math.inf}, "softcap must be finite")):
        with pytest.raises(ValueError, match=message):
            FusedLinearPreferenceLoss(**kwargs)
    from nash_fast import sequence_logprobs

    with pytest.raises(ValueError, match="softcap must be a positive finite number"):  # not NaN log-probs
        sequence_logprobs(torch.zeros(2, 4), torch.zeros(3, 4), torch.tensor([0, 1]), softcap=math.inf)


def _accepts(call) -> bool:
    try:
        call()
        return True
    except ValueError:
        return False


@settings(max_examples=40)
@given(exponent=st.floats(-48.0, 310.0), loss=st.sampled_from(["dpo", "ipo", "spce", "sr_dpo", "sr_ipo", "sppo", "inpo"]))
def test_cli_accepts_exactly_what_the_api_accepts(exponent, loss):
    """For every magnitude 10^e of the loss's scale hyperparameter, parse_config accepts the flag exactly when
    the API accepts the value on float32 inputs (the trainer's compute dtype), and an accepted value gives a
    finite loss at the reference point."""
    from nash_fast.config import parse_config

    value = 10.0 ** exponent if exponent < 308.25 else 1.7e308
    z = torch.zeros(3)
    p = torch.full((3,), 0.5)
    if loss == "sppo":
        flags, api = ["--eta", repr(value)], lambda: L.sppo_pair_loss(z, z, z, z, p, eta=value)
    elif loss == "inpo":
        flags, api = ["--eta", repr(value), "--tau", "0"], lambda: L.inpo_loss(*[z] * 6, eta=value, tau=0.0)
    elif loss in ("sr_dpo", "sr_ipo"):
        fn = getattr(L, f"{loss}_loss")
        flags, api = ["--beta", repr(value), "--lam", "0.5"], lambda: fn(*[z] * 8, beta=value, lam=0.5)
    elif loss == "spce":
        flags, api = ["--beta", repr(value)], lambda: L.spce_loss(z, z, z, z, p, beta=value)
    else:
        fn = getattr(L, f"{loss}_loss")
        flags, api = ["--beta", repr(value)], lambda: fn(z, z, z, z, beta=value)
    cli = _accepts(lambda: parse_config(["--loss", loss, *flags]))
    assert cli == _accepts(api), (loss, value)
    if cli:
        assert torch.isfinite(api()).all()


# ----------------------------------------------------------------------------- TRL's loss types

def test_trl_special_cases_reduce_to_parents():
    gen = torch.Generator().manual_seed(5)
    pw, pl, rw, rl = torch.randn(4, 5, generator=gen, dtype=torch.float64) * 3
    dpo = L.dpo_loss(pw, pl, rw, rl, beta=0.3)
    torch.testing.assert_close(L.robust_loss(pw, pl, rw, rl, beta=0.3, label_smoothing=0.0), dpo)
    torch.testing.assert_close(L.sigmoid_norm_loss(pw, pl, rw, rl, torch.ones(5, dtype=torch.float64),
                                                   torch.zeros(5, dtype=torch.float64), beta=0.3), dpo)  # n clamps to 1
    torch.testing.assert_close(L.sppo_hard_loss(pw, pl, rw, rl, beta=0.3),
                               L.sppo_pair_loss(pw, pl, rw, rl, torch.ones(5, dtype=torch.float64), eta=1 / 0.3))
    torch.testing.assert_close(L.bco_pair_loss(pw, pl, rw, rl, beta=0.3),
                               -F.logsigmoid(0.3 * (pw - rw)) - F.logsigmoid(-0.3 * (pl - rl)))
    one = slice(0, 1)  # one pair: AOT's sorted quantiles are the pair itself, cDPO at eps = 0 is DPO
    for aot in (L.aot_loss, L.aot_unpaired_loss):
        torch.testing.assert_close(aot(pw[one], pl[one], rw[one], rl[one], beta=0.3), dpo[one])
    # robust with eps: cDPO's weighted mix, unbiased by 1 / (1 - 2 eps) (Chowdhury et al.)
    z = 0.3 * ((pw - rw) - (pl - rl))
    torch.testing.assert_close(L.robust_loss(pw, pl, rw, rl, beta=0.3, label_smoothing=0.2),
                               (-0.8 * F.logsigmoid(z) + 0.2 * F.logsigmoid(-z)) / 0.6)


def test_trl_hyperparameter_domains_are_trls():
    z = torch.zeros(3)
    with pytest.raises(ValueError, match=r"label_smoothing must be in \(0, 1\) for the exo_pair loss \(the EXO paper "
                                         r"recommends 1e-3\), got 0.0"):
        L.exo_pair_loss(z, z, z, z, beta=0.1, label_smoothing=0.0)
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 0.5\) for the robust loss, got 0.5"):
        L.robust_loss(z, z, z, z, beta=0.1, label_smoothing=0.5)
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\] for the aot loss"):
        L.aot_loss(z, z, z, z, beta=0.1, label_smoothing=1.5)
    with pytest.raises(ValueError, match=r"label_smoothing must be > 0 in float32"):
        L.exo_pair_loss(z, z, z, z, beta=0.1, label_smoothing=1e-60)  # log eps would be -inf
    with pytest.raises(ValueError, match=r"discopop_tau must be > 0"):
        L.discopop_loss(z, z, z, z, beta=0.1, discopop_tau=0.0)
    with pytest.raises(ValueError, match=r"beta=1e-30: the sppo_hard loss is not finite in float32"):
        L.sppo_hard_loss(z, z, z, z, beta=1e-30)
    with pytest.raises(ValueError, match="sorts over the batch"):
        L.aot_loss(*[torch.zeros(())] * 4, beta=0.1)
    assert set(L.LOSS_TYPES) >= {"sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
                                 "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"}


class _TRLRunningMoments:
    """trl 0.19.1 trl/trainer/utils.py RunningMoments.update, single process, transcribed line by line."""

    mean, std, var, count = 0, 1, 1, 1e-24

    @torch.no_grad()
    def update(self, xs):
        xs_count = xs.numel()
        xs_var, xs_mean = torch.var_mean(xs, unbiased=False)
        xs_mean, xs_var = xs_mean.float(), xs_var.float()
        delta = xs_mean - self.mean
        tot_count = self.count + xs_count
        new_sum = xs_var * xs_count
        old_sum = self.var * self.count + delta**2 * self.count * xs_count / tot_count
        tot_sum = old_sum + new_sum
        self.mean += (delta * xs_count / tot_count).item()
        new_var = tot_sum / tot_count
        self.std = (new_var * tot_count / (tot_count - 1)).float().sqrt().item()
        self.var = new_var.item()
        self.count = tot_count


@settings(max_examples=30, deadline=None)
@given(stream=st.lists(st.lists(st.floats(-1e4, 1e4), min_size=1, max_size=5), min_size=1, max_size=8),
       scalar=st.booleans())
def test_running_moments_are_trls_bitwise_and_round_trip_json(stream, scalar):
    """bco_pair's running mean (TRL 0.x) is kept with TRL's arithmetic, bit for bit, and its state survives JSON (the
    trainer's checkpoint format) exactly. TRL 0.x's bco_pair updates it with the batch's mean reward, a scalar."""
    import json

    ours, theirs = L.RunningMoments(), _TRLRunningMoments()
    for batch in stream:
        xs = torch.tensor(batch, dtype=torch.float32)
        xs = xs.mean() if scalar else xs
        assert ours.update(xs)
        theirs.update(xs)
        assert ours.state_dict() == {"mean": theirs.mean, "std": theirs.std, "var": theirs.var, "count": theirs.count}
    restored = L.RunningMoments()
    restored.load_state_dict(json.loads(json.dumps(ours.state_dict())))
    assert restored.state_dict() == ours.state_dict()
    assert not ours.update(torch.tensor(math.nan)) and restored.state_dict() == ours.state_dict()  # NaN not merged
    with pytest.raises(ValueError, match="RunningMoments state"):
        restored.load_state_dict({"mean": 0.0})


@settings(max_examples=40)
@given(exponent=st.floats(-48.0, 310.0), smoothing=st.floats(-0.5, 1.5),
       loss=st.sampled_from(["hinge", "exo_pair", "robust", "sppo_hard", "aot", "discopop", "bco_pair", "sigmoid_norm"]))
def test_cli_accepts_exactly_what_the_api_accepts_for_trls_losses(exponent, smoothing, loss):
    """TRL's loss types: for every magnitude 10^e of beta (and discopop_tau) and every label_smoothing, parse_config
    accepts the flags exactly when the API accepts the values on float32 inputs, and then the loss is finite at the
    reference point."""
    from nash_fast.config import parse_config

    value = 10.0 ** exponent if exponent < 308.25 else 1.7e308
    z = torch.zeros(3)
    flags, hyper = ["--beta", repr(value)], dict(beta=value)
    if loss in ("exo_pair", "robust", "aot"):
        flags += [f"--label-smoothing={smoothing!r}"]  # "=": a negative value is not a flag
        hyper["label_smoothing"] = smoothing
    if loss == "discopop":
        flags, hyper = ["--discopop-tau", repr(value)], dict(beta=0.1, discopop_tau=value)
    fn = L.LOSS_TYPES[loss]
    args = (z, z, z, z, z + 5, z + 5) if loss == "sigmoid_norm" else (z, z, z, z)
    cli = _accepts(lambda: parse_config(["--loss", loss, *flags]))
    assert cli == _accepts(lambda: fn(*args, **hyper)), (loss, hyper)
    if cli:
        assert torch.isfinite(fn(*args, **hyper)).all()
