"""Dataset rules of SPPO, INPO and OSP against hand-worked examples."""

import numpy as np
import pytest

from nash_fast import build
from nash_fast.data import tokenize_records
from nash_fast.tiny import build_tiny_tokenizer


class MatrixJudge:
    """Answers from a fixed matrix over responses named 'r0', 'r1', ... (and '' = the blank response,
    whose row is `vs_empty`); counts queries and calls."""

    def __init__(self, P, vs_empty=None):
        self.P, self.vs_empty = np.asarray(P, dtype=float), vs_empty
        self.queries, self.calls = [], 0

    def __call__(self, prompts, first, second):
        self.calls += 1
        out = []
        for a, b in zip(first, second):
            self.queries.append((a, b))
            i = int(a[1:])
            out.append(self.vs_empty[i] if b == "" else self.P[i, int(b[1:])])
        return np.array(out)


def names(K):
    return [f"r{k}" for k in range(K)]


def skew(upper):
    """Preference matrix from {(i, j): P(y_i > y_j)} for i < j."""
    K = max(max(k) for k in upper) + 1
    P = np.full((K, K), 0.5)
    for (i, j), p in upper.items():
        P[i, j], P[j, i] = p, 1 - p
    return P


# ------------------------------------------------------------------ SPPO

P3 = skew({(0, 1): 0.8, (0, 2): 0.3, (1, 2): 0.6})


def test_sppo_win_rates_hand_worked():
    judge = MatrixJudge(P3)
    (judgment,) = build.judge_groups(judge, "sppo", ["x"], [names(3)])
    assert len(judge.queries) == 3 and judge.calls == 1
    selection = build.replay("sppo", judgment)
    # (1/K) sum_k P(y_i > y_k), the diagonal 1/2 included
    np.testing.assert_allclose(selection["winrates"], [(0.5 + 0.8 + 0.3) / 3, (0.2 + 0.5 + 0.6) / 3,
                                                       (0.7 + 0.4 + 0.5) / 3])
    records, stats = build.build_records("sppo", [judgment], sppo_mode="pair")
    # win rates 0.5333, 0.4333, 0.5333: best is the first maximum (r0), worst r1
    assert records == [{"prompt": "x", "chosen": "r0", "rejected": "r1", "chosen_winrate": pytest.approx(1.6 / 3),
                        "rejected_winrate": pytest.approx(1.3 / 3), "preference": pytest.approx(0.8)}]
    assert stats == {"prompts": 1, "records": 1, "skipped": {}}
    # default form: the two responses as a group, each with its own win rate (eq. 4.7)
    records, _ = build.build_records("sppo", [judgment])
    assert records == [{"prompt": "x", "responses": ["r0", "r1"],
                        "winrates": [pytest.approx(1.6 / 3), pytest.approx(1.3 / 3)]}]


def test_sppo_all_responses_form_drops_empty_with_its_win_rate():
    judge = MatrixJudge(P3)
    responses = ["r0", "r1", "r2"]
    (judgment,) = build.judge_groups(judge, "sppo", ["x"], [responses])
    judgment["responses"][1] = "  "  # as if r1 had been an empty generation
    records, stats = build.build_records("sppo", [judgment], sppo_mode="all")
    assert records == [{"prompt": "x", "responses": ["r0", "r2"],
                        "winrates": [pytest.approx(1.6 / 3), pytest.approx(1.6 / 3)]}]
    assert stats["skipped"] == {"empty_response": 1}


def test_sppo_equal_win_rates_and_empty_chosen_are_counted():
    same = build.judge_groups(MatrixJudge(np.full((3, 3), 0.5)), "sppo", ["x"], [names(3)])
    empty = build.judge_groups(MatrixJudge(P3), "sppo", ["y"], [names(3)])
    empty[0]["responses"][0] = ""  # r0, the best, was an empty generation
    for mode in ("best_worst", "pair"):
        records, stats = build.build_records("sppo", same + empty, sppo_mode=mode)
        assert records == [] and stats["skipped"] == {"all_win_rates_equal": 1, "empty_response": 1}


# ------------------------------------------------------------------ INPO tournament


def test_tournament_k8_transitive_finds_best_and_worst_in_11_comparisons():
    scores = np.array([3.0, 7.0, 1.0, 5.0, 0.0, 6.0, 2.0, 4.0])
    P = 1 / (1 + np.exp(-(scores[:, None] - scores[None, :])))
    judge = MatrixJudge(P)
    (judgment,) = build.judge_groups(judge, "inpo", ["x"], [names(8)])
    assert len(judge.queries) == 11 == build.comparisons_needed("inpo", 8)
    assert judge.calls == 4  # first round, two bracket rounds, final
    selection = build.replay("inpo", judgment)
    assert (selection["best"], selection["worst"]) == (1, 4) and selection["keep"]
    records, _ = build.build_records("inpo", [judgment])
    assert records == [{"prompt": "x", "chosen": "r1", "rejected": "r4", "preference": pytest.approx(P[1, 4])}]


def test_tournament_hand_worked_intransitive_k4():
    # round 1: r0 vs r1 -> r1 (0.3 < 1/2), r2 vs r3 -> r2 (0.9); winners r1 vs r2 -> r1 (0.7)
    # losers r0 vs r3 -> r3 loses (P(r0 > r3) = 0.6); final r1 vs r3: P = 0.4 -> best does not beat worst
    P = skew({(0, 1): 0.3, (2, 3): 0.9, (1, 2): 0.7, (0, 3): 0.6, (1, 3): 0.4, (0, 2): 0.5})
    judge = MatrixJudge(P)
    (judgment,) = build.judge_groups(judge, "inpo", ["x"], [names(4)])
    assert [q for q in judge.queries] == [("r0", "r1"), ("r2", "r3"), ("r1", "r2"), ("r0", "r3"), ("r1", "r3")]
    assert build.replay("inpo", judgment) == {"best": 1, "worst": 3, "preference": 0.4, "keep": False}
    records, stats = build.build_records("inpo", [judgment])
    assert records == [] and stats["skipped"] == {"best_does_not_beat_worst": 1}


def test_tournament_ties_go_to_the_first_and_a_tied_final_is_not_kept():
    P = np.full((2, 2), 0.5)
    judge = MatrixJudge(P)
    (judgment,) = build.judge_groups(judge, "inpo", ["x"], [names(2)])
    assert len(judge.queries) == 1  # K = 2: the final is the first-round pair, answered from the record
    assert build.replay("inpo", judgment) == {"best": 0, "worst": 1, "preference": 0.5, "keep": False}


def test_tournament_odd_k_cycle_can_make_best_equal_worst():
    # r0 > r1, r1 > r2, r2 > r0: r2 (unpaired) wins the winners' bracket and loses the losers' one
    P = skew({(0, 1): 0.8, (1, 2): 0.8, (0, 2): 0.2})
    (judgment,) = build.judge_groups(MatrixJudge(P), "inpo", ["x"], [names(3)])
    selection = build.replay("inpo", judgment)
    assert selection["best"] == selection["worst"] == 2 and not selection["keep"]


# ------------------------------------------------------------------ OSP ranked pairing


def test_osp_ranked_pairing_hand_worked():
    vs_empty = [0.4, 0.9, 0.1, 0.7, 0.9]  # ranking: r1, r4 (tie broken by index), r3, r0, r2
    P = skew({(i, j): 0.5 + 0.05 * (j - i) for i in range(5) for j in range(i + 1, 5)})
    judge = MatrixJudge(P, vs_empty)
    (judgment,) = build.judge_groups(judge, "osp", ["x"], [names(5)])
    assert len(judge.queries) == 5 + 2 == build.comparisons_needed("osp", 5) and judge.calls == 2
    assert judge.queries[:5] == [(f"r{i}", "") for i in range(5)]
    records, stats = build.build_records("osp", [judgment])
    assert records == [
        {"prompt": "x", "chosen": "r1", "rejected": "r2", "preference": pytest.approx(0.55)},
        {"prompt": "x", "chosen": "r4", "rejected": "r0", "preference": pytest.approx(1 - 0.7)},  # kept below 1/2
    ]
    assert stats["skipped"] == {}


# ------------------------------------------------------------------ INPO Algorithm-1 pairs


def test_random_pairs_rule_draws_the_winner_from_the_preference():
    P = skew({(0, 1): 0.9, (2, 3): 0.2, (0, 2): 0.5, (0, 3): 0.5, (1, 2): 0.5, (1, 3): 0.5})
    prompts = [f"prompt {n}" for n in range(400)]
    judge = MatrixJudge(P)
    judgments = build.judge_groups(judge, "pairs", prompts, [names(5)] * len(prompts))
    assert len(judge.queries) == 2 * len(prompts) == build.comparisons_needed("pairs", 5) * len(prompts)
    records, stats = build.build_records("pairs", judgments, seed=3)
    assert len(records) == 2 * len(prompts) and stats["skipped"] == {}
    first = [r for r in records if {r["chosen"], r["rejected"]} == {"r0", "r1"}]
    second = [r for r in records if {r["chosen"], r["rejected"]} == {"r2", "r3"}]
    # P(r0 wins) = 0.9, P(r2 wins) = 0.2: binomial frequencies within 4 standard deviations
    assert abs(sum(r["chosen"] == "r0" for r in first) / 400 - 0.9) < 4 * (0.09 / 400) ** 0.5
    assert abs(sum(r["chosen"] == "r2" for r in second) / 400 - 0.2) < 4 * (0.16 / 400) ** 0.5
    assert all(r["preference"] == pytest.approx(P[int(r["chosen"][1]), int(r["rejected"][1])]) for r in records)
    assert build.build_records("pairs", judgments, seed=3) == (records, stats)  # reproducible
    assert build.build_records("pairs", judgments, seed=4)[0] != records


# ------------------------------------------------------------------ bad input and integration


def test_k_below_two_is_refused():
    with pytest.raises(ValueError, match="K must be >= 2.*'lonely'"):
        build.judge_groups(MatrixJudge(P3), "sppo", ["lonely"], [["r0"]])
    with pytest.raises(ValueError, match="method"):
        build.judge_groups(MatrixJudge(P3), "ppo", ["x"], [names(3)])


def test_replay_names_the_prompt_when_a_comparison_is_missing():
    (judgment,) = build.judge_groups(MatrixJudge(P3), "sppo", ["the prompt"], [names(3)])
    judgment["comparisons"] = judgment["comparisons"][:-1]
    with pytest.raises(ValueError, match="'the prompt' lack the comparisons"):
        build.replay("sppo", judgment)


def test_lockstep_batches_all_prompts_per_round():
    scores = np.arange(6.0)
    P = 1 / (1 + np.exp(-(scores[:, None] - scores[None, :])))
    judge = MatrixJudge(P)
    judgments = build.judge_groups(judge, "inpo", ["a", "b", "c"], [names(6), names(6)[::-1], names(6)])
    assert judge.calls == 4  # first round, 2 bracket rounds (3 -> 2 -> 1), final; all prompts together
    assert [build.replay("inpo", j)["best"] for j in judgments] == [5, 0, 5]


def test_records_are_accepted_by_the_tokenizer_pipeline():
    tokenizer = build_tiny_tokenizer()
    P = skew({(0, 1): 0.8, (0, 2): 0.7, (1, 2): 0.6})
    groups = [["Yes.", "No way.", "Maybe so."]]
    for method, mode in [("sppo", "best_worst"), ("sppo", "pair"), ("sppo", "all"), ("inpo", "best_worst"),
                         ("pairs", "best_worst"), ("osp", "best_worst")]:
        judge = lambda prompts, a, b: [P[groups[0].index(x), groups[0].index(y)] if y else 0.5 for x, y in zip(a, b)]
        judgments = build.judge_groups(judge, method, ["Is it?"], groups)
        records, _ = build.build_records(method, judgments, sppo_mode=mode)
        assert records
        examples = tokenize_records(tokenizer, records)
        assert len(examples) == len(records)
