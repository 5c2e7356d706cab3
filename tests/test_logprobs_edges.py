"""sequence_logprobs at the edges of its input space, against float64, every kernel path in a child process.

Issue 22 found, by fuzzing, inputs the main property test (tests/test_logprobs.py) never drew: a vocabulary
block whose logits are all -inf (NaN), a soft-cap under or beyond float32's range (ignored; NaN), a zero-width
hidden (SIGFPE), cu_seqlens on another device (uninitialised memory read as results), uint8 labels whose
ignore_index wrapped. The strategies here draw those classes on purpose:

  masked vocabulary   whole 128-entry blocks (the native tile; 4 Triton tiles) at the start, middle and end,
                      by a -inf bias, a -1e30 bias (-inf in fp16, finite elsewhere) or a -inf weight entry
                      against a positive hidden column; labels inside masked blocks included
  soft-caps           from 1e-50 (under float32's subnormals) through 2^-126 and ordinary values to 3e38
  widths, vocabularies  H in {0, 1, 2, 3, 17, 40}, V in {1, 2, 127, 128, 129, 300, 700}
  label dtypes        uint8 through int64, with ignore_index values that wrap in the narrow ones, and labels
                      equal to the wrapped value (which must be scored)
  devices             each tensor argument on the meta device

Each case is computed in a spawned child process (tests/edge_worker.py): a crash fails the test that
drew it, naming the input. Tolerance, where float64 is finite: the derived bound of tests/reference.py,
|ours - ref64| <= 2 * bound + 1e-30, as in tests/test_logprobs.py (its module docstring); masked entries
are exact on every path (-inf in, exp = 0 out), so they add no term (reference.py says why). Where
float64 is -inf or NaN (a label logit of -inf: -inf; every logit -inf: NaN; a -inf weight times a zero
d_z in d_hidden: NaN), the path must give exactly that.
"""

import math
import subprocess
import sys

import pytest
import torch
from hypothesis import example, given, strategies as st

import edge_worker
from reference import reference_sequence_logprobs, rounding_error_bounds
from test_logprobs import CASE_IDS, CASES, DEVICE, native_paths_here, path_roundings

from nash_fast import sequence_logprobs

VOCAB_BLOCK = 128  # the native kernels' BLOCK_V (csrc/cpu/common.h); a multiple of Triton's tiles
LABEL_DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64]
SOFTCAPS = [None, None, 1e-50, 1e-45, 1e-40, 2.0**-126, 1e-3, 4.0, 1e10, 3e38]


@pytest.fixture(scope="module", autouse=True)
def _child_process():
    yield
    edge_worker.shutdown()


def _dtype_range(dtype):
    info = torch.iinfo(dtype)
    return info.min, info.max


def _wrapped(value, dtype):
    """value as the integer dtype's wraparound would store it (the old bug: -100 in uint8 is 156)."""
    lo, hi = _dtype_range(dtype)
    span = hi - lo + 1
    return (value - lo) % span + lo


@st.composite
def edge_problems(draw):
    V = draw(st.sampled_from([1, 2, 127, 128, 129, 300, 700]))
    H = draw(st.sampled_from([0, 1, 2, 3, 17, 40]))
    blocks = math.ceil(V / VOCAB_BLOCK)
    mask_kind = draw(st.sampled_from([None, "bias", "bias", "weight"] if H else [None, "bias"]))
    masked_blocks = sorted(draw(st.sets(st.sampled_from([0, blocks // 2, blocks - 1]), min_size=1))) if mask_kind else []
    return dict(
        V=V, H=H,
        lengths=draw(st.lists(st.integers(0, 9), min_size=1, max_size=4)),
        padded=draw(st.booleans()),
        dtype=draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16])),
        label_dtype=draw(st.sampled_from(LABEL_DTYPES)),
        ignore_index=draw(st.sampled_from([-100, 0, 156, 2**32 - 100])),
        ignore_p=draw(st.sampled_from([0.0, 0.3])),
        mask_kind=mask_kind, masked_blocks=masked_blocks,
        mask_value=draw(st.sampled_from([float("-inf"), -1e30])),
        masked_label_p=draw(st.sampled_from([0.0, 0.5])),
        average=draw(st.booleans()),
        bias=draw(st.booleans()),
        softcap=draw(st.sampled_from(SOFTCAPS)),
        seed=draw(st.integers(0, 2**16)),
        threads=draw(st.sampled_from([1, 2])),
    )


def make_edge_inputs(p):
    g = torch.Generator().manual_seed(p["seed"])
    V, H, dtype, label_dtype = p["V"], p["H"], p["dtype"], p["label_dtype"]
    lengths = p["lengths"]
    N = len(lengths) * max(max(lengths), 1) if p["padded"] else sum(lengths)
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g) / math.sqrt(max(H, 1)) * 3
    bias = torch.randn(V, generator=g) if (p["bias"] or p["mask_kind"] == "bias") else None
    masked = torch.zeros(V, dtype=torch.bool)
    for b in p["masked_blocks"]:
        masked[b * VOCAB_BLOCK:(b + 1) * VOCAB_BLOCK] = True
    if p["mask_kind"] == "bias":
        bias[masked] = p["mask_value"]
    elif p["mask_kind"] == "weight":  # W[v, 0] = -inf against hidden[:, 0] > 0: z_v = -inf exactly
        weight[masked, 0] = float("-inf")
        hidden[:, 0] = hidden[:, 0].abs() + 0.5

    lo, hi = _dtype_range(label_dtype)
    top = min(V, hi + 1)  # labels the dtype can hold
    labels = torch.randint(0, top, (N,), generator=g)
    trap = _wrapped(p["ignore_index"], label_dtype)
    if trap != p["ignore_index"] and 0 <= trap < top:  # the wrapped ignore_index is a class: it must be scored
        labels[torch.rand(N, generator=g) < 0.3] = trap
    in_mask = masked[:top].nonzero().squeeze(1)
    if in_mask.numel():
        pick = torch.rand(N, generator=g) < p["masked_label_p"]
        labels[pick] = in_mask[torch.randint(0, in_mask.numel(), (int(pick.sum()),), generator=g)]
    if lo <= p["ignore_index"] <= hi:  # ignored positions only where the dtype can hold ignore_index
        labels[torch.rand(N, generator=g) < p["ignore_p"]] = p["ignore_index"]
    if p["padded"]:
        T = max(max(lengths), 1)
        hidden, labels = hidden.reshape(len(lengths), T, H), labels.reshape(len(lengths), T)
        if lo <= p["ignore_index"] <= hi:
            for row, n in enumerate(lengths):
                labels[row, n:] = p["ignore_index"]
        cu = None
    else:
        cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(hidden), cast(weight), labels.to(label_dtype), cu, cast(bias)


def _check_edge(name, ours, ref, bound, reach=None):
    """Where float64 is finite: within 2 x the derived bound, or, where `reach` (the largest magnitude the
    computation passes through: ref itself, or a sequence's sum before average=True divides it) +- that bound
    gets to the output dtype's largest value (two tokens at a capped logit of -3e38 sum to -6e38), the
    overflow to +-inf of ref's sign that fp32 arithmetic gives. Where float64 is +-inf or NaN: exactly that."""
    largest = torch.finfo(ours.dtype).max
    reach = ref.abs() if reach is None else torch.maximum(reach.abs(), ref.abs())
    ours, ref, bound, reach = ours.double().cpu(), ref.double().cpu(), bound.double().cpu(), reach.double().cpu()
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    finite = torch.isfinite(ref)
    torch.testing.assert_close(ours[~finite], ref[~finite], rtol=0, atol=0, equal_nan=True,
                               msg=lambda m: f"{name}: where float64 is not finite the path must match it exactly: {m}")
    if not finite.any():
        return
    ours, ref, bound, reach = ours[finite], ref[finite], 2 * bound[finite] + 1e-30, reach[finite]
    overflow = torch.isinf(ours) & (torch.sign(ours) == torch.sign(ref)) & (reach + bound >= largest)
    assert (torch.isfinite(ours) | overflow).all(), f"{name}: non-finite values where float64 is finite"
    err = torch.where(overflow, 0.0, (ours - ref).abs())
    excess = err - bound
    worst = int(excess.argmax())
    assert excess[worst] <= 0, (f"{name}: error {err[worst].item():.3g} > 2 x derived bound "
                                f"{(bound[worst].item() - 1e-30) / 2:.3g} (ref {ref[worst].item():.6g})")


def _describe(p):
    return {k: v for k, v in p.items() if k != "seed"} | {"seed": p["seed"]}


# The issue's first report: bias -inf over the first 128 entries, label 699 (float64: about -140).
ISSUE_MASKED = dict(V=700, H=32, lengths=[4], padded=False, dtype=torch.float32, label_dtype=torch.int64,
                    ignore_index=-100, ignore_p=0.0, mask_kind="bias", masked_blocks=[0], mask_value=float("-inf"),
                    masked_label_p=0.0, average=False, bias=False, softcap=None, seed=0, threads=1)


@pytest.mark.parametrize("backend,isa", CASES, ids=CASE_IDS)
@given(p=edge_problems())
@example(p=ISSUE_MASKED)
@example(p=ISSUE_MASKED | dict(dtype=torch.bfloat16, masked_blocks=[0, 2, 5], masked_label_p=0.5, threads=2))
@example(p=ISSUE_MASKED | dict(mask_kind="weight", masked_blocks=[0, 5], lengths=[3, 0, 4], dtype=torch.float16))
@example(p=ISSUE_MASKED | dict(V=300, H=16, lengths=[10], mask_kind=None, masked_blocks=[], softcap=1e-50))
@example(p=ISSUE_MASKED | dict(V=7, H=0, lengths=[5], mask_kind=None, masked_blocks=[], bias=True, softcap=4.0))
@example(p=ISSUE_MASKED | dict(V=200, H=16, label_dtype=torch.uint8, ignore_p=0.3, mask_kind=None, masked_blocks=[]))
# A label on a -inf-weight entry under a cap whose 1/c is subnormal: the slope must be exactly 0 there (d_hidden
# 0 x -inf = NaN, as float64), not 1 - (s / c)^2 recovered through a rounded 1/c (found by --hypothesis-seed=970).
@example(p=dict(V=129, H=3, lengths=[0, 9], padded=True, dtype=torch.float32, label_dtype=torch.uint8,
                ignore_index=-100, ignore_p=0.0, mask_kind="weight", masked_blocks=[1], mask_value=float("-inf"),
                masked_label_p=0.0, average=False, bias=False, softcap=3e38, seed=1075, threads=1))
def test_edges_match_float64(backend, isa, p):
    if DEVICE[backend] != "cpu":
        pytest.skip("the child process runs CPU backends (the Triton interpreter included)")
    hidden, weight, labels, cu, bias = make_edge_inputs(p)
    kw = dict(average=p["average"], softcap=p["softcap"], ignore_index=p["ignore_index"], cu_seqlens=cu)
    try:
        ours, g_ours, upstream = edge_worker.run_in_child(
            edge_worker.forward_backward, backend, isa, p["threads"], hidden, weight, labels, bias, kw, p["seed"] + 1)
    except edge_worker.ChildCrashed as crash:
        pytest.fail(f"{crash} on {_describe(p)}")
    exact = [None if t is None else t.detach().double().requires_grad_(True) for t in (hidden, weight, bias)]
    bias_exact = None if exact[2] is None else exact[2].detach()
    ref_kw = dict(average=p["average"], softcap=p["softcap"], ignore_index=p["ignore_index"], bias=exact[2])
    ref = reference_sequence_logprobs(exact[0], exact[1], labels, cu, **ref_kw)
    leaves = [t for t in exact if t is not None]
    if ref.requires_grad:
        g_ref = [torch.zeros_like(t) if g is None else g for t, g in
                 zip(leaves, torch.autograd.grad(ref, leaves, upstream.double(), allow_unused=True))]
    else:
        g_ref = [torch.zeros_like(t) for t in leaves]
    assert ours.dtype == torch.float32
    bounds = rounding_error_bounds(hidden, weight, labels, cu, upstream, bias=bias, average=p["average"],
                                   softcap=p["softcap"], ignore_index=p["ignore_index"],
                                   **path_roundings(backend, isa, "cpu", p["dtype"]))
    sums = ref if not p["average"] else reference_sequence_logprobs(  # log-probs are <= 0: |partial sums| <= |sum|
        exact[0].detach(), exact[1].detach(), labels, cu, **(ref_kw | dict(average=False, bias=bias_exact)))
    _check_edge("forward", ours, ref, bounds["forward"], reach=sums.detach())
    for name, a, c in zip(["d_hidden", "d_weight", "d_bias"], g_ours, g_ref):
        assert a.dtype == p["dtype"]
        _check_edge(name, a, c, bounds[name])


@pytest.mark.skipif(not native_paths_here(), reason="nash_fast._C is not built")
@pytest.mark.parametrize("isa", native_paths_here())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_native_ops_zero_width_do_not_crash(isa, dtype):
    """H = 0 through the operators themselves (the public API and the property test reach them too): the
    forward once died of SIGFPE (slices sized by H), the backward of SIGFPE or std::bad_alloc. The answer is
    exact: every logit is the bias (0 without), so logp = b_y - log sum exp(b), and only d_bias is non-empty."""
    labels = torch.tensor([0, 3, 6, 3, 1])
    bias = torch.tensor([0.5, -1.0, 0.0, 2.0, float("-inf"), 0.25, -3.0]).to(dtype)
    hidden, weight = torch.zeros(5, 0, dtype=dtype), torch.zeros(7, 0, dtype=dtype)
    grad = torch.tensor([1.0, -2.0, 0.5, 3.0, 1.0])
    try:
        logp, lse = edge_worker.run_in_child(edge_worker.native_op, isa, "token_logprobs_forward",
                                             hidden, weight, None, labels, None)
        logp_b, lse_b = edge_worker.run_in_child(edge_worker.native_op, isa, "token_logprobs_forward",
                                                 hidden, weight, bias, labels, 3.0)
        d_hidden, d_weight, d_bias = edge_worker.run_in_child(
            edge_worker.native_op, isa, "token_logprobs_backward", hidden, weight, bias, labels, 3.0, lse_b, grad,
            True, True, True, 1 << 20)
        none_needed = edge_worker.run_in_child(
            edge_worker.native_op, isa, "token_logprobs_backward", hidden, weight, None, labels, None, lse, grad,
            True, True, False, 3)
    except edge_worker.ChildCrashed as crash:
        pytest.fail(f"{crash}: native path {isa}, {dtype}, H = 0")
    torch.testing.assert_close(logp, torch.full((5,), -math.log(7)), rtol=0, atol=4e-7)  # 2 ulp of log 7
    s = 3.0 * torch.tanh(bias.double() / 3.0)  # the capped bias in float64
    torch.testing.assert_close(logp_b.double(), s[labels] - torch.logsumexp(s, 0), rtol=0, atol=1e-6)
    p = torch.exp(s - torch.logsumexp(s, 0))
    onehot = torch.zeros(5, 7, dtype=torch.float64).index_put_((torch.arange(5), labels), torch.tensor(1.0, dtype=torch.float64))
    expected = ((onehot - p) * grad.double()[:, None]).sum(0) * (1 - (s / 3.0) ** 2)
    tol = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11 if dtype == torch.float16 else 1e-6
    torch.testing.assert_close(d_bias.double(), expected, rtol=tol, atol=1e-5)
    assert d_hidden.shape == (5, 0) and d_weight.shape == (7, 0)
    assert [t.numel() for t in none_needed] == [0, 0, 0]


@pytest.mark.skipif(not native_paths_here(), reason="nash_fast._C is not built")
def test_native_zero_width_in_a_fresh_process():
    """The issue's exact call, in a fresh interpreter (the way a user's script would die of SIGFPE)."""
    code = ("import torch, nash_fast.logprobs as lp; lp.native_status(); "
            "print(torch.ops.nash_fast.token_logprobs_forward(torch.zeros(5, 0), torch.zeros(7, 0), None, "
            "torch.zeros(5, dtype=torch.long), None)[0].tolist())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode} (negative: killed by that signal): {proc.stderr[-2000:]}"
    assert [round(x, 5) for x in eval(proc.stdout.strip().splitlines()[-1])] == [round(-math.log(7), 5)] * 5


BACKENDS_HERE = sorted({b for b, _ in CASES if DEVICE[b] == "cpu"})


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("softcap", [0.0, -1.0, float("nan"), float("inf"), 1e39, 1e300, "x"])
def test_softcap_outside_float32_range_is_a_value_error(backend, softcap):
    args = (torch.randn(4, 6), torch.randn(7, 6), torch.tensor([0, 1, 6, -100]))
    with pytest.raises(ValueError, match="softcap"):
        sequence_logprobs(*args, softcap=softcap, backend=backend)


@pytest.mark.skipif(not native_paths_here(), reason="nash_fast._C is not built")
@pytest.mark.parametrize("softcap", [1e39, float("inf"), 0.0])
def test_native_op_rejects_softcap_outside_float32_range(softcap):
    with pytest.raises(ValueError, match="softcap"):
        edge_worker.native_op(None, "token_logprobs_forward", torch.randn(3, 4), torch.randn(5, 4), None,
                              torch.tensor([0, 1, 2]), softcap)


@given(which=st.sampled_from(["hidden", "weight", "labels", "bias", "cu_seqlens"]),
       backend=st.sampled_from(BACKENDS_HERE), N=st.integers(0, 6), V=st.integers(1, 9))
def test_a_tensor_on_another_device_is_a_value_error_naming_it(which, backend, N, V):
    """cu_seqlens on the meta device once returned uninitialised memory as log-probs; every tensor argument on
    another device than hidden's (the meta device stands for one) is a ValueError naming that argument."""
    args = dict(hidden=torch.randn(N, 4), weight=torch.randn(V, 4), labels=torch.randint(0, V, (N,)),
                bias=torch.randn(V), cu_seqlens=torch.tensor([0, N], dtype=torch.int32))
    args[which] = args[which].to("meta")
    with pytest.raises(ValueError, match=which if which != "labels" else "labels are on"):
        sequence_logprobs(args.pop("hidden"), args.pop("weight"), args.pop("labels"), backend=backend, **args)


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_narrow_label_dtypes_compare_by_value(backend):
    """uint8 labels: -100 once wrapped to 156 and class 156 was silently ignored; int32 labels with
    ignore_index = 2**32 - 100 ignored -100. Labels compare with ignore_index by value."""
    g = torch.Generator().manual_seed(7)
    hidden, weight = torch.randn(4, 16, generator=g), torch.randn(200, 16, generator=g)
    labels = torch.tensor([156, 3, 5, 156])
    wide = sequence_logprobs(hidden, weight, labels, backend=backend)
    for dtype in (torch.uint8, torch.int16, torch.int32, torch.uint16, torch.uint32):
        assert torch.equal(sequence_logprobs(hidden, weight, labels.to(dtype), backend=backend), wide), dtype
    with pytest.raises(ValueError, match=r"labels must be in \[0, 200\)"):
        sequence_logprobs(hidden, weight, torch.tensor([-100, 3, 5, 1], dtype=torch.int32), ignore_index=2**32 - 100,
                          backend=backend)
    with pytest.raises(ValueError, match="labels of dtype torch.uint64"):
        sequence_logprobs(hidden, weight, labels.to(torch.uint64), backend=backend)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(ignore_index=2**70), "ignore_index must be an integer"),
        (dict(ignore_index=-(2**63) - 1), "ignore_index must be an integer"),
        (dict(ignore_index=-100.5), "ignore_index must be an integer"),
        (dict(ignore_index="-100"), "ignore_index must be an integer"),
        (dict(bias=[0.0] * 7), "bias must be a"),
        (dict(bias=0.0), "bias must be a"),
    ],
)
@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_bad_arguments_are_value_errors_naming_them(backend, kwargs, match):
    args = (torch.randn(4, 6), torch.randn(7, 6), torch.tensor([0, 1, 6, -100]))
    with pytest.raises(ValueError, match=match):
        sequence_logprobs(*args, backend=backend, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_zero_width_and_empty_vocabulary_through_the_api(backend):
    """H = 0: the exact answer, -log V per scored token (the logits are all 0). V = 0: a ValueError naming weight."""
    labels = torch.tensor([0, 6, -100, 2, 5])
    out = sequence_logprobs(torch.zeros(5, 0), torch.zeros(7, 0), labels, cu_seqlens=torch.tensor([0, 2, 5], dtype=torch.int32),
                            backend=backend)
    torch.testing.assert_close(out, torch.tensor([-2 * math.log(7), -2 * math.log(7)]), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="weight"):
        sequence_logprobs(torch.zeros(5, 3), torch.zeros(0, 3), torch.full((5,), -100), backend=backend)


@pytest.mark.skipif(not native_paths_here(), reason="nash_fast._C is not built")
def test_vnni_path_is_named_for_what_it_is():
    """The 16-bit path is oneDNN's brgemm on VNNI-layout operands (AMX tiles, or AVX512-BF16 dot products on
    CPUs without AMX such as AMD Zen 4): "vnni", never "amx" on a CPU without AMX. NASH_FAST_CPU_ISA=amx, the
    old name, still selects it."""
    from test_logprobs import forced_isa

    import nash_fast.logprobs as lp_mod

    with forced_isa(None):
        best = lp_mod.native_cpu_isa(torch.bfloat16)
    assert best in ("vnni", "avx512", "avx2", "portable")
    with forced_isa("amx"):
        assert lp_mod.native_cpu_isa(torch.bfloat16) == best  # no higher than what the CPU supports
    if best == "vnni":
        with forced_isa("vnni"):
            assert torch.ops.nash_fast.cpu_gemm(torch.bfloat16) == "brgemm-vnni"
