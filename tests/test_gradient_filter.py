"""Gradient filtering (sequence_logprobs's filter_eps) and float32 matmul precision on every backend.

Tolerance of a filtered gradient, derived from the filter's definition and the path's roundings:
  A backend may drop d_z entry (i, v) only when its computed softmax p^_iv < eps, and (native, triton) never a
  label's. The computed p^ is within dP_iv of the exact p_iv (tests/reference.py: rounding_error_bounds, "p"), so
  a dropped entry has p_iv < eps + dP_iv and p_iv - dP_iv < eps. Dropping it removes exactly g_i p_iv cap'_iv from
  d_z (the torch backend drops it from a label entry too: 1 - p -> 1, the same amount), so with
      F_iv = |g_i| |cap'_iv| min(p_iv, eps + dP_iv)   where p_iv - dP_iv < eps (and v != y_i where labels are kept),
      F_iv = 0                                        elsewhere,
  the filtered exact gradients differ from the unfiltered exact ones by at most
      |d_hidden_ih| <= sum_v F_iv |W_vh| = (F |W|)_ih,      |d_weight_vh| <= sum_i F_iv |h_ih| = (F^T |h|)_vh
  (first order in nothing: these are exact sums of the removed terms). The kept entries are computed as before,
  so their rounding errors stay within the path's derived bound B (tests/reference.py); the final rounding to the
  input dtype (u_io, 2^-8 for bf16) now applies to a value up to F |W| larger: u_io F |W| more. Hence
      |ours - ref64| <= 2 B + (1 + u_io) (F |W|  or  F^T |h|) + 1e-30,
  with 2 B and 1e-30 as in tests/test_logprobs.py. The coarser bound the docs state, eps |g_i| ||W_{:,h}||_1, is
  this one with p < eps (dP is second order). d_bias = sum_i d_z_i: exact on the native backend (it sums the d_z
  tiles before any GEMM is skipped), filtered on torch and triton (bound 2 B + (1 + u_io) sum_i F_iv). The forward
  is bitwise the unfiltered one.

float32 matmul precision "medium" (native, where bf16 runs on the vnni path): the fp32 inputs are rounded to bf16
once and every product is exact in fp32 from there, d_z rounded to bf16 as on the bf16 path; so the result is
held to the float64 reference of the bf16-rounded inputs with the bf16 path's bound B (its last rounding to bf16
counted although fp32 outputs are not rounded: a looser bound, still a valid one).
"""

import math

import pytest
import torch
from hypothesis import given, strategies as st

import nash_fast.logprobs as lp_mod
from nash_fast import FusedLinearPreferenceLoss, sequence_logprobs
from nash_fast.logprobs import resolve_filter_eps
from reference import UNIT_ROUNDOFF, reference_sequence_logprobs, rounding_error_bounds
from test_logprobs import CASE_IDS, CASES, DEVICE, _grads, forced_isa, make_inputs, native_paths_here, path_roundings

# Tiny and prime vocabularies, and ones spanning several 16-row filter blocks and 128-row native tiles.
VOCABS = [1, 2, 3, 7, 31, 53, 131, 257, 521]
EPS = [1e-3, 1e-2, 0.2, "auto", "high"]


@st.composite
def problems(draw):
    V = draw(st.sampled_from(VOCABS))
    return dict(
        V=V, H=draw(st.integers(1, 40)), lengths=draw(st.lists(st.integers(0, 13), min_size=1, max_size=5)),
        padded=draw(st.booleans()), ignore_p=draw(st.sampled_from([0.0, 0.3, 1.0])),
        dtype=draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16])),
        average=draw(st.booleans()), bias=draw(st.booleans()), softcap=draw(st.sampled_from([None, None, 4.0])),
        seed=draw(st.integers(0, 2**16)), threads=draw(st.sampled_from([1, 2])),
        eps=draw(st.sampled_from(EPS)), scale=draw(st.sampled_from([1.0, 4.0])),
    )


def _run(backend, isa, hidden, weight, labels, cu, bias, upstream_seed, threads, **kw):
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with forced_isa(isa):
            out = sequence_logprobs(hidden, weight, labels, cu_seqlens=cu, bias=bias, backend=backend, **kw)
            upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(upstream_seed)).to(out.device)
            grads = _grads(out, upstream, [hidden, weight, bias])
    finally:
        torch.set_num_threads(saved)
    return out, upstream, grads


def filter_bounds(bounds, hidden, weight, eps, keep_labels):
    """(F |W| over all tokens [N_all, H], F^T |h| [V, H], sum_i F_iv [V]) of the module docstring, from
    rounding_error_bounds' output."""
    p, dP, g, cap = bounds["softmax"], bounds["softmax_error"], bounds["token_grad"], bounds["cap"]
    scored, y = bounds["scored"], bounds["scored_labels"]
    W = weight.detach().cpu().double()
    h_all = hidden.detach().cpu().double().reshape(-1, W.shape[1])
    h = h_all[scored]
    droppable = (p - dP) < eps
    if keep_labels and p.shape[0]:
        droppable[torch.arange(p.shape[0]), y] = False
    F = torch.where(droppable, g.abs()[:, None] * cap.abs() * torch.minimum(p, eps + dP), 0.0)
    dh = torch.zeros_like(h_all)
    dh[scored] = F @ W.abs()
    return dh.reshape(hidden.shape), F.t() @ h.abs(), F.sum(0)


def _check(name, ours, ref, bound):
    ours, ref, bound = ours.double().cpu(), ref.double().cpu(), bound.double().cpu()
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    if not ref.numel():
        return
    err = (ours - ref).abs()
    excess = (err - bound).flatten()
    worst = int(excess.argmax())
    assert excess[worst] <= 0, (f"{name}: error {err.flatten()[worst].item():.3g} > bound {bound.flatten()[worst].item():.3g}"
                                f" at flat index {worst} (ref {ref.flatten()[worst].item():.6g})")


@pytest.mark.parametrize("backend,isa", CASES, ids=CASE_IDS)
@given(p=problems())
def test_filtered_gradients_within_derived_bound(backend, isa, p):
    hidden, weight, labels, cu, bias = make_inputs(p, DEVICE[backend])
    with torch.no_grad():  # sharper softmax distributions (scale 4): more entries below eps
        weight.mul_(p["scale"])
    kw = dict(average=p["average"], softcap=p["softcap"])
    eps = resolve_filter_eps(p["eps"], p["dtype"])
    ours, upstream, g_ours = _run(backend, isa, hidden, weight, labels, cu, bias, p["seed"] + 1, p["threads"],
                                  filter_eps=p["eps"], **kw)
    plain, _, _ = _run(backend, isa, hidden, weight, labels, cu, bias, p["seed"] + 1, p["threads"], **kw)
    assert torch.equal(ours, plain), "filtering changed the forward"
    exact = [None if t is None else t.detach().double().requires_grad_(True) for t in (hidden, weight, bias)]
    ref = reference_sequence_logprobs(exact[0], exact[1], labels, cu, bias=exact[2], **kw)
    g_ref = _grads(ref, upstream.double(), exact)
    bounds = rounding_error_bounds(hidden, weight, labels, cu, upstream, bias=bias, **kw,
                                   **path_roundings(backend, isa, DEVICE[backend], p["dtype"]))
    u_io = 0.0 if p["dtype"] == torch.float32 else UNIT_ROUNDOFF[p["dtype"]]
    f_hidden, f_weight, f_bias = filter_bounds(bounds, hidden, weight, eps, keep_labels=backend != "torch")
    for name, ours_g, ref_g, extra in zip(["d_hidden", "d_weight", "d_bias"], g_ours, g_ref,
                                          [f_hidden, f_weight, None if backend == "native" else f_bias]):
        bound = 2 * bounds[name] + 1e-30 + (0.0 if extra is None else (1 + u_io) * extra)
        _check(name, ours_g, ref_g, bound)


@pytest.mark.parametrize("backend,isa", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_filter_none_and_zero_are_the_exact_path_bitwise(backend, isa, dtype):
    p = dict(V=257, H=24, lengths=[0, 1, 70, 13], padded=False, ignore_p=0.3, dtype=dtype, average=False, bias=True,
             softcap=None, seed=3, threads=1)
    hidden, weight, labels, cu, bias = make_inputs(p, DEVICE[backend])
    base = _run(backend, isa, hidden, weight, labels, cu, bias, 7, 1)
    for eps in (None, 0.0, 0):
        other = _run(backend, isa, hidden, weight, labels, cu, bias, 7, 1, filter_eps=eps)
        assert torch.equal(base[0], other[0])
        for a, b in zip(base[2], other[2]):
            assert torch.equal(a, b), eps


@pytest.mark.skipif(not native_paths_here(), reason="nash_fast._C not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_filter_skips_blocks_of_a_peaked_distribution(dtype):
    """Most 16 x 64 blocks are negligible here, so the filtered gradients differ from the exact ones (the GEMMs
    really skipped them), by no more than the derived bound (checked above); label rows are never dropped."""
    g = torch.Generator().manual_seed(0)
    N, H, V = 200, 32, 1031
    hidden = torch.randn(N, H, generator=g).to(dtype).requires_grad_(True)
    # Like an LM's head: a frequent head of the vocabulary (large logits) and a long tail of rare entries (small
    # weight rows: logits near 0 against a maximum near 35, softmax ~ e^-35).
    w = torch.randn(V, H, generator=g) * 2
    w[256:] *= 0.05
    weight = w.to(dtype).requires_grad_(True)
    labels = torch.randint(0, 256, (N,), generator=g)
    grads = {}
    for eps in (None, 1e-3):
        out = sequence_logprobs(hidden, weight, labels, backend="native", filter_eps=eps)
        grads[eps] = torch.autograd.grad(out.sum(), [hidden, weight])
    assert not torch.equal(grads[None][1], grads[1e-3][1])
    # A d_weight row whose whole 16-row block (FILTER_ROWS, aligned) is negligible for every token and holds no label
    # is skipped by every token block: exactly 0. (p < eps / 2 leaves room for the kernel's fp32 softmax.)
    p = torch.softmax(hidden.detach().double() @ weight.detach().double().t(), -1)
    rows = (p < 1e-3 / 2).all(0) & ~torch.isin(torch.arange(V), labels)
    pad = torch.zeros(-(-V // 16) * 16, dtype=torch.bool)
    pad[:V] = rows
    blocks = pad.reshape(-1, 16).all(1).repeat_interleave(16)[:V]
    assert blocks.sum() >= 16 * 8, "the test needs negligible blocks"
    assert (grads[1e-3][1][blocks] == 0).all()
    assert (grads[None][1][blocks] != 0).any()


@pytest.mark.parametrize("bad", [-1e-3, 1.0, 2, float("nan"), float("inf"), "fast", "AUTO", True, [1e-3], b"auto"])
def test_bad_filter_eps_is_a_one_line_error_naming_the_option(bad):
    h = torch.randn(3, 4, requires_grad=True)
    w = torch.randn(5, 4)
    with pytest.raises(ValueError, match="filter_eps") as info:
        sequence_logprobs(h, w, torch.tensor([0, 1, 2]), backend="torch", filter_eps=bad)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="filter_eps"):
        FusedLinearPreferenceLoss("dpo", filter_eps=bad)


def test_named_filter_eps_values():
    """"auto" is cut-cross-entropy's finfo(dtype).eps / 32, "high" finfo(dtype).eps / 1024."""
    assert resolve_filter_eps("auto", torch.bfloat16) == 2.0**-12
    assert resolve_filter_eps("auto", torch.float16) == 2.0**-15
    assert resolve_filter_eps("auto", torch.float32) == 2.0**-28
    assert resolve_filter_eps("high", torch.bfloat16) == 2.0**-17
    assert resolve_filter_eps("high", torch.float32) == 2.0**-33
    assert resolve_filter_eps(None, torch.bfloat16) is None
    assert resolve_filter_eps(0.0, torch.bfloat16) is None
    assert resolve_filter_eps(1e-4, torch.float32) == 1e-4


def test_fused_loss_passes_filter_eps(monkeypatch):
    seen = []
    real = lp_mod.sequence_logprobs

    def spy(*args, **kwargs):
        seen.append(kwargs.get("filter_eps"))
        return real(*args, **kwargs)

    import nash_fast.fused_loss as fl

    monkeypatch.setattr(fl, "sequence_logprobs", spy)
    loss = FusedLinearPreferenceLoss("dpo", filter_eps="auto", backend="torch")
    assert "filter_eps='auto'" in repr(loss)
    H, V = 8, 11
    hidden = torch.randn(2, 5, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    labels = torch.randint(0, V, (2, 5))
    value, _ = loss(weight, hidden, labels, ref_chosen_logps=torch.zeros(1), ref_rejected_logps=torch.zeros(1))
    value.backward()
    assert seen and all(s == "auto" for s in seen)


def test_config_logprob_filter_eps():
    from nash_fast.config import parse_config

    assert parse_config([]).logprob_filter_eps_value() is None
    for text, value in (("none", None), ("auto", "auto"), ("high", "high"), ("1e-4", 1e-4), ("0", None)):
        assert parse_config(["--logprob-filter-eps", text]).logprob_filter_eps_value() == value
    for bad in ("fast", "1.5", "-1e-3", "nan"):
        with pytest.raises(ValueError, match="--logprob-filter-eps") as info:
            parse_config([f"--logprob-filter-eps={bad}"])
        assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- float32 matmul precision

def _bf16_vnni_here():
    if not native_paths_here():
        return False
    with forced_isa(None):
        return lp_mod.native_cpu_isa(torch.bfloat16) == "vnni" and lp_mod.native_cpu_isa(torch.float32) == "avx512"


@pytest.fixture
def matmul_precision():
    saved = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(saved)


@pytest.mark.skipif(not native_paths_here(), reason="nash_fast._C not built")
def test_fp32_precision_high_stays_exact(matmul_precision):
    p = dict(V=131, H=40, lengths=[5, 13, 0, 70], padded=False, ignore_p=0.3, dtype=torch.float32, average=False,
             bias=True, softcap=None, seed=5, threads=1)
    hidden, weight, labels, cu, bias = make_inputs(p)
    base = _run("native", None, hidden, weight, labels, cu, bias, 1, 1)
    matmul_precision("high")
    high = _run("native", None, hidden, weight, labels, cu, bias, 1, 1)
    assert torch.equal(base[0], high[0]) and all(torch.equal(a, b) for a, b in zip(base[2], high[2]))


@pytest.mark.skipif(not _bf16_vnni_here(), reason="needs the native bf16 vnni path (AVX512-BF16 or AMX)")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fp32_precision_medium_multiplies_in_bf16(matmul_precision, seed):
    p = dict(V=257, H=40, lengths=[5, 13, 0, 70], padded=False, ignore_p=0.3, dtype=torch.float32,
             average=seed == 1, bias=seed != 0, softcap=4.0 if seed == 2 else None, seed=seed, threads=1 + seed % 2)
    hidden, weight, labels, cu, bias = make_inputs(p)
    kw = dict(average=p["average"], softcap=p["softcap"])
    exact = _run("native", None, hidden, weight, labels, cu, bias, seed, p["threads"], **kw)
    matmul_precision("medium")
    ours, upstream, g_ours = _run("native", None, hidden, weight, labels, cu, bias, seed, p["threads"], **kw)
    assert ours.dtype == torch.float32 and g_ours[0].dtype == torch.float32
    assert not torch.equal(exact[2][1], g_ours[1])  # the products really were bf16
    # Reference: the bf16-rounded inputs in float64; bound: the bf16 vnni path's (module docstring).
    # The bias is added in fp32 (it is no GEMM operand): only hidden and weight are rounded.
    r16 = [hidden.detach().to(torch.bfloat16), weight.detach().to(torch.bfloat16), None if bias is None else bias.detach()]
    r64 = [None if t is None else t.double().requires_grad_(True) for t in r16]
    ref = reference_sequence_logprobs(r64[0], r64[1], labels, cu, bias=r64[2], **kw)
    g_ref = _grads(ref, upstream.double(), r64)
    bounds = rounding_error_bounds(r16[0], r16[1], labels, cu, upstream, bias=r16[2], **kw, dz_rounded=True,
                                   truncating_accumulation=True)
    _check("forward", ours, ref, 2 * bounds["forward"] + 1e-30)
    for name, a, b in zip(["d_hidden", "d_weight", "d_bias"], g_ours, g_ref):
        _check(name, a, b, 2 * bounds[name] + 1e-30)


@pytest.mark.skipif(not native_paths_here(), reason="nash_fast._C not built")
def test_native_op_refuses_an_unknown_precision():
    h, w, y = torch.randn(2, 4), torch.randn(5, 4), torch.tensor([0, 1])
    with pytest.raises((ValueError, RuntimeError), match="float32_matmul_precision"):
        torch.ops.nash_fast.token_logprobs_forward(h, w, None, y, None, "fast")


@pytest.mark.skipif(not _bf16_vnni_here(), reason="needs the native bf16 vnni path (AVX512-BF16 or AMX)")
def test_compiled_call_follows_the_matmul_precision(matmul_precision):
    """torch.compile(fullgraph=True): the precision is read when the graph is traced and a change retraces it."""
    g = torch.Generator().manual_seed(0)
    h, w, y = torch.randn(70, 40, generator=g), torch.randn(300, 40, generator=g), torch.randint(0, 300, (70,), generator=g)
    eager_highest = sequence_logprobs(h, w, y, backend="native")
    torch._dynamo.reset()
    f = torch.compile(lambda h, w, y: sequence_logprobs(h, w, y, backend="native"), fullgraph=True, backend="aot_eager")
    assert torch.equal(f(h, w, y), eager_highest)
    matmul_precision("medium")
    eager_medium = sequence_logprobs(h, w, y, backend="native")
    assert not torch.equal(eager_medium, eager_highest)
    assert torch.equal(f(h, w, y), eager_medium)
