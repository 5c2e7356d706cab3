"""FusedLinearPreferenceLoss: LM-head weight + final hidden states -> (preference loss, metrics).

One module for every loss of `nash_fast.losses`. The policy's per-sequence log-probs come from
`nash_fast.sequence_logprobs` (the [tokens x vocab] logits are never materialized); everything the
policy does not produce with gradient (reference, previous iterate, reference on the augmented
query, win rates, target preferences) is passed in as precomputed per-pair tensors.

Two batch layouts:

  Liger layout (cu_seqlens=None): hidden [2B, T, H], labels [2B, T], rows 0..B-1 the chosen and
    rows B..2B-1 the rejected responses of pairs 0..B-1 (Liger-Kernel's convention). Sr-DPO /
    Sr-IPO take the prompt-augmented sequences p+x as aug_hidden [2B, T', H], aug_labels [2B, T'],
    in the same order.

  Packed layout (the PackedPreferenceCollator's): hidden [N, H] or [1, N, H], labels [N] or [1, N],
    cu_seqlens int32 [S + 1], role [S] (0 chosen, 1 rejected, 2 augmented chosen, 3 augmented
    rejected) and pair_index [S] (which pair, 0..P-1, each sequence belongs to). Every pair needs
    exactly one sequence of each role its loss uses.

labels[i] is the token predicted at position i (already shifted), ignore_index elsewhere.
Precomputed per-pair tensors are [P] (P = B in the Liger layout), ordered by pair id.

Gradient flows only through the chosen and rejected sequences: in the packed layout their
log-probs come from one sequence_logprobs call with the augmented sequences' labels set to
ignore_index (so their tokens are skipped), and the policy's augmented log-probs from a second
call under torch.no_grad() with the other labels ignored. Sr-DPO's refinement term is under
stop-gradient (Sr-DPO paper, Algorithm 1), so no backward ever runs through augmented tokens.

SPPO takes two forms. Pairwise (SPPO eq. 4.8): ref_chosen_logps, ref_rejected_logps and
winrate [P] = P(y_w > y_l | x), the rejected response getting 1 - P. All responses (SPPO eq. 4.7,
all K samples kept): pass ref_logps [S] and winrate [S] = P(y > pi_t | x), one per sequence; every
sequence is one response (role must be None or all 0; pair_index, optional, groups the responses
of one prompt and only feeds the num_prompts metric); the loss averages over responses.

Switching from Liger-Kernel's LigerFusedLinearDPOLoss:

    liger = LigerFusedLinearDPOLoss(ignore_index=-100, beta=0.1)
    loss, aux = liger(lin_weight, _input, target, bias, ref_input, ref_weight, ref_bias)
becomes
    ours = FusedLinearPreferenceLoss("dpo", beta=0.1, ignore_index=-100)
    with torch.no_grad():
        ref = sequence_logprobs(ref_input, ref_weight, target, bias=ref_bias)  # [2B]
    loss, metrics = ours(lin_weight, _input, target, bias=bias,
                         ref_chosen_logps=ref[:B], ref_rejected_logps=ref[B:])

i.e. the reference enters as precomputed log-probs (from any pass: a separate model, a cached
dataset column) instead of a reference model's hidden states and weight. Liger's compute_nll_loss
has no equivalent here (add an SFT term yourself); compiled and chunk_size are replaced by
`backend`. Liger can average log-probs over tokens: set average_log_prob=True to match that.
The second return value is a dict of detached metrics instead of Liger's aux tuple.

Metrics (detached float tensors, means over pairs): loss (mean per-pair loss, whatever the
reduction), chosen_logratio (pi_w - ref_w), rejected_logratio (pi_l - ref_l), reward_margin
(beta (Delta_w - Delta_l) for dpo/ipo/spce/sr_dpo/sr_ipo; Delta_w - Delta_l for sppo and inpo,
which have no beta), reward_accuracy (fraction with Delta_w > Delta_l), policy_chosen_logps,
policy_rejected_logps, num_pairs, num_tokens (scored tokens of the gradient pass), and for Sr-*
refinement (mean D of Sr-DPO eq. 11). The SPPO all-responses form reports loss, logratio,
policy_logps, num_responses, num_tokens and, with pair_index, num_prompts.
"""

from __future__ import annotations

import torch

from nash_fast import losses
from nash_fast.logprobs import sequence_logprobs
from nash_fast.losses import _hyperparameter

__all__ = ["FusedLinearPreferenceLoss"]

CHOSEN, REJECTED, AUG_CHOSEN, AUG_REJECTED = 0, 1, 2, 3

DEFAULT_BETA = 0.1

# Hyperparameters each loss reads; any other one given is an error, not silently ignored.
_HYPERPARAMETERS = {
    "sppo": ("beta", "eta"),  # eta, or beta as eta = 1 / beta (TRL's sppo_hard convention)
    "inpo": ("eta", "tau"),
    "ipo": ("beta",),
    "dpo": ("beta",),
    "sr_dpo": ("beta", "lam"),
    "sr_ipo": ("beta", "lam"),
    "spce": ("beta",),
}

# Precomputed inputs each loss needs in its pairwise form.
_PAIR_INPUTS = {
    "sppo": ("ref_chosen_logps", "ref_rejected_logps", "winrate"),
    "inpo": ("ref_chosen_logps", "ref_rejected_logps", "prev_chosen_logps", "prev_rejected_logps"),
    "ipo": ("ref_chosen_logps", "ref_rejected_logps"),
    "dpo": ("ref_chosen_logps", "ref_rejected_logps"),
    "sr_dpo": ("ref_chosen_logps", "ref_rejected_logps", "aug_ref_chosen_logps", "aug_ref_rejected_logps"),
    "sr_ipo": ("ref_chosen_logps", "ref_rejected_logps", "aug_ref_chosen_logps", "aug_ref_rejected_logps"),
    "spce": ("ref_chosen_logps", "ref_rejected_logps", "target_prob"),
}
_ALL_RESPONSES_INPUTS = ("ref_logps", "winrate")
_PROBABILITIES = ("winrate", "target_prob")

_LIGER_ONLY = {
    "compute_nll_loss": "there is no NLL term; add an SFT loss separately",
    "compiled": "use backend=",
    "chunk_size": "use backend=; chunking is internal",
    "use_ref_model": "pass ref_chosen_logps / ref_rejected_logps to forward",
}


class FusedLinearPreferenceLoss(torch.nn.Module):
    """(loss, metrics) of SPPO / INPO / IPO / DPO / Sr-DPO / Sr-IPO / SPCE from hidden states.

    Args:
        loss: "sppo", "inpo", "ipo", "dpo", "sr_dpo", "sr_ipo" or "spce" (see nash_fast.losses).
        beta: inverse temperature of dpo/ipo/spce/sr_dpo/sr_ipo; None means 0.1. For sppo it may be
            given instead of eta, meaning eta = 1 / beta (so beta matches TRL's sppo_hard).
        eta: SPPO's eta (default 1 / 0.1 = 10 when neither eta nor beta is given) or INPO's eta
            (required).
        tau: INPO's KL weight to the reference, 0 <= tau < eta (required for inpo).
        lam: Sr-DPO / Sr-IPO refinement weight (required for those).
        average_log_prob: average each sequence's log-prob over its scored tokens instead of summing.
        ignore_index: label value of unscored positions.
        softcap: final-logit soft-cap (Gemma-2), passed to sequence_logprobs.
        backend: "auto", "torch" or "triton", passed to sequence_logprobs.
        reduction: "mean" or "sum" over pairs (responses), or "none" for the per-pair losses.

    A hyperparameter the chosen loss does not read raises ValueError, as does any unknown keyword.
    """

    def __init__(
        self,
        loss: str = "sppo",
        *,
        beta: float | None = None,
        eta: float | None = None,
        tau: float | None = None,
        lam: float | None = None,
        average_log_prob: bool = False,
        ignore_index: int = -100,
        softcap: float | None = None,
        backend: str = "auto",
        reduction: str = "mean",
        **unknown,
    ):
        super().__init__()
        if unknown:
            hints = "; ".join(f"{k}: {_LIGER_ONLY[k]}" for k in sorted(unknown) if k in _LIGER_ONLY)
            raise ValueError(f"unknown argument(s) {sorted(unknown)}" + (f" ({hints})" if hints else ""))
        if loss not in _HYPERPARAMETERS:
            raise ValueError(f"loss must be one of {sorted(_HYPERPARAMETERS)}, got {loss!r}")
        given = {k: v for k, v in dict(beta=beta, eta=eta, tau=tau, lam=lam).items() if v is not None}
        unused = sorted(set(given) - set(_HYPERPARAMETERS[loss]))
        if unused:
            raise ValueError(f"{', '.join(unused)} not used by loss={loss!r} (it reads {_HYPERPARAMETERS[loss]})")
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        if backend not in ("auto", "torch", "triton"):
            raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
        if softcap is not None:
            softcap = _hyperparameter("softcap", softcap, positive=True)
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")

        self.beta = self.eta = self.tau = self.lam = None
        if loss == "sppo":
            if beta is not None and eta is not None:
                raise ValueError("give eta or beta for loss='sppo' (eta = 1 / beta), not both")
            if eta is None:
                eta = 1.0 / _hyperparameter("beta", DEFAULT_BETA if beta is None else beta, positive=True)
            self.eta = _hyperparameter("eta", eta, positive=True)
        elif loss == "inpo":
            for name, value in (("eta", eta), ("tau", tau)):
                if value is None:
                    raise ValueError(f"loss='inpo' needs {name}")
            self.eta = _hyperparameter("eta", eta, positive=True)
            self.tau = _hyperparameter("tau", tau)
            if not 0.0 <= self.tau < self.eta:
                raise ValueError(f"tau must satisfy 0 <= tau < eta, got tau={tau!r}, eta={eta!r}")
        else:
            self.beta = _hyperparameter("beta", DEFAULT_BETA if beta is None else beta, positive=True)
            if loss in ("sr_dpo", "sr_ipo"):
                if lam is None:
                    raise ValueError(f"loss={loss!r} needs lam")
                self.lam = _hyperparameter("lam", lam)

        self.loss = loss
        self.average_log_prob = bool(average_log_prob)
        self.ignore_index = ignore_index
        self.softcap = softcap
        self.backend = backend
        self.reduction = reduction

    def extra_repr(self) -> str:
        hyper = {k: getattr(self, k) for k in ("beta", "eta", "tau", "lam") if getattr(self, k) is not None}
        return f"loss={self.loss!r}, " + ", ".join(f"{k}={v}" for k, v in hyper.items()) + (
            f", average_log_prob={self.average_log_prob}, reduction={self.reduction!r}, backend={self.backend!r}"
        )

    @property
    def _uses_augmented(self) -> bool:
        return self.loss in ("sr_dpo", "sr_ipo")

    def _logps(self, hidden, weight, labels, bias, cu_seqlens=None):
        return sequence_logprobs(
            hidden, weight, labels, cu_seqlens=cu_seqlens, ignore_index=self.ignore_index,
            average=self.average_log_prob, bias=bias, softcap=self.softcap, backend=self.backend,
        )

    def forward(
        self,
        weight: torch.Tensor,
        hidden: torch.Tensor,
        labels: torch.Tensor,
        *,
        bias: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        role: torch.Tensor | None = None,
        pair_index: torch.Tensor | None = None,
        ref_chosen_logps: torch.Tensor | None = None,
        ref_rejected_logps: torch.Tensor | None = None,
        prev_chosen_logps: torch.Tensor | None = None,
        prev_rejected_logps: torch.Tensor | None = None,
        aug_ref_chosen_logps: torch.Tensor | None = None,
        aug_ref_rejected_logps: torch.Tensor | None = None,
        aug_hidden: torch.Tensor | None = None,
        aug_labels: torch.Tensor | None = None,
        winrate: torch.Tensor | None = None,
        target_prob: torch.Tensor | None = None,
        ref_logps: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Returns (loss, metrics); loss is a scalar ("mean"/"sum") or [P] ("none")."""
        precomputed = dict(
            ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
            prev_chosen_logps=prev_chosen_logps, prev_rejected_logps=prev_rejected_logps,
            aug_ref_chosen_logps=aug_ref_chosen_logps, aug_ref_rejected_logps=aug_ref_rejected_logps,
            winrate=winrate, target_prob=target_prob, ref_logps=ref_logps,
        )
        all_responses = self.loss == "sppo" and ref_logps is not None
        needed = _ALL_RESPONSES_INPUTS if all_responses else _PAIR_INPUTS[self.loss]
        for name in needed:
            if precomputed[name] is None:
                raise ValueError(f"loss={self.loss!r} needs {name}")
        for name, value in precomputed.items():
            if value is not None and name not in needed:
                form = " in the all-responses form (ref_logps given)" if all_responses else ""
                raise ValueError(f"{name} is not used by loss={self.loss!r}{form}")
        if not self._uses_augmented or all_responses:
            for name, value in (("aug_hidden", aug_hidden), ("aug_labels", aug_labels)):
                if value is not None:
                    raise ValueError(f"{name} is only used by loss='sr_dpo' / 'sr_ipo'")
        if not isinstance(hidden, torch.Tensor):
            raise ValueError(f"hidden must be a tensor, got {type(hidden).__name__}")

        if all_responses:
            return self._all_responses(weight, hidden, labels, bias, cu_seqlens, role, pair_index, ref_logps, winrate)

        if cu_seqlens is None:
            chosen, rejected, aug_chosen, aug_rejected, num_tokens = self._liger_layout(
                weight, hidden, labels, bias, role, pair_index, aug_hidden, aug_labels
            )
        else:
            for name, value in (("aug_hidden", aug_hidden), ("aug_labels", aug_labels)):
                if value is not None:
                    raise ValueError(
                        f"{name} is for the Liger layout; packed batches carry augmented sequences as role 2/3"
                    )
            chosen, rejected, aug_chosen, aug_rejected, num_tokens = self._packed_layout(
                weight, hidden, labels, bias, cu_seqlens, role, pair_index
            )

        num_pairs = chosen.shape[0]
        given = {
            name: _per_example(name, precomputed[name], num_pairs, chosen.device, name in _PROBABILITIES)
            for name in needed
        }
        ref_w, ref_l = given["ref_chosen_logps"], given["ref_rejected_logps"]
        if self.loss == "sppo":
            per_pair = losses.sppo_pair_loss(chosen, rejected, ref_w, ref_l, given["winrate"], eta=self.eta)
        elif self.loss == "inpo":
            per_pair = losses.inpo_loss(
                chosen, rejected, ref_w, ref_l, given["prev_chosen_logps"], given["prev_rejected_logps"],
                eta=self.eta, tau=self.tau,
            )
        elif self.loss == "ipo":
            per_pair = losses.ipo_loss(chosen, rejected, ref_w, ref_l, beta=self.beta)
        elif self.loss == "dpo":
            per_pair = losses.dpo_loss(chosen, rejected, ref_w, ref_l, beta=self.beta)
        elif self.loss == "spce":
            per_pair = losses.spce_loss(chosen, rejected, ref_w, ref_l, given["target_prob"], beta=self.beta)
        else:
            sr_loss = losses.sr_dpo_loss if self.loss == "sr_dpo" else losses.sr_ipo_loss
            per_pair = sr_loss(
                chosen, rejected, ref_w, ref_l, aug_chosen, aug_rejected,
                given["aug_ref_chosen_logps"], given["aug_ref_rejected_logps"], beta=self.beta, lam=self.lam,
            )

        with torch.no_grad():
            delta_w, delta_l = chosen - ref_w, rejected - ref_l
            margin = delta_w - delta_l
            if self.beta is not None:
                margin = self.beta * margin
            metrics = {
                "loss": per_pair.mean(),
                "chosen_logratio": delta_w.mean(),
                "rejected_logratio": delta_l.mean(),
                "reward_margin": margin.mean(),
                "reward_accuracy": (delta_w > delta_l).float().mean(),
                "policy_chosen_logps": chosen.mean(),
                "policy_rejected_logps": rejected.mean(),
                "num_pairs": torch.tensor(float(num_pairs), device=chosen.device),
                "num_tokens": num_tokens.float(),
            }
            if self._uses_augmented:
                refinement = self.beta * (
                    (aug_chosen - given["aug_ref_chosen_logps"]) - (aug_rejected - given["aug_ref_rejected_logps"])
                )
                metrics["refinement"] = refinement.mean()
            metrics = {k: v.detach() for k, v in metrics.items()}
        return self._reduce(per_pair), metrics

    def _reduce(self, per_example):
        if self.reduction == "mean":
            return per_example.mean()
        if self.reduction == "sum":
            return per_example.sum()
        return per_example

    def _liger_layout(self, weight, hidden, labels, bias, role, pair_index, aug_hidden, aug_labels):
        for name, value in (("role", role), ("pair_index", pair_index)):
            if value is not None:
                raise ValueError(f"{name} is only used with the packed layout (give cu_seqlens too)")
        if hidden.dim() != 3:
            raise ValueError(
                f"hidden must be [2B, T, H] (Liger layout, chosen rows first) when cu_seqlens is None, "
                f"got shape {tuple(hidden.shape)}; packed [N, H] hidden needs cu_seqlens, role and pair_index"
            )
        rows = hidden.shape[0]
        if rows == 0 or rows % 2:
            raise ValueError(
                f"hidden must have an even, non-zero number of rows 2B (chosen then rejected), got {rows}"
            )
        policy = self._logps(hidden, weight, labels, bias)
        num_pairs = rows // 2
        num_tokens = (labels != self.ignore_index).sum()
        aug_chosen = aug_rejected = None
        if self._uses_augmented:
            for name, value in (("aug_hidden", aug_hidden), ("aug_labels", aug_labels)):
                if value is None:
                    raise ValueError(f"loss={self.loss!r} in the Liger layout needs {name} [2B, T', ...]")
            if aug_hidden.dim() != 3 or aug_hidden.shape[0] != rows:
                raise ValueError(
                    f"aug_hidden must be [2B, T', H] with 2B = {rows} rows like hidden, "
                    f"got shape {tuple(aug_hidden.shape)}"
                )
            with torch.no_grad():  # the refinement D is under stop-gradient (Sr-DPO Algorithm 1)
                augmented = self._logps(aug_hidden, weight, aug_labels, bias)
            aug_chosen, aug_rejected = augmented[:num_pairs], augmented[num_pairs:]
        return policy[:num_pairs], policy[num_pairs:], aug_chosen, aug_rejected, num_tokens

    def _packed_layout(self, weight, hidden, labels, bias, cu_seqlens, role, pair_index):
        hidden, labels, lengths = _packed_inputs(hidden, labels, cu_seqlens)
        num_seqs = lengths.numel()
        role = _sequence_ids("role", role, num_seqs)
        pair_index = _sequence_ids("pair_index", pair_index, num_seqs)
        if bool(((role < 0) | (role > AUG_REJECTED)).any()):
            raise ValueError(
                f"role values must be 0..3 (chosen, rejected, aug chosen, aug rejected), got {role.unique().tolist()}"
            )
        used_roles = (CHOSEN, REJECTED, AUG_CHOSEN, AUG_REJECTED) if self._uses_augmented else (CHOSEN, REJECTED)
        if not self._uses_augmented and bool((role >= AUG_CHOSEN).any()):
            raise ValueError(f"role has augmented sequences (2/3) but loss={self.loss!r} does not use them")
        num_pairs = int((role == CHOSEN).sum())
        if num_pairs == 0:
            raise ValueError("role has no chosen sequence (role 0): the batch has no pairs")
        order = {r: _pair_order(role, pair_index, r, num_pairs) for r in used_roles}

        device = hidden.device
        token_is_aug = torch.repeat_interleave(
            (role >= AUG_CHOSEN).to(device), lengths.to(device), output_size=hidden.shape[0]
        )
        policy_labels = labels.masked_fill(token_is_aug, self.ignore_index) if self._uses_augmented else labels
        policy = self._logps(hidden, weight, policy_labels, bias, cu_seqlens)
        num_tokens = (policy_labels != self.ignore_index).sum()
        aug_chosen = aug_rejected = None
        if self._uses_augmented:
            with torch.no_grad():  # the refinement D is under stop-gradient (Sr-DPO Algorithm 1)
                aug_labels = labels.masked_fill(~token_is_aug, self.ignore_index)
                augmented = self._logps(hidden, weight, aug_labels, bias, cu_seqlens)
            aug_chosen = augmented[order[AUG_CHOSEN].to(device)]
            aug_rejected = augmented[order[AUG_REJECTED].to(device)]
        chosen, rejected = policy[order[CHOSEN].to(device)], policy[order[REJECTED].to(device)]
        return chosen, rejected, aug_chosen, aug_rejected, num_tokens

    def _all_responses(self, weight, hidden, labels, bias, cu_seqlens, role, pair_index, ref_logps, winrate):
        if cu_seqlens is None:
            for name, value in (("role", role), ("pair_index", pair_index)):
                if value is not None:
                    raise ValueError(f"{name} is only used with the packed layout (give cu_seqlens too)")
            if hidden.dim() != 3 or hidden.shape[0] == 0:
                raise ValueError(
                    f"hidden must be [S, T, H] (one response per row) when cu_seqlens is None, "
                    f"got shape {tuple(hidden.shape)}"
                )
            num_seqs = hidden.shape[0]
        else:
            hidden, labels, lengths = _packed_inputs(hidden, labels, cu_seqlens)
            num_seqs = lengths.numel()
            if role is not None and bool((_sequence_ids("role", role, num_seqs) != CHOSEN).any()):
                raise ValueError(
                    "role must be None or all 0 in SPPO's all-responses form (every sequence is one response)"
                )
            if pair_index is not None:
                pair_index = _sequence_ids("pair_index", pair_index, num_seqs)
        if num_seqs == 0:
            raise ValueError("the batch has no sequences")
        policy = self._logps(hidden, weight, labels, bias, cu_seqlens)
        ref = _per_example("ref_logps", ref_logps, num_seqs, policy.device, False, what="sequences")
        win = _per_example("winrate", winrate, num_seqs, policy.device, True, what="sequences")
        per_response = losses.sppo_loss(policy, ref, win, eta=self.eta)
        with torch.no_grad():
            metrics = {
                "loss": per_response.mean(),
                "logratio": (policy - ref).mean(),
                "policy_logps": policy.mean(),
                "num_responses": torch.tensor(float(num_seqs), device=policy.device),
                "num_tokens": (labels != self.ignore_index).sum().float(),
            }
            if pair_index is not None:
                metrics["num_prompts"] = torch.tensor(float(pair_index.unique().numel()), device=policy.device)
            metrics = {k: v.detach() for k, v in metrics.items()}
        return self._reduce(per_response), metrics


def _packed_inputs(hidden, labels, cu_seqlens):
    """Flattens [1, N, ...] to [N, ...] and returns (hidden, labels, per-sequence lengths on the CPU)."""
    if hidden.dim() == 3:
        if hidden.shape[0] != 1:
            raise ValueError(f"packed hidden must be [N, H] or [1, N, H], got shape {tuple(hidden.shape)}")
        hidden = hidden[0]
    if hidden.dim() != 2:
        raise ValueError(f"packed hidden must be [N, H] or [1, N, H], got shape {tuple(hidden.shape)}")
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"labels must be a tensor, got {type(labels).__name__}")
    if labels.dim() == 2 and labels.shape[0] == 1:
        labels = labels[0]
    if labels.shape != hidden.shape[:1]:
        raise ValueError(
            f"labels must be [N] = [{hidden.shape[0]}] like hidden's tokens, got shape {tuple(labels.shape)}"
        )
    if (
        not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() == 0
        or cu_seqlens.dtype not in (torch.int32, torch.int64)
    ):
        raise ValueError(f"cu_seqlens must be a 1-D int32 tensor [S + 1], got {cu_seqlens!r:.80}")
    cu = cu_seqlens.detach().cpu().long()
    lengths = cu[1:] - cu[:-1]
    if int(cu[0]) != 0 or int(cu[-1]) != hidden.shape[0] or bool((lengths < 0).any()):
        raise ValueError(
            f"cu_seqlens must be non-decreasing from 0 to N = {hidden.shape[0]}, got {cu.tolist()[:8]}..."
        )
    return hidden, labels, lengths


def _sequence_ids(name, ids, num_seqs):
    """Validates a per-sequence integer tensor [S] (role or pair_index) and returns it on the CPU."""
    if ids is None:
        raise ValueError(f"the packed layout needs {name} [S]")
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor [S], got {getattr(ids, 'dtype', type(ids).__name__)}")
    if ids.shape != (num_seqs,):
        raise ValueError(
            f"{name} must be [S] = [{num_seqs}] (one per sequence of cu_seqlens), got shape {tuple(ids.shape)}"
        )
    return ids.detach().cpu().long()


_ROLE_NAMES = {
    CHOSEN: "chosen", REJECTED: "rejected", AUG_CHOSEN: "augmented chosen", AUG_REJECTED: "augmented rejected",
}


def _pair_order(role, pair_index, which, num_pairs):
    """Sequence indices of role `which` for pairs 0..P-1; every pair must have exactly one."""
    sequences = (role == which).nonzero().squeeze(1)
    pairs = pair_index[sequences]
    if bool(((pairs < 0) | (pairs >= num_pairs)).any()):
        raise ValueError(
            f"pair_index must be in 0..P-1 with P = {num_pairs} pairs (the count of chosen sequences), "
            f"got {pairs.tolist()[:8]} for {_ROLE_NAMES[which]} sequences"
        )
    counts = torch.bincount(pairs, minlength=num_pairs)
    if bool((counts != 1).any()):
        bad = int((counts != 1).nonzero()[0])
        raise ValueError(
            f"pair_index: pair {bad} has {int(counts[bad])} {_ROLE_NAMES[which]} sequences (role {which}); "
            f"every pair needs exactly one"
        )
    order = torch.empty(num_pairs, dtype=torch.long)
    order[pairs] = sequences
    return order


def _per_example(name, value, count, device, probability, what="pairs"):
    """Checks a precomputed per-pair (or per-sequence) tensor and returns it as float32."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        got = getattr(value, "dtype", type(value).__name__)
        raise ValueError(f"{name} must be a floating-point tensor, got {got}")
    if value.shape != (count,):
        raise ValueError(
            f"{name} must have shape [{count}] (one per {what[:-1]}: {count} {what}), got {tuple(value.shape)}"
        )
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but the hidden states are on {device}")
    if probability and not bool(((value >= 0) & (value <= 1)).all()):
        raise ValueError(f"{name} must hold probabilities in [0, 1] (finite)")
    return value.float()
