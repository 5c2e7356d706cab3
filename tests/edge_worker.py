"""The child-process half of tests/test_logprobs_edges.py (not collected: no test_ prefix).

A crash in a kernel (SIGFPE from a division by a zero width, SIGSEGV, std::bad_alloc's abort) kills the
process it runs in. The edge-case property tests therefore run sequence_logprobs here, in a spawned child
that `run_in_child` keeps for the whole module: a crash breaks only the child's pool, and the test that
sent the input fails naming it, instead of pytest dying with every other result.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import torch

_POOL: list[ProcessPoolExecutor] = []


class ChildCrashed(RuntimeError):
    """The child process died while computing (a signal or an abort, not a Python exception)."""


def run_in_child(fn, *args, timeout=600):
    """fn(*args) in the spawned child; its Python exceptions come back as themselves."""
    if not _POOL:
        _POOL.append(ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")))
    try:
        return _POOL[0].submit(fn, *args).result(timeout=timeout)
    except BrokenProcessPool:
        _POOL.pop().shutdown(wait=False, cancel_futures=True)
        raise ChildCrashed("the process running the kernel died (a crash: SIGFPE, SIGSEGV or an abort)") from None


def shutdown():
    while _POOL:
        _POOL.pop().shutdown(wait=True, cancel_futures=True)


def _force_path(isa):
    """NASH_FAST_CPU_ISA=isa ("<isa>+brgemm": NASH_FAST_CPU_MKL=0 too; None: neither), read on every call."""
    for key in ("NASH_FAST_CPU_ISA", "NASH_FAST_CPU_MKL"):
        os.environ.pop(key, None)
    if isa is not None:
        name, _, gemm = isa.partition("+")
        os.environ["NASH_FAST_CPU_ISA"] = name
        if gemm == "brgemm":
            os.environ["NASH_FAST_CPU_MKL"] = "0"


def forward_backward(backend, isa, threads, hidden, weight, labels, bias, kwargs, upstream_seed):
    """(logp [S], [d_hidden, d_weight, d_bias or None], upstream) of sequence_logprobs on native path `isa`
    and `threads` threads, for the upstream gradient randn(S) drawn from upstream_seed."""
    from nash_fast import sequence_logprobs

    _force_path(isa)
    torch.set_num_threads(threads)
    leaves = [t.requires_grad_(True) for t in (hidden, weight, bias) if t is not None]
    out = sequence_logprobs(hidden, weight, labels, bias=bias, backend=backend, **kwargs)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(upstream_seed))
    if out.requires_grad:
        grads = torch.autograd.grad(out, leaves, upstream, allow_unused=True)
        grads = [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]
    else:  # no scored token at all: every gradient is zero
        grads = [torch.zeros_like(t) for t in leaves]
    grads = [g.detach() for g in grads]
    if bias is None:
        grads.append(None)
    return out.detach(), grads, upstream


def native_op(isa, name, *args):
    """torch.ops.nash_fast.<name>(*args) on native path `isa`, for the operators' own edge cases."""
    import nash_fast.logprobs as lp_mod

    ok, why = lp_mod.native_status()
    if not ok:
        raise RuntimeError(why)
    _force_path(isa)
    return getattr(torch.ops.nash_fast, name)(*args)
