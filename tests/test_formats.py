"""nash_fast.data.formats and the chat-template rendering of nash_fast.data.records: TRL's preference formats
(standard / conversational, explicit / implicit prompt), SPPO groups, the prompt/response token boundary."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nash_fast.data import apply_chat_template_option, tokenize_pair, tokenize_records
from nash_fast.data.formats import (
    ACCEPTED_FORMATS,
    check_prompt,
    extract_prompt,
    normalize_record,
    prompt_text,
    record_format,
    validate_records,
)
from nash_fast.tiny import build_tiny_tokenizer

TOKENIZER = build_tiny_tokenizer()

SYSTEM = {"role": "system", "content": "You are terse."}
USER1 = {"role": "user", "content": "What is 2 + 3?"}
ASSISTANT1 = {"role": "assistant", "content": "5."}
USER2 = {"role": "user", "content": "And 2 + 4?"}
PROMPT = [SYSTEM, USER1, ASSISTANT1, USER2]  # a system message and a multi-turn prompt
CHOSEN = [{"role": "assistant", "content": "6."}]
REJECTED = [{"role": "assistant", "content": "7."}]


def trl_extract_prompt(example):
    """TRL's extract_prompt (trl/data_utils.py, v1.16), verbatim."""
    for idx in range(min(len(example["chosen"]), len(example["rejected"]))):
        if example["chosen"][idx] != example["rejected"][idx]:
            if example["chosen"][idx - 1] == " ":  # remove space before the prompt
                idx -= 1
            break
    return {"prompt": example["chosen"][:idx], "chosen": example["chosen"][idx:], "rejected": example["rejected"][idx:]}


# ------------------------------------------------------------------------------------------------ formats

def test_trl_docstring_examples():
    conversation = {"chosen": [{"role": "user", "content": "What color is the sky?"}, {"role": "assistant", "content": "It is blue."}],
                    "rejected": [{"role": "user", "content": "What color is the sky?"}, {"role": "assistant", "content": "It is green."}]}
    record = normalize_record(conversation)
    assert record == {"prompt": [{"role": "user", "content": "What color is the sky?"}],
                      "chosen": [{"role": "assistant", "content": "It is blue."}],
                      "rejected": [{"role": "assistant", "content": "It is green."}]}
    assert normalize_record({"chosen": "The sky is blue.", "rejected": "The sky is green."}) == {
        "prompt": "The sky is", "chosen": " blue.", "rejected": " green."}


@given(st.text("ab c", max_size=6), st.text("ab c", min_size=1, max_size=6), st.text("ab c", min_size=1, max_size=6))
def test_implicit_prompt_is_trls_extract_prompt(prefix, a, b):
    """Whenever the two completions differ somewhere within the shorter one (TRL's loop breaks) but not at the
    very first character, ours equals TRL's. Left out: one a prefix of the other (TRL's loop never breaks; ours
    refuses the row) and a difference at index 0 (TRL reads chosen[-1], the last character, there)."""
    chosen, rejected = prefix + a, prefix + b
    differ = [i for i, (x, y) in enumerate(zip(chosen, rejected)) if x != y]
    if not differ or differ[0] == 0:
        return
    prompt, (c, r) = extract_prompt([chosen, rejected])
    assert {"prompt": prompt, "chosen": c, "rejected": r} == trl_extract_prompt({"chosen": chosen, "rejected": rejected})
    conversations = [[{"role": "user", "content": x}] for x in prefix] + [{"role": "assistant", "content": a}]
    other = conversations[:-1] + [{"role": "assistant", "content": b}]
    if a != b:
        assert extract_prompt([conversations, other])[0] == trl_extract_prompt({"chosen": conversations, "rejected": other})["prompt"]


FORMS = [
    ({"prompt": "Q?", "chosen": "A", "rejected": "B"}, ("pair", "standard", "explicit")),
    ({"chosen": "Q? A", "rejected": "Q? B"}, ("pair", "standard", "implicit")),
    ({"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED}, ("pair", "conversational", "explicit")),
    ({"chosen": PROMPT + CHOSEN, "rejected": PROMPT + REJECTED}, ("pair", "conversational", "implicit")),
    ({"prompt": "And 2 + 4?", "chosen": PROMPT + CHOSEN, "rejected": PROMPT + REJECTED},  # TRL: the string is a copy
     ("pair", "conversational", "implicit")),
    ({"prompt": "Q?", "responses": ["A", "B", "C"], "winrates": [0.5, 0.2, 0.3]}, ("group", "standard", "explicit")),
    ({"responses": ["Q? A", "Q? B", "Q? C"], "winrates": [0.5, 0.2, 0.3]}, ("group", "standard", "implicit")),
    ({"prompt": PROMPT, "responses": [CHOSEN, REJECTED], "winrates": [0.7, 0.3]}, ("group", "conversational", "explicit")),
    ({"responses": [PROMPT + CHOSEN, PROMPT + REJECTED], "winrates": [0.7, 0.3]}, ("group", "conversational", "implicit")),
]


@pytest.mark.parametrize("row, form", FORMS, ids=lambda x: "-".join(x) if isinstance(x, tuple) else None)
def test_every_accepted_form_is_recognized_and_made_explicit(row, form):
    assert record_format(row) == form
    record = normalize_record(row)
    assert record_format(record)[:2] == form[:2] and record_format(record)[2] == "explicit"
    if form[1] == "conversational":
        assert record["prompt"] == PROMPT
        texts = [record["chosen"], record["rejected"]] if form[0] == "pair" else record["responses"]
        assert texts == [CHOSEN, REJECTED]
    else:
        assert record["prompt"] == "Q?"
    assert {k: v for k, v in record.items() if k not in ("prompt", "chosen", "rejected", "responses")} == {
        k: v for k, v in row.items() if k not in ("prompt", "chosen", "rejected", "responses")}


@pytest.mark.parametrize(
    "row, problem",
    [
        ({"prompt": PROMPT, "chosen": "A", "rejected": "B"}, "field 'prompt' is a list of messages but chosen and rejected are strings"),
        ({"prompt": "Q?", "chosen": "A", "rejected": REJECTED}, "chosen and rejected mix strings and message lists"),
        ({"prompt": "Q?", "chosen": 3, "rejected": "B"}, "field 'chosen' must be a non-empty string or a list"),
        ({"prompt": PROMPT + CHOSEN, "chosen": CHOSEN, "rejected": REJECTED}, "field 'prompt' ends with an assistant message"),
        ({"prompt": PROMPT, "chosen": [USER2], "rejected": REJECTED}, "field 'chosen' must start with the assistant's message"),
        ({"prompt": PROMPT, "chosen": [{"content": "x"}], "rejected": REJECTED}, "field 'chosen' must be a non-empty string"),
        ({"prompt": PROMPT, "chosen": [{"role": "assistant"}], "rejected": REJECTED}, r"field 'chosen'\[0\] \(assistant message\) has no 'content'"),
        ({"chosen": PROMPT + CHOSEN, "rejected": PROMPT + CHOSEN}, "chosen ends where the shared start ends"),
        ({"chosen": "A", "rejected": "B"}, "share no start"),
        ({"responses": ["Q? A"], "winrates": [1.0]}, "one response and no 'prompt'"),
        ({"prompt": "Q?", "responses": [], "winrates": []}, "field 'responses' must be a non-empty list"),
        ({"prompt": "Q?", "chosen": "A"}, "missing field 'rejected'"),
        ({"prompt": "   ", "chosen": "A", "rejected": "B"}, "field 'prompt' is empty"),
    ],
)
def test_unsupported_shapes_name_the_row_and_the_accepted_formats(row, problem):
    with pytest.raises(ValueError, match=problem) as error:
        normalize_record(row, "row 7")
    assert str(error.value).startswith("row 7: ") and str(error.value).endswith(ACCEPTED_FORMATS)


def test_validate_records_names_the_dataset_row_and_column():
    rows = [{"q": PROMPT, "good": CHOSEN, "bad": REJECTED, "p": 0.6}] * 2 + [{"q": PROMPT, "good": "A", "bad": REJECTED, "p": 0.6}]
    with pytest.raises(ValueError, match=r"^--dataset d: row 2: chosen and rejected mix .*accepted formats: ") as error:
        validate_records(rows, columns={"prompt": "q", "chosen": "good", "rejected": "bad", "preference": "p"}, source="--dataset d")
    assert "\n" not in str(error.value)
    rows[2] = {"q": PROMPT + CHOSEN, "good": CHOSEN, "bad": REJECTED, "p": 0.6}
    with pytest.raises(ValueError, match=r"row 2: column 'q' \(field 'prompt'\) ends with an assistant message"):
        validate_records(rows, columns={"prompt": "q", "chosen": "good", "rejected": "bad", "preference": "p"})
    records = validate_records(rows[:2], columns={"prompt": "q", "chosen": "good", "rejected": "bad", "preference": "p"})
    assert records[0] == {"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED, "preference": 0.6}


def test_prompt_only_rows_for_self_play():
    assert check_prompt("Q?", "row 0") == "Q?" and check_prompt(PROMPT, "row 0") == PROMPT
    for bad, problem in (("", "is empty"), (PROMPT + CHOSEN, "ends with an assistant message"), (3, "TRL's prompt-only")):
        with pytest.raises(ValueError, match=f"row 3: .*{problem}"):
            check_prompt(bad, "row 3")
    assert prompt_text([USER1]) == "What is 2 + 3?"
    assert prompt_text(PROMPT).splitlines()[0] == "system: You are terse."


# ------------------------------------------------------------------------------------------------ rendering

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
          "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def with_template(template):
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = template
    return tokenizer


@pytest.mark.parametrize("template", [None, CHATML, LLAMA3], ids=["tiny", "chatml", "llama3"])
def test_prompt_response_boundary_is_where_the_generation_prompt_ends(template):
    tokenizer = with_template(template) if template else TOKENIZER
    example = tokenize_pair(tokenizer, {"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED})
    generation_prompt = tokenizer.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    assert example["prompt_ids"] == tokenizer(generation_prompt, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(example["prompt_ids"]) == generation_prompt  # ends exactly with the generation prompt
    assert "You are terse." in generation_prompt and "And 2 + 4?" in generation_prompt
    for completion, ids in ((CHOSEN, example["chosen_ids"]), (REJECTED, example["rejected_ids"])):
        full = tokenizer.apply_chat_template(PROMPT + completion, tokenize=False)
        assert tokenizer.decode(example["prompt_ids"] + ids) == full
        response = tokenizer.decode(ids)  # the assistant's content and the template's end of turn, nothing before
        assert response.startswith(completion[0]["content"]) and full.endswith(response)


def test_explicit_and_implicit_writings_tokenize_identically():
    rows = [FORMS[2][0], FORMS[3][0], FORMS[4][0]]
    first, *others = tokenize_records(TOKENIZER, rows)
    assert all(other == first for other in others)
    groups = tokenize_records(TOKENIZER, [FORMS[7][0], FORMS[8][0]])
    assert groups[0] == groups[1]
    assert groups[0]["responses_ids"] == [first["chosen_ids"], first["rejected_ids"]]
    # a string record renders as one user turn and the assistant's answer
    plain = tokenize_records(TOKENIZER, [FORMS[0][0], FORMS[1][0]])
    assert plain[0]["chosen_ids"] != plain[1]["chosen_ids"]  # "A" vs " A": TRL's rule keeps the space
    assert plain[1] == tokenize_records(TOKENIZER, [{"prompt": "Q?", "chosen": " A", "rejected": " B"}])[0]


def test_conversational_records_need_a_chat_template(tmp_path):
    bare = with_template(None)
    bare.chat_template = None
    record = {"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED}
    with pytest.raises(ValueError, match=r"record 1: a conversational record .* needs a chat template .*--chat-template"):
        tokenize_records(bare, [FORMS[0][0], record])
    with pytest.raises(ValueError, match=r"record 0: a conversational record .*--chat-template off"):
        tokenize_records(TOKENIZER, [record], use_chat_template=False)
    assert tokenize_records(bare, [FORMS[0][0]])[0]["chosen_ids"][-1] == bare.eos_token_id  # raw text still works
    # --chat-template: a file, a tokenizer directory, or the text; the template is installed on the tokenizer
    (tmp_path / "chatml.jinja").write_text(CHATML)
    TOKENIZER.save_pretrained(tmp_path / "tok")
    for option, template in ((str(tmp_path / "chatml.jinja"), CHATML), (CHATML, CHATML),
                             (str(tmp_path / "tok"), TOKENIZER.chat_template)):
        tokenizer = with_template(None)
        tokenizer.chat_template = None
        assert apply_chat_template_option(tokenizer, option) is True and tokenizer.chat_template == template
        tokenize_records(tokenizer, [record])
    assert [apply_chat_template_option(TOKENIZER, o) for o in ("auto", "off")] == [None, False]
    with pytest.raises(ValueError, match="--chat-template on: the tokenizer has no chat template"):
        apply_chat_template_option(bare, "on")
    with pytest.raises(ValueError, match="--chat-template 'nonsense'"):
        apply_chat_template_option(bare, "nonsense")


def test_a_template_that_does_not_keep_the_prompt_as_a_prefix_is_named():
    # renders the last user turn differently when an assistant turn follows it
    odd = ("{% for m in messages %}{% if loop.last and not add_generation_prompt %}[{{ m['content'] }}]"
           "{% else %}{{ m['role'] }}: {{ m['content'] }}\n{% endif %}{% endfor %}"
           "{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(ValueError, match=r"record 0: the chat template does not render the prompt .*--chat-template"):
        tokenize_records(with_template(odd), [{"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED}])
    failing = "{{ raise_exception('system messages are not supported') }}"
    with pytest.raises(ValueError, match=r"record 0: the chat template fails .*system messages are not supported"):
        tokenize_records(with_template(failing), [{"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED}])
