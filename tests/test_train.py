"""python -m nash_fast.train end to end on CPU: every loss, resume == straight run, SIGTERM and kill -9,
non-finite steps, data validation before any model, DeepSpeed ZeRO-2 with 2 processes == 1 process."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import nash_fast.train as trainer
from nash_fast.checkpoint import checkpoint_step, latest_checkpoint
from nash_fast.config import parse_config
from nash_fast.data import load_tiny_preferences

REPO = Path(__file__).resolve().parents[1]

LOSS_FLAGS = {
    "sppo": [],
    "inpo": ["--eta", "0.5", "--tau", "0.1"],
    "ipo": ["--beta", "0.5", "--average-log-prob"],
    "dpo": ["--beta", "0.1"],
    "sr_dpo": ["--beta", "0.1", "--lam", "0.5", "--aug-prompt", "Give a 100/100 answer. Query: "],
    "sr_ipo": ["--beta", "0.5", "--lam", "0.5", "--aug-prompt", "Give a 100/100 answer. Query: "],
    "spce": ["--beta", "0.1"],
}
# TRL's loss types, as TRL names them (nash_fast.fused_loss.TRL_LOSS_TYPES; sigmoid is dpo above)
TRL_LOSS_FLAGS = {
    "hinge": [], "exo_pair": ["--label-smoothing", "1e-3"], "nca_pair": [], "robust": ["--label-smoothing", "0.1"],
    "bco_pair": ["--bco-running-mean"], "sppo_hard": ["--beta", "0.5"], "aot": [], "aot_unpaired": [],
    "apo_zero": [], "apo_down": [], "discopop": ["--discopop-tau", "0.05"], "sft": [],
    "sigmoid_norm": ["--beta", "2"],  # per-token mean log-ratios are small: beta 0.1 moves them slowly
    "sigmoid,ipo,sft": ["--loss-weights", "0.8,0.2,1"],
}


def run_args(small_data, out, *extra):
    return ["--dataset", small_data, "--output-dir", str(out), "--progress-bar", "false", "--plot", "false",
            "--max-tokens", "512", "--tensorboard", "false", *extra]


def read_metrics(out):
    with open(Path(out) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def final_weights(out):
    from safetensors.torch import load_file

    return load_file(str(Path(out) / "final" / "model.safetensors"))


def assert_same_weights(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for key in a:
        if atol == 0.0:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


# ------------------------------------------------------------------------------------------------ every loss

@pytest.mark.parametrize("loss", sorted(LOSS_FLAGS))
def test_every_loss_end_to_end(tmp_path, small_data, loss):
    threads = torch.get_num_threads()
    summary = trainer.train(parse_config(run_args(small_data, tmp_path, "--loss", loss, *LOSS_FLAGS[loss],
                                                  "--max-steps", "3", "--save-steps", "2")))
    assert torch.get_num_threads() == threads  # the tiny run's single thread does not leak to the caller
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3] and summary["steps"] == 3
    for row in rows:
        assert not row["skipped"]
        for key in ("loss", "lr", "tokens", "tokens_per_s", "chosen_logratio", "rejected_logratio",
                    "reward_accuracy", "reward_margin", "grad_norm", "padding_fraction"):
            assert isinstance(row[key], (int, float)) and torch.isfinite(torch.tensor(float(row[key]))), (key, row)
        assert 0 <= row["reward_accuracy"] <= 1 and 0 <= row["padding_fraction"] < 1 and row["tokens"] > 0
    # Step 1 sees the reference itself: log-ratios are exactly what the policy and reference disagree on (0).
    assert rows[0]["chosen_logratio"] == pytest.approx(0.0, abs=1e-4)
    # The saved model loads with transformers and is the trained one (not the initial weights).
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    initial = trainer.load_model("tiny", parse_config([]), vocab_size=model.config.vocab_size,
                                 dtype=torch.float32, device=torch.device("cpu"))
    assert not torch.equal(model.lm_head.weight, initial.lm_head.weight)
    assert (tmp_path / "final" / "tokenizer.json").is_file()
    assert checkpoint_step(latest_checkpoint(tmp_path / "checkpoints")) == 3


def test_torch_compile_trains_like_eager(tmp_path, small_data):
    # --torch-compile compiles the decoder layers (once: they share one graph) and trains the same model.
    import torch._dynamo

    torch._dynamo.reset()
    eager = trainer.train(parse_config(run_args(small_data, tmp_path / "eager", "--max-steps", "2")))
    compiled = trainer.train(parse_config(run_args(small_data, tmp_path / "compiled", "--max-steps", "2",
                                                   "--torch-compile")))
    assert eager["steps"] == compiled["steps"] == 2
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # something was compiled
    # Step 1's loss is a forward of the same weights on the same batch: the compiled kernels only reorder
    # element-wise work (RMSNorm's mean over 64 channels: <= 64 * 2^-24 = 4e-6 relative per norm, 5 norms,
    # doubled by the squared loss: 4e-5); measured ~1e-7.
    first = [read_metrics(tmp_path / name)[0]["loss"] for name in ("eager", "compiled")]
    assert first[1] == pytest.approx(first[0], rel=1e-4)
    # The reference pass ran compiled too (compiled layers round differently from eager ones): step 1's policy is
    # the reference, so its log-ratios are ~0 as in the eager run.
    assert abs(read_metrics(tmp_path / "compiled")[0]["chosen_logratio"]) < 1e-4
    # The state dict keeps its keys (nn.Module.compile compiles in place, no _orig_mod prefix).
    assert final_weights(tmp_path / "eager").keys() == final_weights(tmp_path / "compiled").keys()


@pytest.mark.parametrize("flags,expected", [([], None), (["--logprob-filter-eps", "auto"], "auto"),
                                            (["--logprob-filter-eps", "1e-4", "--loss", "sigmoid,ipo"], 1e-4)])
def test_logprob_filter_eps_reaches_the_loss(flags, expected):
    assert trainer.build_loss_fn(parse_config(flags)).filter_eps == expected


def test_bf16_plain_path_reference_runs_like_the_policy(tmp_path, small_data, monkeypatch):
    # --bf16 without DeepSpeed trains an fp32 policy under bf16 autocast: the reference pass loads fp32 weights
    # and runs under the same autocast (a bf16-weight reference biased every step-1 log-ratio on SmolLM2).
    seen = []
    original = trainer.cached_sequence_logprobs  # nash_fast.precompute's, as the trainer calls it

    def spy(name, model_name, load_model, examples, **kwargs):
        def loading():
            model = load_model()
            seen.append((name, kwargs["autocast_dtype"], next(model.parameters()).dtype))
            return model
        return original(name, model_name, loading, examples, **kwargs)

    monkeypatch.setattr(trainer, "cached_sequence_logprobs", spy)
    trainer.train(parse_config(run_args(small_data, tmp_path, "--max-steps", "1", "--bf16")))
    assert seen == [("ref", torch.bfloat16, torch.float32)]
    # Policy = reference at step 1, computed alike: the log-ratios are the packing's rounding noise only.
    assert abs(read_metrics(tmp_path)[0]["chosen_logratio"]) < 0.05


@pytest.mark.parametrize("flags", [["--zero-stage", "2"], ["--gradient-checkpointing"]])
def test_torch_compile_refuses_what_it_cannot_do(flags):
    with pytest.raises(ValueError, match="--torch-compile"):
        parse_config(["--torch-compile", *flags])


@pytest.mark.parametrize("loss", sorted(LOSS_FLAGS) + sorted(TRL_LOSS_FLAGS))
def test_loss_goes_down_on_a_fixed_batch(small_data, loss):
    from nash_fast.precompute import attach_logprobs, dataset_sequence_logprobs

    cfg = parse_config(["--dataset", small_data, "--loss", loss, *{**LOSS_FLAGS, **TRL_LOSS_FLAGS}[loss]])
    tokenizer = trainer.load_tokenizer(cfg)
    examples = trainer.tokenize(cfg, tokenizer, trainer.load_records(cfg))[:4]
    plan = trainer.LossPlan.for_config(cfg, examples)
    cpu = torch.device("cpu")
    reference = trainer.load_model("tiny", cfg, vocab_size=len(tokenizer), dtype=torch.float32, device=cpu)
    logps = dataset_sequence_logprobs(reference, examples, augment=plan.augment, average=cfg.average_log_prob)
    attach_logprobs(examples, logps, "ref_logps", augment=plan.augment)
    if loss == "inpo":  # a previous iterate that differs from the reference
        from nash_fast.tiny import build_tiny_model

        other = build_tiny_model(len(tokenizer), seed=7)
        attach_logprobs(examples, dataset_sequence_logprobs(other, examples), "prev_logps", augment=False)
    batch = plan.collator()(examples)
    policy = trainer.load_model("tiny", cfg, vocab_size=len(tokenizer), dtype=torch.float32, device=cpu).train()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    loss_fn = trainer.build_loss_fn(cfg)
    values = []
    for _ in range(8):
        optimizer.zero_grad()
        value, _ = trainer.micro_batch_loss(policy, batch, loss_fn, plan, backward=lambda l: l.backward())
        values.append(value.item())
        optimizer.step()
    assert all(map(lambda v: torch.isfinite(torch.tensor(v)), values))
    assert values[-1] < 0.95 * values[0], values


@pytest.mark.parametrize("grad_accum", [1, 3])
def test_metrics_epoch_is_the_epoch_the_step_trains_on(tmp_path, small_data, grad_accum):
    """metrics.jsonl's epoch of step s is the epoch of its first micro-batch: a 2-epoch run shows epochs 0 and 1
    only (the last step may run past the end of epoch 1: steps are whole), and with one micro-batch per step
    epoch e holds exactly as many steps as epoch e has token-budget batches."""
    from nash_fast.data import TokenBudgetBatchSampler, example_sequence_lengths

    cfg = parse_config(run_args(small_data, tmp_path, "--num-epochs", "2", "--grad-accum", str(grad_accum),
                                "--save-steps", "0"))
    trainer.train(cfg)
    epochs = [r["epoch"] for r in read_metrics(tmp_path)]
    examples = trainer.tokenize(cfg, trainer.load_tokenizer(cfg), trainer.load_records(cfg))
    lengths = [example_sequence_lengths(e, i) for i, e in enumerate(examples)]
    stream = trainer.BatchStream(TokenBudgetBatchSampler(lengths, cfg.max_tokens, shuffle=True, seed=cfg.seed))
    batches = [len(stream.epoch_batches(e)) for e in (0, 1)]
    assert len(epochs) == -(-sum(batches) // grad_accum) and sorted(set(epochs)) == [0, 1]
    assert epochs == [stream.locate(grad_accum * s)[0] for s in range(len(epochs))]
    if grad_accum == 1:
        assert epochs == [0] * batches[0] + [1] * batches[1]


# ------------------------------------------------------------------------------------------------ resume

def test_resume_equals_straight_run_and_sigterm_saves(tmp_path, small_data, monkeypatch, sigterm_after_step):
    """6 steps straight == 3 steps stopped by SIGTERM (checkpoint, clean exit) + rerun of the same command."""
    args = ["--max-steps", "6", "--save-steps", "100", "--seed", "3", "--lr", "3e-3"]
    straight = tmp_path / "straight"
    trainer.train(parse_config(run_args(small_data, straight, *args)))

    interrupted = tmp_path / "interrupted"
    sigterm_after_step(monkeypatch, 3)  # delivered to our handler: checkpoint, then exit the loop
    summary = trainer.train(parse_config(run_args(small_data, interrupted, *args)))
    monkeypatch.undo()
    assert summary["stopped_by_signal"] and summary["steps"] == 3
    assert checkpoint_step(latest_checkpoint(interrupted / "checkpoints")) == 3
    assert not (interrupted / "final").exists()

    # Same command again: the output dir holds a checkpoint, so it continues from step 3.
    trainer.train(parse_config(run_args(small_data, interrupted, *args)))
    assert_same_weights(final_weights(straight), final_weights(interrupted))
    timing = ("tokens_per_s", "step_time_s")
    assert [{k: v for k, v in r.items() if k not in timing} for r in read_metrics(interrupted)] == [
        {k: v for k, v in r.items() if k not in timing} for r in read_metrics(straight)]

    # --resume PATH from the step-3 checkpoint of a copy, and --resume never starting over, agree too.
    copy = tmp_path / "copy"
    shutil.copytree(interrupted / "checkpoints", copy / "saved")
    trainer.train(parse_config(run_args(small_data, copy, *args, "--resume", str(copy / "saved" / "step-00000003"))))
    assert_same_weights(final_weights(straight), final_weights(copy))
    trainer.train(parse_config(run_args(small_data, copy, *args, "--resume", "never")))
    assert_same_weights(final_weights(straight), final_weights(copy))
    with pytest.raises(ValueError, match="--resume"):
        trainer.train(parse_config(run_args(small_data, tmp_path / "empty", *args, "--resume", "latest")))
    # Resuming an output dir that holds another run's checkpoint (different loss) is refused, not mixed.
    with pytest.raises(ValueError, match=r"different run \(--beta None -> 0.1, --loss 'sppo' -> 'dpo'\)"):
        trainer.train(parse_config(run_args(small_data, copy, *args, "--loss", "dpo", "--beta", "0.1")))


def test_trl_loss_list_with_running_state_resumes_bitwise(tmp_path, small_data, monkeypatch, sigterm_after_step):
    """TRL's loss_type list with loss_weights (MPO's sigmoid + bco_pair + sft) and bco_pair's running mean of rewards
    (TRL 0.x's RunningMoments), spelled as TRL's YAML would (loss_type / loss_weights lists): 6 steps straight ==
    3 steps stopped by SIGTERM + the same command again, bitwise, because the running mean is saved in the
    checkpoint (trainer_state.json) and restored; a checkpoint whose loss state is missing is damaged."""
    config = tmp_path / "run.yaml"
    config.write_text("loss_type: [sigmoid, bco_pair, sft]\nloss_weights: [0.8, 2e-1, 1]\nbco_running_mean: true\n"
                      "beta: 5e-1\n")
    args = ["--config", str(config), "--max-steps", "6", "--save-steps", "100", "--seed", "3", "--lr", "3e-3"]
    straight = tmp_path / "straight"
    trainer.train(parse_config(run_args(small_data, straight, *args)))

    interrupted = tmp_path / "interrupted"
    sigterm_after_step(monkeypatch, 3)
    summary = trainer.train(parse_config(run_args(small_data, interrupted, *args)))
    monkeypatch.undo()
    assert summary["stopped_by_signal"] and summary["steps"] == 3
    saved = json.loads((latest_checkpoint(interrupted / "checkpoints") / "trainer_state.json").read_text())
    moments = saved["loss_state"]["bco_running_moments"]
    assert moments["count"] == pytest.approx(3.0) and moments["mean"] != 0.0  # one merge per micro-batch
    trainer.train(parse_config(run_args(small_data, interrupted, *args)))
    assert_same_weights(final_weights(straight), final_weights(interrupted))
    timing = ("tokens_per_s", "step_time_s")
    assert [{k: v for k, v in r.items() if k not in timing} for r in read_metrics(interrupted)] == [
        {k: v for k, v in r.items() if k not in timing} for r in read_metrics(straight)]

    # Without the saved running mean the resumed steps would differ: a checkpoint without it is not this run's.
    from nash_fast.checkpoint import MANIFEST
    from nash_fast.rundir import sha256_file

    broken = tmp_path / "broken"
    shutil.copytree(interrupted / "checkpoints" / "step-00000003", broken / "checkpoints" / "step-00000003")
    state_file = broken / "checkpoints" / "step-00000003" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["loss_state"]
    state_file.write_text(json.dumps(state))
    manifest = json.loads((state_file.parent / MANIFEST).read_text())
    manifest["files"]["trainer_state.json"] = {"bytes": state_file.stat().st_size, "sha256": sha256_file(state_file)}
    (state_file.parent / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(Exception, match="loss state"):
        trainer.train(parse_config(run_args(small_data, broken, *args, "--resume", str(state_file.parent))))


KILLED_RUN = textwrap.dedent(
    """
    import sys
    from nash_fast.train import main
    sys.exit(main(sys.argv[1:]))
    """
)


def test_kill_9_mid_run_then_resume_equals_straight_run(tmp_path, small_data):
    """SIGKILL a subprocess that checkpoints every step, at some moment mid-run; the newest complete checkpoint
    loads and resuming reaches bitwise the weights of an uninterrupted run."""
    args = ["--max-steps", "16", "--save-steps", "1", "--save-total-limit", "2", "--seed", "5"]
    straight = tmp_path / "straight"
    trainer.train(parse_config(run_args(small_data, straight, *args)))

    killed = tmp_path / "killed"
    script = tmp_path / "run.py"
    script.write_text(KILLED_RUN)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    process = subprocess.Popen([sys.executable, str(script), *run_args(small_data, killed, *args)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    metrics = killed / "metrics.jsonl"
    while time.time() < deadline and process.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 4:
            break
        time.sleep(0.02)
    assert process.poll() is None, "the run finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    latest = latest_checkpoint(killed / "checkpoints")
    assert latest is not None and 1 <= checkpoint_step(latest) < 16
    trainer.train(parse_config(run_args(small_data, killed, *args)))
    assert_same_weights(final_weights(straight), final_weights(killed))
    assert [r["step"] for r in read_metrics(killed)] == list(range(1, 17))


# ------------------------------------------------------------------------------------------------ faults

def test_non_finite_loss_skips_the_step_then_stops_after_n_in_a_row(tmp_path, small_data, monkeypatch):
    real = trainer.build_loss_fn
    poisoned_calls = set()

    def poisoned_loss_fn(cfg):
        loss_fn = real(cfg)
        calls = [0]

        def wrapped(*args, **kwargs):
            calls[0] += 1
            loss, metrics = loss_fn(*args, **kwargs)
            if calls[0] in poisoned_calls:
                loss = loss * float("nan")
            return loss, metrics

        wrapped.softcap = None
        return wrapped

    monkeypatch.setattr(trainer, "build_loss_fn", poisoned_loss_fn)
    poisoned_calls.update({2})
    trainer.train(parse_config(run_args(small_data, tmp_path / "one", "--max-steps", "4", "--warmup-steps", "0",
                                        "--lr-scheduler", "linear")))
    rows = read_metrics(tmp_path / "one")
    assert [r["skipped"] for r in rows] == [False, True, False, False]
    assert rows[1]["skip_reason"] == "non-finite loss" and rows[1]["loss"] is None
    assert rows[2]["lr"] == rows[1]["lr"]  # the schedule did not advance on the skipped step
    for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines():  # strict JSON: no NaN tokens
        json.loads(line, parse_constant=lambda name: pytest.fail(f"non-JSON constant {name}"))
    weights = final_weights(tmp_path / "one")
    assert all(torch.isfinite(w).all() for w in weights.values())

    poisoned_calls.clear()
    poisoned_calls.update(range(1, 100))
    with pytest.raises(RuntimeError, match="3 optimizer steps in a row"):
        trainer.train(parse_config(run_args(small_data, tmp_path / "many", "--max-steps", "10",
                                            "--max-consecutive-bad-steps", "3")))
    assert [r["skipped"] for r in read_metrics(tmp_path / "many")] == [True, True, True]


# ------------------------------------------------------------------------------------------------ data

def test_schema_errors_name_row_and_column_before_any_model_loads(tmp_path, monkeypatch):
    def no_models(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded before the data was validated")

    monkeypatch.setattr(trainer, "load_model", no_models)
    monkeypatch.setattr(trainer, "load_tokenizer", no_models)
    rows = [{"question": "q", "good": "a", "bad": "b", "p": 0.7}] * 3
    rows = rows[:2] + [{"question": "q", "good": "a", "p": 0.7}]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    mapping = "prompt=question,chosen=good,rejected=bad,preference=p"
    with pytest.raises(ValueError, match=r"row 2: missing column 'bad' \(field 'rejected'\)"):
        trainer.train(parse_config(["--dataset", str(path), "--columns", mapping, "--output-dir", str(tmp_path / "o")]))
    rows[2] = {"question": "q", "good": "a", "bad": "b", "p": 1.7}
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"row 2: column 'p' \(field 'preference'\) must be a probability"):
        trainer.train(parse_config(["--dataset", str(path), "--columns", mapping, "--output-dir", str(tmp_path / "o")]))
    with pytest.raises(ValueError, match=r"row 0: missing column 'preference'.*--default-preference"):
        trainer.train(parse_config(["--dataset", str(path), "--columns", "prompt=question,chosen=good,rejected=bad",
                                    "--output-dir", str(tmp_path / "o")]))
    with pytest.raises(ValueError, match=r"row 0: column 'question' \(field 'prompt'\) must be a non-empty string"):
        trainer.validate_records([{"question": 3, "good": "a", "bad": "b"}], parse_config(
            ["--loss", "dpo", "--columns", "prompt=question,chosen=good,rejected=bad"]))
    with pytest.raises(ValueError, match="unsupported file type"):
        trainer.load_rows(parse_config(["--dataset", str(Path(__file__))]))


def test_column_mapping_parquet_and_default_preference(tmp_path, small_data):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = load_tiny_preferences()[:12]
    table = pa.Table.from_pylist([{"q": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in records])
    pq.write_table(table, tmp_path / "data.parquet")
    cfg = parse_config(run_args(str(tmp_path / "data.parquet"), tmp_path / "out", "--columns", "prompt=q,chosen=good,rejected=bad",
                                "--default-preference", "1.0", "--max-steps", "2"))
    validated = trainer.load_records(cfg)
    assert validated[3]["prompt"] == records[3]["prompt"] and validated[3]["preference"] == 1.0
    assert "q" not in validated[3]
    trainer.train(cfg)
    assert len(read_metrics(tmp_path / "out")) == 2


# ------------------------------------------------------------------------------------------------ data formats

SYSTEM = {"role": "system", "content": "Answer in one line."}
EARLIER = [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": "Hi."}]  # a multi-turn prompt


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _forms(records):
    """The same pairs written in TRL's four ways (and SPPO groups in two)."""
    user = lambda r: [SYSTEM, *EARLIER, {"role": "user", "content": r["prompt"]}]  # noqa: E731
    turn = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    standard = [dict(prompt=r["prompt"], chosen=" A: " + r["chosen"], rejected=" B: " + r["rejected"],
                     preference=r["preference"]) for r in records]
    return {
        "standard_explicit": standard,
        "standard_implicit": [dict(chosen=r["prompt"] + r["chosen"], rejected=r["prompt"] + r["rejected"],
                                   preference=r["preference"]) for r in standard],
        "conversational_explicit": [dict(prompt=user(r), chosen=turn(r["chosen"]), rejected=turn(r["rejected"]),
                                         preference=r["preference"]) for r in records],
        "conversational_implicit": [dict(chosen=user(r) + turn(r["chosen"]), rejected=user(r) + turn(r["rejected"]),
                                         preference=r["preference"]) for r in records],
        "groups_explicit": [dict(prompt=user(r), responses=[turn(r["chosen"]), turn(r["rejected"])],
                                 winrates=[r["chosen_winrate"], r["rejected_winrate"]]) for r in records],
        "groups_implicit": [dict(responses=[user(r) + turn(r["chosen"]), user(r) + turn(r["rejected"])],
                                 winrates=[r["chosen_winrate"], r["rejected_winrate"]]) for r in records],
    }


@pytest.mark.parametrize("style", ["standard", "conversational", "groups"])
def test_explicit_and_implicit_prompts_train_to_identical_losses(tmp_path, style):
    """TRL's formats: the same data with the prompt explicit and implicit (the shared start of chosen and
    rejected, TRL's extract_prompt), with a system message and a multi-turn prompt when conversational, trains
    to identical losses (the records tokenize identically)."""
    forms = _forms(load_tiny_preferences()[:8])
    runs = {}
    for prompt in ("explicit", "implicit"):
        name = f"{style}_{prompt}"
        trainer.train(parse_config(run_args(_write(tmp_path / f"{name}.jsonl", forms[name]), tmp_path / name,
                                            "--max-steps", "2", "--save-steps", "0")))
        runs[prompt] = read_metrics(tmp_path / name)
    keys = ("loss", "logratio") if style == "groups" else ("loss", "chosen_logratio", "rejected_logratio", "reward_margin")
    for a, b in zip(runs["explicit"], runs["implicit"], strict=True):
        assert [a[k] for k in keys + ("tokens",)] == [b[k] for k in keys + ("tokens",)]
        assert all(isinstance(a[k], float) for k in keys)


def test_conversational_data_needs_a_chat_template_named_in_the_error(tmp_path, monkeypatch):
    """A tokenizer without a chat template refuses conversational data (naming --chat-template) before any model
    loads; --chat-template FILE gives it one, and the saved tokenizer keeps it."""
    from nash_fast.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    template = tokenizer.chat_template
    tokenizer.chat_template = None
    tokenizer.save_pretrained(tmp_path / "bare")
    (tmp_path / "template.jinja").write_text(template)
    data = _write(tmp_path / "conv.jsonl", _forms(load_tiny_preferences()[:4])["conversational_implicit"])
    real_load_model = trainer.load_model

    def no_models(*args, **kwargs):
        raise AssertionError("a model was loaded before the data was checked")

    monkeypatch.setattr(trainer, "load_model", no_models)
    with pytest.raises(ValueError, match=r"--dataset .*: row 0: a conversational record .*needs a chat template.*"
                                         r"--chat-template"):
        trainer.train(parse_config(run_args(data, tmp_path / "a", "--tokenizer", str(tmp_path / "bare"))))
    with pytest.raises(ValueError, match=r"row 0: a conversational record .*--chat-template off"):
        trainer.train(parse_config(run_args(data, tmp_path / "b", "--chat-template", "off")))
    with pytest.raises(ValueError, match=r"--dataset .*: row 1: field 'prompt' is a list of messages but chosen and "
                                         r"rejected are strings.*accepted formats"):
        rows = _forms(load_tiny_preferences()[:2])["conversational_explicit"]
        rows[1] = dict(rows[1], chosen="text", rejected="other")
        trainer.train(parse_config(run_args(_write(tmp_path / "mixed.jsonl", rows), tmp_path / "c")))
    monkeypatch.setattr(trainer, "load_model", real_load_model)
    trainer.train(parse_config(run_args(data, tmp_path / "d", "--tokenizer", str(tmp_path / "bare"), "--max-steps", "1",
                                        "--chat-template", str(tmp_path / "template.jinja"))))
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path / "d" / "final").chat_template == template


# ------------------------------------------------------------------------------------------------ DeepSpeed

DS_WORKER = textwrap.dedent(
    """
    import os, sys
    import torch.multiprocessing as mp

    def worker(rank, world, port, argv):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
        import nash_fast.train as trainer
        poison = int(os.environ.get("POISON_LOSS_CALL", "0"))
        if poison:  # the loss of this micro-batch call becomes NaN on the last rank
            real = trainer.build_loss_fn

            def poisoned(cfg):
                loss_fn, calls = real(cfg), [0]

                def wrapped(*args, **kwargs):
                    calls[0] += 1
                    loss, metrics = loss_fn(*args, **kwargs)
                    return (loss * float("nan") if calls[0] == poison and rank == world - 1 else loss), metrics

                wrapped.softcap = None
                return wrapped

            trainer.build_loss_fn = poisoned
        status = trainer.main(argv)  # the CLI returns its exit status (errors are one line, not exceptions)
        if status:
            sys.exit(status)

    if __name__ == "__main__":
        world, port = int(sys.argv[1]), int(sys.argv[2])
        mp.spawn(worker, args=(world, port, sys.argv[3:]), nprocs=world)
    """
)


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_deepspeed(tmp_path, world, argv, **env_extra):
    script = tmp_path / "ds_worker.py"
    script.write_text(DS_WORKER)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **env_extra}
    result = subprocess.run([sys.executable, str(script), str(world), str(_free_port()), *argv],
                            env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]


def test_deepspeed_zero2_two_processes_equal_one_process(tmp_path, small_data):
    """Same global batch (2 micro-batches per step): 2 gloo processes x grad_accum 1 == 1 process x grad_accum 2,
    and both match the plain (non-DeepSpeed) path within float32 rounding."""
    common = ["--zero-stage", "2", "--max-steps", "3", "--save-steps", "2"]
    for world, accum, name in ((2, "1", "two"), (1, "2", "one")):
        run_deepspeed(tmp_path, world, run_args(small_data, tmp_path / name, *common, "--grad-accum", accum))
    two, one = read_metrics(tmp_path / "two"), read_metrics(tmp_path / "one")
    # Step 1 starts from the same weights: the same loss up to float32 rounding. Later steps differ only by
    # the order of the gradient sum (all-reduce over 2 processes vs accumulation in one).
    assert two[0]["loss"] == pytest.approx(one[0]["loss"], rel=1e-7)
    for a, b in zip(two, one):
        assert a["tokens"] == b["tokens"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    assert len(two) == len(one) == 3
    assert_same_weights(final_weights(tmp_path / "two"), final_weights(tmp_path / "one"), atol=1e-5)
    assert (latest_checkpoint(tmp_path / "two" / "checkpoints") / "engine").is_dir()

    # 2 processes resumed from the step-2 DeepSpeed checkpoint (model, partitioned optimizer states, schedule,
    # data position) reach the same weights as the uninterrupted 2-process run.
    shutil.copytree(tmp_path / "two" / "checkpoints" / "step-00000002", tmp_path / "resumed" / "checkpoints" / "step-00000002")
    run_deepspeed(tmp_path, 2, run_args(small_data, tmp_path / "resumed", *common, "--grad-accum", "1"))
    assert_same_weights(final_weights(tmp_path / "two"), final_weights(tmp_path / "resumed"))
    # The log is rebuilt from the checkpoint's own copy: steps 1-2 as the run that wrote it logged them, then 3.
    resumed = read_metrics(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == [1, 2, 3] and resumed[:2] == read_metrics(tmp_path / "two")[:2]

    trainer.train(parse_config(run_args(small_data, tmp_path / "plain", "--max-steps", "3", "--grad-accum", "2")))
    plain = read_metrics(tmp_path / "plain")
    for a, b in zip(plain, one):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert_same_weights(final_weights(tmp_path / "plain"), final_weights(tmp_path / "one"), atol=1e-5)


def test_deepspeed_in_a_plain_process_is_a_world_of_one(tmp_path, small_data):
    """`python -m nash_fast.train --zero-stage 2` with no launcher: no MPI discovery (mpi4py is made unimportable
    here, so discovery would fail), a one-process group set up in-process; a second run in the same process
    reuses it."""
    script = textwrap.dedent(
        """
        import sys
        sys.modules["mpi4py"] = None  # any MPI discovery fails loudly
        import torch
        from nash_fast.train import main
        for out in sys.argv[2:]:
            main(["--dataset", sys.argv[1], "--output-dir", out, "--zero-stage", "2", "--max-steps", "2",
                  "--progress-bar", "false", "--plot", "false", "--tensorboard", "false", "--max-tokens", "512"])
        assert torch.distributed.get_world_size() == 1 and torch.distributed.get_rank() == 0
        """
    )
    from nash_fast.distributed import _LAUNCHER_VARIABLES

    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARIABLES + ("MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")
    result = subprocess.run([sys.executable, "-c", script, small_data, str(tmp_path / "a"), str(tmp_path / "b")],
                            env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    for out in ("a", "b"):
        rows = read_metrics(tmp_path / out)
        assert [r["step"] for r in rows] == [1, 2] and not any(r["skipped"] for r in rows)
        assert (tmp_path / out / "checkpoints" / "step-00000002" / "engine").is_dir()  # the DeepSpeed engine ran
    assert read_metrics(tmp_path / "a") == [dict(r, tokens_per_s=a["tokens_per_s"], step_time_s=a["step_time_s"])
                                            for r, a in zip(read_metrics(tmp_path / "b"), read_metrics(tmp_path / "a"))]


def test_deepspeed_config_from_flags_and_file(tmp_path):
    built = trainer.deepspeed_config(parse_config(["--zero-stage", "3", "--offload-optimizer", "--offload-param",
                                                   "--grad-accum", "4", "--bf16"]), world_size=8)
    assert built["train_batch_size"] == 32 and built["gradient_accumulation_steps"] == 4
    assert built["zero_optimization"]["stage"] == 3 and built["bf16"]["enabled"]
    assert built["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": "auto", "gradient_accumulation_steps": "auto",
                                "zero_optimization": {"stage": 2}, "bf16": {"enabled": "auto"}}))
    filled = trainer.deepspeed_config(parse_config(["--deepspeed", str(path), "--grad-accum", "2"]), world_size=4)
    assert filled["train_batch_size"] == 8 and filled["train_micro_batch_size_per_gpu"] == 1
    assert filled["bf16"]["enabled"] is False
    path.write_text(json.dumps({"gradient_accumulation_steps": 3}))
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        trainer.deepspeed_config(parse_config(["--deepspeed", str(path)]), world_size=1)


def test_lr_schedule():
    factors = [trainer.lr_factor(s, total_steps=10, warmup_steps=2, schedule="linear") for s in range(10)]
    assert factors[:3] == pytest.approx([1 / 3, 2 / 3, 1.0]) and factors[-1] == pytest.approx(1 / 8)
    assert all(a >= b for a, b in zip(factors[2:], factors[3:]))
    cosine = [trainer.lr_factor(s, total_steps=10, warmup_steps=0, schedule="cosine") for s in range(11)]
    assert cosine[0] == 1.0 and cosine[5] == pytest.approx(0.5) and cosine[10] == pytest.approx(0.0, abs=1e-12)


# ------------------------------------------------------------------------------------------------ plots

def _write_metrics(out):
    out.mkdir(parents=True, exist_ok=True)
    rows = [{"step": s, "loss": 10.0 / s, "chosen_logratio": 0.1 * s, "rejected_logratio": -0.1 * s, "lr": 1e-3,
             "grad_norm": None if s == 3 else 1.0, "tokens_per_s": 100.0, "skipped": s == 3} for s in range(1, 8)]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 8, "lo')  # torn line


def test_plot_without_matplotlib_says_so(tmp_path, monkeypatch, capsys):
    from nash_fast import plot

    _write_metrics(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert plot.main([str(tmp_path)]) == 1
    assert "matplotlib is not installed" in capsys.readouterr().err
    assert not (tmp_path / "plots").exists()
    assert plot.main([str(tmp_path / "nothing-here")]) == 1
    assert "metrics.jsonl does not exist" in capsys.readouterr().err


def test_plot_writes_pngs(tmp_path):
    pytest.importorskip("matplotlib", reason="optional extra nash-fast[plot]")
    from nash_fast import plot

    _write_metrics(tmp_path)
    assert plot.main([str(tmp_path)]) == 0
    names = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert names == sorted(["loss.png", "logratios.png", "lr.png", "grad_norm.png", "tokens_per_s.png"])
    for name in names:
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot.smooth([1.0, 1.0, 1.0]) == pytest.approx([1.0, 1.0, 1.0])


def test_example_over_token_budget_names_option_and_row(tmp_path, small_data):
    with pytest.raises(ValueError, match=r"--max-tokens 64: row \d+: its 2 sequences hold \d+ tokens"):
        trainer.train(parse_config(["--dataset", small_data, "--output-dir", str(tmp_path), "--max-tokens", "64"]))


def test_deepspeed_non_finite_loss_on_one_rank_skips_the_step_everywhere(tmp_path, small_data):
    """Rank 1's second micro-batch gives NaN: both ranks skip that optimizer step (ZeRO-2's overflow check sees
    the non-finite gradient), the schedule holds, and training continues with finite weights."""
    run_deepspeed(tmp_path, 2, run_args(small_data, tmp_path / "out", "--zero-stage", "2", "--max-steps", "3",
                                        "--warmup-steps", "0"), POISON_LOSS_CALL="2")
    rows = read_metrics(tmp_path / "out")
    assert [r["skipped"] for r in rows] == [False, True, False]
    assert rows[1]["skip_reason"] == "non-finite loss" and rows[2]["lr"] == rows[1]["lr"]
    assert rows[1]["grad_norm"] is None and rows[0]["grad_norm"] > 0
    assert all(torch.isfinite(w).all() for w in final_weights(tmp_path / "out").values())


def test_sppo_all_responses_groups(tmp_path):
    """K-response records (SPPO eq. 4.7 with every sampled response and its win rate) train with --loss sppo;
    other losses refuse them by name."""
    records = load_tiny_preferences()[:10]
    path = tmp_path / "groups.jsonl"
    path.write_text("".join(json.dumps({"prompt": r["prompt"], "responses": [r["chosen"], r["rejected"], r["chosen"] + " Done."],
                                        "winrates": [r["chosen_winrate"], r["rejected_winrate"], 0.5]}) + "\n" for r in records))
    trainer.train(parse_config(run_args(str(path), tmp_path / "out", "--max-steps", "2")))
    rows = read_metrics(tmp_path / "out")
    assert len(rows) == 2 and rows[0]["logratio"] == pytest.approx(0.0, abs=1e-4)
    assert all(torch.isfinite(torch.tensor([r["loss"], r["logratio"], r["grad_norm"]])).all() for r in rows)
    with pytest.raises(ValueError, match="only --loss sppo"):
        trainer.load_records(parse_config(["--dataset", str(path), "--loss", "dpo"]))
    bad = path.read_text().splitlines()
    bad[4] = json.dumps({"prompt": "p", "responses": ["a", "b"], "winrates": [0.5]})
    path.write_text("\n".join(bad) + "\n")
    with pytest.raises(ValueError, match=r"row 4: column 'winrates' must list one win rate per response"):
        trainer.load_records(parse_config(["--dataset", str(path)]))


def test_embedded_default_without_arguments(tmp_path):
    """`python -m nash_fast.train` with no arguments: tiny model, shipped data, SPPO, CPU; the loss falls and
    the printout says where metrics, plots and the model are."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), "CUDA_VISIBLE_DEVICES": ""}
    start = time.time()
    result = subprocess.run([sys.executable, "-m", "nash_fast.train"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=600)
    elapsed = time.time() - start
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "outputs" / "train"
    for line in ("metrics: outputs/train/metrics.jsonl", "plots:", "model:   outputs/train/final"):
        assert line in result.stdout, result.stdout[-2000:]
    rows = read_metrics(out)
    assert rows[-1]["step"] == len(rows) > 100 and not any(r["skipped"] for r in rows)
    tenth = len(rows) // 10
    first = sum(r["loss"] for r in rows[:tenth]) / tenth
    last = sum(r["loss"] for r in rows[-tenth:]) / tenth
    assert last < first / 3, (first, last)
    assert sum(r["reward_accuracy"] for r in rows[-tenth:]) / tenth > 0.9
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(out / "final")
    AutoTokenizer.from_pretrained(out / "final")
    print(f"embedded default run: {elapsed:.0f} s")


def test_deepspeed_zero3_single_process_matches_plain_path(tmp_path, small_data):
    """ZeRO-3 partitions every weight; the LM head is gathered around the fused loss and its backward, and the
    backbone runs through the engine so gradient accumulation accumulates: same run as without DeepSpeed."""
    args = ["--max-steps", "3", "--grad-accum", "2"]
    run_deepspeed(tmp_path, 1, run_args(small_data, tmp_path / "zero3", *args, "--zero-stage", "3"))
    trainer.train(parse_config(run_args(small_data, tmp_path / "plain", *args)))
    for a, b in zip(read_metrics(tmp_path / "zero3"), read_metrics(tmp_path / "plain"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    # Per tensor, the two runs' weight updates agree to 1e-3 in norm. Not elementwise: AdamW divides by
    # sqrt(v), so an element whose gradient is ~0 turns fp32 reduction-order noise into a visible step
    # (measured: 1 of 8192 elements of a layer-0 MLP matrix 2e-5 apart, updates up to 2e-3, while the
    # tensors' updates agree to 1.5e-4 in norm). A lost or doubled micro-batch moves them by O(1).
    cfg = parse_config(run_args(small_data, tmp_path / "init", *args))
    tokenizer = trainer.load_tokenizer(cfg)
    initial = trainer.load_model(cfg.model, cfg, vocab_size=len(tokenizer), dtype=torch.float32,
                                 device=torch.device("cpu")).state_dict()
    zero3, plain = final_weights(tmp_path / "zero3"), final_weights(tmp_path / "plain")
    assert zero3.keys() == plain.keys()
    for key in plain:
        update_zero3, update_plain = zero3[key] - initial[key], plain[key] - initial[key]
        assert update_plain.norm() > 0, key
        assert (update_zero3 - update_plain).norm() <= 1e-3 * update_plain.norm(), key
