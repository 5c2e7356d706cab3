"""Preference records -> token ids.

Two record forms (plain dicts, e.g. rows of a jsonl file or a `datasets.Dataset`):

  pair     {"prompt": str, "chosen": str, "rejected": str,
            optional "preference": P(chosen beats rejected) in [0, 1],
            optional "chosen_winrate", "rejected_winrate": P(response beats the current policy) in [0, 1],
            optional "aug_prompt": str}           (the p of Sr-DPO's prompt-augmented query p + x)
  K-group  {"prompt": str, "responses": [str, ...], optional "winrates": [float, ...] (one per response)}
            (SPPO's all-responses form: every sampled response with its estimated win rate)

Tokenized examples (what PackedPreferenceCollator consumes):

  pair     {"prompt_ids", "chosen_ids", "rejected_ids"[, "aug_prompt_ids"], "preference", "chosen_winrate", ...}
  K-group  {"prompt_ids", "responses_ids": [[...], ...][, "responses_winrate": [...]]}

Prompt and responses go through the tokenizer's chat template when it has one (the prompt as a user turn with
the generation prompt appended; the response is the rest of the rendered conversation, so the template's
end-of-turn tokens are scored), raw text otherwise (prompt with the tokenizer's special tokens, e.g. BOS; the
response followed by EOS). The prompt-augmented query is literal token concatenation p + x, as in Sr-DPO's
reference implementation (Appendix: p + x = torch.cat([p, x])): aug_prompt_ids are the aug_prompt's tokens
without special tokens.

Prompt and response are tokenized separately (as TRL's DPO trainer does), so a BPE merge across the
prompt/response boundary never happens; with a chat template the boundary falls right after the generation
prompt, where templates end with a newline or a special token. A template that renders the prompt differently
once an assistant turn follows (so the prompt is not a prefix of the conversation) raises ValueError.

Nothing is truncated: a record whose tokens exceed max_length raises ValueError naming the record.
Other keys of a record (e.g. "task", ids) are copied unchanged into the example.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable

FILES = Path(__file__).resolve().parent / "files"

PAIR_TEXT_FIELDS = ("prompt", "chosen", "rejected")
PROBABILITY_FIELDS = ("preference", "chosen_winrate", "rejected_winrate")


def load_jsonl(path: str | Path) -> list[dict]:
    """Rows of a jsonl file; a malformed line raises ValueError naming the file and line."""
    rows = []
    with open(path) as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {line_number} is not valid JSON ({e})") from None
    return rows


def load_tiny_preferences() -> list[dict]:
    """The shipped synthetic pairwise preference set (320 records; see make_tiny_data.py)."""
    return load_jsonl(FILES / "prefs.jsonl")


def load_tiny_prompts() -> list[dict]:
    """The shipped synthetic self-play prompts ({prompt, answer, task}; see make_tiny_data.py)."""
    return load_jsonl(FILES / "prompts.jsonl")


def _where(index: int | None) -> str:
    return "record" if index is None else f"record {index}"


def _check_text(record: dict, field: str, index: int | None) -> str:
    if field not in record:
        raise ValueError(f"{_where(index)}: missing field {field!r}")
    value = record[field]
    if not isinstance(value, str):
        raise ValueError(f"{_where(index)}: field {field!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{_where(index)}: field {field!r} is empty")
    return value


def _check_probability(value: Any, field: str, index: int | None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{_where(index)}: field {field!r} must be a number in [0, 1], got {value!r}")
    if not (0.0 <= float(value) <= 1.0) or math.isnan(value):
        raise ValueError(f"{_where(index)}: field {field!r} must be in [0, 1], got {value!r}")
    return float(value)


def _has_chat_template(tokenizer) -> bool:
    return getattr(tokenizer, "chat_template", None) is not None


def _encode(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def tokenize_prompt(tokenizer, prompt: str, *, use_chat_template: bool | None = None) -> list[int]:
    """Token ids of the prompt as the model sees it right before the response (chat template + generation prompt)."""
    if use_chat_template is None:
        use_chat_template = _has_chat_template(tokenizer)
    if use_chat_template:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return _encode(tokenizer, text, add_special_tokens=False)
    return _encode(tokenizer, prompt, add_special_tokens=True)


def tokenize_response(
    tokenizer, prompt: str, response: str, *, use_chat_template: bool | None = None, append_eos: bool = True
) -> list[int]:
    """Token ids of the response continuing tokenize_prompt(prompt) (template end-of-turn / EOS included)."""
    if use_chat_template is None:
        use_chat_template = _has_chat_template(tokenizer)
    if use_chat_template:
        user = [{"role": "user", "content": prompt}]
        prompt_text = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template(
            user + [{"role": "assistant", "content": response}], tokenize=False
        )
        if not full_text.startswith(prompt_text):
            raise ValueError(
                "the tokenizer's chat template does not render the prompt (with generation prompt) as a prefix of "
                "the full conversation, so the response cannot be separated; pass use_chat_template=False"
            )
        return _encode(tokenizer, full_text[len(prompt_text):], add_special_tokens=False)
    ids = _encode(tokenizer, response, add_special_tokens=False)
    if append_eos and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


def tokenize_pair(
    tokenizer,
    record: dict,
    *,
    index: int | None = None,
    use_chat_template: bool | None = None,
    append_eos: bool = True,
    max_length: int | None = None,
) -> dict:
    """One pair record -> {"prompt_ids", "chosen_ids", "rejected_ids"[, "aug_prompt_ids"], <probabilities>, <extras>}.

    max_length bounds each full sequence (aug_prompt + prompt + response); longer raises ValueError (no truncation).
    """
    if not isinstance(record, dict):
        raise ValueError(f"{_where(index)}: expected a dict, got {type(record).__name__}")
    prompt, chosen, rejected = (_check_text(record, f, index) for f in PAIR_TEXT_FIELDS)
    example = {k: v for k, v in record.items() if k not in PAIR_TEXT_FIELDS + PROBABILITY_FIELDS + ("aug_prompt",)}
    for field in PROBABILITY_FIELDS:
        if field in record and record[field] is not None:
            example[field] = _check_probability(record[field], field, index)
    example["prompt_ids"] = tokenize_prompt(tokenizer, prompt, use_chat_template=use_chat_template)
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        example[f"{name}_ids"] = tokenize_response(
            tokenizer, prompt, text, use_chat_template=use_chat_template, append_eos=append_eos
        )
    if record.get("aug_prompt") is not None:
        example["aug_prompt_ids"] = _encode(tokenizer, _check_text(record, "aug_prompt", index), False)
    for field in ("prompt_ids", "chosen_ids", "rejected_ids", "aug_prompt_ids"):
        if field in example and not example[field]:
            raise ValueError(f"{_where(index)}: field {field[:-4]!r} tokenizes to no tokens")
    if max_length is not None:
        prefix = len(example.get("aug_prompt_ids", ())) + len(example["prompt_ids"])
        for name in ("chosen", "rejected"):
            length = prefix + len(example[f"{name}_ids"])
            if length > max_length:
                raise ValueError(
                    f"{_where(index)}: prompt + {name} is {length} tokens, longer than max_length={max_length} "
                    "(nothing is truncated; filter or shorten the record)"
                )
    return example


def tokenize_group(
    tokenizer,
    record: dict,
    *,
    index: int | None = None,
    use_chat_template: bool | None = None,
    append_eos: bool = True,
    max_length: int | None = None,
) -> dict:
    """One K-response record -> {"prompt_ids", "responses_ids"[, "responses_winrate"], <extras>}."""
    if not isinstance(record, dict):
        raise ValueError(f"{_where(index)}: expected a dict, got {type(record).__name__}")
    prompt = _check_text(record, "prompt", index)
    if "responses" not in record:
        raise ValueError(f"{_where(index)}: missing field 'responses'")
    responses = record["responses"]
    if not isinstance(responses, (list, tuple)) or not responses:
        raise ValueError(f"{_where(index)}: field 'responses' must be a non-empty list of strings")
    for k, response in enumerate(responses):
        if not isinstance(response, str) or not response.strip():
            raise ValueError(f"{_where(index)}: field 'responses'[{k}] must be a non-empty string, got {response!r}")
    example = {k: v for k, v in record.items() if k not in ("prompt", "responses", "winrates")}
    if record.get("winrates") is not None:
        winrates = record["winrates"]
        if not isinstance(winrates, (list, tuple)) or len(winrates) != len(responses):
            raise ValueError(
                f"{_where(index)}: field 'winrates' must be a list with one number per response ({len(responses)})"
            )
        example["responses_winrate"] = [_check_probability(w, f"winrates[{k}]", index) for k, w in enumerate(winrates)]
    example["prompt_ids"] = tokenize_prompt(tokenizer, prompt, use_chat_template=use_chat_template)
    example["responses_ids"] = [
        tokenize_response(tokenizer, prompt, r, use_chat_template=use_chat_template, append_eos=append_eos)
        for r in responses
    ]
    if not example["prompt_ids"]:
        raise ValueError(f"{_where(index)}: field 'prompt' tokenizes to no tokens")
    for k, ids in enumerate(example["responses_ids"]):
        if not ids:
            raise ValueError(f"{_where(index)}: field 'responses'[{k}] tokenizes to no tokens")
        if max_length is not None and len(example["prompt_ids"]) + len(ids) > max_length:
            raise ValueError(
                f"{_where(index)}: prompt + responses[{k}] is {len(example['prompt_ids']) + len(ids)} tokens, "
                f"longer than max_length={max_length} (nothing is truncated)"
            )
    return example


def tokenize_records(tokenizer, records: Iterable[dict], **kwargs) -> list[dict]:
    """tokenize_pair / tokenize_group over records (the form is chosen per record by a 'responses' key);
    errors name the record's index."""
    examples = []
    for index, record in enumerate(records):
        is_group = isinstance(record, dict) and "responses" in record
        tokenize = tokenize_group if is_group else tokenize_pair
        examples.append(tokenize(tokenizer, record, index=index, **kwargs))
    return examples
