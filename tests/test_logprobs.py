"""sequence_logprobs (both backends) against a float64 reference that materializes the logits.

Tolerance: every output and gradient element must be within twice its derived rounding-error bound,
    |ours - ref64| <= 2 * bound + 1e-30,
where `bound` (tests/reference.py: rounding_error_bounds, derivation there) is built from the
roundings the path really performs: fp32 logits and reductions, the final rounding to the input
dtype, and on GPU paths d_z rounded to 16 bits before the tensor-core GEMMs. The factor 2 covers the
second-order terms and the float64 reference's own error; 1e-30 covers fp32 underflow. The plain
same-dtype implementation's error is printed beside a failure for scale; it does not set the bound
(it can be exact on a draw where a correct fused path is not, or the other way round).
"""

import contextlib
import math
import os
import warnings

import pytest
import torch
from hypothesis import example, given, strategies as st

import nash_fast.logprobs as lp_mod
from nash_fast import sequence_logprobs
from reference import reference_sequence_logprobs, rounding_error_bounds

VOCABS = [1, 2, 3, 7, 31, 32, 53, 97, 131]

try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except Exception:  # pragma: no cover
    HAVE_TRITON = False

NATIVE_PATHS = ["vnni", "avx512", "avx2", "portable"]


def native_paths_here():
    """The native code paths this machine runs (best first), empty without nash_fast._C. A path named
    "<isa>+brgemm" is <isa> with NASH_FAST_CPU_MKL=0: its fp32 GEMMs on oneDNN's brgemm instead of MKL
    (the fallback where torch has no MKL), listed once, for the best fp32 path."""
    if not lp_mod.native_status()[0]:
        return []
    with forced_isa(None):
        best = lp_mod.native_cpu_isa(torch.bfloat16)
        fp32_best = lp_mod.native_cpu_isa(torch.float32)
        mkl = torch.ops.nash_fast.cpu_gemm(torch.float32) == "mkl"
    return NATIVE_PATHS[NATIVE_PATHS.index(best):] + ([f"{fp32_best}+brgemm"] if mkl else [])


@contextlib.contextmanager
def forced_isa(isa):
    """NASH_FAST_CPU_ISA=isa (None: unset) for the block, and NASH_FAST_CPU_MKL=0 for an "<isa>+brgemm"
    path; the native ops read both on every call."""
    saved = {k: os.environ.pop(k, None) for k in ("NASH_FAST_CPU_ISA", "NASH_FAST_CPU_MKL")}
    if isa is not None:
        isa, _, gemm = isa.partition("+")
        os.environ["NASH_FAST_CPU_ISA"] = isa
        if gemm == "brgemm":
            os.environ["NASH_FAST_CPU_MKL"] = "0"
    try:
        yield
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None)
            if v is not None:
                os.environ[k] = v


# (backend, native path): the Triton backend runs compiled on a GPU machine and under the interpreter
# (conftest) elsewhere; the native backend runs every instruction-set path this CPU has.
CASES = [("torch", None)] + ([("triton", None)] if HAVE_TRITON else []) + [("native", p) for p in native_paths_here()]
CASE_IDS = [b if p is None else f"{b}-{p}" for b, p in CASES]
BACKENDS = ["torch"] + (["triton"] if HAVE_TRITON else []) + (["native"] if native_paths_here() else [])
DEVICE = {"torch": "cpu", "native": "cpu", "triton": "cuda" if torch.cuda.is_available() else "cpu"}


def path_roundings(backend, isa, device, dtype):
    """What the path rounds beyond fp32 arithmetic (tests/reference.py: rounding_error_bounds)."""
    if torch.device(device).type == "cuda":  # d_z to 16 bits for tensor-core GEMMs
        return dict(dz_rounded=True, truncating_accumulation=True, reduced_precision_reduction=True,
                    flushes_subnormals=True)
    if backend == "native" and dtype != torch.float32:
        with forced_isa(isa):
            active = lp_mod.native_cpu_isa(dtype)
        if active == "vnni":  # 16-bit d_z into the matrix units (AMX tiles or AVX512-BF16 dot products)
            return dict(dz_rounded=True, truncating_accumulation=True)
    return dict(dz_rounded=False)


@st.composite
def problems(draw):
    V = draw(st.sampled_from(VOCABS))
    H = draw(st.integers(1, 40))
    lengths = draw(st.lists(st.integers(0, 13), min_size=1, max_size=5))
    padded = draw(st.booleans())
    ignore_p = draw(st.sampled_from([0.0, 0.3, 1.0]))
    return dict(
        V=V, H=H, lengths=lengths, padded=padded, ignore_p=ignore_p,
        dtype=draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16])),
        average=draw(st.booleans()),
        bias=draw(st.booleans()),
        softcap=draw(st.sampled_from([None, None, 4.0])),
        seed=draw(st.integers(0, 2**16)),
        threads=draw(st.sampled_from([1, 2])),
    )


def make_inputs(p, device="cpu"):
    g = torch.Generator().manual_seed(p["seed"])
    V, H, dtype = p["V"], p["H"], p["dtype"]
    lengths = p["lengths"]
    if p["padded"]:
        T = max(max(lengths), 1)
        hidden = torch.randn(len(lengths), T, H, generator=g)
        labels = torch.randint(0, V, (len(lengths), T), generator=g)
        for row, n in enumerate(lengths):  # padding positions are ignored, as a collator would mark them
            labels[row, n:] = -100
        cu = None
    else:
        N = sum(lengths)
        hidden = torch.randn(N, H, generator=g)
        labels = torch.randint(0, V, (N,), generator=g)
        cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0).to(torch.int32)
    drop = torch.rand(labels.shape, generator=g) < p["ignore_p"]
    labels = labels.masked_fill(drop, -100)
    weight = torch.randn(V, H, generator=g) / math.sqrt(H) * 3
    bias = torch.randn(V, generator=g) if p["bias"] else None
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype).requires_grad_(True)
    cu = None if cu is None else cu.to(device)
    return cast(hidden), cast(weight), labels.to(device), cu, cast(bias)


def _grads(out, upstream, tensors):
    tensors = [t for t in tensors if t is not None]
    if not out.requires_grad:  # no token at all: every gradient is zero
        return [torch.zeros_like(t) for t in tensors]
    grads = torch.autograd.grad(out, tensors, upstream, allow_unused=True)
    return [torch.zeros_like(t) if gr is None else gr for t, gr in zip(tensors, grads)]


def _check(name, ours, plain, ref, bound):
    ours, plain, ref, bound = ours.double().cpu(), plain.double().cpu(), ref.double().cpu(), bound.double().cpu()
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    if not ref.numel():
        return
    err = (ours - ref).abs()
    excess = err - (2 * bound + 1e-30)
    worst = int(excess.flatten().argmax())
    plain_err = (plain - ref).abs().max().item()
    assert excess.flatten()[worst] <= 0, (
        f"{name}: error {err.flatten()[worst].item():.3g} > 2 x derived bound {bound.flatten()[worst].item():.3g} "
        f"at flat index {worst} (ref {ref.flatten()[worst].item():.6g}; plain same-dtype max error {plain_err:.3g})"
    )


@pytest.mark.parametrize("backend,isa", CASES, ids=CASE_IDS)
@given(p=problems())
# Found by hypothesis 6.170: when the torch backend rounded logits to bf16, d_bias was one bf16 ulp off
# here while the plain bf16 implementation happened to round exactly.
@example(p=dict(V=3, H=9, lengths=[13, 9, 6, 9, 6], padded=False, ignore_p=0.0, dtype=torch.bfloat16,
                average=False, bias=True, softcap=4.0, seed=65535, threads=1))
def test_forward_backward_matches_float64(backend, isa, p):
    hidden, weight, labels, cu, bias = make_inputs(p, DEVICE[backend])
    kw = dict(average=p["average"], softcap=p["softcap"])
    threads = torch.get_num_threads()
    torch.set_num_threads(p["threads"])
    try:
        with forced_isa(isa):
            ours = sequence_logprobs(hidden, weight, labels, cu_seqlens=cu, bias=bias, backend=backend, **kw)
            upstream = torch.randn(ours.shape, generator=torch.Generator().manual_seed(p["seed"] + 1)).to(ours.device)
            g_ours = _grads(ours, upstream, [hidden, weight, bias])
    finally:
        torch.set_num_threads(threads)
    # float64 leaves: the exact gradients must not be rounded back to the input dtype by autograd.
    exact = [None if t is None else t.detach().double().requires_grad_(True) for t in (hidden, weight, bias)]
    ref = reference_sequence_logprobs(exact[0], exact[1], labels, cu, bias=exact[2], **kw)
    g_ref = _grads(ref, upstream.double(), exact)
    try:  # the textbook computation in the input dtype, for scale in failure messages only
        plain = reference_sequence_logprobs(hidden, weight, labels, cu, bias=bias, dtype=p["dtype"], **kw)
        g_plain = _grads(plain, upstream.double(), [hidden, weight, bias])
    except RuntimeError:  # e.g. a float16 op without a CPU kernel
        plain, g_plain = ref.detach(), g_ref
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    bounds = rounding_error_bounds(hidden, weight, labels, cu, upstream, bias=bias, **kw,
                                   **path_roundings(backend, isa, DEVICE[backend], p["dtype"]))
    _check("forward", ours, plain, ref, bounds["forward"])
    for name, a, b, c in zip(["d_hidden", "d_weight", "d_bias"], g_ours, g_plain, g_ref):
        assert a.dtype == p["dtype"] and c.dtype == torch.float64
        _check(name, a, b, c, bounds[name])


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunked_paths_equal_single_chunk(backend, monkeypatch):
    """Token chunking (forward in torch, backward d_logits in both) does not change the result."""
    g = torch.Generator().manual_seed(0)
    N, H, V = 45, 24, 61
    dev = DEVICE[backend]
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64).float().to(dev).requires_grad_(True)
    weight = torch.randn(V, H, generator=g).to(dev).requires_grad_(True)
    labels = torch.randint(0, V, (N,), generator=g).to(dev)
    cu = torch.tensor([0, 10, 10, 31, 45], dtype=torch.int32, device=dev)
    upstream = torch.randn(4, generator=g).to(dev)

    def run():
        out = sequence_logprobs(hidden, weight, labels, cu_seqlens=cu, backend=backend)
        return (out, *torch.autograd.grad(out, [hidden, weight], upstream))

    whole = run()
    monkeypatch.setattr(lp_mod, "TORCH_CHUNK_ELEMENTS", 3 * V)
    monkeypatch.setattr(lp_mod, "MAX_CHUNK_ELEMENTS", 7 * V)
    monkeypatch.setattr(lp_mod, "NATIVE_CHUNK_ELEMENTS", 7 * V)
    chunked = run()
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not native_paths_here(), reason="nash_fast._C is not built")
@pytest.mark.parametrize("isa", native_paths_here())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_native_vocabulary_slices_and_tiles(isa, dtype, monkeypatch):
    """Shapes past one tile and one slice: 2 forward slices (1 MiB of weight each), several backward
    slices (NATIVE_CHUNK_ELEMENTS), ragged last token / vocabulary blocks, odd N and odd H."""
    g = torch.Generator().manual_seed(5)
    N, H, V = 151, 521, 1100
    hidden = torch.randn(N, H, generator=g).to(dtype).requires_grad_(True)
    weight = (torch.randn(V, H, generator=g) / math.sqrt(H) * 3).to(dtype).requires_grad_(True)
    bias = torch.randn(V, generator=g).to(dtype).requires_grad_(True)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::7] = -100
    cu = torch.tensor([0, 40, 40, 97, 151], dtype=torch.int32)
    upstream = torch.randn(4, generator=g)
    monkeypatch.setattr(lp_mod, "NATIVE_CHUNK_ELEMENTS", 1)  # the narrowest slices: 512 entries, 3 slices
    with forced_isa(isa):
        ours = sequence_logprobs(hidden, weight, labels, cu_seqlens=cu, bias=bias, softcap=7.0, backend="native")
        g_ours = _grads(ours, upstream, [hidden, weight, bias])
    exact = [t.detach().double().requires_grad_(True) for t in (hidden, weight, bias)]
    ref = reference_sequence_logprobs(exact[0], exact[1], labels, cu, bias=exact[2], softcap=7.0)
    g_ref = _grads(ref, upstream.double(), exact)
    bounds = rounding_error_bounds(hidden, weight, labels, cu, upstream, bias=bias, softcap=7.0,
                                   **path_roundings("native", isa, "cpu", dtype))
    _check("forward", ours, ref, ref, bounds["forward"])
    for name, a, c in zip(["d_hidden", "d_weight", "d_bias"], g_ours, g_ref):
        _check(name, a, c, c, bounds[name])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("frozen", ["weight", "hidden"])
def test_frozen_input_gradient_is_not_computed(backend, frozen, monkeypatch):
    """A frozen LM head (adapters) or frozen hidden states: the backend is asked for neither its
    gradient nor a buffer for it (no [V, H] d_weight: 2NHV fewer FLOPs), and the others are unchanged."""
    dev = DEVICE[backend]
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(12, 8, generator=g).to(dev)
    weight = torch.randn(13, 8, generator=g).to(dev)
    labels = torch.randint(0, 13, (12,), generator=g).to(dev)
    forward, backward = lp_mod._TOKEN_KERNELS[backend]
    calls = []

    def spy(*args):
        result = backward(*args)
        calls.append((args[-3:], result))
        return result

    monkeypatch.setitem(lp_mod._TOKEN_KERNELS, backend, (forward, spy))
    both = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    sequence_logprobs(both[0], both[1], labels, backend=backend).sum().backward()
    frozen_index = 1 if frozen == "weight" else 0
    one = [t.clone().requires_grad_(i != frozen_index) for i, t in enumerate((hidden, weight))]
    sequence_logprobs(one[0], one[1], labels, backend=backend).sum().backward()
    (need_hidden, need_weight, need_bias), (d_hidden, d_weight, d_bias) = calls[-1]
    assert (need_hidden, need_weight) == ((True, False) if frozen == "weight" else (False, True)) and not need_bias
    assert (d_weight is None) == (frozen == "weight") and (d_hidden is None) == (frozen == "hidden") and d_bias is None
    assert one[frozen_index].grad is None
    trained = 1 - frozen_index
    torch.testing.assert_close(one[trained].grad, both[trained].grad, rtol=0, atol=0)


@pytest.mark.skipif(not native_paths_here(), reason="nash_fast._C is not built")
def test_native_operator_skips_unneeded_gradients():
    hidden, weight = torch.randn(5, 4), torch.randn(9, 4)
    labels = torch.randint(0, 9, (5,))
    _, lse = torch.ops.nash_fast.token_logprobs_forward(hidden, weight, None, labels, None)
    d_hidden, d_weight, d_bias = torch.ops.nash_fast.token_logprobs_backward(
        hidden, weight, None, labels, None, lse, torch.ones(5), True, False, False, 1 << 20)
    assert d_hidden.shape == (5, 4) and d_weight.numel() == 0 and d_bias.numel() == 0


COMPILE_CASES = [(b, "inductor" if b == "native" else "aot_eager") for b in BACKENDS]


@pytest.mark.parametrize("backend,compiler", COMPILE_CASES, ids=[b for b, _ in COMPILE_CASES])
def test_compile_fullgraph_equals_eager(backend, compiler):
    """torch.compile(fullgraph=True) traces sequence_logprobs with no graph break (custom operators with
    fake kernels and registered autograd) and gives eager's values and gradients. Inductor compiles the
    native case (the full stack); aot_eager the others, for CI time."""
    torch._dynamo.reset()
    dev = DEVICE[backend]
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(3, 7, 8, generator=g).to(dev)
    weight = torch.randn(11, 8, generator=g).to(dev)
    labels = torch.randint(0, 11, (3, 7), generator=g).to(dev)
    labels[0, :2] = -100

    def loss_fn(h, w, y):
        logps = sequence_logprobs(h, w, y, average=True, softcap=5.0, backend=backend)
        return (logps[0] - logps[1]).square() + torch.nn.functional.logsigmoid(logps[2])

    results = []
    for fn in (loss_fn, torch.compile(loss_fn, fullgraph=True, backend=compiler)):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = fn(h, w, labels)
        loss.backward()
        results.append((loss.detach(), h.grad, w.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_gradcheck_float64():
    """Finite differences in float64 (the torch backend keeps float64; Triton dots are at most fp32)."""
    backend = "torch"
    g = torch.Generator().manual_seed(1)
    N, H, V = 9, 5, 7
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(V, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[3] = -100
    cu = torch.tensor([0, 4, 4, 9], dtype=torch.int32)
    f = lambda h, w, b: sequence_logprobs(h, w, labels, cu_seqlens=cu, bias=b, softcap=3.0, average=True, backend=backend).double()
    assert torch.autograd.gradcheck(f, (hidden, weight, bias))


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored_and_empty_sequences_give_zero(backend):
    dev = DEVICE[backend]
    hidden = torch.randn(6, 8, device=dev, requires_grad=True)
    weight = torch.randn(11, 8, device=dev, requires_grad=True)
    labels = torch.tensor([-100, -100, 3, -100, -100, -100], device=dev)
    cu = torch.tensor([0, 2, 2, 4, 6], dtype=torch.int32, device=dev)
    for average in (False, True):
        out = sequence_logprobs(hidden, weight, labels, cu_seqlens=cu, average=average, backend=backend)
        assert torch.isfinite(out).all()
        assert out[0] == 0 and out[1] == 0 and out[3] == 0 and out[2] < 0
    out.sum().backward()
    assert hidden.grad[[0, 1, 3, 4, 5]].abs().sum() == 0 and hidden.grad[2].abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_is_forward_only(backend):
    dev = DEVICE[backend]
    hidden = torch.randn(10, 8, device=dev, requires_grad=True)
    weight = torch.randn(13, 8, device=dev, requires_grad=True)
    labels = torch.randint(0, 13, (10,), device=dev)
    with_grad = sequence_logprobs(hidden, weight, labels, backend=backend)
    with torch.no_grad():
        without = sequence_logprobs(hidden, weight, labels, backend=backend)
    assert without.grad_fn is None
    torch.testing.assert_close(with_grad.detach(), without)


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_autocast_casts_inputs_like_the_linear_it_replaces(backend):
    # Under bf16 autocast, float32 hidden / weight / bias run as bf16 (what autocast does to the LM-head Linear):
    # bitwise the result of passing them cast; gradients come back in float32. float64 is left alone.
    if backend == "native" and not lp_mod.native_status()[0]:
        pytest.skip("native kernels not built")
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(10, 8, generator=generator, requires_grad=True)
    weight = torch.randn(13, 8, generator=generator, requires_grad=True)
    bias = torch.randn(13, generator=generator, requires_grad=True)
    labels = torch.randint(0, 13, (10,), generator=generator)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sequence_logprobs(hidden, weight, labels, cu_seqlens=cu, bias=bias, backend=backend)
    expected = sequence_logprobs(hidden.detach().bfloat16(), weight.detach().bfloat16(), labels, cu_seqlens=cu,
                                 bias=bias.detach().bfloat16(), backend=backend)
    assert torch.equal(out, expected)
    out.sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.float32 for t in (hidden, weight, bias))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        double = sequence_logprobs(hidden.detach().double(), weight.detach().double(), labels, backend=backend
                                   if backend == "torch" else "torch")
    assert double.dtype == torch.float64


def test_single_sequence_default_layout_and_padded_equals_packed():
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 5, 8, generator=g)
    weight = torch.randn(17, 8, generator=g)
    labels = torch.randint(0, 17, (2, 5), generator=g)
    padded = sequence_logprobs(hidden, weight, labels, backend="torch")
    packed = sequence_logprobs(hidden.reshape(10, 8), weight, labels.reshape(10),
                               cu_seqlens=torch.tensor([0, 5, 10], dtype=torch.int32), backend="torch")
    whole = sequence_logprobs(hidden.reshape(10, 8), weight, labels.reshape(10), backend="torch")
    torch.testing.assert_close(padded, packed)
    torch.testing.assert_close(whole, packed.sum(0, keepdim=True))


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda a: a.update(labels=torch.tensor([0, 1, 7, 2])), r"labels must be in \[0, 7\)"),
        (lambda a: a.update(labels=torch.tensor([0, -5, 1, 2])), "labels must be in"),
        (lambda a: a.update(labels=torch.tensor([0.0, 1.0, 1.0, 2.0])), "labels must be an integer"),
        (lambda a: a.update(labels=torch.tensor([0, 1, 2])), "labels shape"),
        (lambda a: a.update(cu_seqlens=torch.tensor([0.0, 4.0])), "cu_seqlens must be an int32"),
        (lambda a: a.update(cu_seqlens=torch.tensor([0, 3, 2, 4], dtype=torch.int32)), "non-decreasing"),
        (lambda a: a.update(cu_seqlens=torch.tensor([0, 3], dtype=torch.int32)), "must end at N = 4"),
        (lambda a: a.update(cu_seqlens=torch.tensor([1, 4], dtype=torch.int32)), "must start at 0"),
        (lambda a: a.update(weight=torch.randn(7, 5)), "hidden width 6 does not match weight width 5"),
        (lambda a: a.update(weight=torch.randn(7, 6, dtype=torch.float64)), "dtype"),
        (lambda a: a.update(weight=torch.randn(7, 6, device="meta")), "weight is on meta"),
        (lambda a: a.update(bias=torch.randn(6)), "bias must have shape"),
        (lambda a: a.update(softcap=-1.0), "softcap"),
        (lambda a: a.update(backend="cuda"), "backend"),
        (lambda a: a.update(hidden=torch.randn(4)), "hidden must be"),
    ],
)
def test_bad_input_names_the_argument(mutate, match):
    args = dict(hidden=torch.randn(4, 6), weight=torch.randn(7, 6), labels=torch.tensor([0, 1, 6, -100]),
                cu_seqlens=torch.tensor([0, 1, 4], dtype=torch.int32), bias=None, softcap=None, backend="torch")
    mutate(args)
    with pytest.raises(ValueError, match=match):
        sequence_logprobs(args.pop("hidden"), args.pop("weight"), args.pop("labels"), **args)


def test_triton_backend_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"backend='triton' needs CUDA tensors, but hidden is on cpu"):
        sequence_logprobs(torch.randn(4, 6), torch.randn(7, 6), torch.tensor([0, 1, 6, -100]), backend="triton")


def test_native_unavailable_is_a_clear_error_and_auto_warns_once(monkeypatch):
    monkeypatch.setattr(lp_mod, "_NATIVE", {"ok": False, "why": "nash_fast._C is not built"})
    args = (torch.randn(4, 6), torch.randn(7, 6), torch.tensor([0, 1, 6, -100]))
    with pytest.raises(ValueError, match=r"backend='native' is unavailable: nash_fast._C is not built; build it with `pip install -e \.`"):
        sequence_logprobs(*args, backend="native")
    bf16 = (args[0].bfloat16(), args[1].bfloat16(), args[2])  # the dtype "auto" would run natively
    with pytest.warns(UserWarning, match="native CPU kernels unavailable") as record:
        first = sequence_logprobs(*bf16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second call does not warn again
        second = sequence_logprobs(*bf16)
    assert len(record) == 1 and torch.equal(first, second)
    torch.testing.assert_close(first, sequence_logprobs(*bf16, backend="torch"), rtol=0, atol=0)


def test_auto_runs_native_on_cpu_when_built():
    """On CPU, "auto" takes the native kernels for every dtype they take (the fastest of our backends there:
    nash_fast/logprobs.py) when the library is built, else the torch backend."""
    h32 = torch.randn(3, 4)
    expected = "native" if lp_mod.native_status()[0] else "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for h in (h32, h32.half(), h32.bfloat16()):
            assert lp_mod._resolve_backend("auto", h) == expected
    assert lp_mod._resolve_backend("auto", h32.double()) == "torch"


@pytest.mark.skipif(not native_paths_here(), reason="nash_fast._C is not built")
def test_native_bad_isa_and_inputs_name_the_problem():
    args = (torch.randn(4, 6), torch.randn(7, 6), torch.tensor([0, 1, 6, -100]))
    with forced_isa("sse9"), pytest.raises(ValueError, match="NASH_FAST_CPU_ISA must be one of vnni, avx512, avx2, portable"):
        sequence_logprobs(*args, backend="native")
    with pytest.raises(ValueError, match="backend='native' takes float32, bfloat16 or float16"):
        sequence_logprobs(*(t.double() if t.is_floating_point() else t for t in args), backend="native")


@pytest.mark.skipif(not (HAVE_TRITON and torch.cuda.is_available()), reason="Inductor compiles user Triton kernels on GPUs only")
def test_triton_kernels_are_triton_ops_inductor_traces():
    """The Triton launchers are torch.library.triton_op: a compiled graph calling them traces the kernels."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(6)
    hidden = torch.randn(40, 64, generator=g).cuda().bfloat16()
    weight = torch.randn(300, 64, generator=g).cuda().bfloat16()
    labels = torch.randint(0, 300, (40,), generator=g).cuda()
    fn = lambda h, w, y: torch.ops.nash_fast.triton_token_logprobs_forward(h, w, None, y, None)[0].sum()  # noqa: E731
    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(hidden, weight, labels), fn(hidden, weight, labels))
