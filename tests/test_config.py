"""TrainConfig: defaults < YAML < flags, --help covers every option, bad values name the option."""

import dataclasses

import pytest

from nash_fast.config import DEFAULT_LR, DEFAULT_TINY_LR, TrainConfig, build_parser, flag, parse_config


def write_yaml(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return str(path)


def test_defaults_are_the_tiny_sppo_demo():
    cfg = parse_config([])
    assert (cfg.model, cfg.dataset, cfg.loss) == ("tiny", "tiny", "sppo")
    assert cfg == TrainConfig()
    assert cfg.resolved_lr() == DEFAULT_TINY_LR
    assert parse_config(["--model", "some/hub-model"]).resolved_lr() == DEFAULT_LR
    assert not cfg.uses_deepspeed()


def test_yaml_overrides_defaults_and_flags_override_yaml(tmp_path):
    path = write_yaml(tmp_path, "loss: ipo\nbeta: 0.5\nmax_steps: 7\nmax-tokens: 333\nbf16: true\noutput_dir: from_yaml\n")
    from_file = parse_config(["--config", path])
    assert (from_file.loss, from_file.beta, from_file.max_steps, from_file.max_tokens, from_file.bf16) == ("ipo", 0.5, 7, 333, True)
    assert from_file.output_dir == "from_yaml"
    # Untouched options keep the dataclass defaults.
    assert from_file.seed == TrainConfig().seed
    both = parse_config(["--config", path, "--max-steps", "9", "--bf16", "false", "--output-dir", "from_flag", "--beta", "0.25"])
    assert (both.max_steps, both.bf16, both.output_dir, both.beta, both.loss, both.max_tokens) == (9, False, "from_flag", 0.25, "ipo", 333)
    # Flag order does not matter: --config after the flags still loses to them.
    assert parse_config(["--max-steps", "9", "--config", path]).max_steps == 9


def test_flag_forms():
    cfg = parse_config(["--max_steps", "3", "--bf16", "--resume", "--zero-stage", "2", "--local_rank=1", "--warmup-steps", "none"])
    assert (cfg.max_steps, cfg.bf16, cfg.resume, cfg.zero_stage, cfg.warmup_steps) == (3, True, "latest", 2, None)
    assert parse_config(["--resume", "never"]).resume == "never"


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for f in dataclasses.fields(TrainConfig):
        assert flag(f.name) in text, f.name
        assert f.metadata["help"], f.name
    for needed in ("--config", "--output-dir", "--max-steps", "--save-steps", "--resume"):
        assert needed in text


@pytest.mark.parametrize(
    "argv, option",
    [
        (["--lr", "-1"], "--lr"),
        (["--max-tokens", "0"], "--max-tokens"),
        (["--grad-accum", "0"], "--grad-accum"),
        (["--warmup-ratio", "1.5"], "--warmup-ratio"),
        (["--adam-beta2", "1.0"], "--adam-beta2"),
        (["--save-total-limit", "0"], "--save-total-limit"),
        (["--cpu-threads", "0"], "--cpu-threads"),
        (["--loss", "inpo", "--tau", "0.1"], "--eta"),
        (["--loss", "inpo", "--eta", "1.0", "--tau", "2.0"], "--tau"),
        (["--loss", "sr_dpo"], "--lam"),
        (["--loss", "dpo", "--eta", "1.0"], "--eta"),
        (["--loss", "sppo", "--beta", "0.1", "--eta", "10"], "--beta"),
        (["--loss", "ipo", "--prev-model", "x"], "--prev-model"),
        (["--default-preference", "1.5"], "--default-preference"),
        (["--offload-param", "--zero-stage", "2"], "--offload-param"),
        (["--deepspeed", "/nonexistent/ds.json"], "--deepspeed"),
        (["--resume", "/nonexistent/checkpoint"], "--resume"),
        (["--columns", "prompt"], "--columns"),
        (["--columns", "question=prompt"], "--columns"),
    ],
)
def test_bad_values_name_the_option(argv, option):
    with pytest.raises(ValueError, match=option):
        parse_config(argv)


@pytest.mark.parametrize(
    "text, option",
    [("lr: abc\n", "--lr"), ("max_steps: 2.5\n", "--max-steps"), ("bf16: maybe\n", "--bf16"),
     ("loss: ppo\n", "--loss"), ("beta: .nan\nloss: dpo\n", "--beta"), ("max_tokens: true\n", "--max-tokens")],
)
def test_bad_yaml_values_name_the_option(tmp_path, text, option):
    with pytest.raises(ValueError, match=option):
        parse_config(["--config", write_yaml(tmp_path, text)])


def test_yaml_unknown_key_and_bad_file(tmp_path):
    with pytest.raises(ValueError, match="unknown option 'learning_rate'"):
        parse_config(["--config", write_yaml(tmp_path, "learning_rate: 0.1\n")])
    with pytest.raises(ValueError, match="mapping"):
        parse_config(["--config", write_yaml(tmp_path, "- 1\n- 2\n")])
    with pytest.raises(ValueError, match="--config"):
        parse_config(["--config", str(tmp_path / "missing.yaml")])


def test_bad_flag_type_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--max-steps", "ten"])
    assert "--max-steps" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_config(["--zero-stage", "5"])


def test_column_mapping():
    cfg = parse_config(["--columns", "prompt=question, chosen=good,rejected=bad"])
    assert cfg.column_mapping() == {"prompt": "question", "chosen": "good", "rejected": "bad"}
    with pytest.raises(ValueError, match="mapped twice"):
        parse_config(["--columns", "prompt=a,prompt=b"])


# ------------------------------------------------------------------------------------------------ YAML = flags

def test_yaml_numbers_are_read_as_people_write_them(tmp_path):
    """PyYAML alone reads 5e-7 as the string '5e-7' (YAML 1.1 wants a dot); options go through the flags' parsers."""
    text = ("lr: 5e-7\noptimizer_eps: 1E-8\nwarmup_ratio: .05\nweight_decay: 0\nmax_tokens: 2_048\n"
            "warmup_steps: none\nbf16: on\nloss: dpo\nbeta: 1e-1\ncolumns: {prompt: question, chosen: good}\n"
            "save_steps: 1e3\nmax_steps: 2000.0\n")
    cfg = parse_config(["--config", write_yaml(tmp_path, text)])
    assert (cfg.lr, cfg.optimizer_eps, cfg.warmup_ratio, cfg.weight_decay, cfg.max_tokens) == (5e-7, 1e-8, 0.05, 0.0, 2048)
    assert (cfg.warmup_steps, cfg.bf16, cfg.beta, cfg.save_steps, cfg.max_steps) == (None, True, 0.1, 1000, 2000)
    assert cfg.column_mapping() == {"prompt": "question", "chosen": "good"}
    assert isinstance(cfg.lr, float) and isinstance(cfg.max_tokens, int)


_TEXTS = {
    bool: ["true", "False", "yes", "no", "on", "off", "1", "0", "maybe", "none"],
    int: ["7", "1_000", "0", "-3", "2.5", "1e3", "4.0", "1e400", "true", "none", "~", "null", ""],
    float: ["5e-7", "5.0e-7", "1E-3", ".5", "3", "1_000.5", "-2", ".inf", "nan", "abc", "none", "~", "true"],
    str: ["tiny", "none", "5e-7", "yes", "~", "null", "a b"],
}


def _flag_value(name, text):
    """The option's value from the flag alone (argparse's conversion), or 'error'."""
    try:
        namespace = vars(build_parser().parse_args([f"{flag(name)}={text}"]))
    except SystemExit:
        return "error"
    return namespace[name]


def _same(a, b):
    return a == b or (isinstance(a, float) and isinstance(b, float) and a != a and b != b)


@pytest.mark.parametrize("field", [f for f in dataclasses.fields(TrainConfig) if "choices" not in f.metadata],
                         ids=lambda f: f.name)
def test_yaml_values_and_flags_parse_the_same_way(tmp_path, capsys, field):
    """For every option and every text a user may write: the flag and the YAML key give the same value, or
    both refuse it (the YAML one with a ValueError naming the option)."""
    from nash_fast.config import load_yaml
    from nash_fast.options import base_type as _base_type

    base, _ = _base_type(field.type)
    for text in _TEXTS[base]:
        expected = _flag_value(field.name, text)
        options, problems = load_yaml(write_yaml(tmp_path, f"{field.name}: {text}\n" if text else f"{field.name}:\n"))
        got = "error" if field.name in problems else options[field.name]
        assert _same(got, expected), (field.name, text, got, expected)
        if got == "error":
            assert problems[field.name].startswith(flag(field.name)), problems
    capsys.readouterr()  # argparse's usage messages


@pytest.mark.parametrize("field", [f for f in dataclasses.fields(TrainConfig) if "choices" in f.metadata],
                         ids=lambda f: f.name)
def test_yaml_and_flag_choices_agree(tmp_path, capsys, field):
    from nash_fast.config import load_yaml

    for choice in field.metadata["choices"]:
        options, problems = load_yaml(write_yaml(tmp_path, f"{field.name}: {choice}\n"))
        assert not problems and options[field.name] == _flag_value(field.name, str(choice)) == choice
        assert not [p for p in TrainConfig(**options).problems() if p.startswith(flag(field.name) + " must")]
    with pytest.raises(SystemExit):
        parse_config([f"{flag(field.name)}=not-a-choice"])
    with pytest.raises(ValueError, match=flag(field.name)):
        parse_config(["--config", write_yaml(tmp_path, f"{field.name}: not-a-choice\n")])
    capsys.readouterr()


# ------------------------------------------------------------------------------------------------ all at once

def test_every_missing_or_conflicting_option_is_reported_at_once(tmp_path):
    with pytest.raises(ValueError) as error:
        parse_config(["--loss", "inpo"])
    assert "--loss inpo needs --eta and --tau" in str(error.value)
    with pytest.raises(ValueError) as error:
        parse_config(["--loss", "inpo", "--beta", "0.1", "--lr", "-1", "--offload-param", "--prev-model", "x",
                      "--columns", "question=prompt"])
    message = str(error.value)
    assert message.startswith("5 problems with the options: ") and "\n" not in message
    for option in ("--eta and --tau", "--beta is not used by --loss inpo", "--lr must be > 0", "--offload-param",
                   "--columns"):
        assert option in message, message
    # YAML values that do not parse are reported with the flags' problems; a flag replaces a bad YAML value.
    path = write_yaml(tmp_path, "lr: abc\nmax_steps: 2.5\nloss: ipo\n")
    with pytest.raises(ValueError) as error:
        parse_config(["--config", path, "--max-tokens", "0", "--tau", "0.1"])
    message = str(error.value)
    assert message.startswith("4 problems"), message
    for option in ("--lr (in --config", "--max-steps (in --config", "--max-tokens must be > 0", "--tau is not used"):
        assert option in message, message
    assert parse_config(["--config", path, "--lr", "1e-3", "--max-steps", "3"]).lr == 1e-3
    # The API: TrainConfig.validate() and .problems() see the same list.
    cfg = TrainConfig(loss="sr_dpo", max_tokens=0)
    assert len(cfg.problems()) == 2
    with pytest.raises(ValueError, match=r"2 problems.*--max-tokens.*--lam"):
        cfg.validate()


# ------------------------------------------------------------------------------------------------ TRL's loss types

TRL_NAMES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
             "aot_unpaired", "aot_pair", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")


@pytest.mark.parametrize("name", sorted(set(TRL_NAMES) | {"sppo", "inpo", "dpo", "sr_dpo", "sr_ipo", "spce"}))
def test_every_loss_name_is_accepted_by_flag_and_yaml_alike(tmp_path, name):
    """--loss takes nash-fast's losses and TRL's loss types as TRL names them, as a flag, as --loss-type (TRL's
    DPOConfig field) and as the YAML keys loss / loss_type."""
    needs = {"inpo": ["--eta", "1", "--tau", "0.1"], "sr_dpo": ["--lam", "0.5"], "sr_ipo": ["--lam", "0.5"],
             "exo_pair": ["--label-smoothing", "1e-3"]}.get(name, [])
    values = [parse_config(["--loss", name, *needs]).loss, parse_config(["--loss-type", name, *needs]).loss]
    for key in ("loss", "loss_type"):
        values.append(parse_config(["--config", write_yaml(tmp_path, f"{key}: {name}\n"), *needs]).loss)
    assert values == [name] * 4


def test_trl_loss_lists_and_weights(tmp_path):
    cfg = parse_config(["--loss", "sigmoid,bco_pair,sft", "--loss-weights", "0.8,0.2,1", "--bco-running-mean"])
    assert cfg.loss_types() == ("sigmoid", "bco_pair", "sft") and cfg.loss_weight_values() == [0.8, 0.2, 1.0]
    # TRL's config spelling: loss_type and loss_weights as YAML lists; numbers read as people write them
    path = write_yaml(tmp_path, "loss_type: [sigmoid, sft]\nloss_weights: [5e-1, 1]\nbeta: 5e-2\n")
    cfg = parse_config(["--config", path])
    assert (cfg.loss, cfg.loss_weight_values(), cfg.beta) == ("sigmoid,sft", [0.5, 1.0], 0.05)
    path = write_yaml(tmp_path, "loss_type:\n  - aot_pair\n  - robust\nlabel_smoothing: 0.1\n")
    assert parse_config(["--config", path]).loss_types() == ("aot_unpaired", "robust")
    with pytest.raises(ValueError, match="give loss or loss_type"):
        parse_config(["--config", write_yaml(tmp_path, "loss: dpo\nloss_type: sigmoid\n")])


@pytest.mark.parametrize("argv, message", [
    (["--loss", "kto"], r"^--loss must be one of sppo, inpo, ipo, dpo, sr_dpo, sr_ipo, spce, one of TRL's loss types "
                        r"sigmoid, hinge, ipo, exo_pair, nca_pair, robust, bco_pair, sppo_hard, aot, aot_unpaired, "
                        r"aot_pair, apo_zero, apo_down, discopop, sft, sigmoid_norm, or a comma-separated list of "
                        r"TRL's loss types; got 'kto'$"),
    (["--loss", "sigmoid,sppo"], "--loss must be one of"),  # lists hold TRL's types only
    (["--loss", "sigmoid,sigmoid"], "--loss must be one of"),
    (["--loss", "sigmoid,sft", "--loss-weights", "1"], "--loss-weights must give 2 numbers"),
    (["--loss", "sigmoid,sft", "--loss-weights", "1,x"], "--loss-weights must be comma-separated numbers"),
    (["--loss", "sigmoid,sft", "--loss-weights", "1,.nan"], "--loss-weights must be finite"),
    (["--loss", "sppo", "--loss-weights", "1"], "--loss-weights is not used by --loss sppo"),
    (["--loss", "exo_pair"], "--loss exo_pair needs --label-smoothing > 0"),
    (["--loss", "exo_pair", "--label-smoothing", "0"], r"--label-smoothing must be in \(0, 1\) for the exo_pair loss"),
    (["--loss", "robust", "--label-smoothing", "0.5"], r"--label-smoothing must be in \[0, 0.5\) for the robust loss"),
    (["--loss", "hinge", "--label-smoothing", "0.1"], "--label-smoothing is not used by --loss hinge"),
    (["--loss", "discopop", "--discopop-tau", "0"], "--discopop-tau must be > 0"),
    (["--loss", "sigmoid", "--discopop-tau", "0.1"], "--discopop-tau is not used by --loss sigmoid"),
    (["--loss", "dpo", "--bco-running-mean"], "--bco-running-mean is not used by --loss dpo"),
    (["--loss", "sppo_hard", "--beta", "1e-30"], "the sppo_hard loss is not finite in float32"),
    (["--loss", "apo_zero", "--eta", "1"], "--eta is not used by --loss apo_zero"),
])
def test_bad_trl_options_are_one_line_naming_the_option(argv, message):
    with pytest.raises(ValueError, match=message) as error:
        parse_config(argv)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("argv, kwargs", [
    (["--loss", "sigmoid"], dict(loss="dpo", beta=0.1)),
    (["--loss", "hinge", "--beta", "0.3"], dict(loss_types=("hinge",), beta=0.3)),
    (["--loss", "robust", "--label-smoothing", "0.2"], dict(loss_types=("robust",), label_smoothing=0.2)),
    (["--loss", "discopop"], dict(loss_types=("discopop",), discopop_tau=0.05)),
    (["--loss", "ipo,sft", "--loss-weights", "1,0.5"], dict(loss_types=("ipo", "sft"), loss_weights=(1.0, 0.5))),
])
def test_trainer_builds_the_apis_loss(argv, kwargs):
    from nash_fast.train import build_loss_fn

    loss_fn = build_loss_fn(parse_config(argv))
    for name, value in kwargs.items():
        assert getattr(loss_fn, name) == value, name
    assert build_loss_fn(parse_config(["--loss", "bco_pair", "--bco-running-mean"])).loss_state() != {}
