// Vector primitives of the CPU kernels, for the instruction set each copy is compiled for (CPU_CAPABILITY:
// AVX512, AVX2, DEFAULT; CMakeLists.txt builds every kernel source once per ISA). Included only by those
// sources, so everything here lives in nash_fast::cpu::CPU_CAPABILITY, in an anonymous namespace: each object
// file holds its own copy, compiled for its ISA, and no definition can be shared across two ISAs by the linker.
#pragma once
#ifndef CPU_CAPABILITY
#error "compiled once per vector ISA with CPU_CAPABILITY defined (CMakeLists.txt: add_capability)"
#endif

#include "common.h"

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <type_traits>
#include <utility>
#include <vector>

namespace nash_fast::cpu {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;
using fVec = Vectorized<float>;
constexpr int64_t LANES = fVec::size();
constexpr int64_t TOKEN_VECS = BLOCK_T / LANES;  // vectors per tile row
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();
static_assert(BLOCK_T % LANES == 0 && BLOCK_V % 2 == 0 && BLOCK_T % 2 == 0, "tile sizes");

// GEMM operand buffers start on a cache line: a tile row (64 bytes) straddling two lines costs the matrix
// units two loads (measured: unaligned std::vector buffers made the gradient GEMMs about 1.6x slower).
template <typename T>
struct CacheLineAllocator {
  using value_type = T;
  CacheLineAllocator() = default;
  template <typename U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}
  T* allocate(std::size_t n) {
    void* p = std::aligned_alloc(64, round_up(std::max<int64_t>(int64_t(n * sizeof(T)), 64), 64));
    if (p == nullptr) throw std::bad_alloc();
    return static_cast<T*>(p);
  }
  void deallocate(T* p, std::size_t) { std::free(p); }
  // Buffer<T>(n) leaves the memory uninitialized (every buffer here is written before it is read):
  // zero-filling tens of MiB per call would cost as much as a packing pass.
  template <typename U>
  void construct(U* p) noexcept {
    ::new (static_cast<void*>(p)) U;
  }
  template <typename U, typename... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
  template <typename U>
  bool operator==(const CacheLineAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const CacheLineAllocator<U>&) const { return false; }
};
template <typename T>
using Buffer = std::vector<T, CacheLineAllocator<T>>;

template <typename dst_t, typename src_t>
inline dst_t cast(src_t x) {
  if constexpr (std::is_same_v<dst_t, src_t>) {
    return x;  // a copy of the bits, not a round trip through float
  } else {
    return static_cast<dst_t>(static_cast<float>(x));
  }
}

// exp for the epilogues. AVX-512: Cody-Waite reduction x = n ln2 + r, |r| <= ln2 / 2, Cephes' degree-7
// polynomial for e^r (relative error <= 2.3e-7, under 4 ulp: the bound tests/reference.py allows) and
// 2^n by vscalefps; exp(-inf) = 0 and exp(nan) = nan (vminps / vmaxps return their second operand when
// either is NaN, so x goes second: a NaN logit must not turn into e^88.7). Elsewhere ATen's (Sleef, 1 ulp).
inline fVec vexp(const fVec& x) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 v = _mm512_max_ps(_mm512_set1_ps(-104.0f), _mm512_min_ps(_mm512_set1_ps(88.7228394f), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), v);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
#else
  return x.exp();
#endif
}

#if defined(CPU_CAPABILITY_AVX512)
// bf16 (round to nearest even) of 16 fp32 lanes, in the upper half of each 32-bit lane.
inline __m512i bf16_upper(__m512 x) {
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  return _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb));
}
#endif

// Rows v, v + 1 of a d_z^T tile as VNNI pairs [BLOCK_T, 2] of op_t (the d_hidden GEMM's B operand);
// odd == nullptr pairs row v with zeros. Rounds to nearest even, as the scalar conversions do.
template <typename op_t>
inline void store_row_pair(const float* even, const float* odd, op_t* dst) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<op_t, at::BFloat16>) {
    const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
    for (int64_t t = 0; t < BLOCK_T; t += 16) {
      const __m512i lo = _mm512_srli_epi32(bf16_upper(_mm512_loadu_ps(even + t)), 16);
      const __m512i hi = odd ? _mm512_and_si512(bf16_upper(_mm512_loadu_ps(odd + t)), high) : _mm512_setzero_si512();
      _mm512_storeu_si512(reinterpret_cast<void*>(dst + 2 * t), _mm512_or_si512(lo, hi));
    }
    return;
  }
#endif
  for (int64_t t = 0; t < BLOCK_T; ++t) {
    dst[2 * t] = static_cast<op_t>(even[t]);
    dst[2 * t + 1] = odd ? static_cast<op_t>(odd[t]) : op_t(0);
  }
}


// A tile row of BLOCK_T fp32 values to op_t.
template <typename op_t>
inline void store_row(const float* src, op_t* dst) {
  if constexpr (std::is_same_v<op_t, float>) {
    std::memcpy(dst, src, BLOCK_T * sizeof(float));
  } else {
    for (int64_t j = 0; j < BLOCK_T; j += 2 * LANES) {
      at::vec::convert_from_float<op_t>(fVec::loadu(src + j), fVec::loadu(src + j + LANES)).store(dst + j);
    }
  }
}

// One fp32 row of H values into the output dtype, rounded once (a copy for fp32).
template <typename scalar_t>
inline void row_from_fp32(const float* src, int64_t H, scalar_t* dst) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    std::memcpy(dst, src, H * sizeof(float));
  } else {
    int64_t h = 0;
    for (; h + 2 * LANES <= H; h += 2 * LANES)
      at::vec::convert_from_float<scalar_t>(fVec::loadu(src + h), fVec::loadu(src + h + LANES)).store(dst + h);
    for (; h < H; ++h) dst[h] = static_cast<scalar_t>(src[h]);
  }
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace nash_fast::cpu
