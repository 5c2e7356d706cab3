"""Per-method dataset rules: which comparisons to ask the judge, and which training records to keep.

Each method is a *plan*: a generator over the K sampled responses of one prompt that yields lists of
index pairs (i, j) to compare (j = EMPTY is OSP's blank baseline response) and receives P(y_i > y_j)
for each, then returns its selection. judge_groups() runs the plans of all prompts in lockstep, so
every round is one batched judge call, and it records every comparison; build_records() replays the
same plan from the recorded comparisons, so the dataset is a pure function of the judgments.

    sppo  (SPPO Algorithm 1 and Sec. 5): all K (K - 1) / 2 pairs -> the K x K matrix P;
          win rate  P(y_i > pi_t) ~ (1/K) sum_k P(y_i > y_k)  (P(y_i > y_i) = 1/2 included);
          chosen / rejected = highest / lowest win rate (first index on ties), written as
          sppo_mode="best_worst": {prompt, responses: [chosen, rejected], winrates: [theirs]}, so the
              trainer applies eq. 4.7 to each with its own estimated P(y > pi_t) (Algorithm 1, line 6);
          sppo_mode="pair": {prompt, chosen, rejected, chosen_winrate, rejected_winrate,
              preference = P(chosen > rejected)} (the pairwise loss, eq. 4.8, reads `preference`);
          sppo_mode="all": every response with its win rate ({prompt, responses, winrates}).
    inpo  (INPO Sec. 4, after Dong et al. 2024): a tournament with O(K) comparisons: pair up
          (0, 1), (2, 3), ...; winners play winners and losers play losers until one best y_w and one
          worst y_l remain (an unpaired response plays in both brackets); a tie (P = 1/2) goes to the
          first; keep (y_w, y_l) only if P(y_w > y_l) > 1/2. K = 8 takes 4 + 3 + 3 + 1 = 11 comparisons.
    pairs (INPO Algorithm 1 as analysed, eq. 8): consecutive pairs (0, 1), (2, 3), ... of the K samples
          (independent draws from pi_t), one comparison each, the winner drawn from Bernoulli(P) with a
          seed per (prompt, pair): an unbiased sample of INPO's population loss, which best-vs-worst
          selection is not (see nash_fast.nash). K // 2 comparisons and pairs (an odd last one unused).
    osp   (OSP Sec. 3.2, ranked pairing): rank by P(y > empty response) (ties by index), pair the
          highest with the lowest, the second highest with the second lowest, ...: K // 2 pairs, each
          with the soft target preference P(y_h > y_l) (used as is, even when below 1/2).

Empty generations (documented rule): a response that is empty or only whitespace stays in the
comparison set (it is a real sample of pi_t, and dropping it would bias every win rate), and is judged
as the empty string; but a training record never contains it (there is nothing to score and the
tokenizer pipeline refuses empty fields): a pair with an empty member is skipped, and in the
all-responses form the empty responses are removed together with their win rates. Every skipped
record is counted by reason in the build statistics (nothing is dropped silently).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import Callable, Generator, Sequence

import numpy as np

from nash_fast.data.formats import prompt_key

EMPTY = -1  # index of the blank baseline response in OSP's ranked pairing
METHODS = ("sppo", "inpo", "pairs", "osp")
SPPO_MODES = ("best_worst", "pair", "all")

Plan = Generator[list, list, dict]


def _check_k(K: int, where: str = "") -> None:
    if K < 2:
        raise ValueError(f"K must be >= 2 responses per prompt{where}, got K={K}")


def is_empty(response: str) -> bool:
    return not response.strip()


# --------------------------------------------------------------------------- plans


def sppo_plan(K: int) -> Plan:
    """All i < j comparisons; returns {"matrix": P (K x K), "winrates": P.mean(axis=1)} (SPPO eq. 4.5)."""
    _check_k(K)
    pairs = [(i, j) for i in range(K) for j in range(i + 1, K)]
    probs = yield pairs
    P = np.full((K, K), 0.5)
    for (i, j), p in zip(pairs, probs):
        P[i, j], P[j, i] = p, 1.0 - p
    return {"matrix": P, "winrates": P.mean(axis=1)}


def _knockout(entrants: list[int]):
    """One bracket round: pair consecutive entrants; the unpaired last one (if any) advances."""
    pairs = [(entrants[k], entrants[k + 1]) for k in range(0, len(entrants) - 1, 2)]
    return pairs, entrants[len(pairs) * 2:]


def inpo_plan(K: int) -> Plan:
    """Best-vs-worst tournament; returns {"best", "worst", "preference": P(best > worst), "keep"}."""
    _check_k(K)
    first_round = [(k, k + 1) for k in range(0, K - 1, 2)]
    probs = yield first_round
    winners = [i if p >= 0.5 else j for (i, j), p in zip(first_round, probs)]
    losers = [j if p >= 0.5 else i for (i, j), p in zip(first_round, probs)]
    if K % 2:  # the unpaired response could be the best or the worst: it plays in both brackets
        winners.append(K - 1)
        losers.append(K - 1)
    while len(winners) > 1 or len(losers) > 1:
        win_pairs, win_bye = _knockout(winners)
        lose_pairs, lose_bye = _knockout(losers)
        probs = yield win_pairs + lose_pairs
        win_probs, lose_probs = probs[: len(win_pairs)], probs[len(win_pairs):]
        winners = [i if p >= 0.5 else j for (i, j), p in zip(win_pairs, win_probs)] + win_bye
        losers = [j if p >= 0.5 else i for (i, j), p in zip(lose_pairs, lose_probs)] + lose_bye
    best, worst = winners[0], losers[0]
    if best == worst:  # possible with an odd K under intransitive preferences
        return {"best": best, "worst": worst, "preference": 0.5, "keep": False}
    (p,) = yield [(best, worst)]
    return {"best": best, "worst": worst, "preference": float(p), "keep": bool(p > 0.5)}


def osp_plan(K: int) -> Plan:
    """Ranked pairing; returns {"vs_empty": [K], "pairs": [(high, low, P(high > low)), ...]} (K // 2 pairs)."""
    _check_k(K)
    vs_empty = yield [(i, EMPTY) for i in range(K)]
    order = sorted(range(K), key=lambda i: (-vs_empty[i], i))
    pairs = [(order[r], order[K - 1 - r]) for r in range(K // 2)]
    probs = yield pairs
    return {"vs_empty": [float(v) for v in vs_empty],
            "pairs": [(h, l, float(p)) for (h, l), p in zip(pairs, probs)]}


def pairs_plan(K: int) -> Plan:
    """Consecutive pairs; returns {"pairs": [(i, j, P(y_i > y_j)), ...]} (K // 2 pairs)."""
    _check_k(K)
    pairs = [(k, k + 1) for k in range(0, K - 1, 2)]
    probs = yield pairs
    return {"pairs": [(i, j, float(p)) for (i, j), p in zip(pairs, probs)]}


def bernoulli_draw(seed: int, prompt, pair_index: int) -> float:
    """A uniform [0, 1) number fixed by (seed, prompt, pair index): the records are reproducible. A prompt is
    a string or a conversation (hashed through its canonical JSON)."""
    digest = np.frombuffer(hashlib.sha256(prompt_key(prompt).encode("utf-8")).digest(), dtype=np.uint32)
    return float(np.random.default_rng([seed, pair_index, *digest.tolist()]).random())


PLANS: dict[str, Callable[[int], Plan]] = {"sppo": sppo_plan, "inpo": inpo_plan, "pairs": pairs_plan,
                                            "osp": osp_plan}


def comparisons_needed(method: str, K: int) -> int:
    """Judge queries of a plan at most: sppo K(K-1)/2; inpo K//2 + 2(ceil(K/2) - 1) + 1; osp K + K//2."""
    if method == "sppo":
        return K * (K - 1) // 2
    if method == "osp":
        return K + K // 2
    if method == "pairs":
        return K // 2
    m = (K + 1) // 2
    return K // 2 + 2 * (m - 1) + 1


# --------------------------------------------------------------------------- running plans


def _key(i: int, j: int):
    return (i, j) if (j == EMPTY or (i != EMPTY and i < j)) else (j, i)


def _lookup(known: dict, i: int, j: int) -> float | None:
    if i == j:
        return 0.5
    key = _key(i, j)
    if key not in known:
        return None
    return known[key] if key == (i, j) else 1.0 - known[key]


def _plan_for(method: str):
    if method not in PLANS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return PLANS[method]


def judge_groups(judge, method: str, prompts: Sequence[str], groups: Sequence[Sequence[str]]) -> list[dict]:
    """Run `method`'s plan for every prompt against `judge` (callable(prompts, a, b) -> P(a > b)).

    Returns one judgment per prompt: {"prompt", "responses", "comparisons": [[i, j, P(y_i > y_j)], ...]}
    with i < j (or j = EMPTY = -1), each pair queried at most once (repeats are answered from the record)."""
    plan = _plan_for(method)
    if len(prompts) != len(groups):
        raise ValueError(f"prompts and groups must have the same length, got {len(prompts)} and {len(groups)}")
    for p, group in enumerate(groups):
        _check_k(len(group), f" (prompt {prompts[p]!r})")
    known = [dict() for _ in groups]
    gens, pending = {}, {}
    for p, group in enumerate(groups):
        gens[p] = plan(len(group))
        pending[p] = next(gens[p])
    while pending:
        queries = []
        for p, pairs in pending.items():
            for i, j in pairs:
                if _lookup(known[p], i, j) is None and (p, _key(i, j)) not in queries:
                    queries.append((p, _key(i, j)))
        if queries:
            probs = judge([prompts[p] for p, _ in queries],
                          [groups[p][i] for p, (i, _) in queries],
                          ["" if j == EMPTY else groups[p][j] for p, (_, j) in queries])
            for (p, key), prob in zip(queries, probs):
                known[p][key] = float(prob)
        for p in list(pending):
            try:
                pending[p] = gens[p].send([_lookup(known[p], i, j) for i, j in pending[p]])
            except StopIteration:
                del pending[p]
    return [{"prompt": prompts[p], "responses": list(groups[p]),
             "comparisons": [[i, j, prob] for (i, j), prob in sorted(known[p].items())]}
            for p in range(len(groups))]


def replay(method: str, judgment: dict) -> dict:
    """The plan's selection for one judged prompt, answering its queries from the recorded comparisons."""
    plan = _plan_for(method)
    responses = judgment["responses"]
    _check_k(len(responses), f" (prompt {judgment['prompt']!r})")
    known = {}
    for i, j, prob in judgment["comparisons"]:
        known[_key(int(i), int(j))] = float(prob)
    gen = plan(len(responses))
    pairs = next(gen)
    while True:
        answers = [_lookup(known, i, j) for i, j in pairs]
        if any(a is None for a in answers):
            missing = [pair for pair, a in zip(pairs, answers) if a is None]
            raise ValueError(f"judgments for prompt {judgment['prompt']!r} lack the comparisons {missing} "
                             f"that method {method!r} needs")
        try:
            pairs = gen.send(answers)
        except StopIteration as stop:
            return stop.value


# --------------------------------------------------------------------------- records


def build_records(method: str, judgments: Sequence[dict], *, sppo_mode: str = "best_worst", seed: int = 0):
    """Training records (nash_fast.data's pair or K-group form) and statistics, from judgments
    (`seed` fixes the "pairs" rule's Bernoulli draws).

    Returns (records, stats) with stats = {"prompts", "records", "skipped": {reason: count}}. A conversational
    prompt (a list of messages) gets its responses as assistant messages, TRL's conversational format."""
    records, stats = _build_records(method, judgments, sppo_mode=sppo_mode, seed=seed)
    return [_conversational(r) if isinstance(r["prompt"], list) else r for r in records], stats


def _conversational(record: dict) -> dict:
    turn = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    out = dict(record)
    for field in ("chosen", "rejected"):
        if field in out:
            out[field] = turn(out[field])
    if "responses" in out:
        out["responses"] = [turn(r) for r in out["responses"]]
    return out


def _build_records(method: str, judgments: Sequence[dict], *, sppo_mode: str, seed: int):
    if sppo_mode not in SPPO_MODES:
        raise ValueError(f"sppo_mode must be one of {SPPO_MODES}, got {sppo_mode!r}")
    records, skipped = [], Counter()

    def pair(prompt, chosen, rejected, **fields):
        if is_empty(chosen) or is_empty(rejected):
            skipped["empty_response"] += 1
            return
        records.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, **fields})

    for judgment in judgments:
        prompt, responses = judgment["prompt"], judgment["responses"]
        selection = replay(method, judgment)
        if method == "sppo":
            winrates = selection["winrates"]
            if sppo_mode == "all":
                kept = [k for k, r in enumerate(responses) if not is_empty(r)]
                skipped["empty_response"] += len(responses) - len(kept)
                if kept:
                    records.append({"prompt": prompt, "responses": [responses[k] for k in kept],
                                    "winrates": [float(winrates[k]) for k in kept]})
                continue
            best, worst = int(np.argmax(winrates)), int(np.argmin(winrates))
            if best == worst:
                skipped["all_win_rates_equal"] += 1
                continue
            if sppo_mode == "best_worst":
                if is_empty(responses[best]) or is_empty(responses[worst]):
                    skipped["empty_response"] += 1
                    continue
                records.append({"prompt": prompt, "responses": [responses[best], responses[worst]],
                                "winrates": [float(winrates[best]), float(winrates[worst])]})
                continue
            pair(prompt, responses[best], responses[worst], chosen_winrate=float(winrates[best]),
                 rejected_winrate=float(winrates[worst]), preference=float(selection["matrix"][best, worst]))
        elif method == "inpo":
            if not selection["keep"]:
                skipped["best_does_not_beat_worst"] += 1
                continue
            pair(prompt, responses[selection["best"]], responses[selection["worst"]],
                 preference=selection["preference"])
        elif method == "pairs":
            for k, (i, j, prob) in enumerate(selection["pairs"]):
                if bernoulli_draw(seed, prompt, k) < prob:
                    pair(prompt, responses[i], responses[j], preference=prob)
                else:
                    pair(prompt, responses[j], responses[i], preference=1.0 - prob)
        else:
            for high, low, prob in selection["pairs"]:
                pair(prompt, responses[high], responses[low], preference=prob)
    return records, {"prompts": len(judgments), "records": len(records), "skipped": dict(skipped)}
