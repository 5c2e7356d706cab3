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
    "check_hyperparameters",
]


# What each loss reads and the domain of each hyperparameter (the papers'): beta > 0 (DPO/IPO/SPCE/Sr-*),
# eta > 0 (SPPO, INPO), 0 <= tau < eta (INPO), lam >= 0 (Sr-DPO eq. 9: "lambda is a positive constant";
# lam = 0 is plain DPO / IPO). The trainer's flags follow the same rule (nash_fast.config calls
# check_hyperparameters), so the API and the CLI accept exactly the same values.
HYPERPARAMETERS = {
    "dpo": ("beta",), "ipo": ("beta",), "sppo": ("eta",), "sppo_pair": ("eta",), "inpo": ("eta", "tau"),
    "sr_dpo": ("beta", "lam"), "sr_ipo": ("beta", "lam"), "spce": ("beta",),
}
_POSITIVE = ("beta", "eta")
_NON_NEGATIVE = ("tau", "lam")


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
    return math.log(2.0)


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
