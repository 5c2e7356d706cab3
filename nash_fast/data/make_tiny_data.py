"""Regenerate the tiny offline data shipped in nash_fast/data/files/ (run: python -m nash_fast.data.make_tiny_data).

Everything here is synthetic and deterministic (seeded), so tests and examples never download anything:

- prefs.jsonl: pairwise preference records {prompt, chosen, rejected, task, preference, chosen_winrate,
  rejected_winrate} over tasks whose better answer is well defined (arithmetic, reversing a word, sorting a
  list of words, counting letters). `chosen` is the correct answer and `rejected` a plausible wrong one.
  `preference` = P(chosen beats rejected) (a noisy judge, 0.6-0.95) and the per-response win rates
  P(y beats the current policy) feed the soft-label losses (SPPO, SPCE); hard-label losses ignore them.
- prompts.jsonl: {prompt, answer, task} for self-play, 168 distinct prompts (the first draw of each among 200);
  `answer` lets a rule-based judge score generations.
- tiny_tokenizer/: a byte-level BPE tokenizer (vocabulary 512) trained with Hugging Face `tokenizers` on the
  text above (all 200 prompt draws), with <s>, </s>, <pad> and a minimal chat template.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

FILES = Path(__file__).resolve().parent / "files"

WORDS = (
    "apple banana cherry grape lemon mango melon olive peach pear plum berry river stone cloud storm "
    "tiger zebra otter eagle robin whale shark horse mouse snake table chair spoon knife plate glass "
    "green black white amber coral ivory azure bright quiet rapid gentle simple"
).split()

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _arithmetic(rng: random.Random):
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    op = rng.choice("+-*")
    answer = {"+": a + b, "-": a - b, "*": a * b}[op]
    prompt = f"What is {a} {op} {b}?"
    wrong = answer + rng.choice([-10, -2, -1, 1, 2, 10])
    verbose = rng.random() < 0.3
    good = f"{a} {op} {b} = {answer}." + (" I computed it digit by digit and checked the carry." if verbose else "")
    return prompt, str(answer), good, f"{a} {op} {b} = {wrong}."


def _reverse(rng: random.Random):
    word = rng.choice(WORDS)
    answer = word[::-1]
    chars = list(answer)
    i = rng.randrange(len(chars) - 1)
    chars[i], chars[i + 1] = chars[i + 1], chars[i]
    wrong = "".join(chars) if "".join(chars) != answer else answer + "x"
    return f"Spell the word '{word}' backwards.", answer, f"Backwards, '{word}' is '{answer}'.", f"Backwards, '{word}' is '{wrong}'."


def _sort(rng: random.Random):
    n = rng.choice([3, 4, 5, 8, 12, 20])  # long lists give long prompts and long responses
    words = rng.sample(WORDS, n)
    answer = " ".join(sorted(words))
    wrong_list = sorted(words)
    i = rng.randrange(n - 1)
    wrong_list[i], wrong_list[i + 1] = wrong_list[i + 1], wrong_list[i]
    prompt = "Sort these words alphabetically: " + ", ".join(words) + "."
    return prompt, answer, "Sorted: " + answer + ".", "Sorted: " + " ".join(wrong_list) + "."


def _count(rng: random.Random):
    word = rng.choice(WORDS)
    letter = rng.choice(sorted(set(word)))
    answer = word.count(letter)
    return (
        f"How many times does the letter '{letter}' appear in '{word}'?",
        str(answer),
        f"The letter '{letter}' appears {answer} time{'s' if answer != 1 else ''} in '{word}'.",
        f"The letter '{letter}' appears {answer + 1} times in '{word}'.",
    )


TASKS = {"arithmetic": _arithmetic, "reverse": _reverse, "sort": _sort, "count": _count}


def make_preferences(n: int = 320, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    records = []
    names = sorted(TASKS)
    for i in range(n):
        task = names[i % len(names)]
        prompt, _, chosen, rejected = TASKS[task](rng)
        record = {"prompt": prompt, "chosen": chosen, "rejected": rejected, "task": task}
        # A noisy judge: the correct answer wins with probability 0.6-0.95.
        record["preference"] = round(rng.uniform(0.6, 0.95), 3)
        record["chosen_winrate"] = round(rng.uniform(0.5, 0.9), 3)
        record["rejected_winrate"] = round(rng.uniform(0.1, 0.5), 3)
        records.append(record)
    return records


def draw_prompts(n: int = 200, seed: int = 1) -> list[dict]:
    """n random prompts; the tasks' small ranges draw some prompts more than once."""
    rng = random.Random(seed)
    names = sorted(TASKS)
    prompts = []
    for i in range(n):
        task = names[i % len(names)]
        prompt, answer, _, _ = TASKS[task](rng)
        prompts.append({"prompt": prompt, "answer": answer, "task": task})
    return prompts


def make_prompts(n: int = 200, seed: int = 1) -> list[dict]:
    """The distinct prompts of draw_prompts(n, seed), each at its first draw (168 of the default 200): self-play
    refuses a prompt file that repeats a prompt (it would weigh twice in training and in the win rates)."""
    seen, prompts = set(), []
    for row in draw_prompts(n, seed):
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            prompts.append(row)
    return prompts


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def train_tokenizer(texts: list[str], out_dir: Path, vocab_size: int = 512) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "model_max_length": 4096,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def main() -> None:
    FILES.mkdir(parents=True, exist_ok=True)
    prefs, prompts = make_preferences(), make_prompts()
    _write_jsonl(FILES / "prefs.jsonl", prefs)
    _write_jsonl(FILES / "prompts.jsonl", prompts)
    # The tokenizer was trained on all 200 drawn prompts, repeats included; it stays the same.
    texts = [r[k] for r in prefs for k in ("prompt", "chosen", "rejected")] + [p["prompt"] for p in draw_prompts()]
    train_tokenizer(texts, FILES / "tiny_tokenizer")
    print(f"wrote {len(prefs)} preference records, {len(prompts)} prompts and the tokenizer to {FILES}")


if __name__ == "__main__":
    main()
