"""Where a record's format is decided: TRL's preference formats and SPPO's K-response groups.

Accepted rows (after --columns renamed the dataset's columns to these fields):

  pairs    {"prompt": P, "chosen": Y, "rejected": Y}              explicit prompt
           {"chosen": X + Y, "rejected": X + Y'}                  implicit prompt (HH-RLHF, ultrafeedback)
  groups   {"prompt": P, "responses": [Y, ...], "winrates": [...]}    SPPO's K responses with P(y > pi_t)
           {"responses": [X + Y, ...], "winrates": [...]}            implicit prompt

in either of TRL's two styles (https://huggingface.co/docs/trl/dataset_formats):

  standard        P and Y are strings
  conversational  P and Y are lists of messages {"role": ..., "content": ...}; the prompt may hold a system
                  message and several turns (and must not end with an assistant turn: the response is the
                  assistant's next turn); a response is one or more messages starting with the assistant's

Implicit prompts follow TRL's extract_prompt: the prompt is the longest shared start of the completions,
message by message (conversational) or character by character (standard, where a space right before the
first difference goes to the completions). As in TRL's maybe_extract_prompt, a string "prompt" column next
to conversational completions is the dataset's copy of the question, and the prompt is taken from the
conversations. Optional fields of pairs: preference (P(chosen beats rejected)), chosen_winrate,
rejected_winrate, aug_prompt (Sr-DPO's p); other columns are carried unchanged.

normalize_record() turns any accepted row into the explicit form (prompt, chosen, rejected or prompt,
responses) of the same style, so explicit and implicit writings of the same data tokenize identically
(nash_fast.data.records renders conversational records with the tokenizer's chat template). A row of any
other shape is a ValueError naming the row, what is wrong and the accepted formats.
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping, Sequence

__all__ = [
    "ACCEPTED_FORMATS",
    "COLUMN_FIELDS",
    "is_conversational",
    "extract_prompt",
    "record_format",
    "normalize_record",
    "validate_records",
    "prompt_key",
    "prompt_text",
    "check_prompt",
]

COLUMN_FIELDS = ("prompt", "chosen", "rejected", "preference", "chosen_winrate", "rejected_winrate",
                 "aug_prompt", "responses", "winrates")
PROBABILITY_FIELDS = ("preference", "chosen_winrate", "rejected_winrate")

ACCEPTED_FORMATS = (
    "accepted formats: pairs {prompt, chosen, rejected} or {chosen, rejected} with the prompt implicit (their shared "
    "start), and SPPO groups {prompt, responses, winrates} or {responses, winrates}; each text a string (standard) "
    "or a list of {role, content} messages (conversational), one style per row"
)


def is_conversational(value: Any) -> bool:
    """A non-empty list of messages (dicts with a 'role'), as TRL's is_conversational tells them apart."""
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "role" in m for m in value)


def _style(value: Any) -> str | None:
    if isinstance(value, str):
        return "standard"
    if is_conversational(value):
        return "conversational"
    return None


def extract_prompt(completions: Sequence[Any]) -> tuple[Any, list[Any]]:
    """(prompt, completions without it): TRL's extract_prompt over any number of completions.

    Conversational: the longest run of leading messages all completions share. Standard: the longest shared
    leading text, less a space that ends it (the space stays with the completions, as TRL's rule does)."""
    shortest = min(len(c) for c in completions)
    length = 0
    while length < shortest and all(c[length] == completions[0][length] for c in completions[1:]):
        length += 1
    if isinstance(completions[0], str) and length > 0 and completions[0][length - 1] == " ":
        length -= 1
    return completions[0][:length], [c[length:] for c in completions]


def record_format(row: Mapping) -> tuple[str, str, str]:
    """(kind, style, prompt) of a row: ("pair" | "group", "standard" | "conversational", "explicit" | "implicit").

    ValueError (without the row's index; normalize_record adds it) for any other shape."""
    kind = "group" if "responses" in row else "pair"
    if kind == "pair":
        for field in ("chosen", "rejected"):
            if row.get(field) is None:
                raise ValueError(f"missing field {field!r}")
        texts = {"chosen": row["chosen"], "rejected": row["rejected"]}
        what = "chosen and rejected"
    else:
        responses = row["responses"]
        if not isinstance(responses, list) or not responses:
            raise ValueError(f"field 'responses' must be a non-empty list of responses, got {responses!r:.80}")
        texts = {f"responses[{k}]": r for k, r in enumerate(responses)}
        what = "the responses"
    for field, value in texts.items():
        if _style(value) is None:
            raise ValueError(f"field {field!r} must be a non-empty string or a list of {{role, content}} messages, "
                             f"got {value!r:.60}")
    styles = {_style(value) for value in texts.values()}
    if len(styles) > 1:
        raise ValueError(f"{what} mix strings and message lists")
    style = styles.pop()
    prompt = row.get("prompt")
    if prompt is None:
        return kind, style, "implicit"
    prompt_style = _style(prompt)
    if prompt_style is None:
        raise ValueError(f"field 'prompt' must be a non-empty string or a list of {{role, content}} messages, "
                         f"got {prompt!r:.60}")
    if prompt_style == style:
        return kind, style, "explicit"
    if prompt_style == "standard" and style == "conversational":
        return kind, style, "implicit"  # TRL: a string copy of the question next to whole conversations
    raise ValueError(f"field 'prompt' is a list of messages but {what} are strings (write them as "
                     "[{'role': 'assistant', 'content': ...}])")


def _check_messages(messages: list, field: str, *, completion: bool) -> None:
    for k, message in enumerate(messages):
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise ValueError(f"field {field!r}[{k}]: 'role' must be a non-empty string, got {role!r}")
        if "content" not in message:
            raise ValueError(f"field {field!r}[{k}] ({role} message) has no 'content'")
    if completion:
        if messages[0]["role"] != "assistant":
            raise ValueError(f"field {field!r} must start with the assistant's message (the response), "
                             f"got a {messages[0]['role']!r} message")
        if not any(isinstance(m["content"], str) and m["content"].strip() for m in messages):
            raise ValueError(f"field {field!r} has no text")
    elif messages[-1]["role"] == "assistant":
        raise ValueError(f"field {field!r} ends with an assistant message; a prompt ends where the assistant's "
                         "response starts (with a user, system or tool message)")


def _check_text(value: Any, field: str, *, completion: bool) -> None:
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"field {field!r} is empty")
    else:
        if not value:
            raise ValueError(f"field {field!r} is empty")
        _check_messages(value, field, completion=completion)


def normalize_record(row: Mapping, where: str = "record") -> dict:
    """Any accepted row -> the explicit form of its style: {prompt, chosen, rejected, ...} or
    {prompt, responses, ...}; other keys are kept. ValueError naming `where` and the accepted formats."""
    if not isinstance(row, Mapping):
        raise ValueError(f"{where}: expected a mapping of field: value, got {type(row).__name__}; {ACCEPTED_FORMATS}")
    try:
        kind, style, prompt_form = record_format(row)
        texts = [row["chosen"], row["rejected"]] if kind == "pair" else list(row["responses"])
        names = ["chosen", "rejected"] if kind == "pair" else [f"responses[{k}]" for k in range(len(texts))]
        if prompt_form == "implicit":
            if len(texts) < 2:
                raise ValueError("one response and no 'prompt': an implicit prompt is the shared start of two or more")
            prompt, texts = extract_prompt(texts)
            for name, text in zip(names, texts):
                if not text or (isinstance(text, str) and not text.strip()):
                    raise ValueError(f"no 'prompt' and {name} ends where the shared start ends: nothing is left "
                                     "to be its response")
            if not prompt or (isinstance(prompt, str) and not prompt.strip()):
                raise ValueError("no 'prompt' and the completions share no start to take it from")
        else:
            prompt = row["prompt"]
        _check_text(prompt, "prompt", completion=False)
        for name, text in zip(names, texts):
            _check_text(text, name, completion=True)
    except ValueError as error:
        raise ValueError(f"{where}: {error}; {ACCEPTED_FORMATS}") from None
    record = {k: v for k, v in row.items() if k not in ("prompt", "chosen", "rejected", "responses")}
    record["prompt"] = prompt
    if kind == "pair":
        record["chosen"], record["rejected"] = texts
    else:
        record["responses"] = texts
    return record


def validate_records(rows: Sequence[Any], *, columns: Mapping[str, str] | None = None, loss: str = "sppo",
                     default_preference: float | None = None, aug_prompt: str | None = None,
                     source: str = "--dataset") -> list[dict]:
    """Rename columns to fields ({field: dataset column}), normalize every row (normalize_record) and check what
    `loss` needs. Errors name the row, the dataset's column and the option that fixes it. Returns the records
    in explicit form with canonical field names (other columns unchanged)."""
    column = {f: (columns or {}).get(f, f) for f in COLUMN_FIELDS}
    if not rows:
        raise ValueError(f"{source}: no rows")
    groups = isinstance(rows[0], Mapping) and column["responses"] in rows[0]
    if groups and loss != "sppo":
        raise ValueError(
            f"{source} has a {column['responses']!r} column (K-response groups): only --loss sppo (its all-responses "
            f"form) trains on groups; --loss {loss} needs chosen/rejected pairs"
        )
    renamed_away = {column[f] for f in COLUMN_FIELDS if column[f] != f}
    records = []
    for index, row in enumerate(rows):
        where = f"{source}: row {index}"
        if not isinstance(row, Mapping):
            raise ValueError(f"{where}: expected a mapping of column: value, got {type(row).__name__}")
        record = {k: v for k, v in row.items() if k not in renamed_away}
        for f in COLUMN_FIELDS:
            if column[f] in row:
                record[f] = row[column[f]]
            elif f in record and column[f] != f:
                del record[f]  # a column named like a field but not the one mapped to it
        if (column["responses"] in row) != groups:
            raise ValueError(f"{where}: mixes pair rows and K-response rows ({column['responses']!r} column)")
        for f in ("responses",) if groups else ("chosen", "rejected"):
            if record.get(f) is None:
                raise ValueError(f"{where}: missing column {column[f]!r} (field {f!r}); map it with --columns {f}=COLUMN")
        try:
            record = normalize_record(record)
        except ValueError as error:
            message = str(error).removeprefix("record: ")
            for f in ("prompt", "chosen", "rejected", "responses"):  # name the dataset's column
                if column[f] != f:
                    message = message.replace(f"field {f!r}", f"column {column[f]!r} (field {f!r})")
            raise ValueError(f"{where}: {message}") from None
        if groups:
            responses = record["responses"]
            winrates = record.get("winrates")
            if winrates is None:
                raise ValueError(f"{where}: missing column {column['winrates']!r} (field 'winrates'): SPPO's "
                                 "all-responses form needs each response's P(y > pi_t)")
            if not isinstance(winrates, list) or len(winrates) != len(responses):
                raise ValueError(f"{where}: column {column['winrates']!r} must list one win rate per response")
            for k, w in enumerate(winrates):
                if not _probability(w):
                    raise ValueError(f"{where}: column {column['winrates']!r}[{k}] must be a probability in [0, 1], got {w!r}")
        else:
            for f in PROBABILITY_FIELDS:
                value = record.get(f)
                if value is None:
                    record.pop(f, None)
                    continue
                if not _probability(value):
                    raise ValueError(f"{where}: column {column[f]!r} (field {f!r}) must be a probability in [0, 1], got {value!r}")
            if loss in ("sppo", "spce") and "preference" not in record:
                if default_preference is None:
                    raise ValueError(
                        f"{where}: missing column {column['preference']!r} (field 'preference', P(chosen beats rejected)) "
                        f"needed by --loss {loss}; map it with --columns preference=COLUMN or set --default-preference "
                        "(1.0 for hard labels)"
                    )
                record["preference"] = default_preference
            if loss in ("sr_dpo", "sr_ipo"):
                aug = record.get("aug_prompt")
                if aug is None:
                    record["aug_prompt"] = aug_prompt
                elif not isinstance(aug, str) or not aug.strip():
                    raise ValueError(f"{where}: column {column['aug_prompt']!r} (field 'aug_prompt') must be a non-empty string")
            else:
                record.pop("aug_prompt", None)
        records.append(record)
    return records


def _probability(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and 0.0 <= value <= 1.0


# ------------------------------------------------------------------------------------------------ prompts alone
# Self-play reads prompt files: TRL's prompt-only format, {"prompt": string or list of messages}.

def check_prompt(prompt: Any, where: str) -> Any:
    """A prompt as a prompt-only row holds it: a non-empty string or a conversation that does not end with an
    assistant turn. Returns it; ValueError naming `where` otherwise."""
    if _style(prompt) is None:
        raise ValueError(f"{where}: a prompt must be a non-empty string or a list of {{role, content}} messages "
                         f"(TRL's prompt-only format), got {prompt!r:.60}")
    try:
        _check_text(prompt, "prompt", completion=False)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    return prompt


def prompt_key(prompt: Any) -> str:
    """A string identifying a prompt of either style (for de-duplication and seeding)."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def prompt_text(prompt: Any) -> str:
    """A prompt as plain text: a string as is; a single user message as its content; a conversation as
    'role: content' lines (for judges that read text)."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1 and isinstance(prompt[0].get("content"), str):
        return prompt[0]["content"]
    return "\n".join(f"{m['role']}: {m.get('content') if isinstance(m.get('content'), str) else json.dumps(m.get('content'))}"
                     for m in prompt)
