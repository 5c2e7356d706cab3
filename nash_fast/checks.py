"""Checks that read tensor values, as custom operators (torch.library).

torch.compile traces each as one opaque call: no graph break and no host sync in the traced code,
while the check still runs, with the same ValueError, whenever the code runs (eager or compiled).
Each returns what it checked (or derived), so its result is used and never dropped as dead code.
"""

from __future__ import annotations

import torch

__all__ = ["checked_probabilities", "checked_sequence_lengths", "pair_order", "checked_single_role"]

CHOSEN, REJECTED, AUG_CHOSEN, AUG_REJECTED = 0, 1, 2, 3
ROLE_NAMES = {CHOSEN: "chosen", REJECTED: "rejected", AUG_CHOSEN: "augmented chosen", AUG_REJECTED: "augmented rejected"}


@torch.library.custom_op("nash_fast::checked_probabilities", mutates_args=())
def checked_probabilities(p: torch.Tensor, name: str) -> torch.Tensor:
    """p (a copy), after checking every entry lies in [0, 1] (NaN fails both comparisons)."""
    if not bool(((p >= 0) & (p <= 1)).all()):
        raise ValueError(f"{name} must hold probabilities in [0, 1] (finite), got values outside")
    return p.clone()


@checked_probabilities.register_fake
def _(p, name):
    return torch.empty_like(p)


torch.library.register_autograd(
    "nash_fast::checked_probabilities", lambda ctx, grad: (grad, None), setup_context=lambda ctx, inputs, output: None)


@torch.library.custom_op("nash_fast::checked_sequence_lengths", mutates_args=())
def checked_sequence_lengths(cu_seqlens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Per-sequence lengths [S] (int64, on cu_seqlens' device) of packed boundaries 0 = cu[0] <= ... <= cu[S] = N."""
    cu = cu_seqlens.detach().cpu().long()
    lengths = cu[1:] - cu[:-1]
    if int(cu[0]) != 0 or int(cu[-1]) != num_tokens or bool((lengths < 0).any()):
        raise ValueError(f"cu_seqlens must be non-decreasing from 0 to N = {num_tokens}, got {cu.tolist()[:8]}...")
    return lengths.to(cu_seqlens.device)


@checked_sequence_lengths.register_fake
def _(cu_seqlens, num_tokens):
    return cu_seqlens.new_empty((cu_seqlens.shape[0] - 1,), dtype=torch.long)


@torch.library.custom_op("nash_fast::pair_order", mutates_args=())
def pair_order(role: torch.Tensor, pair_index: torch.Tensor, roles: list[int], loss: str) -> torch.Tensor:
    """[len(roles), P] sequence indices (int64, on role's device): row r lists, for pairs 0..P-1, the sequence
    of role roles[r]. P is the number of chosen sequences; every pair needs exactly one sequence of each role
    in `roles`, and no sequence may have a role outside them."""
    role_cpu, pairs_cpu = role.detach().cpu().long(), pair_index.detach().cpu().long()
    if bool(((role_cpu < 0) | (role_cpu > AUG_REJECTED)).any()):
        raise ValueError(
            f"role values must be 0..3 (chosen, rejected, aug chosen, aug rejected), got {role_cpu.unique().tolist()}")
    if AUG_CHOSEN not in roles and bool((role_cpu >= AUG_CHOSEN).any()):
        raise ValueError(f"role has augmented sequences (2/3) but loss={loss!r} does not use them")
    num_pairs = int((role_cpu == CHOSEN).sum())
    if num_pairs == 0:
        raise ValueError("role has no chosen sequence (role 0): the batch has no pairs")
    order = torch.empty(len(roles), num_pairs, dtype=torch.long)
    for row, which in enumerate(roles):
        sequences = (role_cpu == which).nonzero().squeeze(1)
        pairs = pairs_cpu[sequences]
        if bool(((pairs < 0) | (pairs >= num_pairs)).any()):
            raise ValueError(
                f"pair_index must be in 0..P-1 with P = {num_pairs} pairs (the count of chosen sequences), "
                f"got {pairs.tolist()[:8]} for {ROLE_NAMES[which]} sequences")
        counts = torch.bincount(pairs, minlength=num_pairs)
        if bool((counts != 1).any()):
            bad = int((counts != 1).nonzero()[0])
            raise ValueError(
                f"pair_index: pair {bad} has {int(counts[bad])} {ROLE_NAMES[which]} sequences (role {which}); "
                f"every pair needs exactly one")
        order[row, pairs] = sequences
    return order.to(role.device)


@pair_order.register_fake
def _(role, pair_index, roles, loss):
    num_pairs = torch.library.get_ctx().new_dynamic_size(min=1)  # known only from the values
    return role.new_empty((len(roles), num_pairs), dtype=torch.long)


@torch.library.custom_op("nash_fast::checked_single_role", mutates_args=())
def checked_single_role(role: torch.Tensor) -> torch.Tensor:
    """role (a copy), after checking it is all 0 (SPPO's all-responses form: every sequence is one response)."""
    if bool((role != CHOSEN).any()):
        raise ValueError("role must be None or all 0 in SPPO's all-responses form (every sequence is one response)")
    return role.clone()


@checked_single_role.register_fake
def _(role):
    return torch.empty_like(role)
