"""Nash diagnostics: equilibria of tabular games and self-play dynamics driven by the real losses."""

import itertools

import numpy as np
import pytest
import torch

from nash_fast import nash

CYCLIC = (0.1, 0.5, 0.9)


def random_skew_game(n, seed):
    rng = np.random.default_rng(seed)
    upper = rng.uniform(0.05, 0.95, size=(n, n))
    P = np.triu(upper, 1)
    P = P + np.tril(1.0 - P.T, -1)
    np.fill_diagonal(P, 0.5)
    return P


def test_games_are_preference_matrices():
    for make in nash.GAMES.values():
        P = nash.check_preference_matrix(make())
        np.testing.assert_allclose(P + P.T, 1.0)


@pytest.mark.parametrize("bad, match", [
    (np.array([[0.5, 0.7], [0.7, 0.5]]), "P\\[i, j\\] \\+ P\\[j, i\\] = 1"),
    (np.array([[0.5, 1.2], [-0.2, 0.5]]), "\\[0, 1\\]"),
    (np.ones((2, 3)), "square"),
])
def test_bad_preference_matrix_is_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        nash.check_preference_matrix(bad)


def test_exploitability_hand_computed():
    P = nash.rock_paper_scissors(0.8)  # P(paper > rock) = 0.9 etc.
    assert nash.exploitability(P, [1, 0, 0]) == pytest.approx(0.4)  # the counter wins 0.9
    assert nash.exploitability(P, [1 / 3] * 3) == pytest.approx(0.0, abs=1e-12)
    # transitive: the best pure response is the winner; mixing in a worse one is exploitable
    P = nash.transitive_game([0.0, 1.0])
    assert nash.exploitability(P, [0.0, 1.0]) == pytest.approx(0.0, abs=1e-12)
    assert nash.exploitability(P, [0.5, 0.5]) == pytest.approx(0.5 * (0.5 + 1 / (1 + np.exp(-1.0))) - 0.5)


def test_von_neumann_winner_closed_forms():
    np.testing.assert_allclose(nash.von_neumann_winner(nash.rock_paper_scissors()), [1 / 3] * 3, atol=1e-8)
    np.testing.assert_allclose(nash.von_neumann_winner(nash.cyclic_game(*CYCLIC)),
                               nash.cyclic_game_winner(*CYCLIC), atol=1e-8)
    np.testing.assert_allclose(nash.cyclic_game_winner(*CYCLIC), [0.6, 1 / 3, 1 / 15])
    np.testing.assert_allclose(nash.von_neumann_winner(nash.transitive_game([0.0, 3.0, 1.0])), [0, 1, 0], atol=1e-8)


@pytest.mark.parametrize("seed", range(4))
def test_linear_program_and_support_enumeration_agree(seed):
    P = random_skew_game(5, seed)
    by_enumeration = nash._winner_by_support_enumeration(P)
    assert nash.exploitability(P, by_enumeration) <= 1e-9
    assert nash.exploitability(P, nash.von_neumann_winner(P)) <= 1e-7
    # no pure strategy or pair mixture does better: the game value of a symmetric game is 1/2
    for i, j in itertools.combinations(range(5), 2):
        pi = np.zeros(5)
        pi[[i, j]] = 0.5
        assert nash.exploitability(P, pi) >= -1e-12


def test_sppo_step_reproduces_multiplicative_weights():
    P = nash.cyclic_game(*CYCLIC)
    pi_t = np.array([0.5, 0.2, 0.3])
    for eta in (0.1, 1.0):
        got = torch.softmax(nash.sppo_step(P, torch.log(torch.as_tensor(pi_t)), eta=eta), -1).numpy()
        want = nash.multiplicative_weights_step(P, pi_t, eta=eta)
        # SPPO replaces log Z by eta/2 (eq. 4.6 -> 4.7); the gap is second order in eta
        np.testing.assert_allclose(got, want, atol=0.05 * eta ** 2)
        assert np.sign(got - pi_t).tolist() == np.sign(want - pi_t).tolist()


def test_inpo_step_matches_closed_form():
    P = nash.cyclic_game(*CYCLIC)
    pi_t, pi_ref = np.array([0.5, 0.2, 0.3]), np.array([0.2, 0.3, 0.5])
    logits = nash.inpo_step(P, torch.log(torch.as_tensor(pi_t)), torch.log(torch.as_tensor(pi_ref)),
                            eta=1.0, tau=0.3)
    np.testing.assert_allclose(torch.softmax(logits, -1).numpy(),
                               nash.inpo_closed_form_step(P, pi_t, pi_ref, eta=1.0, tau=0.3), atol=1e-6)


@pytest.fixture(scope="module")
def cyclic_traces():
    P = nash.cyclic_game(*CYCLIC)
    return {m: nash.self_play(P, m, iterations=50) for m in ("sppo", "inpo", "dpo")}


def test_sppo_average_iterate_approaches_the_winner(cyclic_traces):
    trace = cyclic_traces["sppo"]
    assert trace.average_exploitability[0] > 0.13  # uniform start is far from (0.6, 1/3, 1/15)
    assert trace.average_exploitability[-1] < 0.02
    assert nash.exploitability(nash.cyclic_game(*CYCLIC), trace.average_policy) == pytest.approx(
        trace.average_exploitability[-1])


def test_inpo_last_iterate_approaches_the_winner(cyclic_traces):
    trace = cyclic_traces["inpo"]
    assert trace.last_exploitability[-1] < 0.01
    assert max(trace.last_exploitability[25:]) < 0.025


def test_iterated_dpo_last_iterate_does_not(cyclic_traces):
    dpo, inpo = cyclic_traces["dpo"], cyclic_traces["inpo"]
    # DPO's Bradley-Terry step overshoots and cycles around the winner instead of settling
    assert max(dpo.last_exploitability[25:]) > 0.1
    assert max(dpo.last_exploitability[25:]) > 4 * max(inpo.last_exploitability[25:])


def test_transitive_game_all_methods_find_the_best_response():
    P = nash.transitive_game([0.0, 1.0, 2.0])
    for method in ("sppo", "inpo", "dpo"):
        trace = nash.self_play(P, method, iterations=15)
        assert trace.last_exploitability[-1] < trace.last_exploitability[0] / 2
        assert int(np.argmax(trace.policies[-1])) == 2


def test_self_play_rejects_bad_arguments():
    P = nash.rock_paper_scissors()
    with pytest.raises(ValueError, match="method"):
        nash.self_play(P, "ppo", iterations=1)
    with pytest.raises(ValueError, match="init"):
        nash.self_play(P, "sppo", iterations=1, init=[1.0, 0.0, 0.0])


# ------------------------------------------------------------------ sampled iterations (the real dataset rules)


@pytest.fixture(scope="module")
def sampled_traces():
    P = nash.cyclic_game(*CYCLIC)
    runs = {"sppo": ("sppo", {}), "inpo": ("inpo", {}), "dpo_tournament": ("dpo", {"pairs": "tournament"})}
    return {name: nash.self_play(P, method, iterations=40, groups=64, K=4, seed=0, **kwargs)
            for name, (method, kwargs) in runs.items()}


def test_sampled_sppo_average_iterate_approaches_the_winner(sampled_traces):
    trace = sampled_traces["sppo"]  # best / worst of K with win rates estimated by nash_fast.build
    assert trace.average_exploitability[0] > 0.13
    assert trace.average_exploitability[-1] < 0.025


def test_sampled_inpo_last_iterate_approaches_the_winner(sampled_traces):
    trace = sampled_traces["inpo"]  # Algorithm 1's pairs: y, y' ~ pi_t, winner drawn from P
    assert trace.last_exploitability[-1] < 0.025
    assert max(trace.last_exploitability[-10:]) < 0.035


def test_sampled_iterated_dpo_on_best_vs_worst_pairs_collapses(sampled_traces):
    # the iterative-DPO recipe (best-vs-worst of K, hard labels, Bradley-Terry loss) drives the policy to
    # a pure response; on a cyclic game every pure response is beaten by its counter
    trace = sampled_traces["dpo_tournament"]
    assert min(trace.last_exploitability[20:]) > 0.2
    assert max(trace.policies[-1]) > 0.99


def test_sampled_runs_are_reproducible():
    P = nash.cyclic_game(*CYCLIC)
    first, second = (nash.self_play(P, "inpo", iterations=3, groups=16, seed=11) for _ in range(2))
    np.testing.assert_array_equal(np.array(first.policies), np.array(second.policies))
    other = nash.self_play(P, "inpo", iterations=3, groups=16, seed=12)
    assert not np.array_equal(np.array(first.policies), np.array(other.policies))
    with pytest.raises(ValueError, match="pairs"):
        nash.self_play(P, "inpo", iterations=1, groups=4, pairs="swiss")
