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
]


def _hyperparameter(name: str, value, *, positive: bool = False) -> float:
    """Returns `value` as a float after checking it is a finite real number (and > 0 if `positive`)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return value


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


def dpo_loss(pi_w, pi_l, ref_w, ref_l, *, beta):
    """DPO: -log sigmoid(beta ((pi_w - ref_w) - (pi_l - ref_l))).

    Rafailov et al. 2023; the form written in the SPPO paper, eq. 4.9 (a - b = beta (Delta_w - Delta_l)).
    """
    beta = _hyperparameter("beta", beta, positive=True)
    pi_w, pi_l, ref_w, ref_l = _checked(pi_w=pi_w, pi_l=pi_l, ref_w=ref_w, ref_l=ref_l)
    return -F.logsigmoid(beta * ((pi_w - ref_w) - (pi_l - ref_l)))


def ipo_loss(pi_w, pi_l, ref_w, ref_l, *, beta):
    """IPO: ((pi_w - ref_w) - (pi_l - ref_l) - 1/(2 beta))^2.

    Azar et al. 2024 (IPO); in this repository's papers it is the Sr-DPO paper's eq. 14 /
    Algorithm 2 with lam = 0. (SPPO eq. 4.10 quotes a simplified variant with margin 1/beta.)
    """
    beta = _hyperparameter("beta", beta, positive=True)
    pi_w, pi_l, ref_w, ref_l = _checked(pi_w=pi_w, pi_l=pi_l, ref_w=ref_w, ref_l=ref_l)
    return ((pi_w - ref_w) - (pi_l - ref_l) - 1.0 / (2.0 * beta)) ** 2


def sppo_loss(pi, ref, winrate, *, eta):
    """SPPO, per response: (pi - ref - eta (winrate - 1/2))^2.

    SPPO paper eq. 4.6 / 4.7 (Algorithm 1, line 6), with log Z replaced by eta/2. `winrate` is the
    estimated P(y > pi_t | x) of each response against the current policy. Works on any shape,
    e.g. [P, K] when all K sampled responses of each prompt are kept.
    """
    eta = _hyperparameter("eta", eta, positive=True)
    pi, ref, winrate = _checked(("winrate",), pi=pi, ref=ref, winrate=winrate)
    return (pi - ref - eta * (winrate - 0.5)) ** 2


def sppo_pair_loss(pi_w, pi_l, ref_w, ref_l, winrate_w, *, eta):
    """SPPO, pairwise symmetric form: (Delta_w - eta (P - 1/2))^2 + (Delta_l - eta (1 - P - 1/2))^2.

    SPPO paper eq. 4.8, with P = winrate_w = P(y_w > y_l | x), soft in [0, 1] or the hard label 1.
    With P = 1 and eta = 1/beta this is TRL's `sppo_hard` loss.
    """
    eta = _hyperparameter("eta", eta, positive=True)
    pi_w, pi_l, ref_w, ref_l, winrate_w = _checked(
        ("winrate_w",), pi_w=pi_w, pi_l=pi_l, ref_w=ref_w, ref_l=ref_l, winrate_w=winrate_w
    )
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
    eta = _hyperparameter("eta", eta, positive=True)
    tau = _hyperparameter("tau", tau)
    if not 0.0 <= tau < eta:
        raise ValueError(f"tau must satisfy 0 <= tau < eta, got tau={tau!r}, eta={eta!r}")
    pi_w, pi_l, ref_w, ref_l, prev_w, prev_l = _checked(
        pi_w=pi_w, pi_l=pi_l, ref_w=ref_w, ref_l=ref_l, prev_w=prev_w, prev_l=prev_l
    )
    h = (pi_w - pi_l) - (tau / eta) * (ref_w - ref_l) - ((eta - tau) / eta) * (prev_w - prev_l)
    return (h - 1.0 / (2.0 * eta)) ** 2


def _refinement(aug_pi_w, aug_pi_l, aug_ref_w, aug_ref_l, beta):
    # Sr-DPO eq. 11: D = beta ((aug_pi_w - aug_ref_w) - (aug_pi_l - aug_ref_l)), under stop-gradient.
    return (beta * ((aug_pi_w - aug_ref_w) - (aug_pi_l - aug_ref_l))).detach()


def _self_refined_terms(pi_w, pi_l, ref_w, ref_l, aug_pi_w, aug_pi_l, aug_ref_w, aug_ref_l, beta, lam):
    """Validated (Delta_w - Delta_l, sg[D], beta, lam) shared by Sr-DPO and Sr-IPO."""
    beta = _hyperparameter("beta", beta, positive=True)
    lam = _hyperparameter("lam", lam)
    pi_w, pi_l, ref_w, ref_l, aug_pi_w, aug_pi_l, aug_ref_w, aug_ref_l = _checked(
        pi_w=pi_w, pi_l=pi_l, ref_w=ref_w, ref_l=ref_l,
        aug_pi_w=aug_pi_w, aug_pi_l=aug_pi_l, aug_ref_w=aug_ref_w, aug_ref_l=aug_ref_l,
    )
    refinement = _refinement(aug_pi_w, aug_pi_l, aug_ref_w, aug_ref_l, beta)
    return (pi_w - ref_w) - (pi_l - ref_l), refinement, beta, lam


def sr_dpo_loss(pi_w, pi_l, ref_w, ref_l, aug_pi_w, aug_pi_l, aug_ref_w, aug_ref_l, *, beta, lam):
    """Sr-DPO: -log sigmoid(beta ((pi_w - ref_w) - (pi_l - ref_l)) - lam sg[D]),
    D = beta ((aug_pi_w - aug_ref_w) - (aug_pi_l - aug_ref_l)).

    Sr-DPO paper eq. 11 (refinement D on the prompt-augmented query p+x), eq. 12 and Algorithm 1
    (stop-gradient on D). No gradient flows into any aug_* argument.
    """
    margin, refinement, beta, lam = _self_refined_terms(
        pi_w, pi_l, ref_w, ref_l, aug_pi_w, aug_pi_l, aug_ref_w, aug_ref_l, beta, lam)
    return -F.logsigmoid(beta * margin - lam * refinement)


def sr_ipo_loss(pi_w, pi_l, ref_w, ref_l, aug_pi_w, aug_pi_l, aug_ref_w, aug_ref_l, *, beta, lam):
    """Sr-IPO: ((pi_w - ref_w) - (pi_l - ref_l) - lam sg[D] - 1/(2 beta))^2,
    D = beta ((aug_pi_w - aug_ref_w) - (aug_pi_l - aug_ref_l)).

    Sr-DPO paper eq. 11 and eq. 14 / Algorithm 2 (stop-gradient on D). No gradient flows into any
    aug_* argument.
    """
    margin, refinement, beta, lam = _self_refined_terms(
        pi_w, pi_l, ref_w, ref_l, aug_pi_w, aug_pi_l, aug_ref_w, aug_ref_l, beta, lam)
    return (margin - lam * refinement - 1.0 / (2.0 * beta)) ** 2


def spce_loss(pi_w, pi_l, ref_w, ref_l, target_prob, *, beta):
    """OSP's soft-preference cross-entropy: -(t log sigma(z) + (1 - t) log sigma(-z)),
    z = beta ((pi_w - ref_w) - (pi_l - ref_l)), t = target_prob = p(y_w > y_l | x).

    OSP paper eq. 7 (implicit preference sigma(z)) and eq. 8 (the loss). With t = 1 it is DPO.
    Computed as binary cross-entropy with logits (log-sigmoid form), finite for any finite z.
    """
    beta = _hyperparameter("beta", beta, positive=True)
    pi_w, pi_l, ref_w, ref_l, target_prob = _checked(
        ("target_prob",), pi_w=pi_w, pi_l=pi_l, ref_w=ref_w, ref_l=ref_l, target_prob=target_prob
    )
    z = beta * ((pi_w - ref_w) - (pi_l - ref_l))
    return F.binary_cross_entropy_with_logits(z, target_prob, reduction="none")
