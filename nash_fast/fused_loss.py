"""FusedLinearPreferenceLoss: LM-head weight + final hidden states -> (preference loss, metrics).

One module for every loss of `nash_fast.losses`. The policy's per-sequence log-probs come from
`nash_fast.sequence_logprobs` (the [tokens x vocab] logits are never materialized); everything the
policy does not produce with gradient (reference, previous iterate, reference on the augmented
query, win rates, target preferences) is passed in as precomputed per-pair tensors; the reference
may instead be computed inside, forward-only, from its hidden states (ref_input, ref_weight, as
Liger-Kernel takes it).

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
of one prompt and only feeds the num_prompts metric); the loss averages over responses. With the
reference as ref_input instead of ref_logps, the form follows winrate's length: one per sequence
(all responses) or one per pair.

Switching from Liger-Kernel's LigerFusedLinearDPOLoss is one import:

    from nash_fast import FusedLinearDPOLoss as LigerFusedLinearDPOLoss   # was: from liger_kernel.chunked_loss ...
    loss_fn = LigerFusedLinearDPOLoss(ignore_index=-100, beta=0.1)        # Liger's arguments and defaults
    loss, (chosen_logps, rejected_logps, chosen_logits_mean, rejected_logits_mean, nll_loss,
           chosen_rewards, rejected_rewards) = loss_fn(lin_weight, _input, target, bias, ref_input, ref_weight, ref_bias)

FusedLinearDPOLoss returns Liger's very tuple (a LigerAux: also readable by name, with every metric below
in .metrics). FusedLinearPreferenceLoss itself takes the same positional call (FusedLinearPreferenceLoss("dpo", beta=0.1)
for the same loss): given ref_input and ref_weight (and ref_bias), the reference log-probs are computed inside,
forward-only under torch.no_grad(), by the same fused op on the same target, averaged or not like the
policy's, as Liger does. The reference may instead be passed precomputed (ref_chosen_logps, ...: from a
cached pass or a dataset column), which is what the trainer does. average_log_prob defaults to False, as in
LigerFusedLinearDPOLoss (and TRL's DPO trainer, which sets it False). The first element of the result is the
loss, as Liger's. The second is a dict of detached metrics instead of Liger's tuple; what a Liger user reads
from the tuple (TRL's DPO trainer reads all of it) is there under TRL's names:

    aux[0] policy chosen log-probs [B]       metrics["chosen_logps"]
    aux[1] policy rejected log-probs [B]     metrics["rejected_logps"]
    aux[2] mean of the chosen logits         metrics["mean_chosen_logits"]   (computed without the logits:
    aux[3] mean of the rejected logits       metrics["mean_rejected_logits"]  see _mean_logits)
    aux[4] NLL of the chosen tokens          metrics["nll_loss"]  (0 unless FusedLinearDPOLoss(compute_nll_loss=True))
    aux[5] chosen rewards [B]                metrics["chosen_rewards"]    beta (log pi - log pi_ref)
    aux[6] rejected rewards [B]              metrics["rejected_rewards"]

Liger's compiled and chunk_size are replaced by `backend` (FusedLinearDPOLoss accepts and ignores them).

Metrics (detached float tensors): means over pairs: loss (mean per-pair preference loss, whatever the
reduction, without the NLL term), chosen_logratio (pi_w - ref_w), rejected_logratio (pi_l - ref_l),
reward_margin (beta (Delta_w - Delta_l) for dpo/ipo/spce/sr_dpo/sr_ipo, TRL's loss types and sppo given beta; Delta_w -
Delta_l for sppo given eta and inpo, which have no beta), reward_accuracy (fraction with Delta_w > Delta_l),
policy_chosen_logps, policy_rejected_logps; counts num_pairs, num_tokens (scored tokens of the gradient
pass); per pair [P]: chosen_logps, rejected_logps, chosen_rewards, rejected_rewards (beta Delta, or Delta
without a beta); scalars mean_chosen_logits, mean_rejected_logits (before any soft-cap; in the Liger layout
over every position of the rows, padding included, as Liger; packed: over the sequences' tokens), nll_loss;
for Sr-* refinement (mean D of Sr-DPO eq. 11). The SPPO all-responses form reports loss, logratio,
policy_logps, num_responses, num_tokens and, with pair_index, num_prompts.
"""

from __future__ import annotations

import collections

import torch

from nash_fast import losses
from nash_fast.checks import checked_probabilities, checked_sequence_lengths, checked_single_role, pair_order
from nash_fast.logprobs import _LABEL_DTYPES, BACKENDS, resolve_filter_eps, sequence_logprobs
from nash_fast.losses import _hyperparameter

__all__ = ["FusedLinearPreferenceLoss", "FusedLinearDPOLoss", "LigerAux"]

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

# TRL's loss types (DPOConfig.loss_type; nash_fast.losses.LOSS_TYPES), all computed from the per-sequence log-probs:
# the names TRL 1.16 accepts, and "aot_pair", TRL 0.x's name of "aot_unpaired". A list of them (TRL's
# loss_type=[...], with loss_weights) is one loss: sum_k w_k mean(loss_k). "dpo" in a list means "sigmoid".
TRL_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
_TRL_ALIASES = {"aot_pair": "aot_unpaired", "dpo": "sigmoid"}
# Those that are nash-fast losses of their own under another name when given alone (FusedLinearPreferenceLoss("dpo"),
# "ipo"): TRL's "sigmoid" is "dpo"; TRL's "ipo" (length-normalized) is "ipo" with average_log_prob=True.
_TRL_ONLY = tuple(t for t in TRL_LOSS_TYPES if t not in ("sigmoid", "ipo")) + ("aot_pair",)
_TRL_SMOOTHED = ("exo_pair", "robust", "aot", "aot_unpaired")  # read label_smoothing
_TRL_COUNTED = ("ipo", "sigmoid_norm", "sft")  # read each response's scored-token count
DEFAULT_DISCOPOP_TAU = 0.05  # TRL's DPOConfig.discopop_tau (the DiscoPOP paper's recommendation)


def trl_loss_types(loss) -> tuple[str, ...]:
    """TRL's loss_type (a name, or a list / tuple / comma-separated names) -> canonical names; ValueError in one line
    listing the supported ones for anything else."""
    names = [n.strip() for n in loss.split(",")] if isinstance(loss, str) else list(loss) if isinstance(
        loss, (list, tuple)) else None
    supported = ", ".join(TRL_LOSS_TYPES) + " (and aot_pair = aot_unpaired)"
    if not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"loss_type must be a name or a non-empty list of names; supported: {supported}; got {loss!r}")
    unknown = [n for n in names if n not in TRL_LOSS_TYPES and n not in _TRL_ALIASES]
    if unknown:
        raise ValueError(f"loss_type {', '.join(map(repr, unknown))} is not supported; supported: {supported}")
    canonical = tuple(_TRL_ALIASES.get(n, n) for n in names)
    if len(set(canonical)) != len(canonical):
        raise ValueError(f"loss_type lists a loss twice: {names!r} (give it once, with its weight in loss_weights)")
    return canonical
_PROBABILITIES = ("winrate", "target_prob")

_LIGER_ONLY = {
    "compute_nll_loss": "no NLL term here; FusedLinearDPOLoss(compute_nll_loss=True, alpha=...) has Liger's",
    "alpha": "the NLL weight of FusedLinearDPOLoss(compute_nll_loss=True, alpha=...)",
    "compiled": "use backend= (FusedLinearDPOLoss accepts it, with no effect)",
    "chunk_size": "use backend=; chunking is internal (FusedLinearDPOLoss accepts it, with no effect)",
    "use_ref_model": "pass ref_input/ref_weight or ref_chosen_logps / ref_rejected_logps to forward; "
                     "FusedLinearDPOLoss(use_ref_model=False) is reference-free",
    "loss_type": "name the loss as the first argument, or use FusedLinearDPOLoss(loss_type=...)",
}


class FusedLinearPreferenceLoss(torch.nn.Module):
    """(loss, metrics) of SPPO / INPO / IPO / DPO / Sr-DPO / Sr-IPO / SPCE, or of TRL's loss types, from hidden states.

    Args:
        loss: "sppo", "inpo", "ipo", "dpo", "sr_dpo", "sr_ipo" or "spce" (see nash_fast.losses); or one of TRL's loss
            types (TRL_LOSS_TYPES: "sigmoid", "hinge", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
            "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"), or a list of TRL's
            loss types, TRL's loss_type=[...]: the loss is sum_k loss_weights[k] mean(loss_k). In a list the names
            mean what they mean in TRL: "ipo" is then TRL's length-normalized IPO (ipo on each response's
            per-token mean log-ratio); alone, "ipo" is IPO on the log-probs as computed (TRL's with
            average_log_prob=True). TRL's losses read the reference log-probs only (ref_chosen_logps /
            ref_rejected_logps or ref_input), like "dpo".
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
        filter_eps: gradient filtering of the LM head's backward, passed to sequence_logprobs: None (default,
            exact), "auto" (finfo(dtype).eps / 32), "high" (finfo(dtype).eps / 1024) or a float in [0, 1).
        reduction: "mean" or "sum" over pairs (responses), or "none" for the per-pair losses.
        loss_weights: TRL's weights of a list of loss types (default 1.0 each).
        label_smoothing: TRL's, read by exo_pair (its eps, required, in (0, 1)), robust (flip rate in [0, 1/2),
            default 0), aot and aot_unpaired (cDPO smoothing in [0, 1], default 0).
        discopop_tau: DiscoPOP's tau (default 0.05, TRL's).
        bco_running_mean: bco_pair's reward shift delta is the running mean of the batches' mean rewards, TRL 0.x's
            RunningMoments (nash_fast.losses.RunningMoments), updated on every call before it is used; False
            (default): delta = 0, as TRL 1.x and Liger-Kernel 0.8.5. The state is loss_state() /
            load_loss_state() (the trainer saves it in its checkpoints).

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
        filter_eps: float | str | None = None,
        loss_weights=None,
        label_smoothing: float | None = None,
        discopop_tau: float | None = None,
        bco_running_mean: bool = False,
        **unknown,
    ):
        super().__init__()
        trl = dict(loss_weights=loss_weights, label_smoothing=label_smoothing, discopop_tau=discopop_tau,
                   bco_running_mean=bco_running_mean)
        if unknown:
            hints = "; ".join(f"{k}: {_LIGER_ONLY[k]}" for k in sorted(unknown) if k in _LIGER_ONLY)
            raise ValueError(f"unknown argument(s) {sorted(unknown)}" + (f" ({hints})" if hints else ""))
        if isinstance(loss, (list, tuple)) or (isinstance(loss, str) and ("," in loss or loss in _TRL_ONLY)):
            self._init_trl(trl_loss_types(loss), beta=beta, eta=eta, tau=tau, lam=lam, **trl)
        else:
            if loss == "sigmoid":
                loss = "dpo"  # TRL's name
            if loss not in _HYPERPARAMETERS:
                raise ValueError(f"loss must be one of {sorted(_HYPERPARAMETERS)}, one of TRL's loss types "
                                 f"{', '.join(TRL_LOSS_TYPES)}, or a list of TRL's loss types; got {loss!r}")
            for name, value in trl.items():
                if value not in (None, False):
                    raise ValueError(f"{name} is only used by TRL's loss types (e.g. {_TRL_ONLY[0]!r} or a list), "
                                     f"not by loss={loss!r}")
            self._init_nash(loss, beta=beta, eta=eta, tau=tau, lam=lam)
        self._check_common(average_log_prob, ignore_index, softcap, backend, reduction, filter_eps)

    def _check_common(self, average_log_prob, ignore_index, softcap, backend, reduction, filter_eps=None):
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if softcap is not None:
            softcap = _hyperparameter("softcap", softcap, positive=True)
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
        resolve_filter_eps(filter_eps, torch.float32)  # its checks now (the value depends on the call's dtype)
        self.filter_eps = filter_eps
        self.average_log_prob = bool(average_log_prob)
        self.ignore_index = ignore_index
        self.softcap = softcap
        self.backend = backend
        self.reduction = reduction

    def _init_trl(self, types, *, beta, eta, tau, lam, loss_weights, label_smoothing, discopop_tau, bco_running_mean):
        """TRL's loss types (one, or a list with loss_weights)."""
        unused = [name for name, value in dict(eta=eta, tau=tau, lam=lam).items() if value is not None]
        if label_smoothing is not None and not set(types) & set(_TRL_SMOOTHED):
            unused.append("label_smoothing")
        if discopop_tau is not None and "discopop" not in types:
            unused.append("discopop_tau")
        if unused:
            raise ValueError(f"{', '.join(unused)} not used by loss={list(types)!r} (TRL's losses read beta; "
                             f"label_smoothing: {', '.join(_TRL_SMOOTHED)}; discopop_tau: discopop)")
        if not isinstance(bco_running_mean, bool):
            raise ValueError(f"bco_running_mean must be True or False, got {bco_running_mean!r}")
        if bco_running_mean and "bco_pair" not in types:
            raise ValueError(f"bco_running_mean is only used by the bco_pair loss, not by loss={list(types)!r}")
        if loss_weights is None:
            weights = (1.0,) * len(types)
        else:
            if not isinstance(loss_weights, (list, tuple)) or len(loss_weights) != len(types):
                raise ValueError(f"loss_weights must be a list of {len(types)} numbers (one per loss type of "
                                 f"{list(types)!r}), got {loss_weights!r}")
            weights = tuple(_hyperparameter("loss_weights", w) for w in loss_weights)
        self.beta = _hyperparameter("beta", DEFAULT_BETA if beta is None else beta, positive=True)
        self.eta = self.tau = self.lam = None
        self.label_smoothing = 0.0 if label_smoothing is None else _hyperparameter("label_smoothing", label_smoothing)
        self.discopop_tau = DEFAULT_DISCOPOP_TAU if discopop_tau is None else _hyperparameter(
            "discopop_tau", discopop_tau, positive=True)
        if "exo_pair" in types and label_smoothing is None:
            raise ValueError("the exo_pair loss needs label_smoothing > 0 (EXO's eps; the EXO paper recommends 1e-3)")
        for name in types:  # the API's one rule, in float32 (sequence_logprobs returns float32)
            rule = "dpo" if name == "sigmoid" else name
            values = {"beta": self.beta, "label_smoothing": self.label_smoothing, "discopop_tau": self.discopop_tau}
            losses.check_hyperparameters(rule, torch.float32, **{k: values[k] for k in losses.HYPERPARAMETERS[rule]})
        self.loss = types[0] if len(types) == 1 else ",".join(types)
        self.loss_types, self.loss_weights = types, weights
        self._bco_running = losses.RunningMoments() if bco_running_mean else None
        self._nll_alpha = None
        self._zero_reference = False
        self._default_winrate = None
        self._reward_beta = self.beta

    def _init_nash(self, loss, *, beta, eta, tau, lam):
        given = {k: v for k, v in dict(beta=beta, eta=eta, tau=tau, lam=lam).items() if v is not None}
        unused = sorted(set(given) - set(_HYPERPARAMETERS[loss]))
        if unused:
            raise ValueError(f"{', '.join(unused)} not used by loss={loss!r} (it reads {_HYPERPARAMETERS[loss]})")
        self.loss_types = self.loss_weights = None
        self._bco_running = None
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
        # The losses run on float32 log-probs here (sequence_logprobs returns float32): the API's one rule.
        rule = "sppo_pair" if loss == "sppo" else loss
        losses.check_hyperparameters(rule, torch.float32, labels={"eta": "eta (= 1 / beta)"} if beta is not None else {},
                                     **{k: getattr(self, k) for k in losses.HYPERPARAMETERS[rule]})

        self.loss = loss
        # Liger compatibility (set by FusedLinearDPOLoss): alpha of the chosen NLL term (None: no term), a
        # reference-free loss (reference log-probs 0), SPPO's hard win rate when none is passed.
        self._nll_alpha: float | None = None
        self._zero_reference = False
        self._default_winrate: float | None = None
        self._reward_beta = self.beta if self.beta is not None else (
            _hyperparameter("beta", beta, positive=True) if loss == "sppo" and beta is not None else None)

    @property
    def _trl(self) -> bool:
        """TRL's loss types (self.loss_types), as opposed to nash-fast's own losses."""
        return self.loss_types is not None

    def loss_state(self) -> dict:
        """The loss's running state (bco_pair's running mean with bco_running_mean=True), as JSON-exact floats; {} for
        stateless losses. The trainer saves it in each checkpoint and restores it on resume."""
        return {} if self._bco_running is None else {"bco_running_moments": self._bco_running.state_dict()}

    def load_loss_state(self, state: dict) -> None:
        """Inverse of loss_state(); ValueError if `state` is not what this loss keeps."""
        expected = sorted(self.loss_state())
        if not isinstance(state, dict) or sorted(state) != expected:
            raise ValueError(f"loss state must hold {expected} for loss={self.loss!r}, got {state!r:.200}")
        if self._bco_running is not None:
            self._bco_running.load_state_dict(state["bco_running_moments"])

    def extra_repr(self) -> str:
        hyper = {k: getattr(self, k) for k in ("beta", "eta", "tau", "lam") if getattr(self, k) is not None}
        if self._trl:
            hyper.update(loss_weights=list(self.loss_weights), label_smoothing=self.label_smoothing,
                         discopop_tau=self.discopop_tau, bco_running_mean=self._bco_running is not None)
        return f"loss={self.loss!r}, " + ", ".join(f"{k}={v}" for k, v in hyper.items()) + (
            f", average_log_prob={self.average_log_prob}, reduction={self.reduction!r}, backend={self.backend!r}"
            + (f", filter_eps={self.filter_eps!r}" if self.filter_eps is not None else "")
        )

    @property
    def _uses_augmented(self) -> bool:
        return self.loss in ("sr_dpo", "sr_ipo")

    def _logps(self, hidden, weight, labels, bias, cu_seqlens=None):
        return sequence_logprobs(
            hidden, weight, labels, cu_seqlens=cu_seqlens, ignore_index=self.ignore_index,
            average=self.average_log_prob, bias=bias, softcap=self.softcap, backend=self.backend,
            filter_eps=self.filter_eps,
        )

    def forward(
        self,
        weight: torch.Tensor,
        hidden: torch.Tensor,
        labels: torch.Tensor,
        bias: torch.Tensor | None = None,
        ref_input: torch.Tensor | None = None,
        ref_weight: torch.Tensor | None = None,
        ref_bias: torch.Tensor | None = None,
        *,
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
        aug_ref_input: torch.Tensor | None = None,
        winrate: torch.Tensor | None = None,
        target_prob: torch.Tensor | None = None,
        ref_logps: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Returns (loss, metrics); loss is a scalar ("mean"/"sum") or [P] ("none").

        The first seven positional arguments are LigerFusedLinearDPOLoss's: (lin_weight, _input, target, bias,
        ref_input, ref_weight, ref_bias). Given ref_input and ref_weight (and ref_bias), the reference log-probs
        are computed here, forward-only under torch.no_grad(), by the same fused op on the same labels (for
        Sr-DPO / Sr-IPO in the Liger layout, aug_ref_input holds the reference's hidden states of the augmented
        rows); otherwise they are passed precomputed (ref_chosen_logps, ...).

        In four steps: the inputs (_resolve_inputs), the layout (_layout, then _per_pair_inputs), the loss
        (_pair_loss: the formula of nash_fast.losses.PAIR_LOSSES by name, or TRL's loss types) and the metrics
        (_pair_metrics); SPPO's all-responses form leaves after the first (_all_responses)."""
        if not isinstance(hidden, torch.Tensor):
            raise ValueError(f"hidden must be a tensor, got {type(hidden).__name__}")
        # Token counts compare labels with ignore_index here too: by value, in int64 (a uint8 -100 would wrap to 156).
        labels, aug_labels = (_int64_labels(t) for t in (labels, aug_labels))
        precomputed = dict(
            ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
            prev_chosen_logps=prev_chosen_logps, prev_rejected_logps=prev_rejected_logps,
            aug_ref_chosen_logps=aug_ref_chosen_logps, aug_ref_rejected_logps=aug_ref_rejected_logps,
            winrate=winrate, target_prob=target_prob, ref_logps=ref_logps,
        )
        # 1. inputs: the form, what it needs, the reference computed here from ref_input.
        all_responses, needed, computed_here, reference_sequences = self._resolve_inputs(
            hidden, labels, cu_seqlens, ref_input, ref_weight, ref_bias, aug_ref_input, aug_hidden, aug_labels,
            precomputed,
        )
        if all_responses:
            if self._nll_alpha is not None:
                raise ValueError("compute_nll_loss needs chosen responses: SPPO's all-responses form has none")
            return self._all_responses(weight, hidden, labels, bias, cu_seqlens, role, pair_index,
                                       precomputed["ref_logps"], winrate)
        # 2. layout: the policy's log-probs per pair, and the inputs per pair.
        chosen, rejected, aug_chosen, aug_rejected, num_tokens, order = self._layout(
            weight, hidden, labels, bias, cu_seqlens, role, pair_index, aug_hidden, aug_labels, aug_ref_input
        )
        given = self._per_pair_inputs(precomputed, needed, computed_here, reference_sequences, order, chosen,
                                      cu_seqlens, ref_weight, ref_bias, aug_ref_input, aug_hidden, aug_labels)
        ref_w, ref_l = given["ref_chosen_logps"], given["ref_rejected_logps"]
        # 3. the loss.
        per_pair = self._pair_loss(chosen, rejected, ref_w, ref_l, aug_chosen, aug_rejected, given, labels,
                                   cu_seqlens, order, hidden)
        nll = self._chosen_nll(chosen, labels, cu_seqlens, order, hidden) if self._nll_alpha is not None else None
        # 4. metrics.
        metrics = self._pair_metrics(per_pair, chosen, rejected, ref_w, ref_l, aug_chosen, aug_rejected, given, nll,
                                     num_tokens, weight, hidden, bias, cu_seqlens, order)
        loss = self._reduce(per_pair)
        if nll is not None:
            loss = loss + self._nll_alpha * nll
        return loss, metrics

    def _resolve_inputs(self, hidden, labels, cu_seqlens, ref_input, ref_weight, ref_bias, aug_ref_input, aug_hidden,
                        aug_labels, precomputed):
        """Step 1 of forward: (all_responses: SPPO's all-responses form rather than the pairwise one, needed: the
        precomputed inputs that form reads, computed_here: those of them made here instead of given, the
        per-sequence reference log-probs computed from ref_input or None). Refuses a missing or an unused input.
        precomputed (the inputs as given, by name) gets ref_logps when the all-responses form computes it here."""
        self._check_reference_arguments(ref_input, ref_weight, ref_bias, aug_ref_input, cu_seqlens,
                                        precomputed["ref_chosen_logps"], precomputed["ref_rejected_logps"],
                                        precomputed["aug_ref_chosen_logps"], precomputed["aug_ref_rejected_logps"],
                                        precomputed["ref_logps"])
        winrate, ref_logps = precomputed["winrate"], precomputed["ref_logps"]
        num_sequences = _num_sequences(hidden, cu_seqlens)
        if self.loss == "sppo" and ref_logps is None and (ref_input is not None or self._zero_reference):
            # No ref_logps to tell SPPO's forms apart: winrate has one entry per sequence in the all-responses
            # form, one per pair (half as many) in the pairwise form.
            all_responses = isinstance(winrate, torch.Tensor) and winrate.shape == (num_sequences,)
        else:
            all_responses = self.loss == "sppo" and ref_logps is not None
        reference_sequences = None  # per-sequence reference log-probs computed here from ref_input
        if ref_input is not None:
            reference_sequences = self._reference_logps(ref_input, ref_weight, ref_bias, hidden, labels, cu_seqlens)
        if all_responses and ref_logps is None:
            precomputed["ref_logps"] = (reference_sequences if reference_sequences is not None
                                        else torch.zeros(num_sequences, device=hidden.device))
        needed = _ALL_RESPONSES_INPUTS if all_responses else _PAIR_INPUTS["dpo" if self._trl else self.loss]
        computed_here = set()
        if not all_responses and (reference_sequences is not None or self._zero_reference):
            computed_here = {"ref_chosen_logps", "ref_rejected_logps"} | (
                {"aug_ref_chosen_logps", "aug_ref_rejected_logps"} if self._uses_augmented else set())
        if self.loss == "sppo" and not all_responses and winrate is None and self._default_winrate is not None:
            computed_here.add("winrate")
        for name in needed:
            if precomputed[name] is None and name not in computed_here:
                hint = " (or ref_input and ref_weight)" if name.startswith(("ref_", "aug_ref_")) else ""
                raise ValueError(f"loss={self.loss!r} needs {name}{hint}")
        for name, value in precomputed.items():
            if value is not None and name not in needed:
                form = " in the all-responses form (ref_logps given)" if all_responses else ""
                raise ValueError(f"{name} is not used by loss={self.loss!r}{form}")
        if not self._uses_augmented or all_responses:
            for name, value in (("aug_hidden", aug_hidden), ("aug_labels", aug_labels), ("aug_ref_input", aug_ref_input)):
                if value is not None:
                    raise ValueError(f"{name} is only used by loss='sr_dpo' / 'sr_ipo'")
        return all_responses, needed, computed_here, reference_sequences

    def _layout(self, weight, hidden, labels, bias, cu_seqlens, role, pair_index, aug_hidden, aug_labels,
                aug_ref_input):
        """Step 2 of forward: the policy's log-probs per pair from either layout, (chosen, rejected, aug_chosen,
        aug_rejected, num_tokens, order); order[role] holds the sequences (rows) of that role, by pair."""
        if cu_seqlens is None:
            return self._liger_layout(weight, hidden, labels, bias, role, pair_index, aug_hidden, aug_labels)
        for name, value in (("aug_hidden", aug_hidden), ("aug_labels", aug_labels), ("aug_ref_input", aug_ref_input)):
            if value is not None:
                raise ValueError(
                    f"{name} is for the Liger layout; packed batches carry augmented sequences as role 2/3"
                )
        return self._packed_layout(weight, hidden, labels, bias, cu_seqlens, role, pair_index)

    def _per_pair_inputs(self, precomputed, needed, computed_here, reference_sequences, order, chosen, cu_seqlens,
                         ref_weight, ref_bias, aug_ref_input, aug_hidden, aug_labels):
        """The inputs the loss reads (needed), each [P] in pair order: the given ones checked, the reference computed
        from ref_input placed per pair (for Sr-* in the Liger layout, the augmented rows' from aug_ref_input), zeros
        for a reference-free loss, SPPO's default win rate."""
        num_pairs = chosen.shape[0]
        device = chosen.device
        if reference_sequences is not None:  # computed from ref_input: place it per pair
            precomputed.update(ref_chosen_logps=reference_sequences[order[CHOSEN].to(device)],
                               ref_rejected_logps=reference_sequences[order[REJECTED].to(device)])
            if self._uses_augmented:
                if cu_seqlens is None:
                    if aug_ref_input is None:
                        raise ValueError(f"loss={self.loss!r} with ref_input in the Liger layout needs aug_ref_input "
                                         "[2B, T', H] (the reference's hidden states of the augmented rows)")
                    augmented = self._reference_logps(aug_ref_input, ref_weight, ref_bias, aug_hidden, aug_labels, None,
                                                      name="aug_ref_input")
                else:
                    augmented = reference_sequences
                precomputed.update(aug_ref_chosen_logps=augmented[order[AUG_CHOSEN].to(device)],
                                   aug_ref_rejected_logps=augmented[order[AUG_REJECTED].to(device)])
        if self._zero_reference:
            zeros = torch.zeros(num_pairs, device=device)
            precomputed.update({name: zeros for name in ("ref_chosen_logps", "ref_rejected_logps",
                                                         "aug_ref_chosen_logps", "aug_ref_rejected_logps")})
        if "winrate" in computed_here:
            precomputed["winrate"] = torch.full((num_pairs,), self._default_winrate, device=device)
        return {
            name: _per_example(name, precomputed[name], num_pairs, device, name in _PROBABILITIES)
            for name in needed
        }

    def _pair_loss(self, chosen, rejected, ref_w, ref_l, aug_chosen, aug_rejected, given, labels, cu_seqlens, order,
                   hidden):
        """Step 3 of forward: the per-pair loss [P], the formula of losses.PAIR_LOSSES[self.loss] (TRL's loss types:
        _trl_loss)."""
        if self._trl:
            return self._trl_loss(chosen, rejected, ref_w, ref_l, labels, cu_seqlens, order, hidden)
        if self._uses_augmented:
            given = dict(given, aug_chosen_logps=aug_chosen, aug_rejected_logps=aug_rejected)
        hyper = {"beta": self.beta, "eta": self.eta, "tau": self.tau, "lam": self.lam}
        return losses.PAIR_LOSSES[self.loss](chosen, rejected, ref_w, ref_l, given, hyper)

    def _pair_metrics(self, per_pair, chosen, rejected, ref_w, ref_l, aug_chosen, aug_rejected, given, nll, num_tokens,
                      weight, hidden, bias, cu_seqlens, order):
        """Step 4 of forward: the detached metrics of the pairwise form (see the module docstring)."""
        device = chosen.device
        with torch.no_grad():
            delta_w, delta_l = chosen - ref_w, rejected - ref_l
            scale = self.reward_scale
            chosen_logits, rejected_logits = _mean_logits(hidden, weight, bias, cu_seqlens, order)
            metrics = {
                "loss": per_pair.mean(),
                "chosen_logratio": delta_w.mean(),
                "rejected_logratio": delta_l.mean(),
                "reward_margin": (scale * (delta_w - delta_l)).mean(),
                "reward_accuracy": (delta_w > delta_l).float().mean(),
                "policy_chosen_logps": chosen.mean(),
                "policy_rejected_logps": rejected.mean(),
                "num_pairs": torch.ones_like(chosen).sum(),  # no host value: P may be known only at run time
                "num_tokens": num_tokens.float(),
                # Per pair, and Liger's / TRL's names: what LigerFusedLinearDPOLoss returns in its second element.
                "chosen_logps": chosen.detach(),
                "rejected_logps": rejected.detach(),
                "mean_chosen_logits": chosen_logits,
                "mean_rejected_logits": rejected_logits,
                "nll_loss": nll.detach() if nll is not None else torch.zeros((), device=device),
                "chosen_rewards": scale * delta_w,
                "rejected_rewards": scale * delta_l,
            }
            if self._uses_augmented:
                refinement = self.beta * (
                    (aug_chosen - given["aug_ref_chosen_logps"]) - (aug_rejected - given["aug_ref_rejected_logps"])
                )
                metrics["refinement"] = refinement.mean()
            return {k: v.detach() for k, v in metrics.items()}

    def _trl_loss(self, chosen, rejected, ref_w, ref_l, labels, cu_seqlens, order, hidden):
        """sum_k w_k loss_k per pair (TRL: sum_k w_k mean(loss_k), the mean of this), each loss_k as TRL computes it
        from the per-sequence log-probs (nash_fast.losses). ipo and sigmoid_norm act on per-token mean log-ratios
        (the sums divided by each response's scored tokens, at least 1, as TRL; with average_log_prob the log-probs
        already are means); sft on the chosen responses' summed log-probs and token counts."""
        device = chosen.device
        counts_w = counts_l = None
        if set(self.loss_types) & set(_TRL_COUNTED):
            scored = _scored_per_sequence(labels, cu_seqlens, self.ignore_index, hidden).to(device)
            counts_w, counts_l = scored[order[CHOSEN].to(device)], scored[order[REJECTED].to(device)]
        beta, total = self.beta, None
        for name, weight in zip(self.loss_types, self.loss_weights):
            if name == "ipo":
                if self.average_log_prob:  # already per-token means
                    per = losses.ipo_loss(chosen, rejected, ref_w, ref_l, beta=beta)
                else:
                    n_w, n_l = counts_w.clamp(min=1.0), counts_l.clamp(min=1.0)
                    per = losses.ipo_loss(chosen / n_w, rejected / n_l, ref_w / n_w, ref_l / n_l, beta=beta)
            elif name == "sigmoid_norm":
                ones = torch.ones_like(chosen)
                n_w, n_l = (ones, ones) if self.average_log_prob else (counts_w, counts_l)
                per = losses.sigmoid_norm_loss(chosen, rejected, ref_w, ref_l, n_w, n_l, beta=beta)
            elif name == "sft":
                per = losses.sft_loss(chosen * counts_w if self.average_log_prob else chosen, counts_w)
            elif name == "bco_pair":
                per = losses.bco_pair_loss(chosen, rejected, ref_w, ref_l, beta=beta,
                                           delta=self._bco_delta(chosen, rejected, ref_w, ref_l))
            elif name in _TRL_SMOOTHED:
                per = losses.LOSS_TYPES[name](chosen, rejected, ref_w, ref_l, beta=beta,
                                              label_smoothing=self.label_smoothing)
            elif name == "discopop":
                per = losses.discopop_loss(chosen, rejected, ref_w, ref_l, beta=beta, discopop_tau=self.discopop_tau)
            else:
                per = losses.LOSS_TYPES[name](chosen, rejected, ref_w, ref_l, beta=beta)
            per = per if weight == 1.0 else weight * per
            total = per if total is None else total + per
        return total

    def _bco_delta(self, chosen, rejected, ref_w, ref_l) -> float:
        """bco_pair's reward shift: 0, or (bco_running_mean) TRL 0.x's running mean of the batches' mean reward
        beta (log pi - log pi_ref) over chosen and rejected, updated with this batch first (TRL's order). A batch
        whose mean reward is not finite is not merged (TRL's would make every later delta NaN; the trainer skips
        such a step)."""
        if self._bco_running is None:
            return 0.0
        with torch.no_grad():
            rewards = torch.cat([self.beta * (chosen - ref_w), self.beta * (rejected - ref_l)], 0).mean()
            self._bco_running.update(rewards)
        return self._bco_running.mean

    def _check_reference_arguments(self, ref_input, ref_weight, ref_bias, aug_ref_input, cu_seqlens, *precomputed):
        names = ("ref_chosen_logps", "ref_rejected_logps", "aug_ref_chosen_logps", "aug_ref_rejected_logps", "ref_logps")
        given = [name for name, value in zip(names, precomputed) if value is not None]
        computed = [name for name, value in (("ref_input", ref_input), ("ref_weight", ref_weight),
                                             ("ref_bias", ref_bias), ("aug_ref_input", aug_ref_input)) if value is not None]
        if self._zero_reference and (given or computed):
            raise ValueError(f"use_ref_model=False: the reference log-probs are 0; {', '.join(given + computed)} "
                             "must not be given")
        if ref_input is None:
            if computed:
                raise ValueError(f"{', '.join(computed)} given without ref_input (the reference model's hidden states)")
            return
        if ref_weight is None:
            raise ValueError("ref_input needs ref_weight (the reference model's LM-head weight [V, H])")
        if given:
            raise ValueError(f"the reference is given twice: as ref_input/ref_weight and as {', '.join(given)}; "
                             "pass one of them")

    def _reference_logps(self, ref_input, ref_weight, ref_bias, hidden, labels, cu_seqlens, name="ref_input"):
        """Per-sequence (or per-row) reference log-probs from the reference model's hidden states and head,
        forward-only (Liger computes its reference under no_grad the same way), averaged like the policy's."""
        if not isinstance(ref_input, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(ref_input).__name__}")
        if not isinstance(hidden, torch.Tensor) or ref_input.shape[:-1] != hidden.shape[:-1]:
            shape = tuple(hidden.shape[:-1]) if isinstance(hidden, torch.Tensor) else None
            raise ValueError(f"{name} must hold the reference's hidden states of the same tokens as the policy's, "
                             f"shape {shape} + (H,), got {tuple(ref_input.shape)}")
        if cu_seqlens is not None:
            ref_input, labels, _ = _packed_inputs(ref_input, labels, cu_seqlens)
        with torch.no_grad():
            return self._logps(ref_input, ref_weight, labels, ref_bias, cu_seqlens).detach()

    def _chosen_nll(self, chosen, labels, cu_seqlens, order, hidden):
        """Liger's NLL term: minus the summed log-probs of the chosen responses' tokens over their count."""
        scored = _scored_per_sequence(labels, cu_seqlens, self.ignore_index, hidden)[order[CHOSEN].to(chosen.device)]
        sums = chosen * scored if self.average_log_prob else chosen
        return -sums.sum() / scored.sum().clamp(min=1)

    @property
    def reward_scale(self) -> float:
        """beta of the reward beta (log pi - log pi_ref); 1 for losses without one (SPPO given eta, INPO)."""
        return self._reward_beta if self._reward_beta is not None else 1.0

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
        first, second = torch.arange(num_pairs), torch.arange(num_pairs, rows)
        order = {CHOSEN: first, REJECTED: second, AUG_CHOSEN: first, AUG_REJECTED: second}  # rows of each role
        return policy[:num_pairs], policy[num_pairs:], aug_chosen, aug_rejected, num_tokens, order

    def _packed_layout(self, weight, hidden, labels, bias, cu_seqlens, role, pair_index):
        hidden, labels, lengths = _packed_inputs(hidden, labels, cu_seqlens)
        num_seqs = lengths.shape[0]
        role = _sequence_ids("role", role, num_seqs)
        pair_index = _sequence_ids("pair_index", pair_index, num_seqs)
        used_roles = [CHOSEN, REJECTED, AUG_CHOSEN, AUG_REJECTED] if self._uses_augmented else [CHOSEN, REJECTED]
        rows = pair_order(role, pair_index, used_roles, self.loss)  # [roles, P]: the checks run inside
        order = {r: rows[i] for i, r in enumerate(used_roles)}

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
        return chosen, rejected, aug_chosen, aug_rejected, num_tokens, order

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
            num_seqs = lengths.shape[0]
            if role is not None:
                role = _sequence_ids("role", role, num_seqs)
            if pair_index is not None:
                pair_index = _sequence_ids("pair_index", pair_index, num_seqs)
        if num_seqs == 0:
            raise ValueError("the batch has no sequences")
        policy = self._logps(hidden, weight, labels, bias, cu_seqlens)
        ref = _per_example("ref_logps", ref_logps, num_seqs, policy.device, False, what="sequences")
        win = _per_example("winrate", winrate, num_seqs, policy.device, True, what="sequences")
        if role is not None and cu_seqlens is not None:
            # The check's result is used (times 0), so that a compiler cannot drop the check as dead code.
            policy = policy + 0 * checked_single_role(role).to(policy.device, policy.dtype).sum()
        per_response = losses.sppo_loss(policy, ref, win, eta=self.eta)
        with torch.no_grad():
            metrics = {
                "loss": per_response.mean(),
                "logratio": (policy - ref).mean(),
                "policy_logps": policy.mean(),
                "num_responses": torch.ones_like(policy).sum(),
                "num_tokens": (labels != self.ignore_index).sum().float(),
            }
            if pair_index is not None:
                ids = pair_index.sort().values  # distinct ids, counted without a data-dependent shape
                metrics["num_prompts"] = (1 + (ids[1:] != ids[:-1]).sum()).float().to(policy.device)
            metrics = {k: v.detach() for k, v in metrics.items()}
        return self._reduce(per_response), metrics


def _int64_labels(labels):
    """Integer labels of a dtype sequence_logprobs takes, as int64 (exact); anything else as it is (it raises there)."""
    return labels.long() if isinstance(labels, torch.Tensor) and labels.dtype in _LABEL_DTYPES else labels


def _packed_inputs(hidden, labels, cu_seqlens):
    """Flattens [1, N, ...] to [N, ...] and returns (hidden, labels, checked per-sequence lengths [S])."""
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
    return hidden, labels, checked_sequence_lengths(cu_seqlens, hidden.shape[0])


def _num_sequences(hidden, cu_seqlens) -> int | None:
    if isinstance(cu_seqlens, torch.Tensor) and cu_seqlens.dim() == 1:
        return cu_seqlens.numel() - 1
    if cu_seqlens is None and isinstance(hidden, torch.Tensor) and hidden.dim() == 3:
        return hidden.shape[0]
    return None


def _scored_per_sequence(labels, cu_seqlens, ignore_index, hidden):
    """Scored (non-ignored) positions of every sequence (packed) or row (Liger layout), as float32."""
    scored = labels != ignore_index
    if cu_seqlens is None:
        return scored.sum(-1).float()
    scored = scored.reshape(-1).long()
    cumulative = torch.cat([scored.new_zeros(1), scored.cumsum(0)])
    cu = cu_seqlens.to(cumulative.device).long()
    return (cumulative[cu[1:]] - cumulative[cu[:-1]]).float()


def _mean_logits(hidden, weight, bias, cu_seqlens, order):
    """Liger's chosen / rejected logits means without the logits: the mean over positions p and vocabulary v
    of z_pv = h_p . W_v + b_v is (sum_p h_p) . (sum_v W_v) / (n V) + sum_v b_v / V (before any soft-cap).
    Liger layout: every position of the B chosen (rejected) rows, padding included, as Liger averages;
    packed layout: every token of the chosen (rejected) sequences."""
    vocab = weight.shape[0]
    column_sum = weight.detach().sum(0, dtype=torch.float32)
    bias_mean = bias.detach().sum(dtype=torch.float32) / vocab if bias is not None else 0.0
    hidden = hidden.detach()
    means = []
    for role in (CHOSEN, REJECTED):
        if cu_seqlens is None:  # the role's rows are contiguous (chosen first): a view, no copy
            num = order[role].shape[0]
            rows = hidden[0:num] if role == CHOSEN else hidden[num:2 * num]
            total = rows.sum(dim=(0, 1), dtype=torch.float32)
            mean = total @ column_sum.to(total.device) / max(1, rows.shape[0] * rows.shape[1] * vocab)
        else:  # device ops only (no host sync): the sequences' tokens as a mask
            flat = hidden.reshape(-1, hidden.shape[-1])
            cu = cu_seqlens.to(flat.device).long()
            member = torch.zeros(cu.shape[0] - 1, dtype=torch.bool, device=flat.device)
            member = member.index_fill(0, order[role].to(flat.device), True)
            mask = torch.repeat_interleave(member, cu[1:] - cu[:-1], output_size=flat.shape[0])
            total = (mask.to(flat.dtype) @ flat).float()
            mean = total @ column_sum.to(total.device) / (mask.sum() * vocab).clamp(min=1)
        means.append(mean + bias_mean)
    return tuple(torch.as_tensor(m, dtype=torch.float32, device=hidden.device) for m in means)


def _sequence_ids(name, ids, num_seqs):
    """Validates a per-sequence integer tensor's type and shape [S] (role or pair_index); returns it as int64."""
    if ids is None:
        raise ValueError(f"the packed layout needs {name} [S]")
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor [S], got {getattr(ids, 'dtype', type(ids).__name__)}")
    if ids.shape != (num_seqs,):
        raise ValueError(
            f"{name} must be [S] = [{num_seqs}] (one per sequence of cu_seqlens), got shape {tuple(ids.shape)}"
        )
    return ids.detach().long()


def _per_example(name, value, count, device, probability, what="pairs"):
    """Checks a precomputed per-pair (or per-sequence) tensor and returns it as float32.

    The count of pairs of a packed batch is known only at run time under torch.compile (from role): there
    the shape check becomes a run-time assertion (torch._check); in eager it is this ValueError."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        got = getattr(value, "dtype", type(value).__name__)
        raise ValueError(f"{name} must be a floating-point tensor, got {got}")
    message = f"{name} must have shape [{count}] (one per {what[:-1]}: {count} {what}), got {tuple(value.shape)}"
    if value.dim() != 1:
        raise ValueError(message)
    if torch.compiler.is_compiling():
        torch._check(value.shape[0] == count)  # Dynamo cannot carry the message closure
    elif value.shape[0] != count:
        raise ValueError(message)
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but the hidden states are on {device}")
    if probability:
        value = checked_probabilities(value, name)
    return value.float()


# LigerFusedLinearDPOLoss's loss_type -> (our loss, SPPO's win rate when none is passed) where it is one of
# nash-fast's own losses; every other TRL loss type (and any list) is FusedLinearPreferenceLoss's TRL path.
_LIGER_LOSS_TYPES = {"sigmoid": ("dpo", None), "sppo_hard": ("sppo", 1.0)}


_LIGER_AUX = ("chosen_logps", "rejected_logps", "mean_chosen_logits", "mean_rejected_logits", "nll_loss",
              "chosen_rewards", "rejected_rewards")


class LigerAux(collections.namedtuple("LigerAux", _LIGER_AUX)):
    """The second element of LigerFusedLinearDPOLoss's result, in its order (so `loss, (a, b, *rest) = ...`
    unpacks as with Liger), readable by name; .metrics holds every FusedLinearPreferenceLoss metric."""

    metrics: dict[str, torch.Tensor]


class FusedLinearDPOLoss(FusedLinearPreferenceLoss):
    """LigerFusedLinearDPOLoss's constructor and call, on nash-fast's fused op: the one-import swap

        from nash_fast import FusedLinearDPOLoss as LigerFusedLinearDPOLoss

    Same arguments, same defaults (average_log_prob=False, as Liger's DPO loss), same positional call
    loss_fn(lin_weight, _input, target, bias, ref_input, ref_weight, ref_bias) -> (loss, aux), aux a LigerAux:
    Liger's 7-tuple (chosen_logps, rejected_logps, mean chosen logits, mean rejected logits, nll_loss,
    chosen_rewards, rejected_rewards), with the full metrics dict as aux.metrics.

    loss_type: any of TRL's loss types (TRL_LOSS_TYPES), with TRL's formulas and defaults (nash_fast.losses): Liger's
    ten (sigmoid, sppo_hard, bco_pair, exo_pair, discopop, nca_pair, apo_down, apo_zero, robust, hinge) and TRL's
    others (ipo, aot, aot_unpaired, sft, sigmoid_norm); or TRL's list loss_type=[...] with loss_weights=[...] (a
    keyword, TRL's DPOConfig field): sum_k w_k mean(loss_k). "ipo" is TRL's (on per-token mean log-ratios; Liger
    refuses it). "sppo_hard" alone is SPPO eq. 4.8 with P = 1 and eta = 1 / beta (pass winrate= for soft win
    rates). label_smoothing is read by robust, exo_pair (required > 0, as TRL and Liger), aot and aot_unpaired, and
    refused with any other loss type; discopop_tau by discopop (ignored otherwise, as Liger). bco_running_mean=True
    (a keyword) keeps TRL 0.x's running mean of rewards as bco_pair's shift. compute_nll_loss adds alpha x the
    chosen responses' token-mean NLL (Liger's RPO term, needs reduction "mean"); use_ref_model=False makes the
    reference log-probs 0. compiled and chunk_size tune Liger's chunked torch.compile path; they are accepted and
    change nothing (the fused op never holds the logits). Every FusedLinearPreferenceLoss keyword (backend, softcap,
    reduction, and the forward's precomputed inputs) works as well.
    """

    def __init__(self, ignore_index: int = -100, beta: float = 0.1, alpha: float = 1.0,
                 compute_nll_loss: bool = False, compiled: bool = True, use_ref_model: bool = True,
                 average_log_prob: bool = False, chunk_size: int = 1, loss_type: str = "sigmoid",
                 label_smoothing: float = 0.0, discopop_tau: float = 0.05, **options):
        types = trl_loss_types(loss_type)  # one line listing the supported ones for anything else
        for name, value in (("compute_nll_loss", compute_nll_loss), ("use_ref_model", use_ref_model)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {value!r}")
        single = isinstance(loss_type, str) and "," not in loss_type and loss_type in _LIGER_LOSS_TYPES
        if single:
            if label_smoothing != 0.0:
                raise ValueError(f"label_smoothing={label_smoothing!r} is not read by loss_type={loss_type!r} (it is "
                                 f"read by {', '.join(_TRL_SMOOTHED)}; conservative DPO with targets 1 - "
                                 "label_smoothing is FusedLinearPreferenceLoss('spce', ...) with target_prob)")
            loss, default_winrate = _LIGER_LOSS_TYPES[loss_type]
            super().__init__(loss, beta=beta, ignore_index=ignore_index, average_log_prob=average_log_prob, **options)
        else:
            smoothed = set(types) & set(_TRL_SMOOTHED)
            if label_smoothing != 0.0 and not smoothed:
                raise ValueError(f"label_smoothing={label_smoothing!r} is not read by loss_type={loss_type!r} (it is "
                                 f"read by {', '.join(_TRL_SMOOTHED)})")
            trl = dict(label_smoothing=label_smoothing if smoothed else None,
                       discopop_tau=discopop_tau if "discopop" in types else None)
            if "exo_pair" in types and not label_smoothing > 0.0:
                raise ValueError(f"loss_type exo_pair needs label_smoothing > 0 (EXO's eps; the EXO paper recommends "
                                 f"1e-3), got {label_smoothing!r}")
            default_winrate = None
            super().__init__(list(types), beta=beta, ignore_index=ignore_index, average_log_prob=average_log_prob,
                             **trl, **options)
        if compute_nll_loss:
            if self.reduction != "mean":
                raise ValueError(f"compute_nll_loss adds a token mean to the loss: it needs reduction='mean', "
                                 f"got {self.reduction!r}")
            self._nll_alpha = _hyperparameter("alpha", alpha)
        self._zero_reference = not use_ref_model
        self._default_winrate = default_winrate
        self.loss_type, self.compiled, self.chunk_size = loss_type, compiled, chunk_size
        if not self._trl:
            self.discopop_tau = discopop_tau

    def forward(self, lin_weight, _input, target, bias=None, ref_input=None, ref_weight=None, ref_bias=None,
                **options) -> tuple[torch.Tensor, LigerAux]:
        """Liger's call (its argument names too); `options` are FusedLinearPreferenceLoss.forward's keywords."""
        loss, metrics = super().forward(lin_weight, _input, target, bias, ref_input, ref_weight, ref_bias, **options)
        if "chosen_logps" not in metrics:  # SPPO's all-responses form has no pairs: no Liger tuple to give
            raise ValueError("FusedLinearDPOLoss returns Liger's per-pair outputs; SPPO's all-responses form "
                             "is FusedLinearPreferenceLoss('sppo')'s")
        aux = LigerAux(*(metrics[name] for name in _LIGER_AUX))
        aux.metrics = metrics
        return loss, aux
