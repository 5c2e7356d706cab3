"""Preference records -> token ids.

Records are the rows nash_fast.data.formats accepts (TRL's standard and conversational preference formats,
explicit or implicit prompt, and SPPO's K-response groups); each is first brought to its explicit form:

  pair     {"prompt", "chosen", "rejected",
            optional "preference": P(chosen beats rejected) in [0, 1],
            optional "chosen_winrate", "rejected_winrate": P(response beats the current policy) in [0, 1],
            optional "aug_prompt": str}           (the p of Sr-DPO's prompt-augmented query p + x)
  K-group  {"prompt", "responses": [...], optional "winrates": [float, ...] (one per response)}
            (SPPO's all-responses form: every sampled response with its estimated win rate)

where a prompt / response is a string (standard) or a list of {role, content} messages (conversational).

Tokenized examples (what PackedPreferenceCollator consumes):

  pair     {"prompt_ids", "chosen_ids", "rejected_ids"[, "aug_prompt_ids"], "preference", "chosen_winrate", ...}
  K-group  {"prompt_ids", "responses_ids": [[...], ...][, "responses_winrate": [...]]}

Chat template. Conversational records always go through the tokenizer's chat template (a tokenizer without
one is a ValueError naming --chat-template); standard records do when the tokenizer has one (use_chat_template
None) or when asked (True), their prompt becoming a user turn and their response the assistant's turn, and
are raw text otherwise (the prompt with the tokenizer's special tokens, e.g. BOS; the response followed by
EOS unless it ends with it, as TRL adds it). The prompt is the conversation rendered with the generation prompt (add_generation_prompt=True); the
response is the rest of the rendered conversation prompt + response up to and including the end-of-turn token
(the tokenizer's EOS: ChatML's <|im_end|>), which is scored; whitespace a template puts after it between turns
(ChatML's newline) is not, since generation stops at the end-of-turn token. The prompt/response token boundary is therefore exactly where the generation prompt ends. A
template that renders the prompt differently once a response follows (so the prompt is not a prefix of the
conversation) raises ValueError naming the record. apply_chat_template_option() reads --chat-template.

The prompt-augmented query is literal token concatenation p + x, as in Sr-DPO's reference implementation
(Appendix: p + x = torch.cat([p, x])): aug_prompt_ids are the aug_prompt's tokens without special tokens.

Prompt and response are tokenized separately (as TRL's DPO trainer did), so a BPE merge across the
prompt/response boundary never happens; with a chat template the boundary falls right after the generation
prompt, where templates end with a newline or a special token.

Nothing is truncated: a record whose tokens exceed max_length raises ValueError naming the record.
Other keys of a record (e.g. "task", ids) are copied unchanged into the example.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable

from nash_fast.data.formats import PROBABILITY_FIELDS, normalize_record

FILES = Path(__file__).resolve().parent / "files"
PAIR_TEXT_FIELDS = ("prompt", "chosen", "rejected")


def read_utf8(path: str | Path) -> str:
    """The text of a file; bytes that are not UTF-8 raise ValueError naming the file, line and byte."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        column = error.start - (raw.rfind(b"\n", 0, error.start) + 1) + 1
        raise ValueError(f"{path}: line {line} is not UTF-8 (byte 0x{raw[error.start]:02x} at column {column})") from None


def load_jsonl(path: str | Path) -> list[dict]:
    """Rows of a jsonl file; a malformed line (not JSON, or not UTF-8) raises ValueError naming the file and line."""
    rows = []
    for line_number, line in enumerate(read_utf8(path).split("\n"), 1):  # not splitlines(): JSON strings may hold U+2028
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


def apply_chat_template_option(tokenizer, option: str | None) -> bool | None:
    """--chat-template -> use_chat_template for the functions below, installing a given template.

    "auto" (or None): the tokenizer's template when it has one; "on": required; "off": raw text (standard records
    only); anything else is a template to install on the tokenizer (so it is saved with the trained model): a
    Jinja file, a tokenizer directory (its chat template), or the Jinja text itself."""
    if option in (None, "auto"):
        return None
    if option == "off":
        return False
    if option == "on":
        if not _has_chat_template(tokenizer):
            raise ValueError("--chat-template on: the tokenizer has no chat template; give one with "
                             "--chat-template FILE.jinja (or a tokenizer directory, or the template text)")
        return True
    tokenizer.chat_template = load_chat_template(option)
    return True


def load_chat_template(option: str) -> str:
    """The Jinja text of --chat-template: a file's contents, a tokenizer directory's chat template, or the
    option itself when it is Jinja text."""
    from pathlib import Path

    path = Path(option)
    if path.is_file():
        return path.read_text()
    if path.is_dir():
        from transformers import AutoTokenizer

        template = getattr(AutoTokenizer.from_pretrained(str(path)), "chat_template", None)
        if not template:
            raise ValueError(f"--chat-template {option}: the tokenizer in that directory has no chat template")
        return template
    if "{{" in option or "{%" in option:
        return option
    raise ValueError(f"--chat-template {option!r}: not auto, on, off, a Jinja file, a tokenizer directory or "
                     "Jinja template text")


def _messages(text, role: str) -> list[dict]:
    return text if isinstance(text, list) else [{"role": role, "content": text}]


def _render(tokenizer, messages: list[dict], index: int | None, **kwargs) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    except Exception as error:  # jinja2 TemplateError (e.g. a template refusing a system message) and kin
        raise ValueError(f"{_where(index)}: the chat template fails on this conversation "
                         f"({type(error).__name__}: {error}); see --chat-template") from None


def _use_template(tokenizer, use_chat_template: bool | None, conversational: bool, index: int | None) -> bool:
    if use_chat_template is None:
        use_chat_template = _has_chat_template(tokenizer)
    if use_chat_template and not _has_chat_template(tokenizer):
        raise ValueError(f"{_where(index)}: use_chat_template=True but the tokenizer has no chat template; give one "
                         "with --chat-template FILE.jinja (API: tokenizer.chat_template = ...)")
    if conversational and not use_chat_template:
        if _has_chat_template(tokenizer):
            raise ValueError(f"{_where(index)}: a conversational record (message lists) is rendered with the chat "
                             "template, which --chat-template off (use_chat_template=False) turns off")
        raise ValueError(f"{_where(index)}: a conversational record (message lists) needs a chat template and the "
                         "tokenizer has none; give one with --chat-template FILE.jinja (or a tokenizer directory, or "
                         "the template text; API: tokenizer.chat_template = ...)")
    return use_chat_template


def _tokenize_prompt_and_responses(tokenizer, prompt, responses: list, *, index: int | None,
                                   use_chat_template: bool | None, append_eos: bool) -> tuple[list[int], list[list[int]]]:
    """(prompt_ids, [response_ids, ...]): the prompt as the model sees it right before a response, and each
    response continuing it (see the module docstring)."""
    conversational = isinstance(prompt, list) or any(isinstance(r, list) for r in responses)
    if not _use_template(tokenizer, use_chat_template, conversational, index):
        prompt_ids = _encode(tokenizer, prompt, add_special_tokens=True)
        out = []
        for response in responses:
            ids = _encode(tokenizer, response, add_special_tokens=False)
            if append_eos and tokenizer.eos_token_id is not None and ids[-1:] != [tokenizer.eos_token_id]:
                ids.append(tokenizer.eos_token_id)  # unless the text ends with it already (TRL's rule)
            out.append(ids)
        return prompt_ids, out
    prompt_messages = _messages(prompt, "user")
    prompt_text = _render(tokenizer, prompt_messages, index, add_generation_prompt=True)
    out = []
    for response in responses:
        full_text = _render(tokenizer, prompt_messages + _messages(response, "assistant"), index)
        if not full_text.startswith(prompt_text):
            raise ValueError(
                f"{_where(index)}: the chat template does not render the prompt (with its generation prompt) as a "
                "prefix of the whole conversation, so the response cannot be separated from it; use another "
                "template (--chat-template) or, for string records, --chat-template off"
            )
        out.append(_end_at_end_of_turn(tokenizer, _encode(tokenizer, full_text[len(prompt_text):],
                                                           add_special_tokens=False)))
    return _encode(tokenizer, prompt_text, add_special_tokens=False), out


def _end_at_end_of_turn(tokenizer, ids: list[int]) -> list[int]:
    """A templated response ends with the end-of-turn token (the tokenizer's EOS, where generation stops): the
    whitespace some templates put after it (ChatML's '<|im_end|>' + newline, Gemma's '<end_of_turn>' + newline)
    separates turns, is never generated, and is not scored."""
    eos = tokenizer.eos_token_id
    if eos is None or eos not in ids:
        return ids
    last = len(ids) - 1 - ids[::-1].index(eos)
    tail = ids[last + 1:]
    if tail and not tokenizer.decode(tail).strip():
        return ids[:last + 1]
    return ids


def tokenize_prompt(tokenizer, prompt, *, use_chat_template: bool | None = None) -> list[int]:
    """Token ids of the prompt (a string or a list of messages) as the model sees it right before the response
    (chat template + generation prompt)."""
    conversational = isinstance(prompt, list)
    if _use_template(tokenizer, use_chat_template, conversational, None):
        text = _render(tokenizer, _messages(prompt, "user"), None, add_generation_prompt=True)
        return _encode(tokenizer, text, add_special_tokens=False)
    return _encode(tokenizer, prompt, add_special_tokens=True)


def tokenize_response(
    tokenizer, prompt, response, *, use_chat_template: bool | None = None, append_eos: bool = True
) -> list[int]:
    """Token ids of the response continuing tokenize_prompt(prompt) (template end-of-turn / EOS included)."""
    return _tokenize_prompt_and_responses(tokenizer, prompt, [response], index=None,
                                          use_chat_template=use_chat_template, append_eos=append_eos)[1][0]


def tokenize_pair(
    tokenizer,
    record: dict,
    *,
    index: int | None = None,
    use_chat_template: bool | None = None,
    append_eos: bool = True,
    max_length: int | None = None,
) -> dict:
    """One pair record (any accepted format) -> {"prompt_ids", "chosen_ids", "rejected_ids"[, "aug_prompt_ids"],
    <probabilities>, <extras>}.

    max_length bounds each full sequence (aug_prompt + prompt + response); longer raises ValueError (no truncation).
    """
    record = normalize_record(record, _where(index))
    prompt, chosen, rejected = (record[f] for f in PAIR_TEXT_FIELDS)
    example = {k: v for k, v in record.items() if k not in PAIR_TEXT_FIELDS + PROBABILITY_FIELDS + ("aug_prompt",)}
    for field in PROBABILITY_FIELDS:
        if field in record and record[field] is not None:
            example[field] = _check_probability(record[field], field, index)
    example["prompt_ids"], (example["chosen_ids"], example["rejected_ids"]) = _tokenize_prompt_and_responses(
        tokenizer, prompt, [chosen, rejected], index=index, use_chat_template=use_chat_template, append_eos=append_eos)
    if record.get("aug_prompt") is not None:
        aug = record["aug_prompt"]
        if not isinstance(aug, str) or not aug.strip():
            raise ValueError(f"{_where(index)}: field 'aug_prompt' must be a non-empty string")
        example["aug_prompt_ids"] = _encode(tokenizer, aug, False)
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
    """One K-response record (any accepted format) -> {"prompt_ids", "responses_ids"[, "responses_winrate"], <extras>}."""
    if not isinstance(record, dict):
        raise ValueError(f"{_where(index)}: expected a dict, got {type(record).__name__}")
    if "responses" not in record:
        raise ValueError(f"{_where(index)}: missing field 'responses'")
    record = normalize_record(record, _where(index))
    responses = record["responses"]
    example = {k: v for k, v in record.items() if k not in ("prompt", "responses", "winrates")}
    if record.get("winrates") is not None:
        winrates = record["winrates"]
        if not isinstance(winrates, (list, tuple)) or len(winrates) != len(responses):
            raise ValueError(
                f"{_where(index)}: field 'winrates' must be a list with one number per response ({len(responses)})"
            )
        example["responses_winrate"] = [_check_probability(w, f"winrates[{k}]", index) for k, w in enumerate(winrates)]
    example["prompt_ids"], example["responses_ids"] = _tokenize_prompt_and_responses(
        tokenizer, record["prompt"], responses, index=index, use_chat_template=use_chat_template, append_eos=append_eos)
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
