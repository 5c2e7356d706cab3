"""Nash diagnostics: the project's real losses on tabular preference games.

A preference game over n responses is a matrix P with P[i, j] = P(y_i > y_j), P + P^T = 1 (so the
diagonal is 1/2). A policy pi is a distribution over the n responses; P(y > pi) = (P pi)_y.
The von Neumann winner pi* (the symmetric Nash equilibrium of the two-player constant-sum game,
INPO eq. 3, SPPO eq. 3.2) satisfies P(y > pi*) <= 1/2 for every y, so

    exploitability(pi) = max_y P(y > pi) - 1/2  >=  0,   with equality exactly at a winner.

The policy here is tabular: logits theta over the n responses, log pi = log_softmax(theta). Each
self-play iteration minimises, over theta, the expectation under pi_t of a real loss from
nash_fast.losses, computed exactly over the game (no sampling noise), with L-BFGS in float64:

    SPPO (Algorithm 1, eq. 4.7):   E_{y ~ pi_t} (log pi(y) - log pi_t(y) - eta (P(y > pi_t) - 1/2))^2
        whose minimiser is, up to the normaliser that SPPO approximates by eta/2, the multiplicative
        weights update pi_{t+1}(y) ∝ pi_t(y) exp(eta P(y > pi_t)) (SPPO eq. 4.6). Theory: the
        *average* iterate converges to the winner (SPPO Theorem 4.1).
    INPO (Algorithm 1, eq. 8):     E_{y, y' ~ pi_t, (y_w, y_l) ~ P} (h_t(pi, y_w, y_l) - 1/(2 eta))^2
        whose minimiser is exactly pi_{t+1} ∝ pi_ref^{tau/eta} pi_t^{1 - tau/eta} exp(P(y > pi_t)/eta)
        (INPO eq. 5); the *last* iterate converges to the tau-regularised winner (INPO Theorem 4).
    iterated DPO (online DPO, reference pi_t): E_{y, y' ~ pi_t, (y_w, y_l) ~ P} -log sigmoid(beta (Δ_w - Δ_l))
        fits a Bradley-Terry reward to P under pi_t's pairs and moves pi_t along it. On an
        intransitive game that is a Hedge-like step with a large, data-dependent step size: its
        last iterate (the policy iterated DPO deploys) keeps cycling around the winner. On sampled
        best-vs-worst pairs with hard labels (the usual iterative-DPO recipe) it collapses onto one
        pure response, which its counter beats.

Measured here (cyclic game, 40 sampled iterations of 64 groups of K = 4): INPO on Algorithm 1's random
pairs converges in the last iterate, but INPO on best-vs-worst tournament pairs (its experiments'
recipe, nash_fast.build's "inpo" rule) does not: that selection is not the unbiased sample of eq. 8.

With groups=M (sampled_step) each iteration instead trains on M sampled groups of K responses, through
nash_fast.build's real dataset rules where the method has one.

`python -m nash_fast.nash [--groups 64]` prints exploitability per iteration for every method and game.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from nash_fast import build, losses
from nash_fast.cli import ArgumentParser, run_cli

# --------------------------------------------------------------------------- games


def check_preference_matrix(P, *, name: str = "P") -> np.ndarray:
    """Validate a preference matrix: square, finite, in [0, 1], P + P^T = 1 (ValueError naming `name`)."""
    P = np.asarray(P, dtype=np.float64)
    if P.ndim != 2 or P.shape[0] != P.shape[1] or P.shape[0] < 1:
        raise ValueError(f"{name} must be a square n x n matrix, got shape {P.shape}")
    if not np.all(np.isfinite(P)) or P.min() < 0.0 or P.max() > 1.0:
        raise ValueError(f"{name} must hold probabilities in [0, 1]")
    if not np.allclose(P + P.T, 1.0, atol=1e-9):
        raise ValueError(f"{name} must satisfy P[i, j] + P[j, i] = 1 (a preference, not a score)")
    return P


def transitive_game(scores) -> np.ndarray:
    """Bradley-Terry game P[i, j] = sigmoid(s_i - s_j); its winner is the pure best response."""
    s = np.asarray(scores, dtype=np.float64)
    return 1.0 / (1.0 + np.exp(-(s[:, None] - s[None, :])))


def rock_paper_scissors(margin: float = 0.8) -> np.ndarray:
    """P = 1/2 + (margin/2) C with C the rock-paper-scissors cycle; winner uniform (1/3, 1/3, 1/3)."""
    return cyclic_game(margin, margin, margin)


def cyclic_game(a: float, b: float, c: float) -> np.ndarray:
    """Generalised rock-paper-scissors: y0 beats y1 by a, y1 beats y2 by c, y2 beats y0 by b.

    P - 1/2 = (1/2) [[0, a, -b], [-a, 0, c], [b, -c, 0]]; for a, b, c > 0 the unique winner is
    pi* = (c, b, a) / (a + b + c) (it zeroes every row of the skew-symmetric matrix).
    """
    if not all(0 < v <= 1 for v in (a, b, c)):
        raise ValueError(f"cyclic_game margins must be in (0, 1], got a={a}, b={b}, c={c}")
    M = np.array([[0.0, a, -b], [-a, 0.0, c], [b, -c, 0.0]])
    return 0.5 + 0.5 * M


def cyclic_game_winner(a: float, b: float, c: float) -> np.ndarray:
    """Closed-form von Neumann winner of cyclic_game(a, b, c)."""
    w = np.array([c, b, a], dtype=np.float64)
    return w / w.sum()


GAMES = {
    "transitive": lambda: transitive_game([0.0, 1.0, 2.0, 0.5]),
    "rock_paper_scissors": rock_paper_scissors,
    "cyclic": lambda: cyclic_game(0.1, 0.5, 0.9),  # winner (0.6, 1/3, 1/15)
}


# --------------------------------------------------------------------------- equilibria


def exploitability(P, pi) -> float:
    """max_y P(y > pi) - 1/2 (0 exactly at a von Neumann winner, > 0 elsewhere)."""
    P = np.asarray(P, dtype=np.float64)
    return float((P @ np.asarray(pi, dtype=np.float64)).max() - 0.5)


def von_neumann_winner(P) -> np.ndarray:
    """A von Neumann winner of P: max_pi min_y P(pi > y), solved exactly.

    Linear program (scipy.optimize.linprog, when scipy is installed): maximise v subject to
    sum_i pi_i P[i, j] >= v for every j, sum pi = 1, pi >= 0. Without scipy: support enumeration
    (exact for the small games used here, exponential in n).
    """
    P = check_preference_matrix(P)
    try:
        from scipy.optimize import linprog
    except ImportError:
        return _winner_by_support_enumeration(P)
    n = P.shape[0]
    # variables (pi_1..pi_n, v); minimise -v; constraint v - (P^T pi)_j <= 0
    c = np.zeros(n + 1)
    c[-1] = -1.0
    A_ub = np.hstack([-P.T, np.ones((n, 1))])
    A_eq = np.hstack([np.ones((1, n)), np.zeros((1, 1))])
    res = linprog(c, A_ub=A_ub, b_ub=np.zeros(n), A_eq=A_eq, b_eq=[1.0],
                  bounds=[(0, None)] * n + [(None, None)], method="highs")
    if not res.success:  # pragma: no cover - the LP is always feasible and bounded
        raise RuntimeError(f"linprog failed: {res.message}")
    pi = np.clip(res.x[:n], 0.0, None)
    return pi / pi.sum()


def _winner_by_support_enumeration(P: np.ndarray) -> np.ndarray:
    """Exact winner by trying supports S (smallest first): solve (P - 1/2)_{S,S} pi_S = 0,
    sum pi_S = 1, and accept when pi_S >= 0 and no response outside S beats it."""
    n = P.shape[0]
    M = P - 0.5
    for size in range(1, n + 1):
        for support in itertools.combinations(range(n), size):
            S = list(support)
            A = np.vstack([M[np.ix_(S, S)], np.ones((1, size))])
            rhs = np.concatenate([np.zeros(size), [1.0]])
            x, *_ = np.linalg.lstsq(A, rhs, rcond=None)
            if not np.allclose(A @ x, rhs, atol=1e-9) or x.min() < -1e-12:
                continue
            pi = np.zeros(n)
            pi[S] = np.clip(x, 0.0, None)
            pi /= pi.sum()
            if exploitability(P, pi) <= 1e-9:
                return pi
    raise RuntimeError("no equilibrium found")  # pragma: no cover - one always exists


# --------------------------------------------------------------------------- self-play steps


def _minimise(objective, theta0: torch.Tensor, max_iter: int = 200) -> torch.Tensor:
    theta = theta0.detach().clone().requires_grad_(True)
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=max_iter, tolerance_grad=1e-12,
                            tolerance_change=1e-14, history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = objective(theta)
        loss.backward()
        return loss

    opt.step(closure)
    return theta.detach()


def _ordered_pairs(P: torch.Tensor, pi_t: torch.Tensor):
    """All (y_w, y_l) with their probability under y, y' ~ pi_t, y_w ~ P(. | y, y'):
    weight(w, l) = 2 pi_t(w) pi_t(l) P[w, l] (the pair can be drawn as (w, l) or (l, w))."""
    n = P.shape[0]
    w_idx, l_idx = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    w_idx, l_idx = w_idx.reshape(-1), l_idx.reshape(-1)
    weight = 2.0 * pi_t[w_idx] * pi_t[l_idx] * P[w_idx, l_idx]
    return w_idx, l_idx, weight


def sppo_step(P, logits_t, *, eta: float) -> torch.Tensor:
    """One SPPO iteration: argmin_theta E_{y ~ pi_t} sppo_loss(log pi(y), log pi_t(y), P(y > pi_t))."""
    P = torch.as_tensor(P, dtype=torch.float64)
    logp_t = torch.log_softmax(logits_t, -1)
    pi_t = logp_t.exp()
    winrate = P @ pi_t

    def objective(theta):
        per_response = losses.sppo_loss(torch.log_softmax(theta, -1), logp_t, winrate, eta=eta)
        return (pi_t * per_response).sum()

    return _minimise(objective, logits_t)


def inpo_step(P, logits_t, logits_ref, *, eta: float, tau: float) -> torch.Tensor:
    """One INPO iteration: argmin_theta of the exact population loss (INPO eq. 8) with inpo_loss."""
    P = torch.as_tensor(P, dtype=torch.float64)
    logp_t, logp_ref = torch.log_softmax(logits_t, -1), torch.log_softmax(logits_ref, -1)
    w, l, weight = _ordered_pairs(P, logp_t.exp())

    def objective(theta):
        logp = torch.log_softmax(theta, -1)
        per_pair = losses.inpo_loss(logp[w], logp[l], logp_ref[w], logp_ref[l], logp_t[w], logp_t[l],
                                    eta=eta, tau=tau)
        return (weight * per_pair).sum()

    return _minimise(objective, logits_t)


def dpo_step(P, logits_t, *, beta: float) -> torch.Tensor:
    """One online (iterated) DPO iteration with reference pi_t: pairs from pi_t, labelled by P."""
    P = torch.as_tensor(P, dtype=torch.float64)
    logp_t = torch.log_softmax(logits_t, -1)
    w, l, weight = _ordered_pairs(P, logp_t.exp())

    def objective(theta):
        logp = torch.log_softmax(theta, -1)
        per_pair = losses.dpo_loss(logp[w], logp[l], logp_t[w], logp_t[l], beta=beta)
        return (weight * per_pair).sum()

    return _minimise(objective, logits_t)


def _rule_records(P: np.ndarray, pi_t: np.ndarray, rule: str, *, groups: int, K: int, rng) -> list[dict]:
    """Records of the project's real dataset rules (nash_fast.build): `groups` prompts' worth of K
    responses sampled from pi_t (a response is its index as a string), judged exactly by P."""
    samples = rng.choice(len(pi_t), size=(groups, K), p=pi_t)
    judge = lambda prompts, a, b: [P[int(x), int(y)] for x, y in zip(a, b)]  # noqa: E731
    prompts = [f"x{g}" for g in range(groups)]  # distinct prompts: the "pairs" rule seeds its draws by prompt
    judgments = build.judge_groups(judge, rule, prompts, [[str(y) for y in row] for row in samples])
    records, _ = build.build_records(rule, judgments, seed=int(rng.integers(2**31)))
    return records


def sampled_step(P, logits_t, logits_ref, method: str, *, groups: int, K: int, rng, eta: float, tau: float,
                 beta: float, pairs: str = "random") -> torch.Tensor:
    """One iteration on sampled data, minimising the mean loss over the iteration's records.

    sppo: nash_fast.build's SPPO rule: the best and worst of K responses with their estimated win rates
          (1/K) sum_k P(y > y_k) (Algorithm 1, eq. 4.7);
    inpo, dpo: pairs="random": nash_fast.build's "pairs" rule, K // 2 pairs per group of independent
          samples of pi_t with the winner drawn from P (INPO Algorithm 1 and its population loss,
          eq. 8); pairs="tournament": nash_fast.build's "inpo" rule,
          the best-vs-worst of K by an O(K) tournament (INPO's experiments, after Dong et al.), which is
          not an unbiased sample of eq. 8 (Proposition 6 needs y, y' ~ pi_t).
    No records (every group skipped) keeps pi_t."""
    P = np.asarray(P, dtype=np.float64)
    logp_t, logp_ref = torch.log_softmax(logits_t, -1), torch.log_softmax(logits_ref, -1)
    pi_t = logp_t.exp().numpy()
    if method == "sppo":
        records = _rule_records(P, pi_t, "sppo", groups=groups, K=K, rng=rng)
        if not records:
            return logits_t.clone()
        idx = torch.tensor([int(y) for r in records for y in r["responses"]])
        winrate = torch.tensor([w for r in records for w in r["winrates"]], dtype=torch.float64)

        def objective(theta):
            logp = torch.log_softmax(theta, -1)
            return losses.sppo_loss(logp[idx], logp_t[idx], winrate, eta=eta).mean()

        return _minimise(objective, logits_t)
    if pairs not in ("random", "tournament"):
        raise ValueError(f"pairs must be 'random' or 'tournament', got {pairs!r}")
    records = _rule_records(P, pi_t, "pairs" if pairs == "random" else "inpo", groups=groups, K=K, rng=rng)
    if not records:
        return logits_t.clone()
    w = torch.tensor([int(r["chosen"]) for r in records])
    l = torch.tensor([int(r["rejected"]) for r in records])  # noqa: E741

    def objective(theta):
        logp = torch.log_softmax(theta, -1)
        if method == "inpo":
            per_pair = losses.inpo_loss(logp[w], logp[l], logp_ref[w], logp_ref[l], logp_t[w], logp_t[l],
                                        eta=eta, tau=tau)
        else:
            per_pair = losses.dpo_loss(logp[w], logp[l], logp_t[w], logp_t[l], beta=beta)
        return per_pair.mean()

    return _minimise(objective, logits_t)


def multiplicative_weights_step(P, pi_t, *, eta: float) -> np.ndarray:
    """The update SPPO's loss approximates: pi_{t+1}(y) ∝ pi_t(y) exp(eta P(y > pi_t)) (SPPO eq. 4.6)."""
    P, pi_t = np.asarray(P, dtype=np.float64), np.asarray(pi_t, dtype=np.float64)
    z = np.log(pi_t) + eta * (P @ pi_t)
    z -= z.max()
    return np.exp(z) / np.exp(z).sum()


def inpo_closed_form_step(P, pi_t, pi_ref, *, eta: float, tau: float) -> np.ndarray:
    """INPO eq. 5: pi_{t+1} ∝ exp(P(y > pi_t)/eta) pi_ref^{tau/eta} pi_t^{1 - tau/eta}."""
    P = np.asarray(P, dtype=np.float64)
    pi_t, pi_ref = np.asarray(pi_t, dtype=np.float64), np.asarray(pi_ref, dtype=np.float64)
    z = (P @ pi_t) / eta + (tau / eta) * np.log(pi_ref) + (1 - tau / eta) * np.log(pi_t)
    z -= z.max()
    return np.exp(z) / np.exp(z).sum()


# --------------------------------------------------------------------------- runs


@dataclass
class SelfPlayTrace:
    """Policies pi_1 .. pi_{T+1} and the exploitability of the last and of the average iterate."""

    method: str
    policies: list = field(default_factory=list)
    last_exploitability: list = field(default_factory=list)
    average_exploitability: list = field(default_factory=list)

    @property
    def average_policy(self) -> np.ndarray:
        return np.mean(self.policies, axis=0)


def self_play(P, method: str, *, iterations: int, init=None, eta: float | None = None,
              tau: float = 0.05, beta: float = 1.0, groups: int | None = None, K: int = 4,
              seed: int = 0, pairs: str = "random") -> SelfPlayTrace:
    """Run `iterations` rounds of `method` ("sppo", "inpo" or "dpo") from pi_1 = init (uniform by
    default; also pi_ref for INPO) and record exploitability after every round.

    groups=None: exact expectations over the game. groups=M: every round samples M groups of K responses
    from pi_t (numpy generator seeded by `seed`) and trains on their records (sampled_step; `pairs`
    picks INPO's / DPO's pair construction).

    Defaults: SPPO eta = 1 (the MW step size); INPO eta = 1 (the OMD step is 1/eta) and tau = 0.05.
    """
    P = check_preference_matrix(P)
    n = P.shape[0]
    pi_1 = np.full(n, 1.0 / n) if init is None else np.asarray(init, dtype=np.float64)
    if pi_1.shape != (n,) or pi_1.min() <= 0 or not math.isclose(pi_1.sum(), 1.0, rel_tol=1e-9):
        raise ValueError("init must be a strictly positive distribution over the game's responses")
    logits_ref = torch.log(torch.as_tensor(pi_1))
    logits = logits_ref.clone()
    trace = SelfPlayTrace(method)

    def record(logits):
        pi = torch.softmax(logits, -1).numpy()
        trace.policies.append(pi)
        trace.last_exploitability.append(exploitability(P, pi))
        trace.average_exploitability.append(exploitability(P, trace.average_policy))

    record(logits)
    rng = np.random.default_rng(seed)
    for _ in range(iterations):
        if groups is not None:
            if method not in ("sppo", "inpo", "dpo"):
                raise ValueError(f"method must be 'sppo', 'inpo' or 'dpo', got {method!r}")
            logits = sampled_step(P, logits, logits_ref, method, groups=groups, K=K, rng=rng,
                                  eta=1.0 if eta is None else eta, tau=tau, beta=beta, pairs=pairs)
        elif method == "sppo":
            logits = sppo_step(P, logits, eta=1.0 if eta is None else eta)
        elif method == "inpo":
            logits = inpo_step(P, logits, logits_ref, eta=1.0 if eta is None else eta, tau=tau)
        elif method == "dpo":
            logits = dpo_step(P, logits, beta=beta)
        else:
            raise ValueError(f"method must be 'sppo', 'inpo' or 'dpo', got {method!r}")
        logits = logits - logits.max()  # logits are shift-invariant; keep them bounded
        record(logits)
    return trace


def main(argv=None) -> int:
    """The CLI (one-line errors, exit status 2; --debug for a traceback)."""
    return run_cli("python -m nash_fast.nash", _main, argv)


def _main(argv) -> None:
    parser = ArgumentParser(prog="python -m nash_fast.nash", description=__doc__.split("\n")[0])
    parser.add_argument("--debug", action="store_true", help="Print the full traceback of an error.")
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--games", nargs="*", default=list(GAMES), choices=list(GAMES))
    parser.add_argument("--groups", type=int, default=None,
                        help="sample this many groups of --K responses per iteration (default: exact expectations)")
    parser.add_argument("--K", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    runs = [("sppo", "sppo", {}), ("inpo", "inpo", {}), ("dpo", "dpo", {})]
    if args.groups is not None:
        runs += [("inpo-tourn", "inpo", {"pairs": "tournament"}), ("dpo-tourn", "dpo", {"pairs": "tournament"})]
        for _, _, kwargs in runs:
            kwargs.update(groups=args.groups, K=args.K, seed=args.seed)
    for game_name in args.games:
        P = GAMES[game_name]()
        n = P.shape[0]
        # pi_1 = pi_ref uniform (INPO's set-up), unless uniform already is the winner (RPS)
        init = np.full(n, 1.0 / n)
        if exploitability(P, init) < 1e-9:
            init = np.linspace(2.0, 1.0, n) / np.linspace(2.0, 1.0, n).sum()
        winner = von_neumann_winner(P)
        print(f"\n== {game_name}: von Neumann winner {np.round(winner, 3).tolist()}; exploitability of the "
              f"last / average iterate")
        traces = {label: self_play(P, method, iterations=args.iterations, init=init, **kwargs)
                  for label, method, kwargs in runs}
        print("iter  " + "  ".join(f"{label + ' last':>15} {'avg':>6}" for label in traces))
        for t in range(args.iterations + 1):
            row = "  ".join(f"{tr.last_exploitability[t]:15.4f} {tr.average_exploitability[t]:6.4f}"
                            for tr in traces.values())
            print(f"{t + 1:4d}  {row}")


if __name__ == "__main__":
    raise SystemExit(main())
