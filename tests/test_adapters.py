"""LoRA adapters (nash_fast.adapters) on the tiny model, CPU: training lowers the loss and moves only the adapters,
the reference is the base bitwise, the merged model equals base + adapter within derived float bounds, adapter
checkpoints resume bitwise, ZeRO-2 / ZeRO-3 (world of one) equal the plain adapter path, the frozen head's
backward computes no d_weight, self-play with adapters, one-line option errors."""

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

import nash_fast.train as trainer
from nash_fast import adapters, selfplay
from nash_fast.checkpoint import checkpoint_step, latest_checkpoint
from nash_fast.config import parse_config
from nash_fast.precompute import attach_logprobs, dataset_sequence_logprobs

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
U32 = 2.0 ** -24  # unit roundoff of float32
U64 = 2.0 ** -53


def gamma(n: int, u: float = U32) -> float:
    """Higham's gamma_n = n u / (1 - n u): |fl(sum of n terms) - sum| <= gamma_n * sum of |terms|, any order."""
    return n * u / (1 - n * u)


@pytest.fixture(autouse=True, scope="module")
def _deepspeed_logger_as_found():
    """Merging saves a full model, and transformers' save_pretrained imports DeepSpeed in this process, whose import
    gives the "DeepSpeed" logger a stdout handler that stops propagating; later modules (test_console) expect the
    logger as they found it, so it is put back after this module."""
    logger = logging.getLogger("DeepSpeed")
    handlers, level, propagate = logger.handlers[:], logger.level, logger.propagate
    yield
    logger.handlers[:] = handlers
    logger.setLevel(level)
    logger.propagate = propagate


def run_args(small_data, out, *extra):
    return ["--dataset", small_data, "--output-dir", str(out), "--progress-bar", "false", "--plot", "false",
            "--max-tokens", "512", "--tensorboard", "false", "--lora-r", "4", "--lora-dropout", "0", *extra]


def read_metrics(out):
    with open(Path(out) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def adapter_weights(out):
    from safetensors.torch import load_file

    return load_file(str(Path(out) / "final" / "adapter_model.safetensors"))


def base_model(cfg, vocab_size):
    return trainer.load_model("tiny", cfg, vocab_size=vocab_size, dtype=torch.float32, device=CPU)


# ------------------------------------------------------------------------------------------------ fixed batch

@pytest.fixture(scope="module")
def trained(small_data):
    """A LoRA policy trained 10 steps on a fixed batch of 4 pairs (SPPO), with its loss curve."""
    cfg = parse_config(["--dataset", small_data, "--lora-r", "4", "--lora-dropout", "0"])
    tokenizer = trainer.load_tokenizer(cfg)
    examples = trainer.tokenize(cfg, tokenizer, trainer.load_records(cfg))[:4]
    plan = trainer.LossPlan.for_config(cfg, examples)
    base = base_model(cfg, len(tokenizer))
    base_logps = dataset_sequence_logprobs(base, examples, augment=plan.augment)
    attach_logprobs(examples, base_logps, "ref_logps", augment=plan.augment)
    batch = plan.collator()(examples)
    lora = adapters.attach(cfg, base_model(cfg, len(tokenizer)))
    model = lora.model.train()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for _, p in lora.trainable()], lr=1e-2)
    loss_fn = trainer.build_loss_fn(cfg)
    values, head_grads = [], []
    for _ in range(10):
        optimizer.zero_grad(set_to_none=True)
        value, _ = trainer.micro_batch_loss(model, batch, loss_fn, plan, backward=lambda l: l.backward())
        head_grads.append(model.get_output_embeddings().weight.grad)
        values.append(value.item())
        optimizer.step()
    model.eval()
    return dict(cfg=cfg, tokenizer=tokenizer, examples=examples, plan=plan, base_logps=base_logps, lora=lora,
                initial=initial, values=values, head_grads=head_grads)


def test_adapter_training_lowers_the_loss_and_moves_only_the_adapters(trained):
    values, lora = trained["values"], trained["lora"]
    assert all(torch.isfinite(torch.tensor(values))) and values[-1] < 0.9 * values[0], values
    after = lora.model.state_dict()
    changed = {k for k, v in trained["initial"].items() if not torch.equal(v, after[k])}
    trainable = {name for name, _ in lora.trainable()}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert changed == trainable  # every adapter matrix moved; nothing of the base did
    # The default targets: every attention and MLP linear layer, neither the LM head nor the embeddings.
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert all(g is None for g in trained["head_grads"])  # the frozen head never received a gradient


def test_reference_is_the_base_model_bitwise(trained):
    """The precompute pass's reference (the policy with adapters disabled, eval mode) gives the base model's
    log-probs exactly: a disabled LoRA layer calls its base layer and nothing else."""
    lora, examples, plan = trained["lora"], trained["examples"], trained["plan"]
    with lora.reference(adapters_on=False) as scorer:
        reference = dataset_sequence_logprobs(scorer, examples, augment=plan.augment)
    assert reference == trained["base_logps"]
    with lora.reference(adapters_on=True) as scorer:  # the trained policy itself differs
        assert dataset_sequence_logprobs(scorer, examples, augment=plan.augment) != trained["base_logps"]
    assert lora.model.training is False  # reference() restores the mode it found
    cfg = trained["cfg"]
    assert lora.source(None) is False and lora.source(cfg.model) is False and lora.source("other") is None


def _linear_inputs(model, batch):
    """Input of every adapted linear layer during a packed forward of `model` (by module name)."""
    from nash_fast.model import packed_hidden_states

    inputs, hooks = {}, []
    for name, module in model.named_modules():
        if hasattr(module, "lora_A"):
            hooks.append(module.register_forward_hook(lambda m, args, out, name=name: inputs.__setitem__(name, args[0])))
    with torch.no_grad():
        packed_hidden_states(model, batch)
    for hook in hooks:
        hook.remove()
    return inputs


def test_merged_model_equals_base_plus_adapter(trained, tmp_path):
    """--merge-adapters' model (reloaded with AutoModelForCausalLM) against the policy with its adapters.

    Per adapted layer, float32, the same input x (hidden state of a packed forward):
      unmerged  y_u = fl(fl(W0 x) + fl(s fl(B fl(A x))))      (PEFT's LoRA forward; s = alpha / r = 2, exact)
      merged    y_m = fl(W' x),  W' = fl(W0 + fl(s fl(B A)))  (PEFT's merge, then save / load: bit-exact)
    With gamma_n's bound on a float sum of n terms (any order, FMA or not) and y* = (W0 + s B A) x:
      |y_u - y*| <= gamma_(H+r+2) (|W0||x| + s |B||A||x|)
      |W' - (W0 + s B A)| <= gamma_(r+2) (|W0| + s |B||A|)  so  |y_m - y*| <= gamma_(H+r+3) (|W0| + s |B||A|) |x|
    hence |y_u - y_m| <= 2 gamma_(H+r+3) (|W0||x| + s |B||A||x|) elementwise (H = in_features, r = rank).

    End to end, the log-probs of each sequence: in float64 the two models differ only by the merge's float32
    rounding dW = W' - (W0 + s B A) (|dW| bounded as above), so to first order
      |logp_merged - logp_unmerged| <= sum over adapted layers of sum_jk |d logp / d W'_jk| * |dW_jk|
    (the gradient from autograd in float64); the second-order remainder is O(|dW|^2) ~ 1e-14 relative and
    float64's own evaluation error ~1e-13 relative of |logp| < 1e3, both far below the 1e-9 added."""
    from transformers import AutoModelForCausalLM

    from nash_fast.model import packed_sequence_logprobs

    lora, cfg, tokenizer, plan = trained["lora"], trained["cfg"], trained["tokenizer"], trained["plan"]
    adapter_dir, merged_dir = tmp_path / "final", tmp_path / "merged"
    lora.save_adapter(adapter_dir)
    adapters.merge(cfg, adapter_dir, merged_dir, tokenizer, lambda: base_model(cfg, len(tokenizer)))
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert not any("lora" in name for name in merged.state_dict())
    batch = plan.collator()(trained["examples"])

    # Per layer, float32, rigorous bound.
    inputs = _linear_inputs(lora.model, batch)
    assert len(inputs) == 14  # 7 linear layers x 2 decoder layers
    merged_modules = dict(merged.named_modules())
    for name, x in inputs.items():
        layer = dict(lora.model.named_modules())[name]
        W0, A, B = layer.base_layer.weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight
        s = layer.scaling["default"]
        with torch.no_grad():
            y_u = layer(x)
            y_m = merged_modules[name](x)
            magnitude = x.abs() @ W0.abs().T + s * (x.abs() @ A.abs().T) @ B.abs().T
        n = W0.shape[1] + A.shape[0] + 3
        assert ((y_u - y_m).abs() <= 2 * gamma(n) * magnitude).all(), name

    # End to end, float64, first-order bound from the merge's rounding.
    unmerged64 = lora.model.double()
    merged64 = merged.double()
    try:
        with torch.no_grad():
            logp_u = packed_sequence_logprobs(unmerged64, batch, backend="torch")
        logp_m = packed_sequence_logprobs(merged64, batch, backend="torch")
        delta_bound = {}
        for name in inputs:
            layer = dict(unmerged64.named_modules())[name]
            W0, A, B = layer.base_layer.weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight
            s = layer.scaling["default"]
            delta_bound[name] = gamma(A.shape[0] + 2) * (W0.abs() + s * B.abs() @ A.abs()).detach()
        for index in range(logp_m.numel()):
            grads = torch.autograd.grad(logp_m[index], [merged_modules[name].weight for name in inputs],
                                        retain_graph=True)
            bound = sum(float((g.abs() * delta_bound[name]).sum()) for g, name in zip(grads, inputs))
            difference = abs(float(logp_m[index].detach()) - float(logp_u[index]))
            assert difference <= bound + 1e-9, (index, bound)
    finally:
        lora.model.float()


# ------------------------------------------------------------------------------------------------ frozen head

def test_frozen_head_backward_computes_no_d_weight():
    """With an LM-head weight that does not require grad, the fused loss's backward op is asked for d_hidden only
    and returns an empty tensor in d_weight's place (no [V, H] buffer, no 2 N H V FLOPs)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from nash_fast import FusedLinearPreferenceLoss

    calls = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if "sequence_logprobs_backward" in str(func):
                calls.append((args[-3:], out))
            return out

    torch.manual_seed(0)
    V, H, N = 96, 16, 12
    hidden = torch.randn(N, H, requires_grad=True)
    cu_seqlens = torch.tensor([0, 3, 6, 9, 12], dtype=torch.int32)
    labels = torch.randint(0, V, (N,))
    common = dict(ref_chosen_logps=torch.zeros(2), ref_rejected_logps=torch.zeros(2),
                  role=torch.tensor([0, 1, 0, 1]), pair_index=torch.tensor([0, 0, 1, 1]), cu_seqlens=cu_seqlens)
    for backend in ("torch", "native") if _native_built() else ("torch",):
        for frozen in (True, False):
            weight = torch.randn(V, H, requires_grad=not frozen)
            loss_fn = FusedLinearPreferenceLoss("dpo", beta=0.1, backend=backend)
            loss, _ = loss_fn(weight, hidden, labels, **common)
            calls.clear()
            with Record():
                loss.backward()
            (need_hidden, need_weight, _), (d_hidden, d_weight, _) = calls[0]
            assert need_hidden and need_weight == (not frozen), backend
            if frozen:
                assert d_weight.numel() == 0 and weight.grad is None, backend
            else:
                assert d_weight.shape == (V, H) and weight.grad is not None
            hidden.grad = None


def _native_built() -> bool:
    try:
        from nash_fast.logprobs import _resolve_backend

        return _resolve_backend("native", torch.zeros(1, 1)) == "native"
    except Exception:
        return False


# ------------------------------------------------------------------------------------------------ trainer

def test_trainer_with_adapters_end_to_end_and_resume_bitwise(tmp_path, small_data, monkeypatch, sigterm_after_step):
    """6 steps straight == 3 steps stopped by SIGTERM + the same command again, with adapters: checkpoints hold
    the adapters only, final/ is a PEFT adapter directory, merged/ loads with AutoModelForCausalLM."""
    args = ["--max-steps", "6", "--save-steps", "100", "--seed", "3", "--lr", "3e-3", "--lora-dropout", "0.1",
            "--merge-adapters"]
    straight = tmp_path / "straight"
    summary = trainer.train(parse_config(run_args(small_data, straight, *args)))
    rows = read_metrics(straight)
    assert summary["steps"] == 6 and not any(r["skipped"] for r in rows)
    # Step 1: the policy (base + B = 0 adapters) is the reference exactly.
    assert rows[0]["chosen_logratio"] == 0.0 and rows[0]["rejected_logratio"] == 0.0

    interrupted = tmp_path / "interrupted"
    sigterm_after_step(monkeypatch, 3)
    assert trainer.train(parse_config(run_args(small_data, interrupted, *args)))["stopped_by_signal"]
    monkeypatch.undo()
    checkpoint = latest_checkpoint(interrupted / "checkpoints")
    assert checkpoint_step(checkpoint) == 3
    saved = torch.load(checkpoint / "model.pt", weights_only=True)
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)
    full_size = sum(p.numel() for p in base_model(parse_config([]), 512).parameters()) * 4
    assert (checkpoint / "model.pt").stat().st_size < full_size / 5  # adapters only, no frozen base
    trainer.train(parse_config(run_args(small_data, interrupted, *args)))
    a, b = adapter_weights(straight), adapter_weights(interrupted)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    timing = ("tokens_per_s", "step_time_s")
    assert [{k: v for k, v in r.items() if k not in timing} for r in read_metrics(interrupted)] == [
        {k: v for k, v in r.items() if k not in timing} for r in rows]

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert json.loads((straight / "final" / "adapter_config.json").read_text())["r"] == 4
    merged = AutoModelForCausalLM.from_pretrained(straight / "merged")
    applied = PeftModel.from_pretrained(base_model(parse_config([]), merged.config.vocab_size), straight / "final")
    assert not torch.equal(merged.model.layers[0].self_attn.q_proj.weight,
                           applied.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight)
    # A run with other adapter options does not resume these checkpoints.
    with pytest.raises(ValueError, match="--lora-r 4 -> 8"):
        trainer.train(parse_config(run_args(small_data, interrupted, *args, "--lora-r", "8", "--max-steps", "7",
                                            "--allow-schedule-change")))


DS_WORKER = """
import os, sys
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                  LOCAL_WORLD_SIZE="1")
import nash_fast.train as trainer
sys.exit(trainer.main(sys.argv[2:]))
"""


def run_deepspeed(*argvs):
    """Each argv in its own one-process DeepSpeed run, all at once (the tiny model runs on one thread each)."""
    import socket

    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    processes = []
    for argv in argvs:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        processes.append(subprocess.Popen([sys.executable, "-c", DS_WORKER, str(port), *argv], env=env,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    try:
        for process in processes:
            _, stderr = process.communicate(timeout=400)
            assert process.returncode == 0, stderr[-3000:]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


def test_deepspeed_zero2_and_zero3_world_of_one_equal_the_plain_adapter_path(tmp_path, small_data):
    """ZeRO-3 partitions the frozen base and the adapters; the frozen LM head is gathered around the fused loss.
    ZeRO-2 runs with packing and gradient checkpointing. Both match the plain adapter run (float32 rounding of
    the reduction order apart, see test_train's ZeRO-3 test); a ZeRO-3 adapter checkpoint (frozen parameters
    excluded) resumes bitwise."""
    args = ["--max-steps", "3", "--grad-accum", "2", "--save-steps", "2"]
    trainer.train(parse_config(run_args(small_data, tmp_path / "plain", *args)))
    run_deepspeed(run_args(small_data, tmp_path / "zero3", *args, "--zero-stage", "3"),
                  run_args(small_data, tmp_path / "zero2", *args, "--zero-stage", "2", "--gradient-checkpointing"))
    plain = read_metrics(tmp_path / "plain")
    from peft import get_peft_model_state_dict

    cfg = parse_config(run_args(small_data, tmp_path / "init", *args))  # the adapters' init: drawn from --seed
    initial = get_peft_model_state_dict(adapters.attach(cfg, base_model(cfg, 512)).peft_model)
    for name in ("zero3", "zero2"):
        for a, b in zip(read_metrics(tmp_path / name), plain, strict=True):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), name
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), name
        ours, theirs = adapter_weights(tmp_path / name), adapter_weights(tmp_path / "plain")
        assert ours.keys() == theirs.keys() == initial.keys()
        for key in theirs:  # per tensor, the updates agree to 1e-3 in norm (see test_train's ZeRO-3 test for why)
            update_ours, update_theirs = ours[key] - initial[key], theirs[key] - initial[key]
            assert update_theirs.norm() > 0, key
            assert (update_ours - update_theirs).norm() <= 1e-3 * update_theirs.norm(), (name, key)
    step2 = tmp_path / "zero3" / "checkpoints" / "step-00000002"
    assert (step2 / "engine").is_dir()
    engine_bytes = sum(f.stat().st_size for f in (step2 / "engine").rglob("*") if f.is_file())
    assert engine_bytes < 2_000_000  # adapters and their optimizer states; the 156k-parameter base is not saved
    shutil.copytree(step2, tmp_path / "resumed" / "checkpoints" / "step-00000002")
    run_deepspeed(run_args(small_data, tmp_path / "resumed", *args, "--zero-stage", "3"))
    a, b = adapter_weights(tmp_path / "zero3"), adapter_weights(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------ self-play

def test_selfplay_with_one_continued_adapter(tmp_path):
    """INPO self-play, --lora-iterations continue: iteration 2 continues iteration 1's adapter on pi_1's weights,
    its reference is pi_1 (the base, adapters disabled) and its previous iterate base + that adapter; generation and
    evaluation use each iteration's merged weights."""
    cfg = selfplay.SelfPlayConfig(output_dir=str(tmp_path / "run"), num_prompts=6, eval_prompts=4, eval_samples=2,
                                  num_samples=3, max_new_tokens=8, iterations=2, method="inpo", lora_r=4,
                                  lora_iterations="continue", train_args="--max-steps 2 --plot false")
    rows = selfplay.selfplay(cfg)
    assert len(rows) == 2 and all(0 <= r["win_rate_vs_initial"] <= 1 for r in rows)
    run = selfplay.Run(cfg)
    root = tmp_path / "run"
    assert run.policy(3) == str(root / "iter_2" / "train" / "merged")
    args = selfplay.train_arguments(run, 2)
    value = lambda name: args[args.index(name) + 1]  # noqa: E731
    assert "--merge-adapters" in args and value("--lora-r") == "4"
    assert value("--model") == value("--ref-model") == str(root / "policy_1")
    assert value("--init-adapter") == value("--prev-model") == str(root / "iter_1" / "train" / "final")
    assert (root / "iter_2" / "train" / "final" / "adapter_config.json").is_file()

    fresh = selfplay.Run(selfplay.SelfPlayConfig(output_dir=str(tmp_path / "fresh"), method="inpo", lora_r=4))
    args = selfplay.train_arguments(fresh, 2)
    pi_2 = str(tmp_path / "fresh" / "iter_1" / "train" / "merged")
    assert value("--model") == value("--prev-model") == pi_2 and "--init-adapter" not in args
    assert value("--ref-model") == str(tmp_path / "fresh" / "policy_1")


# ------------------------------------------------------------------------------------------------ options

@pytest.mark.parametrize("argv, message", [
    (["--lora-alpha", "16"], "--lora-alpha needs --lora-r"),
    (["--merge-adapters"], "--merge-adapters needs --lora-r"),
    (["--lora-r", "0"], "--lora-r must be a positive integer"),
    (["--lora-r", "4", "--lora-dropout", "1"], r"--lora-dropout must be in \[0, 1\)"),
    (["--lora-r", "4", "--lora-target-modules", "all-linear,q_proj"], "--lora-target-modules: all-linear"),
    (["--lora-r", "4", "--init-adapter", "."], "--init-adapter .: not a PEFT adapter directory"),
    (["--lora-r", "4", "--load-in-4bit"] if not torch.cuda.is_available() else ["--load-in-8bit"],
     "--load-in-4bit needs a CUDA device" if not torch.cuda.is_available() else "--load-in-8bit needs --lora-r"),
])
def test_option_errors_name_the_option(argv, message):
    with pytest.raises(ValueError, match=message):
        parse_config(argv)


def test_missing_peft_is_one_line_naming_the_extra(monkeypatch, tmp_path, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    assert trainer.main(["--lora-r", "4", "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nash-fast[peft]" in err[0] and "--lora-r" in err[0]
    monkeypatch.setitem(sys.modules, "peft", None)  # the lazy import itself
    with pytest.raises(ValueError, match=r"--lora-r needs PEFT, an optional extra: pip install 'nash-fast\[peft\]'"):
        adapters.require_peft()
    with pytest.raises(ValueError, match="--lora-r needs PEFT"):
        selfplay.SelfPlayConfig(lora_r=4).validate()


@pytest.mark.parametrize("train_args, message", [
    ("--lora-r 4", "--train-args: --lora-r is set by self-play"),
    ("--merge-adapters", "--train-args: --merge-adapters is set by self-play"),
    ("--lora-alpha 4", "--train-args --lora-alpha needs self-play's --lora-r"),
])
def test_selfplay_adapter_options_are_checked(train_args, message):
    with pytest.raises(ValueError, match=message):
        selfplay.SelfPlayConfig(train_args=train_args).validate()
    with pytest.raises(ValueError, match="--lora-r must be a positive integer"):
        selfplay.SelfPlayConfig(lora_r=0).validate()


def test_lm_head_named_in_target_modules_is_trained_in_full(tmp_path, small_data):
    """--lora-target-modules all-linear,lm_head: the head is a fully trained copy (PEFT's modules_to_save) that the
    fused loss reads and final/ holds; the embeddings stay frozen."""
    trainer.train(parse_config(run_args(small_data, tmp_path, "--lora-target-modules", "all-linear,lm_head",
                                        "--max-steps", "2")))
    saved = adapter_weights(tmp_path)
    head = [k for k in saved if "lm_head" in k]
    assert head == ["base_model.model.lm_head.weight"] and not any("embed_tokens" in k for k in saved)
    base = base_model(parse_config([]), saved[head[0]].shape[0])
    assert not torch.equal(saved[head[0]], base.lm_head.weight)
