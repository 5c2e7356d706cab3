"""Charts and README tables from the benchmark CSVs (bench/results/*.csv by default).

    python bench/plot.py                      # bench/results/logprobs.png (+ loss.png, e2e.png)
    python bench/plot.py --markdown           # Markdown tables on stdout (for bench/README.md)
    python bench/plot.py --results DIR --out-dir DIR

Rows are appended run after run; for every (group, gpu, shape, N, method, mode) the last row wins,
so a re-run of a subset updates just those cells. --gpu picks one device when several are present.
matplotlib is imported only to draw (pip install matplotlib).
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

GROUPS = ("logprobs", "loss", "e2e")
METHOD_ORDER = ["naive", "compile", "liger", "cce", "cce_exact", "ours_torch", "ours_triton",
                "trl_sppo", "trl_inpo", "trl_ipo", "liger_dpo", "liger_sppo_hard", "ours_sppo", "ours_inpo", "ours_ipo",
                "padded_materialized", "padded_fused", "packed_fused"]
SHAPE_ORDER = ["llama3-8b", "mistral-7b", "qwen2.5-7b", "gemma2-2b", "tiny", "tiny-softcap", "qwen2-0.5b", "qwen2-tiny"]
MODE_ORDER = ["fwd", "fwd_bwd", "fwd_only", "train_step"]


def _order(value, table):
    return table.index(value) if value in table else len(table)


def load(results: Path, gpu: str | None = None) -> dict[str, list[dict]]:
    out = {}
    for group in GROUPS:
        path = results / f"{group}.csv"
        if not path.exists():
            continue
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        if gpu is not None:
            rows = [r for r in rows if r["gpu"] == gpu]
        latest = {}
        for r in rows:
            latest[(r["gpu"], r["shape"], r["N"], r["method"], r["mode"])] = r
        out[group] = sorted(latest.values(), key=lambda r: (
            r["gpu"], _order(r["shape"], SHAPE_ORDER), int(r["N"] or 0), _order(r["mode"], MODE_ORDER),
            _order(r["method"], METHOD_ORDER)))
    return out


def _f(value, fmt):
    if value in ("", None):
        return ""
    x = float(value)
    return "" if math.isnan(x) else format(x, fmt)


def _time(r):
    if r["status"] != "ok":
        return r["status"]
    return f"{_f(r['ms_median'], '.2f')} ({_f(r['ms_p20'], '.2f')}-{_f(r['ms_p80'], '.2f')})"


def _reason(r):
    return "" if r["status"] == "ok" else r["reason"].replace("|", "/")[:90]


def markdown(groups: dict[str, list[dict]]) -> str:
    lines = []
    for group, rows in groups.items():
        if not rows:
            continue
        gpus = sorted({r["gpu"] for r in rows})
        first = rows[0]
        lines.append(f"### {group}\n")
        lines.append(f"{', '.join(gpus)}; torch {first['torch']}, triton {first['triton']}, liger-kernel "
                     f"{first['liger_kernel']}, cut-cross-entropy {first['cut_cross_entropy']}; "
                     f"{first['date'][:10]}; {first['dtype']}; measured matmul peak "
                     f"{_f(first['matmul_peak_tflops'], '.0f')} TFLOP/s\n")
        if group == "e2e":
            lines.append("| model | method | status | ms (p20-p80) | tokens/s | peak mem GiB | logp err vs baseline | notes |")
            lines.append("|---|---|---|---|---|---|---|---|")
            for r in rows:
                lines.append(f"| {r['shape']} | {r['method']} | {r['status']} | {_time(r)} | {_f(r['tokens_per_s'], '.0f')} "
                             f"| {_f(r['mem_peak_gib'], '.2f')} | {_f(r['err_out_rel'], '.1e')} | {r['notes'] or _reason(r)} |")
        else:
            err = "logp err" if group == "logprobs" else "loss err"
            lines.append(f"| shape | N | mode | method | status | ms (p20-p80) | TFLOP/s | % of peak | peak mem GiB "
                         f"| {err} | grad h err | grad W err | note |")
            lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
            for r in rows:
                pct = _f(float(r["peak_fraction"]) * 100, ".0f") if r["peak_fraction"] else ""
                lines.append(
                    f"| {r['shape']} | {r['N']} | {r['mode']} | {r['method']} | {r['status']} | {_time(r)} "
                    f"| {_f(r['tflops'], '.0f' if float(r['tflops'] or 0) >= 10 else '.3g')} | {pct} "
                    f"| {_f(r['mem_peak_gib'], '.2f')} | {_f(r['err_out_rel'], '.1e')} "
                    f"| {_f(r['err_grad_hidden_rel'], '.1e')} | {_f(r['err_grad_weight_rel'], '.1e')} | {_reason(r)} |")
        lines.append("")
    return "\n".join(lines)


def plot(groups: dict[str, list[dict]], out_dir: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit(f"plotting needs matplotlib (pip install matplotlib): {exc}")
    written = []
    for group, rows in groups.items():
        rows = [r for r in rows if r["status"] == "ok"]
        if not rows:
            continue
        modes = [m for m in MODE_ORDER if any(r["mode"] == m for r in rows)]
        fig, axes = plt.subplots(2, len(modes), figsize=(6 * len(modes), 8), squeeze=False)
        for col, mode in enumerate(modes):
            sub = [r for r in rows if r["mode"] == mode]
            cases = []
            for r in sub:
                case = f"{r['shape']}\nN={r['N']}"
                if case not in cases:
                    cases.append(case)
            methods = [m for m in METHOD_ORDER if any(r["method"] == m for r in sub)]
            width = 0.8 / max(1, len(methods))
            for k, method in enumerate(methods):
                for row_i, (key, label) in enumerate((("ms_median", "ms (log)"), ("mem_peak_gib", "peak GiB above inputs"))):
                    xs, ys = [], []
                    for i, case in enumerate(cases):
                        match = [r for r in sub if r["method"] == method and f"{r['shape']}\nN={r['N']}" == case]
                        if match and match[0][key] not in ("", "nan"):
                            xs.append(i + k * width)
                            ys.append(float(match[0][key]))
                    ax = axes[row_i][col]
                    ax.bar(xs, ys, width, label=method)
                    ax.set_ylabel(label)
                    if key == "ms_median":
                        ax.set_yscale("log")
            for row_i in range(2):
                ax = axes[row_i][col]
                ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
                ax.set_xticklabels(cases, fontsize=7)
                ax.set_title(f"{group}: {mode}")
            axes[0][col].legend(fontsize=7)
        gpu = rows[0]["gpu"]
        fig.suptitle(f"nash-fast bench ({group}) on {gpu}, {rows[0]['dtype']}; lower is better")
        fig.tight_layout()
        path = out_dir / f"{group}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    here = Path(__file__).resolve().parent / "results"
    p.add_argument("--results", default=str(here), help="directory holding logprobs.csv / loss.csv / e2e.csv")
    p.add_argument("--out-dir", default=None, help="where PNGs go (default: --results)")
    p.add_argument("--markdown", action="store_true", help="print Markdown tables instead of plotting")
    p.add_argument("--gpu", default=None, help="only rows of this device name")
    args = p.parse_args(argv)
    results = Path(args.results)
    groups = load(results, args.gpu)
    if not groups:
        raise SystemExit(f"no benchmark CSVs in {results}")
    if args.markdown:
        print(markdown(groups))
        return 0
    for path in plot(groups, Path(args.out_dir) if args.out_dir else results):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
