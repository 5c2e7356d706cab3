// Which CPU code path runs: what the CPU and this build support, lowered by NASH_FAST_CPU_ISA.
#include "common.h"
#include "mkl.h"

#include <ATen/native/CPUBlas.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>

namespace nash_fast::cpu {

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Vnni: return "vnni";
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    default: return "portable";
  }
}

namespace {

bool cpu_has_avx512() {
#if defined(NASH_FAST_HAVE_AVX512) && (defined(__x86_64__) || defined(__i386__))
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

bool cpu_has_avx2() {
#if defined(NASH_FAST_HAVE_AVX2) && (defined(__x86_64__) || defined(__i386__))
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

// Whether oneDNN's brgemm multiplies `dtype` operands in our VNNI layout on this CPU (AMX, AVX512-BF16):
// ATen raises when the dtype is not supported, and some CPUs take 16-bit operands in another layout
// (float16 without AMX-FP16), so a small product with distinct values must come out exact, once per dtype.
template <typename T>
bool probe_vnni() {
  constexpr int64_t M = 2, N = 16, K = 4;
  T a[M * K], b[K * N];
  float c[M * N];
  for (int64_t i = 0; i < M * K; ++i) a[i] = T(float(i % 5 + 1));
  for (int64_t k = 0; k < K; ++k)
    for (int64_t n = 0; n < N; ++n) b[((k >> 1) * N + n) * 2 + (k & 1)] = T(float((k * N + n) % 7 - 3));
  try {
    at::native::cpublas::brgemm(M, N, K, K, N, N, false, a, b, c, true);
    at::native::cpublas::brgemm_release();
  } catch (const c10::Error&) {
    return false;
  }
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      float expected = 0;
      for (int64_t k = 0; k < K; ++k) expected += float((m * K + k) % 5 + 1) * float((k * N + n) % 7 - 3);
      if (c[m * N + n] != expected) return false;
    }
  return true;
}

bool brgemm_takes_vnni(at::ScalarType dtype) {
  static std::once_flag once;
  static bool bf16 = false, fp16 = false;
  std::call_once(once, [] {
    bf16 = probe_vnni<at::BFloat16>();
    fp16 = probe_vnni<at::Half>();
  });
  return dtype == at::kBFloat16 ? bf16 : dtype == at::kHalf ? fp16 : false;
}

}  // namespace

bool mkl_available() {
  static const bool linked = sgemm_ != nullptr && cblas_sgemm_pack_get_size != nullptr &&
                             cblas_sgemm_pack != nullptr && cblas_sgemm_compute != nullptr &&
                             MKL_Set_Num_Threads_Local != nullptr;
  const char* wanted = std::getenv("NASH_FAST_CPU_MKL");  // read on every call, like NASH_FAST_CPU_ISA
  return linked && !(wanted != nullptr && std::strcmp(wanted, "0") == 0);
}

Isa supported_isa(at::ScalarType dtype) {
  if (cpu_has_avx512()) return brgemm_takes_vnni(dtype) ? Isa::Vnni : Isa::Avx512;
  if (cpu_has_avx2()) return Isa::Avx2;
  return Isa::Portable;
}

Isa active_isa(at::ScalarType dtype) {
  const Isa best = supported_isa(dtype);
  const char* forced = std::getenv("NASH_FAST_CPU_ISA");
  if (forced == nullptr || *forced == '\0') return best;
  // "amx" was the vnni path's name until it was seen running on AVX512-BF16 (no AMX); old settings keep working.
  if (std::strcmp(forced, "amx") == 0) forced = isa_name(Isa::Vnni);
  for (Isa isa : {Isa::Vnni, Isa::Avx512, Isa::Avx2, Isa::Portable}) {
    if (std::strcmp(forced, isa_name(isa)) == 0) return static_cast<int>(isa) < static_cast<int>(best) ? isa : best;
  }
  TORCH_CHECK_VALUE(false, "NASH_FAST_CPU_ISA must be one of vnni, avx512, avx2, portable; got '", forced, "'");
}

}  // namespace nash_fast::cpu
