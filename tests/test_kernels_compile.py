"""The Triton kernels compile ahead of time for Hopper (sm_90) without a GPU.

The interpreter checks the kernels' arithmetic on CPU; it does not type-check them the way the
GPU compiler does, nor show which matrix instructions they lower to. This compiles every
autotuning config to a cubin and checks the bf16 path uses Hopper's wgmma and fits in shared
memory. Compilation runs in a subprocess because the interpreter (set by conftest) replaces
@triton.jit functions with interpreted ones.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

HOPPER_SMEM_BYTES = 227 * 1024

COMMON = {"h_ptr": "*{dt}", "w_ptr": "*{dt}", "b_ptr": "*{dt}", "labels_ptr": "*i64"}
SIGNATURES = {
    "_logits_lse_kernel": dict(
        COMMON, partial_lse_ptr="*fp32", target_ptr="*fp32", N="i32", V="i32", H="i32",
        stride_h="i32", stride_w="i32", softcap="fp32",
    ),
    "_dlogits_kernel": dict(
        COMMON, lse_ptr="*fp32", grad_ptr="*fp32", dz_ptr="*{dt}", dbias_partial_ptr="*fp32",
        N="i32", V="i32", H="i32", v_offset="i32", stride_h="i32", stride_w="i32", stride_dz="i32", softcap="fp32",
    ),
}


def compile_for_sm90(kernel_name, dtype, config, has_bias=True, has_softcap=True):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import nash_fast.kernels.sequence_logprobs as k

    fn = getattr(k, kernel_name).fn  # the JITFunction under the autotuner
    sig = {name: t.format(dt=dtype) for name, t in SIGNATURES[kernel_name].items()}
    consts = dict(HAS_BIAS=has_bias, HAS_SOFTCAP=has_softcap, UPCAST=False,
                  PRECISION="ieee" if dtype == "fp32" else "tf32", **config.kwargs)
    names = list(sig) + list(consts)
    sig.update({name: "constexpr" for name in consts})
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(n),): v for n, v in consts.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    return dict(wgmma="wgmma.mma_async" in compiled.asm["ptx"], shared=compiled.metadata.shared,
                cubin_bytes=len(compiled.asm["cubin"]))


def _compile_all():
    import nash_fast.kernels.sequence_logprobs as k

    results = {}
    for name in SIGNATURES:
        for i, config in enumerate(k.gpu_configs()):
            results[f"{name}/bf16/{i}"] = compile_for_sm90(name, "bf16", config)
        results[f"{name}/fp32/0"] = compile_for_sm90(name, "fp32", k.gpu_configs()[0], False, False)
    return results


@pytest.fixture(scope="module")
def compiled():
    env = {key: v for key, v in os.environ.items() if key != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_bf16_config_compiles_to_wgmma_within_shared_memory(compiled):
    bf16 = {key: v for key, v in compiled.items() if "/bf16/" in key}
    assert bf16
    for key, v in bf16.items():
        assert v["cubin_bytes"] > 0, key
        assert v["wgmma"], f"{key}: bf16 tiles should lower to Hopper's warpgroup MMA"
        assert v["shared"] <= HOPPER_SMEM_BYTES, f"{key}: {v['shared']} bytes of shared memory"


def test_fp32_ieee_path_compiles(compiled):
    for name in SIGNATURES:
        assert compiled[f"{name}/fp32/0"]["cubin_bytes"] > 0


if __name__ == "__main__":
    print(json.dumps(_compile_all()))
