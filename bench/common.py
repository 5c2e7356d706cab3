"""Shared pieces of the nash-fast benchmarks: shapes, realistic inputs, timing, memory, the float64
reference, the roofline and the CSV rows. Imported by bench/run.py and the bench_*.py groups.

Conventions (also in bench/README.md):
  * N is the number of packed tokens; n_scored those whose label is not ignore_index. FLOPs are
    counted on n_scored (useful work): 2 * n_scored * H * V for a forward, 8 * n_scored * H * V for
    forward+backward with logit recompute (2 forward + 2 recompute + 4 for d_hidden and d_weight).
    A method that also multiplies the ignored rows does that work for free in this count.
  * peak memory is torch.cuda.max_memory_allocated during one call minus the memory allocated just
    before it (inputs, reference results and the grads of earlier calls already freed); on CPU the
    process's peak resident memory during the call (VmHWM, reset before it) minus its resident
    memory just before it, so buffers outside PyTorch's allocator (C++ kernels) count too. For
    forward+backward it includes the fresh .grad buffers of hidden and weight (the same for every
    method); for forward it includes whatever the method saves for backward.
  * errors compare against a float64 reference computed in token chunks from the same bf16 inputs.
"""

from __future__ import annotations

import csv
import datetime as _dt
import gc
import math
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch

IGNORE_INDEX = -100
GiB = 2**30

# (hidden size H, vocabulary V, final-logit soft-cap) of the models named in issue 6.
SHAPES = {
    "llama3-8b": (4096, 128256, None),
    "mistral-7b": (4096, 32768, None),
    "qwen2.5-7b": (3584, 152064, None),
    "gemma2-2b": (2304, 256000, 30.0),  # Gemma-2 caps its final logits: 30 * tanh(z / 30)
}
N_TOKENS = (4096, 16384, 65536)
# --device cpu (without --quick): LM heads a 2-core CPU can time against materialized logits.
CPU_SHAPES = {
    "h1024-v32000": (1024, 32000, None),
    "h2048-v32000": (2048, 32000, None),
    "h4096-v32000": (4096, 32000, None),
    "h2048-v128256": (2048, 128256, None),
}
CPU_N_TOKENS = (4096,)
# --quick: tiny shapes that exercise the same code paths (V odd and not a tile multiple; a soft-cap).
# Only the first runs by default (the Triton interpreter is slow); pick the other with --shapes.
QUICK_SHAPES = {
    "tiny": (64, 257, None),
    "tiny-softcap": (48, 300, 30.0),
}
QUICK_DEFAULT_SHAPES = ("tiny",)
QUICK_N_TOKENS = (96,)

CSV_COLUMNS = [
    "run_id", "date", "device", "gpu", "torch", "triton", "liger_kernel", "cut_cross_entropy",
    "transformers", "nash_fast_commit",
    "group", "method", "mode", "shape", "H", "V", "N", "n_scored", "n_seqs", "dtype",
    "status", "reason",
    "ms_median", "ms_p20", "ms_p80", "tflops", "peak_fraction", "matmul_peak_tflops",
    "mem_peak_gib", "err_out_abs", "err_out_rel", "err_grad_hidden_rel", "err_grad_weight_rel",
    "tokens_per_s", "notes",
]


# ----------------------------------------------------------------------------- environment

def package_version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def git_commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_description() -> str:
    """The CPU model, the matrix/vector extensions that matter here, and the threads torch uses."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and ":" in line:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and ":" in line:
                    flags = set(line.split(":", 1)[1].split())
                if flags and model:
                    break
    except OSError:
        pass
    wanted = ("amx_bf16", "amx_fp16", "amx_tile", "avx512_bf16", "avx512_fp16", "avx512f", "avx2")
    return f"{model} [{' '.join(f for f in wanted if f in flags)}] {torch.get_num_threads()} threads"


def environment(device: torch.device) -> dict:
    """The columns every row carries: what ran where, with which library versions, when."""
    if device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
    else:
        gpu = "cpu:" + cpu_description()
    now = _dt.datetime.now(_dt.timezone.utc)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return {
        "run_id": now.strftime("%Y%m%dT%H%M%SZ"),
        "date": now.isoformat(timespec="seconds"),
        "device": device.type,
        "gpu": gpu,
        "torch": torch.__version__,
        "triton": triton_version,
        "liger_kernel": package_version("liger-kernel"),
        "cut_cross_entropy": package_version("cut-cross-entropy"),
        "transformers": package_version("transformers"),
        "nash_fast_commit": git_commit(),
    }


# ----------------------------------------------------------------------------- CSV

class CsvLog:
    """Appends rows to DIR/<group>.csv, one flushed line at a time, so an interrupted suite keeps
    every finished row. An existing file must have the same header (else a clear error)."""

    def __init__(self, out_dir: Path, env: dict, echo: bool = True):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.env = env
        self.echo = echo

    def path(self, group: str) -> Path:
        return self.out_dir / f"{group}.csv"

    def write(self, group: str, **fields) -> dict:
        unknown = set(fields) - set(CSV_COLUMNS)
        if unknown:
            raise ValueError(f"unknown CSV columns {sorted(unknown)}")
        row = {c: "" for c in CSV_COLUMNS}
        row.update(self.env)
        row["group"] = group
        for k, v in fields.items():
            if isinstance(v, float):
                v = "" if math.isnan(v) else f"{v:.6g}"
            row[k] = "" if v is None else v
        path = self.path(group)
        new = not path.exists() or path.stat().st_size == 0
        if not new:
            with open(path, newline="") as f:
                header = next(csv.reader(f), [])
            if header != CSV_COLUMNS:
                raise ValueError(f"{path} has a different header; move it away (columns changed)")
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
            if new:
                w.writeheader()
            w.writerow(row)
        if self.echo:
            shown = {k: row[k] for k in ("method", "mode", "shape", "N", "status", "ms_median", "tflops",
                                          "peak_fraction", "mem_peak_gib", "err_out_rel",
                                          "err_grad_weight_rel", "tokens_per_s", "reason") if row[k] != ""}
            print(f"[{group}] " + " ".join(f"{k}={v}" for k, v in shown.items()), flush=True)
        return row


# ----------------------------------------------------------------------------- inputs

def sample_lengths(n_tokens: int, gen: torch.Generator, median: float = 350.0, sigma: float = 0.8,
                   lo: int = 8, hi: int = 4096) -> list[int]:
    """Sequence lengths (prompt + response) drawn log-normally around a chat-preference median,
    clipped to [lo, hi], the last one cut so they sum to n_tokens exactly."""
    scale = min(1.0, n_tokens / (8 * median))  # tiny --quick batches still hold several sequences
    lengths, total = [], 0
    while total < n_tokens:
        z = torch.randn((), generator=gen).item()
        n = int(min(hi, max(lo * scale, median * scale * math.exp(sigma * z))))
        n = max(1, min(n, n_tokens - total))
        lengths.append(n)
        total += n
    return lengths


@dataclass
class LogprobInputs:
    hidden: torch.Tensor      # [N, H], dtype
    weight: torch.Tensor      # [V, H], dtype
    labels: torch.Tensor      # [N] int64, IGNORE_INDEX on prompt positions and each sequence's last
    cu_seqlens: torch.Tensor  # int32 [S + 1]
    seq_id: torch.Tensor      # int64 [N]: which sequence each token belongs to
    num_seqs: int
    softcap: float | None
    n_scored: int
    lengths: list


def make_inputs(N: int, H: int, V: int, softcap, dtype, device, seed: int = 0, lengths=None) -> LogprobInputs:
    """Inputs shaped like a trained model's last layer on preference data.

    hidden = RMS-normalised activations times per-channel gains (1 + 0.5|N(0,1)|, like a final
    RMSNorm weight), plus a push along the label's weight row so the label's logit sits a little
    below the log-sum-exp of the rest: per-token log-probs of about -1.7 +- 2 (a trained model's
    loss), and a peaked softmax -- which matters to gradient filtering (cut-cross-entropy skips
    softmax entries below ~2e-4; a flat softmax would let it skip nearly everything).
    weight ~ N(0, 0.02). Lengths ~ log-normal (median 350); per sequence the first 20-50% of
    tokens (the prompt) and the last token (no next token) are ignored. `lengths` (summing to N)
    replaces the drawn lengths (the loss group uses 2B equal-length sequences).
    """
    gen = torch.Generator().manual_seed(seed)
    if lengths is None:
        lengths = sample_lengths(N, gen)
    elif sum(lengths) != N:
        raise ValueError(f"lengths must sum to N = {N}, got {sum(lengths)}")
    labels = torch.randint(0, V, (N,), generator=gen)
    target = labels.clone()  # the token the model "expects" at every position, scored or not
    start = 0
    for n in lengths:
        prompt = int(n * (0.2 + 0.3 * torch.rand((), generator=gen).item()))
        labels[start:start + prompt] = IGNORE_INDEX
        labels[start + n - 1] = IGNORE_INDEX
        start += n
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    seq_id = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))

    dgen = torch.Generator(device=device).manual_seed(seed + 1)
    weight = (torch.randn(V, H, device=device, generator=dgen, dtype=torch.float32) * 0.02).to(dtype)
    gains = 1.0 + 0.5 * torch.randn(H, device=device, generator=dgen).abs()
    hidden = torch.randn(N, H, device=device, generator=dgen) * gains
    logit_std = 0.02 * math.sqrt(H) * gains.square().mean().sqrt().item()
    lse_background = math.log(V) + logit_std**2 / 2
    target = target.to(device)
    w_rows = weight.index_select(0, target).float()
    boost = lse_background - 1.5 + 2.0 * torch.randn(N, device=device, generator=dgen)
    # + boost along w_y / |w_y|^2 raises the target logit by exactly `boost`.
    hidden += w_rows * (boost / w_rows.square().sum(1))[:, None]
    del w_rows
    hidden = hidden.to(dtype)
    n_scored = int((labels != IGNORE_INDEX).sum())
    return LogprobInputs(hidden, weight, labels.to(device), cu.to(device), seq_id.to(device),
                         len(lengths), softcap, n_scored, lengths)


# ----------------------------------------------------------------------------- float64 reference

def reference_logprobs(inp: LogprobInputs, grad_seq: torch.Tensor | None = None, max_elements: int = 2**27):
    """Per-sequence log-probs in float64, [chunk x V] at a time (never [N x V]); with grad_seq the
    gradients of sum_s grad_seq[s] * logp[s] w.r.t. hidden and weight:
        d z_iv = g_i (onehot(y_i)_v - softmax(s_i)_v) * cap'(z_iv),  d h = dz W,  d W = dz^T h.
    Returns (logp float64 [S], d_hidden float32 or None, d_weight float32 or None)."""
    h, W = inp.hidden, inp.weight
    N, H = h.shape
    V = W.shape[0]
    W64 = W.double()
    out = torch.zeros(inp.num_seqs, dtype=torch.float64, device=h.device)
    d_h = torch.empty(N, H, dtype=torch.float32, device=h.device) if grad_seq is not None else None
    d_W = torch.zeros(V, H, dtype=torch.float64, device=h.device) if grad_seq is not None else None
    chunk = max(1, max_elements // V)
    cap = inp.softcap
    for a in range(0, N, chunk):
        b = min(N, a + chunk)
        h64 = h[a:b].double()
        s = h64 @ W64.T
        if cap is not None:
            s = cap * torch.tanh(s / cap)
        lse = torch.logsumexp(s, 1)
        y = inp.labels[a:b]
        valid = y != IGNORE_INDEX
        yc = y.clamp_min(0)
        lp = (s.gather(1, yc[:, None]).squeeze(1) - lse) * valid
        out.index_add_(0, inp.seq_id[a:b], lp)
        if grad_seq is not None:
            g = grad_seq.double()[inp.seq_id[a:b]] * valid
            dz = torch.exp(s - lse[:, None]).mul_(-g[:, None])
            dz[torch.arange(b - a, device=h.device), yc] += g
            if cap is not None:
                dz *= 1.0 - (s / cap) ** 2
            del s
            d_h[a:b] = (dz @ W64).float()
            d_W += dz.T @ h64
            del dz
    del W64
    return out, d_h, (d_W.float() if d_W is not None else None)


def max_rel_err(x: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max |x - ref|, max |x - ref| / max |ref|): a norm-wise relative error that is not blown up
    by entries of the reference that happen to be near zero."""
    diff = (x.double() - ref.double()).abs().max().item()
    scale = ref.double().abs().max().item()
    return diff, diff / scale if scale > 0 else diff


def grad_rel_err(x: torch.Tensor, ref: torch.Tensor, rows: int = 8192) -> float:
    """max |x - ref| / max |ref| computed in row chunks (the weight gradient is V x H)."""
    diff, scale = 0.0, 0.0
    for a in range(0, x.shape[0], rows):
        xr, rr = x[a:a + rows].float(), ref[a:a + rows].float()
        diff = max(diff, (xr - rr).abs().max().item())
        scale = max(scale, rr.abs().max().item())
    return diff / scale if scale > 0 else diff


# ----------------------------------------------------------------------------- timing and memory

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_of(fn, repeats: int, *, warmup: bool = False) -> float:
    """Fastest of `repeats` timed calls of fn() on the CPU, in seconds; warmup: one untimed call first (oneDNN
    kernel generation, first touch of buffers)."""
    if warmup:
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def time_call(fn, device, grad_to_none=(), quick: bool = False) -> tuple[float, float, float]:
    """(median, 20th, 80th percentile) milliseconds of fn().

    CUDA: triton.testing.do_bench (L2 flushed between calls, CUDA-event timing), with warm-up and
    repetition windows scaled to the call's length so that at least ~10 timed calls are taken.
    CPU: a perf_counter loop (3 calls with --quick)."""
    def reset_grads():
        for t in grad_to_none:
            t.grad = None

    if device.type == "cuda":
        from triton.testing import do_bench

        reset_grads()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        once = start.elapsed_time(end)
        rep = min(3000.0, max(100.0, 10 * once))
        warm = min(500.0, max(25.0, 2 * once))
        q = do_bench(fn, warmup=warm, rep=rep, grad_to_none=list(grad_to_none) or None,
                     quantiles=[0.5, 0.2, 0.8])
        return float(q[0]), float(q[1]), float(q[2])
    reset_grads()
    t0 = time.perf_counter()
    fn()
    once = time.perf_counter() - t0
    reps = 2 if quick else max(3, min(10, int(30.0 / max(once, 1e-6))))  # ~30 s per case at most
    times = []
    for _ in range(reps):
        reset_grads()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    qs = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else times * 9
    return statistics.median(times), qs[1], qs[7]


def free_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _release_free_heap():
    """Give freed heap pages back to the OS (glibc), so resident memory is what is really live."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """with PeakMemory(device) as m: ...; m.gib = peak memory during the block above that at its start.

    CUDA: torch.cuda.max_memory_allocated. CPU (Linux): resident set size: the kernel's high-water
    mark VmHWM is reset at the start (/proc/self/clear_refs), so every buffer counts, PyTorch's or a
    C++ kernel's own. NaN where neither is available."""

    def __init__(self, device):
        self.device = device
        self.gib = float("nan")

    def __enter__(self):
        if self.device.type == "cuda":
            sync(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            gc.collect()
            _release_free_heap()
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self.base = _proc_status_bytes("VmRSS")
            except OSError:
                self.base = None
        return self

    def __exit__(self, *exc):
        if exc[0] is not None:
            return False
        if self.device.type == "cuda":
            sync(self.device)
            self.gib = (torch.cuda.max_memory_allocated(self.device) - self.base) / GiB
        elif self.base is not None:
            self.gib = (_proc_status_bytes("VmHWM") - self.base) / GiB
        return False


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def available_gib(device) -> float:
    if device.type != "cuda":
        return float("inf")
    free, _total = torch.cuda.mem_get_info(device)
    return free / GiB


def matmul_peak_tflops(device, dtype, quick: bool = False) -> float:
    """The dense matmul roofline of this device, measured now: TFLOP/s of an n^3 product
    (n = 8192 on GPU; 4096 on CPU, 512 with --quick) in the benchmark dtype on random data."""
    n = 8192 if device.type == "cuda" else (512 if quick else 4096)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    fn = lambda: torch.matmul(a, b)  # noqa: E731
    fn()
    sync(device)
    ms, _, _ = time_call(fn, device, quick=quick)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def dtype_from_name(name: str) -> torch.dtype:
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
             "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}
    if name not in table:
        raise ValueError(f"--dtype must be one of {sorted(table)}, got {name!r}")
    return table[name]


def short_error(exc: BaseException, limit: int = 300) -> str:
    msg = f"{type(exc).__name__}: {exc}".replace("\n", " ").replace("\r", " ")
    return msg if len(msg) <= limit else msg[:limit] + "..."


class Deadline:
    """Wall-clock budget of a run (--deadline, unix seconds). Cases not started in time are written
    as skipped rows, never silently dropped."""

    def __init__(self, at: float | None):
        self.at = at

    def passed(self) -> bool:
        return self.at is not None and time.time() >= self.at

    def reason(self) -> str:
        return "suite time budget exhausted before this case started (--deadline)"


def set_repo_on_path():
    """Let `python bench/run.py` import nash_fast from this checkout when it is not installed.

    The checkout keeps the Triton kernels in kernels/, which pyproject installs as nash_fast.kernels;
    without an install that mapping is made here, or `backend="triton"` would fail to import."""
    import importlib.util
    import sys

    root = Path(__file__).resolve().parent.parent
    if str(root) not in sys.path:
        sys.path.append(str(root))
    import nash_fast

    if "nash_fast.kernels" in sys.modules or importlib.util.find_spec("nash_fast.kernels") is not None:
        return
    spec = importlib.util.spec_from_file_location(
        "nash_fast.kernels", root / "kernels" / "__init__.py", submodule_search_locations=[str(root / "kernels")])
    module = importlib.util.module_from_spec(spec)
    sys.modules["nash_fast.kernels"] = module
    spec.loader.exec_module(module)
    nash_fast.kernels = module


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
