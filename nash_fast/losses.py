"""Exact preference losses on per-sequence log-probabilities, one value per example (no reduction).

Every function takes log p(y | x) summed (or averaged) over response tokens, as returned by
`nash_fast.sequence_logprobs`: the policy's (pi_*), the frozen reference's (ref_*), the previous
iterate's (prev_*, INPO) and those given the prompt-augmented query p+x (aug_*, Sr-DPO / Sr-IPO).
_w is the chosen (winning) response and _l the rejected one, and Delta_w = pi_w - ref_w,
Delta_l = pi_l - ref_l are the log-ratios. Hyperparameters are keyword-only.

    dpo_loss        -log sigmoid(beta (Delta_w - Delta_l))                       DPO; SPPO paper eq. 4.9
    ipo_loss        (Delta_w - Delta_l - 1/(2 beta))^2                           IPO; Sr-DPO eq. 14 at lam = 0
    sppo_loss       (pi - ref - eta (P(y > pi_t) - 1/2))^2 per response          SPPO eq. 4.6 / 4.7
    sppo_pair_loss  chosen term with P(y_w > y_l) + rejected term with 1 - P     SPPO eq. 4.8
    inpo_loss       (h - 1/(2 eta))^2, h as in inpo_loss                         INPO eq. 8, Alg. 1 line 5
    sr_dpo_loss     -log sigmoid(beta (Delta_w - Delta_l) - lam sg[D])           Sr-DPO eq. 11, 12, Alg. 1
    sr_ipo_loss     (Delta_w - Delta_l - lam sg[D] - 1/(2 beta))^2               Sr-DPO eq. 11, 14, Alg. 2
    spce_loss       -(t log sigma(z) + (1 - t) log sigma(-z))                    OSP eq. 7, 8
                    with z = beta (Delta_w - Delta_l), t the target P(y_w > y_l)

TRL's DPOTrainer loss types (trl 1.16.0, trl/trainer/dpo_trainer.py, DPOTrainer._compute_loss; the same
formulas as Liger-Kernel 0.8.5's chunked_loss/dpo_loss.py where Liger has them), with d = Delta_w - Delta_l:

    hinge_loss         relu(1 - beta d)                                          SLiC (Zhao et al. 2023), TRL
    exo_pair_loss      KL(softmax(beta [Delta_w, Delta_l]) || [1 - eps, eps])    EXO (Ji et al. 2024) eq. 16
    nca_pair_loss      -log s(r_w) - 1/2 log s(-r_w) - 1/2 log s(-r_l)           NCA (Chen et al. 2024), TRL
    robust_loss        ((1-eps)(-log s(beta d)) - eps(-log s(-beta d)))/(1-2eps) rDPO (Chowdhury et al. 2024)
    bco_pair_loss      -log s(r_w - delta) - log s(-(r_l - delta))               BCO (Jung et al. 2024), TRL
    sppo_hard_loss     (Delta_w - 1/(2 beta))^2 + (Delta_l + 1/(2 beta))^2      SPPO eq. 4.8 at P = 1, eta = 1/beta
    aot_loss           cDPO on sorted(pi_w - pi_l) - sorted(ref_w - ref_l)       AOT (Melnyk et al. 2024), TRL
    aot_unpaired_loss  cDPO on sorted(Delta_w) - sorted(Delta_l)                 AOT, unpaired form, TRL
    apo_zero_loss      1 - s(r_w) + s(r_l)                                       APO (D'Oosterlinck et al. 2024) eq. 7
    apo_down_loss      s(r_w) + 1 - s(beta d)                                    APO eq. 8
    discopop_loss      (-log s(l))(1 - s(l/tau)) + e^-l s(l/tau), l = beta d     DiscoPOP (Chris Lu et al. 2024) eq. 5
    sigmoid_norm_loss  -log s(beta (Delta_w / n_w - Delta_l / n_l))              TRL's length-normalized DPO
    sft_loss           -sum(pi_w) / sum(n_w), the same for every pair            TRL's "sft" (chosen-token NLL)

(s the logistic sigmoid, r = beta Delta the implicit rewards, n the scored tokens of a response.) TRL's
"sigmoid" is dpo_loss, and its "ipo" is ipo_loss on per-token mean log-probs (TRL divides both log-ratios by
the responses' token counts). LOSS_TYPES lists TRL's names and the functions computing them; PAIR_LOSSES
nash-fast's own names (the pairwise forms), as FusedLinearPreferenceLoss calls them.

Inputs must share shape, dtype and device; they are upcast to at least float32 (bf16 log-probs
would lose the small log-ratio differences these losses act on). Every loss is written with
log-sigmoid or plain polynomials, so it stays finite at log-ratios of |x| ~ 1e4.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from nash_fast.checks import checked_probabilities

__all__ = [
    "dpo_loss",
    "ipo_loss",
    "sppo_loss",
    "sppo_pair_loss",
    "inpo_loss",
    "sr_dpo_loss",
    "sr_ipo_loss",
    "spce_loss",
    "hinge_loss",
    "exo_pair_loss",
    "nca_pair_loss",
    "robust_loss",
    "bco_pair_loss",
    "sppo_hard_loss",
    "aot_loss",
    "aot_unpaired_loss",
    "apo_zero_loss",
    "apo_down_loss",
    "discopop_loss",
    "sigmoid_norm_loss",
    "sft_loss",
    "RunningMoments",
    "check_hyperparameters",
]


# What each loss reads and the domain of each hyperparameter (the papers'): beta > 0 (DPO/IPO/SPCE/Sr-*),
# eta > 0 (SPPO, INPO), 0 <= tau < eta (INPO), lam >= 0 (Sr-DPO eq. 9: "lambda is a positive constant";
# lam = 0 is plain DPO / IPO). The trainer's flags follow the same rule (nash_fast.config calls
# check_hyperparameters), so the API and the CLI accept exactly the same values.
HYPERPARAMETERS = {
    "dpo": ("beta",), "ipo": ("beta",), "sppo": ("eta",), "sppo_pair": ("eta",), "inpo": ("eta", "tau"),
    "sr_dpo": ("beta", "lam"), "sr_ipo": ("beta", "lam"), "spce": ("beta",),
    # TRL's loss types (DPOConfig: beta 0.1, label_smoothing 0.0, discopop_tau 0.05). label_smoothing: EXO's eps in
    # (0, 1) (TRL refuses 0; the EXO paper recommends 1e-3), the flip rate of robust DPO in [0, 1/2) (Chowdhury et
    # al.; TRL warns outside it, Liger refuses), AOT's cDPO smoothing in [0, 1].
    "hinge": ("beta",), "exo_pair": ("beta", "label_smoothing"), "nca_pair": ("beta",),
    "robust": ("beta", "label_smoothing"), "bco_pair": ("beta",), "sppo_hard": ("beta",),
    "aot": ("beta", "label_smoothing"), "aot_unpaired": ("beta", "label_smoothing"), "apo_zero": ("beta",),
    "apo_down": ("beta",), "discopop": ("beta", "discopop_tau"), "sigmoid_norm": ("beta",), "sft": (),
}
_POSITIVE = ("beta", "eta", "discopop_tau")
_NON_NEGATIVE = ("tau", "lam")
# label_smoothing's domain per loss: (low, low inclusive, high, high inclusive).
_SMOOTHING = {"exo_pair": (0.0, False, 1.0, False), "robust": (0.0, True, 0.5, False),
              "aot": (0.0, True, 1.0, True), "aot_unpaired": (0.0, True, 1.0, True)}


def _hyperparameter(name: str, value, *, positive: bool = False, dtype: torch.dtype = torch.float32,
                    label: str | None = None) -> float:
    """Returns `value` as a float after checking it is a real number that is finite in `dtype` (and > 0
    without rounding to 0 in `dtype` if `positive`). label: how to name it in the message (default: name)."""
    label = label or name
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{label} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{label} must be finite, got {value!r}")
    info = torch.finfo(dtype)
    if abs(value) > info.max:
        raise ValueError(f"{label} must be finite in {_dtype_name(dtype)} (|{name}| <= {info.max:.3g}), got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{label} must be > 0, got {value!r}")
    # Round to nearest even: a magnitude up to half the smallest subnormal (tiny * eps) becomes 0 in dtype.
    if positive and value <= info.tiny * info.eps / 2:
        raise ValueError(f"{label} must be > 0 in {_dtype_name(dtype)} (it rounds to 0 there), got {value!r}")
    return value


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_hyperparameters(loss: str, dtype: torch.dtype = torch.float32, *, labels: dict[str, str] | None = None,
                          **values) -> dict[str, float]:
    """The one rule for every loss's hyperparameters, in the API and the CLI alike.

    Each must be a real number finite in the compute dtype (float32 for float32 / bf16 / fp16 inputs,
    the losses upcast to at least float32); beta and eta > 0 (and not rounding to 0 there), tau and
    lam >= 0, tau < eta. Then the loss itself must be finite at the reference point, every log-ratio 0
    and every probability 0, 1/2 or 1, in that dtype: that is where training starts, and where a
    derived constant overflows first, e.g. IPO's (1/(2 beta))^2 (beta = 1e-30 gives 2.5e59, beyond
    float32's 3.4e38) or SPPO's (eta/2)^2. labels maps names to what the message calls them (flags).
    Returns the values as floats. ValueError names the hyperparameter.
    """
    if loss not in HYPERPARAMETERS:
        raise ValueError(f"loss must be one of {sorted(HYPERPARAMETERS)}, got {loss!r}")
    labels = labels or {}
    checked = {}
    for name in HYPERPARAMETERS[loss]:
        label = labels.get(name, name)
        if name not in values:
            raise ValueError(f"{loss} needs {label}")
        value = _hyperparameter(name, values[name], positive=name in _POSITIVE, dtype=dtype, label=label)
        if name in _NON_NEGATIVE and value < 0:
            raise ValueError(f"{label} must be >= 0, got {value!r}")
        checked[name] = value
    if loss in _SMOOTHING:
        low, low_closed, high, high_closed = _SMOOTHING[loss]
        eps = checked["label_smoothing"]
        if not ((eps >= low if low_closed else eps > low) and (eps <= high if high_closed else eps < high)):
            label = labels.get("label_smoothing", "label_smoothing")
            domain = f"{'[' if low_closed else '('}{low:g}, {high:g}{']' if high_closed else ')'}"
            hint = " (the EXO paper recommends 1e-3)" if loss == "exo_pair" else ""
            raise ValueError(f"{label} must be in {domain} for the {loss} loss{hint}, got {eps!r}")
        if loss == "exo_pair" and eps <= torch.finfo(dtype).tiny * torch.finfo(dtype).eps / 2:
            raise ValueError(f"{labels.get('label_smoothing', 'label_smoothing')} must be > 0 in {_dtype_name(dtype)} "
                             f"(log eps of the exo_pair loss; it rounds to 0 there), got {eps!r}")
    if loss == "inpo" and not checked["tau"] < checked["eta"]:
        raise ValueError(f"tau must satisfy 0 <= tau < eta, got {labels.get('tau', 'tau')}={checked['tau']!r}, "
                         f"{labels.get('eta', 'eta')}={checked['eta']!r}")
    worst = _loss_at_reference(loss, checked)
    # The dtype evaluates the same constants with at most three roundings of relative size eps/2 each (the
    # constant, its square, a sum), so it stays finite when worst * (1 + 4 eps) does not exceed its max.
    info = torch.finfo(dtype)
    if not worst * (1.0 + 4.0 * info.eps) <= info.max:
        names = " and ".join(f"{labels.get(k, k)}={v!r}" for k, v in checked.items())
        raise ValueError(f"{names}: the {loss} loss is not finite in {_dtype_name(dtype)} at the reference point "
                         f"(all log-ratios 0): it reaches {worst:.3g}, beyond {info.max:.3g}; choose a value "
                         "in a representable range")
    return checked


def _loss_at_reference(loss: str, hyper: dict[str, float]) -> float:
    """The largest value the loss takes at zero log-ratios (probabilities 0, 1/2 or 1), in float64: the formulas
    below at those points, in the order the code evaluates them. Python computes the scalar constants in float64
    and the tensors hold them in the compute dtype, so the dtype's overflow is this value exceeding its max
    (float64 itself overflows to inf here). Pure Python on constants: torch.compile folds it, no graph break.

        dpo, spce, sr_dpo   -log sigmoid(0) = log 2 (lam * D = 0)           always finite
        ipo, sr_ipo         (0 - 1/(2 beta))^2
        sppo                (0 - eta (P - 1/2))^2, largest at P in {0, 1}: (eta / 2)^2
        sppo_pair           chosen + rejected term, each (eta / 2)^2 at P in {0, 1}
        inpo                (0 - 1/(2 eta))^2
    """
    if loss in ("ipo", "sr_ipo"):
        margin = 1.0 / (2.0 * hyper["beta"])
        return margin * margin
    if loss == "sppo":
        half = hyper["eta"] * 0.5
        return half * half
    if loss == "sppo_pair":
        half = hyper["eta"] * 0.5
        return half * half + half * half
    if loss == "inpo":
        margin = 1.0 / (2.0 * hyper["eta"])
        return margin * margin
    if loss == "sppo_hard":  # (0 -+ 1/(2 beta))^2, twice
        margin = 0.5 / hyper["beta"]
        return margin * margin + margin * margin
    if loss == "exo_pair":  # 1/2 (log 1/2 - log(1 - eps)) + 1/2 (log 1/2 - log eps)
        eps = hyper["label_smoothing"]
        return 0.5 * abs(-math.log(2.0) - math.log1p(-eps)) + 0.5 * abs(-math.log(2.0) - math.log(eps))
    if loss == "discopop":  # log 2 (1 - 1/2) + e^0 / 2
        return math.log(2.0) * 0.5 + 0.5
    if loss in ("nca_pair", "bco_pair"):  # 2 log 2 (bco_pair's running delta is state, not a hyperparameter)
        return 2.0 * math.log(2.0)
    if loss in ("hinge", "apo_zero", "apo_down"):  # relu(1); 1 - 1/2 + 1/2
        return 1.0
    return math.log(2.0)  # dpo, spce, sr_dpo, robust ((1 - 2 eps) log 2 / (1 - 2 eps)), aot, sigmoid_norm; sft: 0


def _checked(probabilities: tuple[str, ...] = (), **tensors: torch.Tensor) -> list[torch.Tensor]:
    """Validates the named tensors and returns them upcast to a common float dtype (>= float32).

    All must be floating-point tensors of one shape, dtype and device; those named in
    `probabilities` must lie in [0, 1] (NaN is rejected too).
    """
    first_name, first = None, None
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if not tensor.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {tensor.dtype}")
        if first is None:
            first_name, first = name, tensor
            continue
        if tensor.shape != first.shape:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)} but {first_name} has shape {tuple(first.shape)}"
            )
        if tensor.dtype != first.dtype:
            raise ValueError(f"{name} has dtype {tensor.dtype} but {first_name} has dtype {first.dtype}")
        if tensor.device != first.device:
            raise ValueError(f"{name} is on {tensor.device} but {first_name} is on {first.device}")
    for name in probabilities:  # a custom operator: torch.compile traces it without a host sync
        tensors[name] = checked_probabilities(tensors[name], name)
    dtype = torch.promote_types(first.dtype, torch.float32)
    return [t.to(dtype) for t in tensors.values()]


# Type and sign are checked before the tensors (so a bad hyperparameter is named first); the dtype-specific
# bounds once the compute dtype is known (check_hyperparameters).
_WIDEST = torch.float64


def _dtype(tensors: list[torch.Tensor]) -> torch.dtype:
    return tensors[0].dtype


def dpo_loss(pi_w, pi_l, ref_w, ref_l, *, beta):
    """DPO: -log sigmoid(beta ((pi_w - ref_w) - (pi_l - ref_l))).

    Rafailov et al. 2023; the form written in the SPPO paper, eq. 4.9 (a - b = beta (Delta_w - Delta_l)).
    """
    _hyperparameter("beta", beta, positive=True, dtype=_WIDEST)
    tensors = _checked(pi_w=pi_w, pi_l=pi_l, ref_w=ref_w, ref_l=ref_l)
    return _dpo(*tensors, **check_hyperparameters("dpo", _dtype(tensors), beta=beta))


def _dpo(pi_w, pi_l, ref_w, ref_l, *, beta):
    return -F.logsigmoid(beta * ((pi_w - ref_w) - (pi_l - ref_l)))


def ipo_loss(pi_w, pi_l, ref_w, ref_l, *, beta):
    """IPO: ((pi_w - ref_w) - (pi_l - ref_l) - 1/(2 beta))^2.

    Azar et al. 2024 (IPO); in this repository's papers it is the Sr-DPO paper's eq. 14 /
    Algorithm 2 with lam = 0. (SPPO eq. 4.10 quotes a simplified variant with margin 1/beta.)
    """
    _hyperparameter("beta", beta, positive=True, dtype=_WIDEST)
    tensors = _checked(pi_w=pi_w, pi_l=pi_l, ref_w=ref_w, ref_l=ref_l)
    return _ipo(*tensors, **check_hyperparameters("ipo", _dtype(tensors), beta=beta))


def _ipo(pi_w, pi_l, ref_w, ref_l, *, beta):
    return ((pi_w - ref_w) - (pi_l - ref_l) - 1.0 / (2.0 * beta)) ** 2


def sppo_loss(pi, ref, winrate, *, eta):
    """SPPO, per response: (pi - ref - eta (winrate - 1/2))^2.

    SPPO paper eq. 4.6 / 4.7 (Algorithm 1, line 6), with log Z replaced by eta/2. `winrate` is the
    estimated P(y > pi_t | x) of each response against the current policy. Works on any shape,
    e.g. [P, K] when all K sampled responses of each prompt are kept.
    """
    _hyperparameter("eta", eta, positive=True, dtype=_WIDEST)
    tensors = _checked(("winrate",), pi=pi, ref=ref, winrate=winrate)
    return _sppo(*tensors, **check_hyperparameters("sppo", _dtype(tensors), eta=eta))


def _sppo(pi, ref, winrate, *, eta):
    return (pi - ref - eta * (winrate - 0.5)) ** 2


def sppo_pair_loss(pi_w, pi_l, ref_w, ref_l, winrate_w, *, eta):
    """SPPO, pairwise symmetric form: (Delta_w - eta (P - 1/2))^2 + (Delta_l - eta (1 - P - 1/2))^2.

    SPPO paper eq. 4.8, with P = winrate_w = P(y_w > y_l | x), soft in [0, 1] or the hard label 1.
    With P = 1 and eta = 1/beta this is TRL's `sppo_hard` loss.
    """
    _hyperparameter("eta", eta, positive=True, dtype=_WIDEST)
    tensors = _checked(("winrate_w",), pi_w=pi_w, pi_l=pi_l, ref_w=ref_w, ref_l=ref_l, winrate_w=winrate_w)
    return _sppo_pair(*tensors, **check_hyperparameters("sppo_pair", _dtype(tensors), eta=eta))


def _sppo_pair(pi_w, pi_l, ref_w, ref_l, winrate_w, *, eta):
    chosen = (pi_w - ref_w - eta * (winrate_w - 0.5)) ** 2
    rejected = (pi_l - ref_l - eta * (0.5 - winrate_w)) ** 2  # P(y_l > y_w) - 1/2 = 1/2 - P
    return chosen + rejected


def inpo_loss(pi_w, pi_l, ref_w, ref_l, prev_w, prev_l, *, eta, tau):
    """INPO: (h - 1/(2 eta))^2 with
    h = (pi_w - pi_l) - (tau/eta) (ref_w - ref_l) - ((eta - tau)/eta) (prev_w - prev_l).

    INPO paper: h_t defined after eq. 5, loss eq. 8 / Algorithm 1 line 5. prev_* are the log-probs
    of the current iterate pi_t (the previous round's policy), tau the KL weight to the reference
    and 1/eta the OMD learning rate; requires 0 <= tau < eta.
    """
    _hyperparameter("eta", eta, positive=True, dtype=_WIDEST)
    _hyperparameter("tau", tau, dtype=_WIDEST)
    tensors = _checked(pi_w=pi_w, pi_l=pi_l, ref_w=ref_w, ref_l=ref_l, prev_w=prev_w, prev_l=prev_l)
    return _inpo(*tensors, **check_hyperparameters("inpo", _dtype(tensors), eta=eta, tau=tau))


def _inpo(pi_w, pi_l, ref_w, ref_l, prev_w, prev_l, *, eta, tau):
    h = (pi_w - pi_l) - (tau / eta) * (ref_w - ref_l) - ((eta - tau) / eta) * (prev_w - prev_l)
    return (h - 1.0 / (2.0 * eta)) ** 2


def _refinement(aug_pi_w, aug_pi_l, aug_ref_w, aug_ref_l, beta):
    # Sr-DPO eq. 11: D = beta ((aug_pi_w - aug_ref_w) - (aug_pi_l - aug_ref_l)), under stop-gradient.
    return (beta * ((aug_pi_w - aug_ref_w) - (aug_pi_l - aug_ref_l))).detach()


def _self_refined_inputs(loss, pi_w, pi_l, ref_w, ref_l, aug_pi_w, aug_pi_l, aug_ref_w, aug_ref_l, beta, lam):
    """Validated tensors and (beta, lam) shared by Sr-DPO and Sr-IPO."""
    _hyperparameter("beta", beta, positive=True, dtype=_WIDEST)
    _hyperparameter("lam", lam, dtype=_WIDEST)
    tensors = _checked(
        pi_w=pi_w, pi_l=pi_l, ref_w=ref_w, ref_l=ref_l,
        aug_pi_w=aug_pi_w, aug_pi_l=aug_pi_l, aug_ref_w=aug_ref_w, aug_ref_l=aug_ref_l,
    )
    return tensors, check_hyperparameters(loss, _dtype(tensors), beta=beta, lam=lam)


def sr_dpo_loss(pi_w, pi_l, ref_w, ref_l, aug_pi_w, aug_pi_l, aug_ref_w, aug_ref_l, *, beta, lam):
    """Sr-DPO: -log sigmoid(beta ((pi_w - ref_w) - (pi_l - ref_l)) - lam sg[D]),
    D = beta ((aug_pi_w - aug_ref_w) - (aug_pi_l - aug_ref_l)).

    Sr-DPO paper eq. 11 (refinement D on the prompt-augmented query p+x), eq. 12 and Algorithm 1
    (stop-gradient on D), lam >= 0 (eq. 9). No gradient flows into any aug_* argument.
    """
    tensors, hyper = _self_refined_inputs("sr_dpo", pi_w, pi_l, ref_w, ref_l, aug_pi_w, aug_pi_l, aug_ref_w,
                                          aug_ref_l, beta, lam)
    return _sr_dpo(*tensors, **hyper)


def _sr_dpo(pi_w, pi_l, ref_w, ref_l, aug_pi_w, aug_pi_l, aug_ref_w, aug_ref_l, *, beta, lam):
    refinement = _refinement(aug_pi_w, aug_pi_l, aug_ref_w, aug_ref_l, beta)
    return -F.logsigmoid(beta * ((pi_w - ref_w) - (pi_l - ref_l)) - lam * refinement)


def sr_ipo_loss(pi_w, pi_l, ref_w, ref_l, aug_pi_w, aug_pi_l, aug_ref_w, aug_ref_l, *, beta, lam):
    """Sr-IPO: ((pi_w - ref_w) - (pi_l - ref_l) - lam sg[D] - 1/(2 beta))^2,
    D = beta ((aug_pi_w - aug_ref_w) - (aug_pi_l - aug_ref_l)).

    Sr-DPO paper eq. 11 and eq. 14 / Algorithm 2 (stop-gradient on D), lam >= 0. No gradient flows
    into any aug_* argument.
    """
    tensors, hyper = _self_refined_inputs("sr_ipo", pi_w, pi_l, ref_w, ref_l, aug_pi_w, aug_pi_l, aug_ref_w,
                                          aug_ref_l, beta, lam)
    return _sr_ipo(*tensors, **hyper)


def _sr_ipo(pi_w, pi_l, ref_w, ref_l, aug_pi_w, aug_pi_l, aug_ref_w, aug_ref_l, *, beta, lam):
    refinement = _refinement(aug_pi_w, aug_pi_l, aug_ref_w, aug_ref_l, beta)
    return ((pi_w - ref_w) - (pi_l - ref_l) - lam * refinement - 1.0 / (2.0 * beta)) ** 2


def spce_loss(pi_w, pi_l, ref_w, ref_l, target_prob, *, beta):
    """OSP's soft-preference cross-entropy: -(t log sigma(z) + (1 - t) log sigma(-z)),
    z = beta ((pi_w - ref_w) - (pi_l - ref_l)), t = target_prob = p(y_w > y_l | x).

    OSP paper eq. 7 (implicit preference sigma(z)) and eq. 8 (the loss). With t = 1 it is DPO.
    Computed as binary cross-entropy with logits (log-sigmoid form), finite for any finite z.
    """
    _hyperparameter("beta", beta, positive=True, dtype=_WIDEST)
    tensors = _checked(("target_prob",), pi_w=pi_w, pi_l=pi_l, ref_w=ref_w, ref_l=ref_l, target_prob=target_prob)
    return _spce(*tensors, **check_hyperparameters("spce", _dtype(tensors), beta=beta))


def _spce(pi_w, pi_l, ref_w, ref_l, target_prob, *, beta):
    z = beta * ((pi_w - ref_w) - (pi_l - ref_l))
    return F.binary_cross_entropy_with_logits(z, target_prob, reduction="none")


# =============================================================================================== by name
# nash-fast's own losses in their pairwise form, as FusedLinearPreferenceLoss(loss) computes them:
#     PAIR_LOSSES[loss](pi_w, pi_l, ref_w, ref_l, given, hyper) -> per-pair loss [P]
# given: the loss's other per-pair inputs under FusedLinearPreferenceLoss's argument names (winrate, target_prob,
# prev_chosen_logps, aug_ref_chosen_logps, ...; aug_chosen_logps / aug_rejected_logps: the policy's log-probs given
# the prompt-augmented query p+x); hyper: {"beta", "eta", "tau", "lam"}, None where the loss has none.

def _sppo_by_name(pi_w, pi_l, ref_w, ref_l, given, hyper):
    """SPPO eq. 4.8: (Delta_w - eta (P - 1/2))^2 + (Delta_l - eta (1/2 - P))^2, P = winrate = P(y_w > y_l | x)."""
    return sppo_pair_loss(pi_w, pi_l, ref_w, ref_l, given["winrate"], eta=hyper["eta"])


def _inpo_by_name(pi_w, pi_l, ref_w, ref_l, given, hyper):
    """INPO eq. 8: (h - 1/(2 eta))^2, h = (pi_w - pi_l) - (tau/eta) (ref_w - ref_l) - ((eta - tau)/eta) (prev_w -
    prev_l), prev_w / prev_l = prev_chosen_logps / prev_rejected_logps (the current iterate's)."""
    return inpo_loss(pi_w, pi_l, ref_w, ref_l, given["prev_chosen_logps"], given["prev_rejected_logps"],
                     eta=hyper["eta"], tau=hyper["tau"])


def _ipo_by_name(pi_w, pi_l, ref_w, ref_l, given, hyper):
    """IPO (Sr-DPO eq. 14 at lam = 0): (Delta_w - Delta_l - 1/(2 beta))^2."""
    return ipo_loss(pi_w, pi_l, ref_w, ref_l, beta=hyper["beta"])


def _dpo_by_name(pi_w, pi_l, ref_w, ref_l, given, hyper):
    """DPO (SPPO eq. 4.9): -log sigmoid(beta (Delta_w - Delta_l))."""
    return dpo_loss(pi_w, pi_l, ref_w, ref_l, beta=hyper["beta"])


def _spce_by_name(pi_w, pi_l, ref_w, ref_l, given, hyper):
    """OSP eq. 7, 8: -(t log sigma(z) + (1 - t) log sigma(-z)), z = beta (Delta_w - Delta_l), t = target_prob."""
    return spce_loss(pi_w, pi_l, ref_w, ref_l, given["target_prob"], beta=hyper["beta"])


def _sr_dpo_by_name(pi_w, pi_l, ref_w, ref_l, given, hyper):
    """Sr-DPO eq. 11, 12: -log sigmoid(beta (Delta_w - Delta_l) - lam sg[D]),
    D = beta ((aug_pi_w - aug_ref_w) - (aug_pi_l - aug_ref_l)) on the prompt-augmented query."""
    return sr_dpo_loss(pi_w, pi_l, ref_w, ref_l, given["aug_chosen_logps"], given["aug_rejected_logps"],
                       given["aug_ref_chosen_logps"], given["aug_ref_rejected_logps"], beta=hyper["beta"],
                       lam=hyper["lam"])


def _sr_ipo_by_name(pi_w, pi_l, ref_w, ref_l, given, hyper):
    """Sr-IPO, Sr-DPO eq. 11, 14: (Delta_w - Delta_l - lam sg[D] - 1/(2 beta))^2, D as in Sr-DPO."""
    return sr_ipo_loss(pi_w, pi_l, ref_w, ref_l, given["aug_chosen_logps"], given["aug_rejected_logps"],
                       given["aug_ref_chosen_logps"], given["aug_ref_rejected_logps"], beta=hyper["beta"],
                       lam=hyper["lam"])


PAIR_LOSSES = {
    "sppo": _sppo_by_name, "inpo": _inpo_by_name, "ipo": _ipo_by_name, "dpo": _dpo_by_name,
    "sr_dpo": _sr_dpo_by_name, "sr_ipo": _sr_ipo_by_name, "spce": _spce_by_name,
}


# =============================================================================================== TRL's loss types
# Transcribed from trl 1.16.0 (trl/trainer/dpo_trainer.py, DPOTrainer._compute_loss) with TRL's defaults
# (DPOConfig: beta=0.1, label_smoothing=0.0, discopop_tau=0.05); TRL's f_divergence_type is its default
# reverse KL, so its "scores" are the log-ratios Delta.

def _pair(loss, pi_w, pi_l, ref_w, ref_l, **hyper):
    """Checked tensors and hyperparameters of a loss on (pi_w, pi_l, ref_w, ref_l)."""
    for name, value in hyper.items():
        _hyperparameter(name, value, positive=name in _POSITIVE, dtype=_WIDEST)
    tensors = _checked(pi_w=pi_w, pi_l=pi_l, ref_w=ref_w, ref_l=ref_l)
    return tensors, check_hyperparameters(loss, _dtype(tensors), **hyper)


def hinge_loss(pi_w, pi_l, ref_w, ref_l, *, beta):
    """TRL's "hinge": relu(1 - beta ((pi_w - ref_w) - (pi_l - ref_l))).

    The hinge loss on the normalized likelihood of SLiC-HF (Zhao et al. 2023, "SLiC-HF: Sequence Likelihood
    Calibration with Human Feedback"), with margin 1/beta scaled by beta, as TRL and Liger-Kernel write it.
    """
    (pi_w, pi_l, ref_w, ref_l), hyper = _pair("hinge", pi_w, pi_l, ref_w, ref_l, beta=beta)
    return torch.relu(1.0 - hyper["beta"] * ((pi_w - ref_w) - (pi_l - ref_l)))


def exo_pair_loss(pi_w, pi_l, ref_w, ref_l, *, beta, label_smoothing):
    """TRL's "exo_pair": KL(p_f || p_rh) with p_f = softmax(beta [Delta_w, Delta_l]) and p_rh = [1 - eps, eps]:
    s(z) (log s(z) - log(1 - eps)) + s(-z) (log s(-z) - log eps), z = beta (Delta_w - Delta_l), eps =
    label_smoothing in (0, 1).

    EXO-pref, Ji et al. 2024 ("Towards Efficient Exact Optimization of Language Model Alignment"), eq. 16 at K = 2,
    as TRL writes it. TRL refuses eps = 0 (log 0); the paper recommends 1e-3.
    """
    (pi_w, pi_l, ref_w, ref_l), hyper = _pair("exo_pair", pi_w, pi_l, ref_w, ref_l, beta=beta,
                                              label_smoothing=label_smoothing)
    eps = hyper["label_smoothing"]
    z = hyper["beta"] * ((pi_w - ref_w) - (pi_l - ref_l))
    return (torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps))
            + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps)))


def nca_pair_loss(pi_w, pi_l, ref_w, ref_l, *, beta):
    """TRL's "nca_pair": -log s(r_w) - 1/2 log s(-r_w) - 1/2 log s(-r_l), r = beta (pi - ref).

    NCA, Chen et al. 2024 ("Noise Contrastive Alignment of Language Models with Explicit Rewards"), pairwise
    form, as TRL and Liger-Kernel write it.
    """
    (pi_w, pi_l, ref_w, ref_l), hyper = _pair("nca_pair", pi_w, pi_l, ref_w, ref_l, beta=beta)
    r_w, r_l = hyper["beta"] * (pi_w - ref_w), hyper["beta"] * (pi_l - ref_l)
    return -F.logsigmoid(r_w) - 0.5 * F.logsigmoid(-r_w) - 0.5 * F.logsigmoid(-r_l)


def robust_loss(pi_w, pi_l, ref_w, ref_l, *, beta, label_smoothing=0.0):
    """TRL's "robust": (-(1 - eps) log s(z) + eps log s(-z)) / (1 - 2 eps), z = beta (Delta_w - Delta_l),
    eps = label_smoothing in [0, 1/2), the rate at which preference labels are flipped.

    Robust DPO, Chowdhury et al. 2024 ("Provably Robust DPO: Aligning Language Models with Noisy Feedback"),
    the unbiased loss of its Section 3, as TRL and Liger-Kernel write it. eps = 0 is DPO.
    """
    (pi_w, pi_l, ref_w, ref_l), hyper = _pair("robust", pi_w, pi_l, ref_w, ref_l, beta=beta,
                                              label_smoothing=label_smoothing)
    eps = hyper["label_smoothing"]
    z = hyper["beta"] * ((pi_w - ref_w) - (pi_l - ref_l))
    return (-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)


def bco_pair_loss(pi_w, pi_l, ref_w, ref_l, *, beta, delta=0.0):
    """TRL's "bco_pair": -log s(r_w - delta) - log s(-(r_l - delta)), r = beta (pi - ref).

    BCO, Jung et al. 2024 ("Binary Classifier Optimization for Large Language Model Alignment"): the rewards are
    a binary classifier's logits, shifted by delta. TRL 1.x and Liger-Kernel 0.8.5 use delta = 0; TRL 0.x kept
    delta as the running mean of the batches' mean rewards (RunningMoments below, updated before each use), which
    FusedLinearPreferenceLoss(..., bco_running_mean=True) does.
    """
    _hyperparameter("delta", delta, dtype=_WIDEST)
    (pi_w, pi_l, ref_w, ref_l), hyper = _pair("bco_pair", pi_w, pi_l, ref_w, ref_l, beta=beta)
    delta = float(delta)
    return -F.logsigmoid(hyper["beta"] * (pi_w - ref_w) - delta) - F.logsigmoid(-(hyper["beta"] * (pi_l - ref_l) - delta))


def sppo_hard_loss(pi_w, pi_l, ref_w, ref_l, *, beta):
    """TRL's "sppo_hard": (Delta_w - 1/(2 beta))^2 + (Delta_l + 1/(2 beta))^2.

    SPPO eq. 4.8 (Algorithm 1) with the hard win probability P = 1 and eta = 1 / beta: sppo_pair_loss(...,
    winrate_w=1, eta=1/beta), as TRL and Liger-Kernel write it (0.5 / beta).
    """
    (pi_w, pi_l, ref_w, ref_l), hyper = _pair("sppo_hard", pi_w, pi_l, ref_w, ref_l, beta=beta)
    half = 0.5 / hyper["beta"]
    return (pi_w - ref_w - half) ** 2 + (pi_l - ref_l + half) ** 2


def _conservative(delta, beta, eps):
    # cDPO's smoothed logistic loss, as TRL's aot / aot_unpaired write it
    return -F.logsigmoid(beta * delta) * (1.0 - eps) - F.logsigmoid(-beta * delta) * eps


def aot_loss(pi_w, pi_l, ref_w, ref_l, *, beta, label_smoothing=0.0):
    """TRL's "aot" (paired): with Delta = sort(pi_w - pi_l) - sort(ref_w - ref_l) over the batch (dim 0),
    -(1 - eps) log s(beta Delta) - eps log s(-beta Delta), eps = label_smoothing in [0, 1].

    AOT, Melnyk et al. 2024 ("Distributional Preference Alignment of LLMs via Optimal Transport"): the first-order
    stochastic dominance of the chosen over the rejected log-ratio distribution, computed by sorting the batch.
    Entry i is the loss of the i-th quantile, not of pair i; only its mean (TRL's reduction) means something.
    """
    (pi_w, pi_l, ref_w, ref_l), hyper = _pair("aot", pi_w, pi_l, ref_w, ref_l, beta=beta,
                                              label_smoothing=label_smoothing)
    _batch_dimension("aot", pi_w)
    delta = torch.sort(pi_w - pi_l, dim=0)[0] - torch.sort(ref_w - ref_l, dim=0)[0]
    return _conservative(delta, hyper["beta"], hyper["label_smoothing"])


def aot_unpaired_loss(pi_w, pi_l, ref_w, ref_l, *, beta, label_smoothing=0.0):
    """TRL's "aot_unpaired" (TRL 0.x: "aot_pair"): with Delta = sort(pi_w - ref_w) - sort(pi_l - ref_l) over the
    batch (dim 0), -(1 - eps) log s(beta Delta) - eps log s(-beta Delta), eps = label_smoothing in [0, 1].

    AOT, Melnyk et al. 2024, unpaired form (chosen and rejected log-ratios sorted separately). Entry i is the loss
    of the i-th quantile; only its mean means something.
    """
    (pi_w, pi_l, ref_w, ref_l), hyper = _pair("aot_unpaired", pi_w, pi_l, ref_w, ref_l, beta=beta,
                                              label_smoothing=label_smoothing)
    _batch_dimension("aot_unpaired", pi_w)
    delta = torch.sort(pi_w - ref_w, dim=0)[0] - torch.sort(pi_l - ref_l, dim=0)[0]
    return _conservative(delta, hyper["beta"], hyper["label_smoothing"])


def _batch_dimension(loss, tensor):
    if tensor.dim() == 0:
        raise ValueError(f"the {loss} loss sorts over the batch: pi_w must have a batch dimension (dim 0), got a scalar")


def apo_zero_loss(pi_w, pi_l, ref_w, ref_l, *, beta):
    """TRL's "apo_zero": (1 - s(r_w)) + s(r_l), r = beta (pi - ref): raise the chosen likelihood, lower the rejected.

    APO-zero, D'Oosterlinck et al. 2024 ("Anchored Preference Optimization and Contrastive Revisions"), eq. 7.
    """
    (pi_w, pi_l, ref_w, ref_l), hyper = _pair("apo_zero", pi_w, pi_l, ref_w, ref_l, beta=beta)
    return (1.0 - torch.sigmoid(hyper["beta"] * (pi_w - ref_w))) + torch.sigmoid(hyper["beta"] * (pi_l - ref_l))


def apo_down_loss(pi_w, pi_l, ref_w, ref_l, *, beta):
    """TRL's "apo_down": s(r_w) + (1 - s(beta (Delta_w - Delta_l))): lower both likelihoods, the rejected more.

    APO-down, D'Oosterlinck et al. 2024, eq. 8.
    """
    (pi_w, pi_l, ref_w, ref_l), hyper = _pair("apo_down", pi_w, pi_l, ref_w, ref_l, beta=beta)
    beta = hyper["beta"]
    return torch.sigmoid(beta * (pi_w - ref_w)) + (1.0 - torch.sigmoid(beta * ((pi_w - ref_w) - (pi_l - ref_l))))


def discopop_loss(pi_w, pi_l, ref_w, ref_l, *, beta, discopop_tau=0.05):
    """TRL's "discopop": with l = beta (Delta_w - Delta_l) and m = s(l / tau),
    -log s(l) (1 - m) + e^-l m  (the log-ratio modulated loss).

    DiscoPOP, Chris Lu et al. 2024 ("Discovering Preference Optimization Algorithms with and for Large Language
    Models"), eq. 5; tau = discopop_tau > 0 (TRL's default and the paper's recommendation: 0.05). e^-l m is
    computed as exp(-l + log s(l/tau)) and 1 - m as s(-l/tau), equal in exact arithmetic, so that e^-l's overflow
    at very negative l never meets m's underflow (inf * 0 in TRL's form): finite whenever the loss is.
    """
    (pi_w, pi_l, ref_w, ref_l), hyper = _pair("discopop", pi_w, pi_l, ref_w, ref_l, beta=beta, discopop_tau=discopop_tau)
    logits = hyper["beta"] * ((pi_w - ref_w) - (pi_l - ref_l))
    scaled = logits / hyper["discopop_tau"]
    return -F.logsigmoid(logits) * torch.sigmoid(-scaled) + torch.exp(F.logsigmoid(scaled) - logits)


def sigmoid_norm_loss(pi_w, pi_l, ref_w, ref_l, num_tokens_w, num_tokens_l, *, beta):
    """TRL's "sigmoid_norm": -log s(beta ((pi_w - ref_w) / n_w - (pi_l - ref_l) / n_l)), n = max(num_tokens, 1).

    DPO on per-token mean log-ratios (TRL's length-normalized DPO): pi and ref are log-probs summed over the
    response's n scored tokens. (TRL's "ipo" normalizes the same way: ipo_loss on pi / n, ref / n.)
    """
    _hyperparameter("beta", beta, positive=True, dtype=_WIDEST)
    pi_w, pi_l, ref_w, ref_l, n_w, n_l = _checked(pi_w=pi_w, pi_l=pi_l, ref_w=ref_w, ref_l=ref_l,
                                                  num_tokens_w=num_tokens_w, num_tokens_l=num_tokens_l)
    hyper = check_hyperparameters("sigmoid_norm", _dtype([pi_w]), beta=beta)
    return -F.logsigmoid(hyper["beta"] * ((pi_w - ref_w) / n_w.clamp(min=1.0) - (pi_l - ref_l) / n_l.clamp(min=1.0)))


def sft_loss(pi_w, num_tokens_w):
    """TRL's "sft": the chosen responses' negative log-likelihood per token over the whole batch,
    -sum(pi_w) / max(sum(n_w), 1), returned for every pair (TRL expands the scalar; its mean is the value).

    pi_w are the chosen responses' summed log-probs and num_tokens_w their scored tokens (TRL: the mean of every
    chosen token's log-prob; its RPO / MPO mixes add it to a preference loss through loss_weights).
    """
    pi_w, n_w = _checked(pi_w=pi_w, num_tokens_w=num_tokens_w)
    return (-pi_w.sum() / n_w.sum().clamp(min=1.0)).expand(pi_w.shape)


class RunningMoments:
    """The running mean (and variance) of a stream of batches, TRL 0.x's trl.trainer.utils.RunningMoments (from
    MOSS-RLHF), which TRL's "bco_pair" kept as its reward shift delta: each update(xs) merges the batch's mean and
    (biased) variance in float32, then adds to the float64 Python state, exactly as TRL's code does:

        delta = mean(xs) - mean;  total = count + n
        mean += delta n / total;  var = (var count + delta^2 count n / total + var(xs) n) / total;  count = total

    starting at mean 0, var 1, count 1e-24. Across processes (torch.distributed initialized, world > 1) the batch's
    moments are those of every process's xs together (TRL's get_global_statistics: all-reduced sum, count and
    squared deviations), so every rank keeps the same state. state_dict() / load_state_dict() are plain floats
    (JSON round-trips them exactly), saved in the trainer's checkpoints.
    """

    def __init__(self):
        self.mean, self.std, self.var, self.count = 0.0, 1.0, 1.0, 1e-24

    @torch.no_grad()
    def update(self, xs: torch.Tensor) -> bool:
        """Merges the batch xs; returns False (state unchanged) when its moments are not finite (TRL merges them,
        and every later mean is then NaN)."""
        import torch.distributed as dist

        xs = xs.detach().float()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            sum_and_count = torch.stack([xs.sum(), torch.tensor(float(xs.numel()), device=xs.device)])
            dist.all_reduce(sum_and_count)
            xs_mean = sum_and_count[0] / sum_and_count[1]
            sum_var = ((xs - xs_mean) ** 2).sum()
            dist.all_reduce(sum_var)
            xs_var, xs_count = sum_var / sum_and_count[1], sum_and_count[1].item()
        else:
            xs_count = xs.numel()
            xs_var, xs_mean = torch.var_mean(xs, unbiased=False)
        xs_mean, xs_var = xs_mean.float(), xs_var.float()
        if not bool(torch.isfinite(xs_mean) & torch.isfinite(xs_var)):  # the same decision on every rank
            return False
        delta = xs_mean - self.mean
        total = self.count + xs_count
        new_sum = xs_var * xs_count
        old_sum = self.var * self.count + delta**2 * self.count * xs_count / total
        total_sum = old_sum + new_sum
        self.mean += (delta * xs_count / total).item()
        new_var = total_sum / total
        self.std = (new_var * total / (total - 1)).float().sqrt().item()
        self.var = new_var.item()
        self.count = total
        return True

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "std": self.std, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or sorted(state) != ["count", "mean", "std", "var"] or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in state.values()):
            raise ValueError(f"RunningMoments state must be {{mean, std, var, count}} numbers, got {state!r:.200}")
        self.mean, self.std, self.var, self.count = (float(state[k]) for k in ("mean", "std", "var", "count"))


# TRL's loss_type names -> the function computing it here ("sigmoid" is DPO; "ipo" is IPO on per-token means,
# see FusedLinearPreferenceLoss; "aot_pair" is TRL 0.x's name of "aot_unpaired").
LOSS_TYPES = {
    "sigmoid": dpo_loss, "hinge": hinge_loss, "ipo": ipo_loss, "exo_pair": exo_pair_loss, "nca_pair": nca_pair_loss,
    "robust": robust_loss, "bco_pair": bco_pair_loss, "sppo_hard": sppo_hard_loss, "aot": aot_loss,
    "aot_unpaired": aot_unpaired_loss, "aot_pair": aot_unpaired_loss, "apo_zero": apo_zero_loss,
    "apo_down": apo_down_loss, "discopop": discopop_loss, "sft": sft_loss, "sigmoid_norm": sigmoid_norm_loss,
}
