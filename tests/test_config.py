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
