// Shared pieces of the CPU kernels: instruction-set levels, tile sizes, kernel arguments.
//
// The GEMMs: 16-bit operands in VNNI layout run through ATen's batch-reduce GEMM (at::native::cpublas::brgemm,
// oneDNN's ukernel) on the CPU's matrix units (AMX) or AVX-512-BF16 dot products, accumulating in fp32;
// fp32 operands (and 16-bit inputs converted exactly) through MKL's packed sgemm where torch links MKL
// (mkl.h), else oneDNN's fp32 brgemm. Everything around the
// GEMM tiles (bias, soft-cap, log-sum-exp, gather, d_z) is our code, compiled once per vector ISA
// (sequence_logprobs_kernel.cpp, built for AVX512, AVX2 and DEFAULT: see CMakeLists.txt).
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace nash_fast::cpu {

// Code paths, best first. NASH_FAST_CPU_ISA=vnni|avx512|avx2|portable forces a lower one (tests; "amx",
// this path's former name, is still read as vnni).
//   vnni      16-bit operands in VNNI layout through oneDNN's brgemm, which runs them on AMX tiles where
//             the CPU has AMX and as AVX512-BF16 / AVX512-FP16 dot products where it does not (an AMD Zen 4
//             has no AMX), AVX-512 epilogues. Chosen when brgemm accepts the dtype in VNNI layout.
//   avx512    fp32 operands (16-bit inputs converted exactly), AVX-512 epilogues.
//   avx2      fp32 operands, AVX2 epilogues.
//   portable  fp32 operands, plain C++ epilogues (any CPU; brgemm falls back to ATen's gemm).
enum class Isa : int { Portable = 0, Avx2 = 1, Avx512 = 2, Vnni = 3 };

const char* isa_name(Isa isa);
// Best path this CPU and this build support for inputs of `dtype` (Vnni only where brgemm takes
// `dtype` in VNNI layout).
Isa supported_isa(at::ScalarType dtype);
// supported_isa(dtype), lowered to NASH_FAST_CPU_ISA when that names a lower path. Read on every
// call, so a test can switch paths inside one process.
Isa active_isa(at::ScalarType dtype);

// Tile sizes. Logits tiles are vocabulary-major: [BLOCK_V entries x BLOCK_T tokens] (fp32, 32 KiB),
// so every per-token reduction (max, sum of exp) runs down the rows in vector lanes. d_weight tiles are
// [BLOCK_V x BLOCK_H]; d_hidden is accumulated transposed, in [BLOCK_HT x BLOCK_T] tiles.
constexpr int64_t BLOCK_V = 128;
constexpr int64_t BLOCK_T = 64;
constexpr int64_t BLOCK_H = 64;
constexpr int64_t BLOCK_HT = 128;
// d_weight units: BLOCK_V vocabulary rows x H_GROUP column blocks of BLOCK_H (fp32 accumulators: 256 KiB).
constexpr int64_t H_GROUP = 8;
// Elements added to the row stride of buffers that GEMMs read 16 rows at a time (64 bytes of bf16).
constexpr int64_t CACHE_LINE_PAD = 32;

// Vocabulary slices: the forward streams Vs x H weight elements per slice (sized to stay in L2 while
// every token block passes over them); the backward keeps d_z for N x Vs elements (max_chunk_elements).
constexpr int64_t FORWARD_SLICE_BYTES = int64_t(1) << 20;
// Narrower backward slices make the d_hidden GEMM's depth too short (measured on AMX: 512 is best at N = 4096
// and at N = 16384; 128 and 256 were 10-40% slower per phase).
constexpr int64_t MIN_BACKWARD_SLICE = 512;
// Gradient filtering (BackwardArgs::filter_eps > 0): the backward decides per FILTER_ROWS vocabulary rows x BLOCK_T
// tokens of d_z whether the two gradient GEMMs may skip them. Measured on SmolLM2-135M's real hidden states at
// eps = 2^-12 (bench/gradient_filter.py): 64% of 16 x 64 blocks are negligible, 13% of whole 128 x 64 tiles.
constexpr int64_t FILTER_ROWS = 16;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// Arguments of one call; pointers are to contiguous tensors of `dtype` unless noted.
struct ForwardArgs {
  at::ScalarType dtype;
  const void* hidden;     // [N, H]
  const void* weight;     // [V, H]
  const void* bias;       // [V] or nullptr
  const int64_t* labels;  // [N], every one in [0, V)
  float softcap;          // 0: none
  int64_t N, H, V;
  float* logp;            // [N] out
  float* lse;             // [N] out
  bool bf16_products = false;  // fp32 inputs on the vnni path: operands rounded once to bf16, fp32 accumulation
};

struct BackwardArgs {
  at::ScalarType dtype;
  const void* hidden;
  const void* weight;
  const void* bias;
  const int64_t* labels;
  float softcap;
  int64_t N, H, V;
  const float* lse;       // [N]
  const float* grad;      // [N]: d loss / d logp of each token
  void* d_hidden;         // [N, H] or nullptr (not needed)
  void* d_weight;         // [V, H] or nullptr
  void* d_bias;           // [V] or nullptr
  int64_t max_chunk_elements;  // bound on N x Vs, the d_z slice
  // > 0: the gradient GEMMs skip every FILTER_ROWS x BLOCK_T block of d_z whose softmax values are all < filter_eps
  // and that holds no label (each skipped entry has |d_z| < filter_eps |g|); 0: exact.
  float filter_eps = 0.0f;
  bool bf16_products = false;  // as in ForwardArgs
};

}  // namespace nash_fast::cpu
