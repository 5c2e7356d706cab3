"""Judges: formulas checked against independent computations on tiny random-init models."""

import math
import textwrap

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from nash_fast import judges
from nash_fast.data import load_tiny_prompts
from nash_fast.tiny import build_tiny_model, build_tiny_tokenizer

PROMPTS = ["What is 19 + 74?", "Spell the word 'rapid' backwards.", "Say something."]
FIRST = ["19 + 74 = 93.", "dipar", "hello there friend, how are you today"]
SECOND = ["It is 83.", "Backwards, 'rapid' is 'dipra'.", ""]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def causal_lm(tokenizer):
    return build_tiny_model(len(tokenizer), seed=3)


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


# ------------------------------------------------------------------ validation and callables


def test_values_outside_unit_interval_or_nan_name_the_prompt():
    for bad in (float("nan"), 1.5, -0.1):
        judge = judges.CallableJudge(lambda p, a, b, bad=bad: [0.5] * (len(p) - 1) + [bad])
        with pytest.raises(ValueError, match="Spell the word 'rapid' backwards"):
            judge(PROMPTS[:2], FIRST[:2], SECOND[:2])


def test_wrong_count_and_mismatched_lengths_are_refused():
    with pytest.raises(ValueError, match="shape"):
        judges.CallableJudge(lambda p, a, b: [0.5])(PROMPTS, FIRST, SECOND)
    with pytest.raises(ValueError, match="one entry per comparison"):
        judges.OfflineJudge()(PROMPTS, FIRST, SECOND[:2])


def test_callable_from_module_string(tmp_path, monkeypatch):
    (tmp_path / "my_judge_mod.py").write_text(textwrap.dedent("""
        def prefer_longer(prompts, first, second):
            return [1.0 if len(a) > len(b) else 0.0 if len(a) < len(b) else 0.5 for a, b in zip(first, second)]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    judge = judges.load_judge("callable:my_judge_mod:prefer_longer")
    np.testing.assert_array_equal(judge(PROMPTS, FIRST, SECOND), [1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="not found"):
        judges.load_judge("callable:my_judge_mod:missing")
    with pytest.raises(ValueError, match="package.module:function"):
        judges.CallableJudge("no_colon_here")


def test_load_judge_rejects_unknown_spec():
    with pytest.raises(ValueError, match="judge='nonsense'"):
        judges.load_judge("nonsense")
    with pytest.raises(ValueError, match="policy"):
        judges.load_judge("self")


# ------------------------------------------------------------------ the shipped offline judge


def test_offline_judge_formula_and_symmetry():
    judge = judges.OfflineJudge()
    prompt = "What is 19 + 74?"
    assert judges._shipped_answers()[prompt] == "93"
    good, bad = "19 + 74 = 93.", "It is 83."  # 5 vs 3 words: (2 - 0) mod 3 = 2 -> the cycle term is -1
    q_good = 2.0 + 1.0  # verbatim + full coverage
    q_bad = 0.5  # covers the '3' of "93"
    assert judge.quality(prompt, good) == pytest.approx(q_good)
    assert judge.quality(prompt, bad) == pytest.approx(q_bad)
    p = judge([prompt], [good], [bad])[0]
    assert p == pytest.approx(sigmoid(3.0 * (q_good - q_bad) - 0.5))
    forward, backward = judge(PROMPTS, FIRST, SECOND), judge(PROMPTS, SECOND, FIRST)
    np.testing.assert_allclose(forward + backward, 1.0)
    np.testing.assert_allclose(judge(PROMPTS, FIRST, FIRST), 0.5)


def test_offline_judge_is_intransitive():
    judge = judges.OfflineJudge()
    prompt = "Say something."  # not shipped: quality from echoing the prompt; equal here
    one, two, three = "zz", "zz zz", "zz zz zz"
    P = judge.preference_matrix(prompt, [one, two, three])
    # word counts 1, 2, 3 (mod 3: 1, 2, 0): two beats one, three beats two, one beats three
    assert P[1, 0] > 0.5 and P[2, 1] > 0.5 and P[0, 2] > 0.5
    np.testing.assert_allclose(P[1, 0], sigmoid(0.5))
    # no Bradley-Terry scores can produce a cycle: s1 > s0, s2 > s1 would force P[2, 0] > 1/2
    assert P[2, 0] < 0.5


def test_offline_judge_covers_the_shipped_prompts():
    answers = judges._shipped_answers()
    rows = load_tiny_prompts()
    assert len(answers) == len({r["prompt"] for r in rows})
    judge = judges.OfflineJudge()
    for row in rows[:20]:
        assert judge([row["prompt"]], [f"The answer: {row['answer']}"], ["I am not sure."])[0] > 0.9


# ------------------------------------------------------------------ pairwise LM / self judge


def independent_first_slot(model, tokenizer, prompt, a, b):
    text = judges.OSP_JUDGE_TEMPLATE.format(prompt=prompt, first=a, second=b)
    text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1].double()
    a_id = tokenizer("A", add_special_tokens=False)["input_ids"][0]
    b_id = tokenizer("B", add_special_tokens=False)["input_ids"][0]
    return sigmoid((logits[a_id] - logits[b_id]).item())


def test_pairwise_lm_judge_matches_independent_order_averaged_formula(causal_lm, tokenizer):
    judge = judges.PairwiseLMJudge(causal_lm, tokenizer, batch_size=2)  # batches of unequal lengths
    got = judge(PROMPTS, FIRST, SECOND)
    for i in range(len(PROMPTS)):
        p_ab = independent_first_slot(causal_lm, tokenizer, PROMPTS[i], FIRST[i], SECOND[i])
        p_ba = independent_first_slot(causal_lm, tokenizer, PROMPTS[i], SECOND[i], FIRST[i])
        assert got[i] == pytest.approx(0.5 * (p_ab + 1.0 - p_ba), abs=1e-5)
    np.testing.assert_allclose(got + judge(PROMPTS, SECOND, FIRST), 1.0, atol=1e-12)
    # the random model is position-biased: one order alone does not satisfy the symmetry
    one_order = (judge.first_slot_probability(PROMPTS, FIRST, SECOND)
                 + judge.first_slot_probability(PROMPTS, SECOND, FIRST))
    assert not torch.allclose(one_order, torch.ones(3, dtype=torch.float64), atol=1e-4)


def test_pairwise_lm_judge_rejects_multi_token_choice(causal_lm, tokenizer):
    with pytest.raises(ValueError, match="choice_a"):
        judges.PairwiseLMJudge(causal_lm, tokenizer, choice_a=" A")


def test_self_judge_loads_the_reference_policy(causal_lm, tokenizer, tmp_path):
    causal_lm.save_pretrained(tmp_path / "policy")
    tokenizer.save_pretrained(tmp_path / "policy")
    judge = judges.load_judge("self", policy=str(tmp_path / "policy"))
    direct = judges.PairwiseLMJudge(causal_lm, tokenizer)
    np.testing.assert_allclose(judge(PROMPTS, FIRST, SECOND), direct(PROMPTS, FIRST, SECOND), atol=1e-6)
    P = judge.preference_matrix(PROMPTS[0], FIRST)
    np.testing.assert_allclose(P + P.T, 1.0, atol=1e-12)


# ------------------------------------------------------------------ Bradley-Terry reward model


@pytest.fixture(scope="module")
def reward_model(tokenizer):
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=0)
    torch.manual_seed(5)
    return LlamaForSequenceClassification(config).eval()


def independent_reward(model, tokenizer, prompt, response):
    conversation = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    text = tokenizer.apply_chat_template(conversation, tokenize=False)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state[0, -1]
        return model.score(hidden)[0].item()


def test_reward_model_judge_is_sigmoid_of_reward_difference(reward_model, tokenizer):
    judge = judges.RewardModelJudge(reward_model, tokenizer, batch_size=4)
    got = judge(PROMPTS, FIRST, SECOND)
    for i in range(len(PROMPTS)):
        r_a = independent_reward(reward_model, tokenizer, PROMPTS[i], FIRST[i])
        r_b = independent_reward(reward_model, tokenizer, PROMPTS[i], SECOND[i])
        assert got[i] == pytest.approx(sigmoid(r_a - r_b), abs=1e-5)
    P = judge.preference_matrix(PROMPTS[0], FIRST + SECOND)
    np.testing.assert_allclose(P + P.T, 1.0, atol=1e-12)
    np.testing.assert_allclose(P[0, 3], judge([PROMPTS[0]], [FIRST[0]], [SECOND[0]])[0], atol=1e-6)
    # Bradley-Terry is transitive: P[i, j] is a function of score differences, so logits add up
    logit = np.log(P / (1 - P))
    np.testing.assert_allclose(logit[0, 2], logit[0, 1] + logit[1, 2], atol=1e-6)
