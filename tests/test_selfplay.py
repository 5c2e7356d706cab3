"""Self-play: generation, every stage on CPU with the tiny model, resume after a crash in each stage."""

import importlib.util
import json
import subprocess
import sys
import textwrap
import time
import warnings
import xml.etree.ElementTree as ET

import pytest
import torch

from nash_fast import generate, selfplay
from nash_fast.data import load_tiny_prompts, tokenize_prompt
from nash_fast.tiny import build_tiny_model, build_tiny_tokenizer

PROMPTS = ["What is 19 + 74?", "Spell the word 'rapid' backwards.",
           "Sort these words alphabetically: melon, glass, banana, mouse."]


@pytest.fixture(scope="module")
def tiny():
    tokenizer = build_tiny_tokenizer()
    return build_tiny_model(len(tokenizer), seed=1), tokenizer


# ------------------------------------------------------------------ generation


def test_greedy_sampling_matches_transformers_generate(tiny):
    model, tokenizer = tiny
    rows = [tokenize_prompt(tokenizer, p) for p in PROMPTS]  # unequal lengths: left padding is exercised
    ours = generate.hf_sample(model, tokenizer, rows, [0, 1, 2], temperature=0.0, top_p=1.0, max_new_tokens=12)
    for row, got in zip(rows, ours):
        ref = model.generate(torch.tensor([row]), do_sample=False, max_new_tokens=12, pad_token_id=0)[0, len(row):]
        ref = ref.tolist()
        if tokenizer.eos_token_id in ref:
            ref = ref[: ref.index(tokenizer.eos_token_id)]
        assert got == ref


def test_each_sample_has_its_own_seed(tiny):
    model, tokenizer = tiny
    kwargs = dict(num_samples=3, max_new_tokens=10, tokenizer=tokenizer)
    batched = generate.generate_responses(model, PROMPTS, seed=7, batch_size=16, **kwargs)
    one_by_one = generate.generate_responses(model, PROMPTS, seed=7, batch_size=1, **kwargs)
    assert batched == one_by_one  # a sample does not depend on its batch
    assert len(batched) == 3 and all(len(g) == 3 for g in batched)
    assert len({r for g in batched for r in g}) > 3  # samples differ
    other_seed = generate.generate_responses(model, PROMPTS, seed=8, batch_size=16, **kwargs)
    assert other_seed != batched
    assert generate.sample_seed(7, 0, 1) != generate.sample_seed(7, 1, 0)


def test_token_counts_are_the_tokens_generated(tiny):
    """mean_response_tokens counts the tokens each response was sampled with (end-of-sequence not counted), never
    the re-tokenized decoded text (which need not give the same count), so it is at most max_new_tokens."""
    model, tokenizer = tiny
    kwargs = dict(num_samples=3, max_new_tokens=10, seed=7, tokenizer=tokenizer)
    groups, counts = generate.generate_responses(model, PROMPTS, return_token_counts=True, **kwargs)
    assert groups == generate.generate_responses(model, PROMPTS, **kwargs)
    rows = [tokenize_prompt(tokenizer, p) for p in PROMPTS for _ in range(3)]
    seeds = [generate.sample_seed(7, i, k) for i in range(len(PROMPTS)) for k in range(3)]
    tokens = generate.hf_sample(model, tokenizer, rows, seeds, temperature=1.0, top_p=1.0, max_new_tokens=10)
    assert [c for g in counts for c in g] == [len(t) for t in tokens]
    assert all(0 <= c <= 10 for g in counts for c in g)
    assert selfplay.mean_tokens(counts) == sum(len(t) for t in tokens) / len(tokens)  # exact: integer sums
    assert selfplay.mean_tokens([]) == 0.0


def test_sampling_passes_the_kv_cache_as_the_installed_transformers_names_it(tiny):
    """transformers 5.x takes the cache as `cache` and deprecates `past_key_values` with a FutureWarning (the
    suite turns that warning into an error, pyproject.toml); older versions take `past_key_values`."""
    import inspect

    model, tokenizer = tiny
    expected = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    assert generate._cache_argument(model) == expected
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        generate.hf_sample(model, tokenizer, [tokenize_prompt(tokenizer, PROMPTS[0])], [0], temperature=1.0,
                           top_p=1.0, max_new_tokens=4)
    assert not [w for w in caught if "past_key_values" in str(w.message)]


def test_generate_cli_matches_in_process(tmp_path, tiny):
    model, tokenizer = tiny
    model.save_pretrained(tmp_path / "policy")
    tokenizer.save_pretrained(tmp_path / "policy")
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    subprocess.run([sys.executable, "-m", "nash_fast.generate", "--model", str(tmp_path / "policy"), "--prompts",
                    str(tmp_path / "prompts.jsonl"), "--output", str(tmp_path / "out.jsonl"), "-K", "2", "--seed", "3",
                    "--max-new-tokens", "8", "--backend", "hf"], check=True, capture_output=True)
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS
    assert [r["responses"] for r in rows] == generate.generate_responses(
        model, PROMPTS, num_samples=2, seed=3, max_new_tokens=8, tokenizer=tokenizer)
    assert ([r["responses"] for r in rows], [r["response_tokens"] for r in rows]) == generate.generate_responses(
        model, PROMPTS, num_samples=2, seed=3, max_new_tokens=8, tokenizer=tokenizer, return_token_counts=True)


def test_win_rate_pairs_samples():
    judge = lambda prompts, a, b: [1.0 if len(x) > len(y) else 0.0 for x, y in zip(a, b)]  # noqa: E731
    got = selfplay.win_rate(judge, ["p", "q"], [["aa", "a"], ["b", "bbb"]], [["a", "aa"], ["bb", "b"]])
    assert got == (1 + 0 + 0 + 1) / 4


def test_top_p_filter_hand_worked():
    probs = torch.tensor([[0.1, 0.5, 0.15, 0.25]])
    # sorted 0.5, 0.25, 0.15, 0.1: mass before each 0, 0.5, 0.75, 0.9 -> top_p 0.7 keeps 0.5 and 0.25
    torch.testing.assert_close(generate._filter_top_p(probs, 0.7), torch.tensor([[0.0, 0.5, 0.0, 0.25]]))
    torch.testing.assert_close(generate._filter_top_p(probs, 1.0), probs)


def test_generation_arguments_are_checked(tiny):
    model, tokenizer = tiny
    for kwargs, match in [(dict(num_samples=0), "num_samples"), (dict(num_samples=2, top_p=0.0), "top_p"),
                          (dict(num_samples=2, temperature=-1.0), "temperature")]:
        with pytest.raises(ValueError, match=match):
            generate.generate_responses(model, PROMPTS, tokenizer=tokenizer, **kwargs)
    has_vllm = importlib.util.find_spec("vllm") is not None
    assert generate.resolve_backend("auto") == ("vllm" if has_vllm and torch.cuda.is_available() else "hf")
    if not has_vllm:
        with pytest.raises(ValueError, match="vllm is not installed"):
            generate.resolve_backend("vllm")
    with pytest.raises(ValueError, match="backend"):
        generate.resolve_backend("tgi")


# ------------------------------------------------------------------ config


def small_config(tmp_path, **overrides):
    options = dict(output_dir=str(tmp_path / "run"), num_prompts=6, eval_prompts=4, eval_samples=2, num_samples=3,
                   max_new_tokens=8,
                   iterations=1, train_args="--max-steps 2 --plot false")
    options.update(overrides)
    return selfplay.SelfPlayConfig(**options)


def test_config_validation_names_the_option(tmp_path):
    with pytest.raises(ValueError, match="--num-samples"):
        small_config(tmp_path, num_samples=1).validate()
    with pytest.raises(ValueError, match="--method"):
        small_config(tmp_path, method="ppo").validate()
    with pytest.raises(ValueError, match="--sppo-mode pair"):
        small_config(tmp_path, loss="dpo").validate()
    with pytest.raises(ValueError, match="--method sppo"):
        small_config(tmp_path, method="inpo", loss="sppo").validate()
    with pytest.raises(ValueError, match="--tau is not used by --loss spce"):
        small_config(tmp_path, method="osp", tau=0.1).validate()
    with pytest.raises(ValueError, match="--tau must satisfy"):
        small_config(tmp_path, method="inpo", tau=2.0).validate()


@pytest.mark.parametrize("option", ["progress_bar", "disjoint_prompts"])
def test_on_off_options_parse_as_the_trainers(option, capsys):
    """--flag, --flag BOOL, --flag=BOOL and --no-flag, as the trainer's on/off options (one helper for both CLIs)."""
    from nash_fast.config import build_parser as trainer_parser

    name = "--" + option.replace("_", "-")
    for argv, value in [([name], True), ([name, "true"], True), ([f"{name}=yes"], True), ([name, "off"], False),
                        ([name, "0"], False), (["--no-" + name[2:]], False), ([name, "--no-" + name[2:]], False),
                        (["--no-" + name[2:], name, "on"], True), ([name, "--iterations", "3"], True)]:
        assert vars(selfplay.build_parser().parse_args(argv))[option] is value, argv
        if option == "progress_bar":  # the trainer has the same option
            trainer_argv = [a for a in argv if a not in ("--iterations", "3")]
            assert vars(trainer_parser().parse_args(trainer_argv))[option] is value, argv
    assert vars(selfplay.build_parser().parse_args([]))[option] is False
    for parser in (selfplay.build_parser(), trainer_parser()):
        with pytest.raises(SystemExit):
            parser.parse_args(["--progress-bar", "maybe"])
    assert "expected true or false, got 'maybe'" in capsys.readouterr().err


def test_duplicate_prompts_are_refused_naming_the_rows(tmp_path):
    """A repeated prompt would weigh twice in training and in the win rates (or be trained on and held out): the
    file is refused in one line naming the rows, strings and conversations alike (message key order aside)."""
    conversation = [{"role": "user", "content": "Hi"}]
    rows = ["a", "b", conversation, "a", "c", [{"content": "Hi", "role": "user"}], "b", "d"]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in rows))
    with pytest.raises(ValueError) as error:
        selfplay.load_prompts(small_config(tmp_path, prompts=str(path), eval_prompts=1))
    message = str(error.value)
    assert message.startswith(f"--prompts {path}: 3 duplicate prompts (row 3 repeats row 0, row 5 repeats row 2, "
                              "row 6 repeats row 1; rows count from 0); remove them")
    assert "\n" not in message
    many = tmp_path / "many.jsonl"
    many.write_text("".join(json.dumps({"prompt": "same"}) + "\n" for _ in range(8)))
    with pytest.raises(ValueError, match=r"7 duplicate prompts \(row 1 repeats row 0, .*, row 5 repeats row 0 and 2 more;"):
        selfplay.load_prompts(small_config(tmp_path, prompts=str(many), eval_prompts=1))
    shipped = [r["prompt"] for r in load_tiny_prompts()]
    assert len(shipped) == len(set(shipped)) == 168


def test_prompt_split(tmp_path):
    cfg = small_config(tmp_path, num_prompts=50, eval_prompts=20, disjoint_prompts=True)
    train, held_out = selfplay.load_prompts(cfg)
    # the shipped prompts are distinct, so none is both trained on and held out
    assert len(set(train)) == len(train) and len(held_out) == 20 and not set(train) & set(held_out)
    assert selfplay.iteration_prompts(cfg, train, 2) == train[50:100]
    assert len(train) < 200
    with pytest.raises(ValueError, match="iteration 4 needs prompts 150..199"):
        selfplay.iteration_prompts(cfg, train, 4)
    assert selfplay.iteration_prompts(small_config(tmp_path, num_prompts=50), train, 3) == train[:50]
    with pytest.raises(ValueError, match="row 1: column 'prompt'"):
        (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"prompt": ""}\n')
        selfplay.load_prompts(small_config(tmp_path, prompts=str(tmp_path / "bad.jsonl")))


def test_train_arguments_per_method(tmp_path):
    run = selfplay.Run(small_config(tmp_path, method="inpo"))
    args = selfplay.train_arguments(run, 2)
    flags = dict(zip(args[::2], args[1::2]))
    assert flags["--model"] == flags["--prev-model"] == str(run.root / "iter_1" / "train" / "final")  # pi_2
    assert flags["--ref-model"] == str(run.root / "policy_1")
    assert flags["--loss"] == "inpo" and float(flags["--tau"]) < float(flags["--eta"])
    assert "--prev-model" not in selfplay.train_arguments(run, 1)  # pi_1 = pi_ref
    run = selfplay.Run(small_config(tmp_path, method="sppo"))
    args = selfplay.train_arguments(run, 2)
    assert "--ref-model" not in args  # the reference is the initial model of the run: pi_t
    assert args[-4:] == ["--max-steps", "2", "--plot", "false"]  # --train-args come last and win
    run = selfplay.Run(small_config(tmp_path, method="osp"))
    flags = dict(zip(*[iter(selfplay.train_arguments(run, 2))] * 2))
    assert flags["--loss"] == "spce" and flags["--ref-model"] == str(run.root / "policy_1")


# ------------------------------------------------------------------ the loop: stages, crashes, resume


class Crash(RuntimeError):
    pass


def instrument(monkeypatch, crash_after=None):
    """Count the calls of every stage; `crash_after` = stage that crashes right after writing its artifact
    (before the manifest marks it done)."""
    calls = {}
    for stage in selfplay.STAGES:
        real = getattr(selfplay, f"stage_{stage}")

        def wrapped(run, t, *args, _real=real, _stage=stage):
            calls[(_stage, t)] = calls.get((_stage, t), 0) + 1
            result = _real(run, t, *args)
            if _stage == crash_after:
                raise Crash(_stage)
            return result

        monkeypatch.setattr(selfplay, f"stage_{stage}", wrapped)
    return calls


def test_resume_after_a_crash_in_each_stage(tmp_path, monkeypatch):
    cfg = small_config(tmp_path)
    previous = None
    for crashing in selfplay.STAGES:
        with monkeypatch.context() as patch:
            calls = instrument(patch, crash_after=crashing)
            with pytest.raises(Crash):
                selfplay.selfplay(cfg)
        # the rerun redoes only the stage that crashed last time (its artifact was never marked done),
        # then runs up to this round's crash; finished stages are skipped
        expected = {(crashing, 1): 1}
        if previous is not None:
            expected[(previous, 1)] = 1
        assert calls == expected, (crashing, calls)
        previous = crashing
    with monkeypatch.context() as patch:
        calls = instrument(patch)
        rows = selfplay.selfplay(cfg)
    assert calls == {("evaluate", 1): 1}
    manifest = json.loads((tmp_path / "run" / "iter_1" / "manifest.json").read_text())
    assert set(manifest["stages"]) == set(selfplay.STAGES)
    assert all(entry["done"] and entry["seconds"] >= 0 for entry in manifest["stages"].values())
    assert len(rows) == 1 and 0.0 <= rows[0]["win_rate_vs_previous"] <= 1.0
    assert rows[0]["win_rate_vs_previous"] == rows[0]["win_rate_vs_initial"]  # pi_t = pi_1 at t = 1

    # extend the run to a second iteration; its training crashes; the rerun trains and evaluates only
    cfg2 = small_config(tmp_path, iterations=2)
    with monkeypatch.context() as patch:
        calls = instrument(patch, crash_after="train")
        with pytest.raises(Crash):
            selfplay.selfplay(cfg2)
    assert calls == {("generate", 2): 1, ("judge", 2): 1, ("build", 2): 1, ("train", 2): 1}
    with monkeypatch.context() as patch:
        calls = instrument(patch)
        rows = selfplay.selfplay(cfg2)
    assert calls == {("train", 2): 1, ("evaluate", 2): 1}
    assert [r["iteration"] for r in rows] == [1, 2]

    # artifacts of every stage
    root = tmp_path / "run"
    responses = [json.loads(line) for line in (root / "iter_2" / "responses.jsonl").read_text().splitlines()]
    assert len(responses) == 6 and all(len(r["responses"]) == 3 for r in responses)
    counts = [c for r in responses for c in r["response_tokens"]]  # generated tokens, at most --max-new-tokens 8
    assert len(counts) == 18 and all(0 <= c <= 8 for c in counts)
    generated = json.loads((root / "iter_2" / "manifest.json").read_text())["stages"]["generate"]
    assert generated["mean_response_tokens"] == sum(counts) / len(counts)
    judgments = [json.loads(line) for line in (root / "iter_2" / "judgments.jsonl").read_text().splitlines()]
    assert all(len(j["comparisons"]) == 3 for j in judgments)  # SPPO: K (K - 1) / 2
    dataset = [json.loads(line) for line in (root / "iter_2" / "dataset.jsonl").read_text().splitlines()]
    assert dataset and all(len(r["responses"]) == 2 and r["winrates"][0] > r["winrates"][1] for r in dataset)
    assert (root / "iter_2" / "train" / "final" / "config.json").is_file()
    evaluation = [json.loads(line) for line in (root / "eval" / "policy_3.jsonl").read_text().splitlines()]
    assert len(evaluation) == 4 and all(len(r["responses"]) == 2 for r in evaluation)
    counts = [c for r in evaluation for c in r["response_tokens"]]
    assert rows[1]["mean_response_tokens"] == sum(counts) / len(counts) and all(0 <= c <= 8 for c in counts)
    assert json.loads((root / "report.json").read_text()) == rows
    # exact-answer accuracy of pi_3 on the held-out prompts (the shipped prompts carry answers), by task
    key = selfplay.answer_key(small_config(tmp_path))
    held_out = [r["prompt"] for r in evaluation]
    assert rows[1]["accuracy"] == selfplay.answer_accuracy(key, held_out, [r["responses"] for r in evaluation])
    assert set(rows[1]["accuracy"]) == {"all"} | {key[p][1] for p in held_out}
    ET.fromstring((root / "report.svg").read_text())  # well-formed plot
    assert "| 2 |" in (root / "report.md").read_text()

    # a rerun with different options in the same directory is refused
    with pytest.raises(ValueError, match="--method 'sppo' -> 'inpo'"):
        selfplay.selfplay(small_config(tmp_path, method="inpo"))


@pytest.mark.parametrize("method, judge", [("inpo", "offline"), ("pairs", "offline"), ("osp", "self")])
def test_inpo_and_osp_iterations(tmp_path, method, judge):
    (rows,) = selfplay.selfplay(small_config(tmp_path, method=method, judge=judge, num_samples=4))
    assert 0.0 <= rows["win_rate_vs_initial"] <= 1.0
    manifest = json.loads((tmp_path / "run" / "iter_1" / "manifest.json").read_text())
    # INPO's tournament: K // 2 + 2 (ceil(K / 2) - 1) + 1 = 5 comparisons at most; OSP: K + K // 2 = 6
    per_prompt = {"inpo": 5, "pairs": 2, "osp": 6}[method]
    assert manifest["stages"]["judge"]["judge_queries"] <= 6 * per_prompt
    dataset = [json.loads(line) for line in (tmp_path / "run" / "iter_1" / "dataset.jsonl").read_text().splitlines()]
    assert dataset and all({"chosen", "rejected", "preference"} <= set(r) for r in dataset)
    if method in ("osp", "pairs"):
        assert manifest["stages"]["judge"]["judge_queries"] == 6 * per_prompt
        assert len(dataset) + sum(manifest["stages"]["build"]["skipped"].values()) == 6 * 2  # K // 2 pairs
    assert "--loss" in manifest["stages"]["train"]["train_args"]


def test_judge_returning_nan_names_the_prompt(tmp_path, monkeypatch):
    (tmp_path / "nan_judge_mod.py").write_text(textwrap.dedent("""
        def judge(prompts, first, second):
            return [float("nan")] * len(prompts)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = small_config(tmp_path, judge="callable:nan_judge_mod:judge")
    with pytest.raises(ValueError, match="nan.*for prompt 'What is"):
        selfplay.selfplay(cfg)
    manifest = json.loads((tmp_path / "run" / "iter_1" / "manifest.json").read_text())
    assert list(manifest["stages"]) == ["generate"]  # generation is kept for the rerun


def test_embedded_default_runs_two_iterations(tmp_path):
    """The demo's speed is measured in docs/timings.md, not asserted here: a wall-clock bound on 2 shared cores
    fails at random (227 s against a 300 s bound was seen under load). The timeout only catches a hang."""
    start = time.time()
    result = subprocess.run([sys.executable, "-m", "nash_fast.selfplay", "--output-dir", str(tmp_path / "demo")],
                            capture_output=True, text=True, timeout=600)
    elapsed = time.time() - start
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert [r["iteration"] for r in rows] == [1, 2]
    assert all(0.0 <= r["win_rate_vs_initial"] <= 1.0 for r in rows)
    print(f"embedded self-play demo: {elapsed:.0f} s")


def test_report_figures_label_axes_with_units_and_name_every_line():
    import xml.etree.ElementTree as ET

    from nash_fast import plot

    rows = [{"iteration": t, "win_rate_vs_previous": 0.5 + 0.1 * t, "win_rate_vs_initial": 0.5 + 0.2 * t,
             "mean_response_tokens": 10.0 + t, "generated_response_tokens": 9.0 + t,
             "seconds": {s: float(t) for s in selfplay.STAGES}} for t in (1, 2)]
    svg = ET.fromstring(plot.svg_report(rows, selfplay.STAGES))  # what selfplay.write_report writes
    texts = [e.text for e in svg.iter("{http://www.w3.org/2000/svg}text")]
    for ylabel in ("P(pi_{t+1} wins) (0 to 1)", "tokens per response", "wall time (s)"):
        assert ylabel in texts
    assert texts.count("iteration") == 3
    for legend in ("vs pi_t", "vs pi_1", "- - 1/2: a tie", "pi_{t+1} held-out", "pi_t samples", *selfplay.STAGES):
        assert legend in texts, legend


def test_conversational_prompt_files(tmp_path):
    """TRL's conversational prompt-only rows ({"prompt": [messages]}, a system message included) go through
    generation (the chat template renders them), judging and training; the dataset is conversational."""
    from nash_fast.data import load_tiny_prompts
    from nash_fast.judges import OfflineJudge

    questions = list(dict.fromkeys(r["prompt"] for r in load_tiny_prompts()))[:10]
    conversations = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": q}] for q in questions]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": c}) + "\n" for c in conversations))
    cfg = small_config(tmp_path, prompts=str(path))
    train, held_out = selfplay.load_prompts(cfg)
    assert train + held_out == conversations  # order kept (repeats are refused: test_duplicate_prompts_...)
    (row,) = selfplay.selfplay(cfg)
    assert 0.0 <= row["win_rate_vs_initial"] <= 1.0
    root = tmp_path / "run" / "iter_1"
    dataset = [json.loads(line) for line in (root / "dataset.jsonl").read_text().splitlines()]
    assert dataset and all(r["prompt"] in conversations for r in dataset)
    assert all(r["responses"][k][0]["role"] == "assistant" for r in dataset for k in range(2))
    # the offline judge reads the conversation's question: the same judgment as for the plain prompt
    judge = OfflineJudge()
    assert judge.quality(conversations[0], "x") == judge.quality(questions[0], "x")

# ------------------------------------------------------------------ one run per directory, signals


def test_a_stop_request_ends_selfplay_at_a_stage_boundary(tmp_path, monkeypatch, sigterm_after_step):
    """SIGINT during judging: judging finishes and is marked done, nothing after it starts; SIGTERM during training:
    the trainer checkpoints after its step and the stage stays undone. Each rerun continues where it stopped."""
    import os
    import signal

    from nash_fast.interrupt import Interrupted

    cfg = small_config(tmp_path, train_args="--max-steps 3 --save-steps 100 --plot false")
    real_judge = selfplay.stage_judge

    def judge_then_ctrl_c(run, t):
        result = real_judge(run, t)
        os.kill(os.getpid(), signal.SIGINT)
        return result

    with monkeypatch.context() as patch:
        patch.setattr(selfplay, "stage_judge", judge_then_ctrl_c)
        with pytest.raises(Interrupted, match="stopped before iteration 1 build") as stopped:
            selfplay.selfplay(cfg)
    assert stopped.value.signal_name == "SIGINT"
    stages = json.loads((tmp_path / "run" / "iter_1" / "manifest.json").read_text())["stages"]
    assert set(stages) == {"generate", "judge"}

    with monkeypatch.context() as patch:
        sigterm_after_step(patch, 2)
        with pytest.raises(Interrupted, match="iteration 1 train stopped with a checkpoint"):
            selfplay.selfplay(cfg)
    assert (tmp_path / "run" / "iter_1" / "train" / "checkpoints" / "step-00000002" / "complete.json").is_file()
    assert "train" not in json.loads((tmp_path / "run" / "iter_1" / "manifest.json").read_text())["stages"]
    rows = selfplay.selfplay(cfg)
    assert len(rows) == 1 and rows[0]["win_rate_vs_previous"] is not None
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "iter_1" / "train" / "metrics.jsonl").open()]
    assert steps == [1, 2, 3]  # resumed at step 2, not restarted


def test_selfplay_owns_its_output_dir_and_cli_errors_are_one_line(tmp_path, capsys):
    from nash_fast.rundir import RunDirectoryLocked, RunLock

    cfg = small_config(tmp_path)
    with RunLock(tmp_path / "run"):
        with pytest.raises(RunDirectoryLocked, match="--output-dir .* is in use by another run: pid"):
            selfplay.selfplay(cfg)
        assert selfplay.main(["--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m nash_fast.selfplay: error: --output-dir") and err.count("\n") == 1
    for args, message in ((["--seed", str(2**40)], "--seed must be an integer"),
                          (["--eta", "1e20"], "--eta=1e+20: the sppo_pair loss is not finite in float32"),
                          (["--model", "./no/such/model"], "--model ./no/such/model: no such file or directory")):
        assert selfplay.main(["--output-dir", str(tmp_path / "other"), *args]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_a_run_written_before_an_option_existed_resumes_with_its_default(tmp_path):
    """selfplay_config.json from an older nash-fast lacks options added since (lora_iterations): the missing
    option had its default then, so the same command resumes; another value is still refused."""
    cfg = small_config(tmp_path)
    run = selfplay.Run(cfg)
    selfplay.check_stored_config(run)
    path = run.root / "selfplay_config.json"
    stored = json.loads(path.read_text())
    del stored["lora_iterations"]
    path.write_text(json.dumps(stored))
    selfplay.check_stored_config(selfplay.Run(small_config(tmp_path)))
    path.write_text(json.dumps(stored))
    other = "continue" if cfg.lora_iterations != "continue" else "fresh"
    with pytest.raises(ValueError, match="--lora-iterations"):
        selfplay.check_stored_config(selfplay.Run(small_config(tmp_path, lora_iterations=other)))


def test_exact_answer_accuracy_matches_whole_words_ignoring_case_and_punctuation():
    key = {"What is 19 + 74?": ("93", "arithmetic"), "Sort: b, a.": ("a b", "sort"), "Count 's'?": ("1", "count")}
    groups = [["The sum is 93.", "193", "It's 93!"], ["A, B", "b a"], ["none"]]
    accuracy = selfplay.answer_accuracy(key, list(key), groups)
    assert accuracy == {"all": 3 / 6, "arithmetic": 2 / 3, "count": 0.0, "sort": 1 / 2}
    assert selfplay.answer_accuracy(key, ["unknown prompt"], [["93"]]) is None
    assert selfplay.normalize_answer("Banana,  glass; MELON") == " banana glass melon "
