"""Preference oracles: one interface returning P(a > b | prompt) in [0, 1] for batches.

    judge = load_judge("offline")                       # shipped deterministic, intransitive judge
    judge = load_judge("pairwise:PATH")                 # pair-preference LM, "A"/"B" logits, both orders
    judge = load_judge("reward:PATH")                   # Bradley-Terry reward model, sigmoid(r_a - r_b)
    judge = load_judge("self", policy="PATH")           # OSP self-judging with the reference policy
    judge = load_judge("callable:my_module:my_function")
    probs = judge(prompts, responses_a, responses_b)    # float64 numpy [B], P(a_i > b_i | prompt_i)

A prompt is a string or a conversation (a list of {role, content} messages): the reward judge scores the
conversation itself, the LM judges read it as text (nash_fast.data.formats.prompt_text), the offline judge
its last user message. Every judge goes through Judge.__call__, which refuses a value outside [0, 1] or NaN with a ValueError
naming the prompt. P(a > b) + P(b > a) = 1 holds exactly for every judge shipped here (the LM judges
average both presentation orders to cancel position bias), so a K x K preference matrix needs only the
K (K - 1) / 2 comparisons with i < j (Judge.preference_matrix).
"""

from __future__ import annotations

import importlib
import math
from collections import Counter
from functools import lru_cache
from typing import Callable, Sequence

import numpy as np
import torch

from nash_fast.data import load_tiny_prompts
from nash_fast.data.formats import prompt_text
from nash_fast.pretrained import resolve_model

# OSP (Figure 6) asks for a one-sentence comparison and then "A" or "B"; the logit read-out needs the
# choice token right after the prompt, so the instruction ends where the answer letter goes.
OSP_JUDGE_TEMPLATE = (
    "For the following query to a chatbot, which response is more helpful?\n"
    "Query: {prompt}\n"
    "Response A: {first}\n"
    "Response B: {second}\n"
    'State only "A" or "B" to indicate which response is more helpful.\n'
    "More helpful:"
)


def check_judgments(probs, prompts: Sequence[str], judge_name: str = "judge") -> np.ndarray:
    """probs as float64 [B]; ValueError naming the first prompt whose value is NaN or outside [0, 1]."""
    array = np.asarray(probs.detach().cpu() if isinstance(probs, torch.Tensor) else probs, dtype=np.float64)
    if array.shape != (len(prompts),):
        raise ValueError(f"{judge_name} returned shape {array.shape} for {len(prompts)} comparisons")
    bad = np.flatnonzero(~((array >= 0.0) & (array <= 1.0)))  # NaN fails both comparisons
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"{judge_name} returned P(a > b) = {float(array[i])!r} for prompt {prompts[i]!r} (comparison {i}); "
            "a judge must return probabilities in [0, 1]"
        )
    return array


class Judge:
    """Base class: subclasses implement compare(prompts, first, second) -> P(first > second | prompt)."""

    name = "judge"

    def compare(self, prompts: list[str], first: list[str], second: list[str]):
        raise NotImplementedError

    def __call__(self, prompts: Sequence[str], first: Sequence[str], second: Sequence[str]) -> np.ndarray:
        prompts, first, second = list(prompts), list(first), list(second)
        if not (len(prompts) == len(first) == len(second)):
            raise ValueError(
                f"prompts, responses_a and responses_b must have one entry per comparison, got lengths "
                f"{len(prompts)}, {len(first)}, {len(second)}"
            )
        if not prompts:
            return np.zeros(0)
        return check_judgments(self.compare(prompts, first, second), prompts, self.name)

    def preference_matrix(self, prompt: str, responses: Sequence[str]) -> np.ndarray:
        """K x K matrix P[i, j] = P(y_i > y_j | prompt) from the i < j comparisons (diagonal 1/2)."""
        K = len(responses)
        upper = [(i, j) for i in range(K) for j in range(i + 1, K)]
        probs = self([prompt] * len(upper), [responses[i] for i, _ in upper], [responses[j] for _, j in upper])
        P = np.full((K, K), 0.5)
        for (i, j), p in zip(upper, probs):
            P[i, j], P[j, i] = p, 1.0 - p
        return P


# --------------------------------------------------------------------------- (d) a user's callable


class CallableJudge(Judge):
    """A user's function fn(prompts, responses_a, responses_b) -> sequence of P(a > b), given as
    a callable or as "package.module:function"."""

    def __init__(self, fn: Callable | str):
        if isinstance(fn, str):
            module_name, sep, attr = fn.partition(":")
            if not sep or not module_name or not attr:
                raise ValueError(f"judge callable must look like 'package.module:function', got {fn!r}")
            fn = getattr(importlib.import_module(module_name), attr, None)
            if fn is None:
                raise ValueError(f"judge callable {attr!r} not found in module {module_name!r}")
        if not callable(fn):
            raise ValueError(f"judge callable must be callable, got {type(fn).__name__}")
        self.fn = fn
        self.name = f"callable judge {getattr(fn, '__qualname__', fn)!s}"

    def compare(self, prompts, first, second):
        return self.fn(prompts, first, second)


# --------------------------------------------------------------------------- (e) the shipped offline judge


@lru_cache(maxsize=1)
def _shipped_answers() -> dict:
    return {row["prompt"]: row["answer"] for row in load_tiny_prompts()}


class OfflineJudge(Judge):
    """Deterministic rule-based judge for the shipped prompts (nash_fast/data/files/prompts.jsonl), with
    an intransitive component so that the game is not Bradley-Terry:

        P(a > b) = sigmoid(scale (q(a) - q(b)) + cycle * c(a, b))

    quality q(y) = 2 [answer occurs verbatim in y] + coverage(y) - 0.005 max(0, len(y) - 3 len(answer) - 20),
        coverage = fraction of the answer's non-space characters (as a multiset) that y contains;
        prompts outside the shipped set use the prompt itself as the "answer" (echo-relevance).
    cycle term c(a, b) = +1 if (words(a) - words(b)) mod 3 == 1, -1 if == 2, else 0 (words = number of
        whitespace-separated words): a rock-paper-scissors over response styles.
    The argument is antisymmetric in (a, b), so P(a > b) + P(b > a) = 1 and P(a > a) = 1/2.
    """

    name = "offline judge"

    def __init__(self, *, scale: float = 3.0, cycle: float = 0.5, answers: dict | None = None):
        self.scale, self.cycle = float(scale), float(cycle)
        self.answers = _shipped_answers() if answers is None else dict(answers)

    def quality(self, prompt, response: str) -> float:
        if isinstance(prompt, list):  # a conversation: its last user message is the question
            prompt = next((m["content"] for m in reversed(prompt) if m.get("role") == "user"), prompt_text(prompt))
        answer = self.answers.get(prompt, prompt)
        if not answer:
            return 0.0
        verbatim = 2.0 if answer in response else 0.0
        need = Counter(answer.replace(" ", ""))
        have = Counter(response)
        coverage = sum(min(n, have[ch]) for ch, n in need.items()) / max(1, sum(need.values()))
        too_long = max(0, len(response) - 3 * len(answer) - 20)
        return verbatim + coverage - 0.005 * too_long

    @staticmethod
    def style(response: str) -> int:
        return len(response.split()) % 3

    def compare(self, prompts, first, second):
        out = []
        for prompt, a, b in zip(prompts, first, second):
            diff = (self.style(a) - self.style(b)) % 3
            cyc = {0: 0.0, 1: 1.0, 2: -1.0}[diff]
            x = self.scale * (self.quality(prompt, a) - self.quality(prompt, b)) + self.cycle * cyc
            out.append(1.0 / (1.0 + math.exp(-x)))
        return out


# --------------------------------------------------------------------------- model helpers


def _load_causal_lm(path: str, device: str | None, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    return model.to(device) if device else model, tokenizer


def _left_padded(rows: list[list[int]], pad_id: int, device):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, width - len(row):] = torch.tensor(row)
        mask[r, width - len(row):] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), position_ids.to(device)


def _single_token(tokenizer, text: str, argument: str) -> int:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"{argument}={text!r} must be a single token for this tokenizer, got ids {ids}")
    return ids[0]


# --------------------------------------------------------------------------- (a) / (c) pairwise LM judges


class PairwiseLMJudge(Judge):
    """A causal LM asked "which response is better, A or B?"; its next-token logits l_A, l_B give

        p(first in slot A wins) = softmax(l_A, l_B)[0] = sigmoid(l_A - l_B)

    and position bias cancels by averaging both presentation orders (OSP, Appendix: "we create two
    instructions for each pair by interchanging the position of the responses"):

        P(a > b) = (p_A(a, b) + 1 - p_A(b, a)) / 2,  so  P(a > b) + P(b > a) = 1 exactly.

    The judge prompt is `template` filled with {prompt}, {first}, {second}, rendered as a user turn
    through the tokenizer's chat template when it has one (use_chat_template=None: auto).
    """

    name = "pairwise LM judge"

    def __init__(self, model, tokenizer, *, template: str = OSP_JUDGE_TEMPLATE, choice_a: str = "A",
                 choice_b: str = "B", use_chat_template: bool | None = None, batch_size: int = 8):
        for field in ("{prompt}", "{first}", "{second}"):
            if field not in template:
                raise ValueError(f"template must contain the field {field}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.token_a = _single_token(tokenizer, choice_a, "choice_a")
        self.token_b = _single_token(tokenizer, choice_b, "choice_b")
        if use_chat_template is None:
            use_chat_template = getattr(tokenizer, "chat_template", None) is not None
        self.use_chat_template, self.batch_size = use_chat_template, batch_size

    @classmethod
    def from_pretrained(cls, path: str, *, device: str | None = None, dtype=torch.float32, **kwargs):
        model, tokenizer = _load_causal_lm(path, device, dtype)
        return cls(model, tokenizer, **kwargs)

    def judge_prompt_ids(self, prompt, first: str, second: str) -> list[int]:
        text = self.template.format(prompt=prompt_text(prompt), first=first, second=second)
        if self.use_chat_template:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    @torch.no_grad()
    def first_slot_probability(self, prompts, first, second) -> torch.Tensor:
        """p_A: probability that the response shown in slot A wins, one order only (float64 [B])."""
        rows = [self.judge_prompt_ids(p, a, b) for p, a, b in zip(prompts, first, second)]
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        device = next(self.model.parameters()).device
        out = []
        for start in range(0, len(rows), self.batch_size):
            ids, mask, pos = _left_padded(rows[start:start + self.batch_size], pad_id, device)
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1).logits[:, -1]
            two = logits[:, [self.token_a, self.token_b]].double()
            out.append(torch.softmax(two, dim=-1)[:, 0].cpu())
        return torch.cat(out)

    def compare(self, prompts, first, second):
        forward = self.first_slot_probability(prompts, first, second)
        swapped = self.first_slot_probability(prompts, second, first)
        return 0.5 * (forward + (1.0 - swapped))


def self_judge(policy_path: str, *, device: str | None = None, **kwargs) -> PairwiseLMJudge:
    """OSP self-preferring: the reference policy judges its own samples with OSP's instruction (Figure 6),
    reading the "A"/"B" logits and averaging both orders (PairwiseLMJudge)."""
    judge = PairwiseLMJudge.from_pretrained(policy_path, device=device, template=OSP_JUDGE_TEMPLATE, **kwargs)
    judge.name = f"self judge ({policy_path})"
    return judge


# --------------------------------------------------------------------------- (b) Bradley-Terry reward model


class RewardModelJudge(Judge):
    """A Bradley-Terry reward model (AutoModelForSequenceClassification, one label): r(x, y) read at the
    last token of the prompt + response, and P(a > b) = sigmoid(r(x, a) - r(x, b)).

    preference_matrix scores each of the K responses once (K forward passes instead of K^2)."""

    name = "reward model judge"

    def __init__(self, model, tokenizer, *, use_chat_template: bool | None = None, batch_size: int = 8):
        if getattr(model.config, "num_labels", 1) != 1:
            raise ValueError(f"a reward model must have num_labels=1, got {model.config.num_labels}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        if use_chat_template is None:
            use_chat_template = getattr(tokenizer, "chat_template", None) is not None
        self.use_chat_template = use_chat_template

    @classmethod
    def from_pretrained(cls, path: str, *, device: str | None = None, dtype=torch.float32, **kwargs):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype).eval()
        return cls(model.to(device) if device else model, tokenizer, **kwargs)

    def conversation_ids(self, prompt, response: str) -> list[int]:
        """The reward model's input: the conversation (a string prompt is one user turn) and the response as the
        assistant's turn, through its chat template; without one, prompt text and response joined by a blank line."""
        if self.use_chat_template:
            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            text = self.tokenizer.apply_chat_template(
                messages + [{"role": "assistant", "content": response}], tokenize=False
            )
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return list(self.tokenizer(prompt_text(prompt) + "\n\n" + response, add_special_tokens=True)["input_ids"])

    @torch.no_grad()
    def rewards(self, prompts, responses) -> torch.Tensor:
        """r(x, y) for each (prompt, response) (float64 [B]); each row is read at its own last token."""
        rows = [self.conversation_ids(p, r) for p, r in zip(prompts, responses)]
        device = next(self.model.parameters()).device
        pad_id = self.model.config.get_text_config().pad_token_id
        # without a pad token the head cannot find each row's last token in a padded batch
        batch_size = self.batch_size if pad_id is not None else 1
        out = []
        for start in range(0, len(rows), batch_size):
            # left padding puts every row's last token in the last column, which is where the
            # sequence-classification head reads (its rightmost token that is not padding)
            ids, mask, pos = _left_padded(rows[start:start + batch_size], pad_id or 0, device)
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
            out.append(logits[:, 0].double().cpu())
        return torch.cat(out)

    def compare(self, prompts, first, second):
        r = self.rewards(prompts + prompts, first + second)
        return torch.sigmoid(r[: len(prompts)] - r[len(prompts):])

    def preference_matrix(self, prompt, responses):
        r = self.rewards([prompt] * len(responses), list(responses)).numpy()
        P = 1.0 / (1.0 + np.exp(-(r[:, None] - r[None, :])))
        return check_judgments(P.reshape(-1), [prompt] * P.size, self.name).reshape(P.shape)


# --------------------------------------------------------------------------- factory


def load_judge(spec: str | Callable, *, policy: str | None = None, device: str | None = None,
               batch_size: int = 8) -> Judge:
    """Build a judge from a spec:
    "offline" | "self" (needs policy=path of the reference policy) | "pairwise:PATH" | "reward:PATH" |
    "callable:package.module:function" | a Python callable | a Judge instance."""
    if isinstance(spec, Judge):
        return spec
    if callable(spec):
        return CallableJudge(spec)
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"judge must be a non-empty string, a callable or a Judge, got {spec!r}")
    kind, _, rest = spec.partition(":")
    if spec == "offline":
        return OfflineJudge()
    if spec == "self":
        if policy is None:
            raise ValueError("judge='self' needs the reference policy's path (policy=...)")
        return self_judge(resolve_model(policy), device=device, batch_size=batch_size)
    if kind == "pairwise" and rest:  # a GGUF model is read from its converted directory (nash_fast.pretrained)
        judge = PairwiseLMJudge.from_pretrained(resolve_model(rest, option="--judge pairwise:"), device=device,
                                                batch_size=batch_size)
        judge.name = f"pairwise LM judge ({rest})"
        return judge
    if kind == "reward" and rest:
        judge = RewardModelJudge.from_pretrained(rest, device=device, batch_size=batch_size)
        judge.name = f"reward model judge ({rest})"
        return judge
    if kind == "callable" and rest:
        return CallableJudge(rest)
    raise ValueError(
        f"judge={spec!r} is not one of 'offline', 'self', 'pairwise:PATH', 'reward:PATH', "
        "'callable:package.module:function'"
    )
