// The fp32 GEMM back end on Intel MKL (mkl.h says why), compiled per ISA like sequence_logprobs_kernel.cpp,
// whose tiles and epilogues (gemm.h) it shares.
#include "gemm.h"
#include "mkl.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace nash_fast::cpu {
namespace CPU_CAPABILITY {
namespace {

// The fp32 path where MKL is present (mkl.h): the same tiles and epilogues, with the weight packed by MKL
// one sub-slice at a time (MKL_SUBSLICE_BYTES of fp32 rows, in L2) and each token block's z^T tile
// [rows x BLOCK_T] computed from the packed panel; the backward's two gradient GEMMs are one MKL sgemm
// each per vocabulary slice (threaded by MKL), d_hidden accumulated in fp32 and d_weight written once.
// 16-bit inputs are converted to fp32 exactly (hidden once, weight a slice at a time).
constexpr int64_t MKL_SUBSLICE_BYTES = int64_t(2) << 20;

inline int64_t mkl_subslice_rows(int64_t H, int64_t V) {
  return std::clamp(MKL_SUBSLICE_BYTES / int64_t(sizeof(float) * H) / BLOCK_V * BLOCK_V, BLOCK_V,
                    std::min<int64_t>(512, round_up(V, BLOCK_V)));
}

// rows x H (weight rows or hidden states) as fp32: a view when already fp32, else converted into `scratch`.
template <typename scalar_t>
const float* rows_as_fp32(const scalar_t* W, int64_t rows, int64_t H, Buffer<float>& scratch) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return W;
  } else {
    at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
      copy_rows(W + r0 * H, r1 - r0, H, H, scratch.data() + r0 * H);
    });
    return scratch.data();
  }
}

// Packs rows [rows x H] (fp32, row stride H) as MKL's A panel for C[rows x BLOCK_T] = A B.
inline void mkl_pack_rows(const float* rows_fp32, int64_t rows, int64_t H, float* packed) {
  cblas_sgemm_pack(NASH_FAST_CBLAS_ROW_MAJOR, NASH_FAST_CBLAS_A_MATRIX, NASH_FAST_CBLAS_NO_TRANS, int(rows),
                   int(BLOCK_T), int(H), 1.0f, rows_fp32, int(H), packed);
}

// z^T tile [rows x BLOCK_T] of one token block (hidden^T packed as [H, BLOCK_T], pad tokens zero).
inline void mkl_logits_tile(const float* packed, int64_t rows, int64_t H, const float* hidden_block, float* tile) {
  cblas_sgemm_compute(NASH_FAST_CBLAS_ROW_MAJOR, NASH_FAST_CBLAS_PACKED, NASH_FAST_CBLAS_NO_TRANS, int(rows),
                      int(BLOCK_T), int(H), packed, int(H), hidden_block, int(BLOCK_T), 0.0f, tile, int(BLOCK_T));
}

// fp32 rows [rows x H] into a 16-bit (or fp32) destination, rounded once.
template <typename scalar_t>
void store_rows(const float* src, int64_t rows, int64_t H, scalar_t* dst) {
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) row_from_fp32(src + r * H, H, dst + r * H);
  });
}

}  // namespace

template <typename scalar_t>
void forward_mkl(const ForwardArgs& a) {
  const int64_t N = a.N, H = a.H, V = a.V;
  const auto* hidden = static_cast<const scalar_t*>(a.hidden);
  const auto* weight = static_cast<const scalar_t*>(a.weight);
  ForwardSteps<scalar_t> steps(a);

  PhaseClock clock("forward(mkl)");
  const int64_t num_token_blocks = ceil_div(N, BLOCK_T);
  Buffer<float> hidden_packed(num_token_blocks * H * BLOCK_T);
  pack_hidden_blocks(hidden, N, H, H, hidden_packed.data());
  const int64_t rows_per_pack = mkl_subslice_rows(H, V);
  Buffer<float> packed(cblas_sgemm_pack_get_size(NASH_FAST_CBLAS_A_MATRIX, int(rows_per_pack), int(BLOCK_T), int(H)) /
                           sizeof(float) + 1);
  Buffer<float> converted(std::is_same_v<scalar_t, float> ? 0 : rows_per_pack * H);
  clock("pack");

  for (int64_t v0 = 0; v0 < V; v0 += rows_per_pack) {
    const int64_t nv = std::min(rows_per_pack, V - v0);
    mkl_pack_rows(rows_as_fp32(weight + v0 * H, nv, H, converted), nv, H, packed.data());
    clock("pack");
    at::parallel_for(0, num_token_blocks, 1, [&](int64_t t_begin, int64_t t_end) {
      MklSequential sequential;
      Buffer<float> tile(rows_per_pack * BLOCK_T);
      for (int64_t tb = t_begin; tb < t_end; ++tb) {
        const int64_t t0 = tb * BLOCK_T;
        fVec m[TOKEN_VECS], s[TOKEN_VECS];
        steps.load(t0, m, s);
        mkl_logits_tile(packed.data(), nv, H, hidden_packed.data() + tb * H * BLOCK_T, tile.data());
        for (int64_t r0 = 0; r0 < nv; r0 += BLOCK_V)
          steps.epilogue(tile.data() + r0 * BLOCK_T, v0 + r0, std::min(BLOCK_V, nv - r0), t0, m, s);
        steps.store(t0, m, s);
      }
    });
    clock("tiles");
  }
  steps.finish();
}

template <typename scalar_t>
void backward_mkl(const BackwardArgs& a) {
  constexpr bool FP32 = std::is_same_v<scalar_t, float>;
  PhaseClock clock("backward(mkl)");
  const int64_t N = a.N, H = a.H, V = a.V;
  const bool need_h = a.d_hidden != nullptr, need_w = a.d_weight != nullptr;
  const auto* hidden = static_cast<const scalar_t*>(a.hidden);
  const auto* weight = static_cast<const scalar_t*>(a.weight);
  const int64_t num_token_blocks = ceil_div(N, BLOCK_T);
  const int64_t N_pad = num_token_blocks * BLOCK_T;
  const int64_t rows_per_pack = mkl_subslice_rows(H, V);
  // d_z^T is kept once, in fp32 (the vnni path keeps it twice in 16 bits): twice max_chunk_elements entries,
  // so that the slice (the depth of the d_hidden sgemm) is wide enough for MKL to run near its peak.
  const int64_t Vs = std::clamp(2 * a.max_chunk_elements / N_pad / rows_per_pack * rows_per_pack, rows_per_pack,
                                round_up(V, rows_per_pack));
  BackwardSteps<scalar_t> steps(a, Vs);

  Buffer<float> hidden_packed(num_token_blocks * H * BLOCK_T);
  pack_hidden_blocks(hidden, N, H, H, hidden_packed.data());
  Buffer<float> hidden_converted(need_w && !FP32 ? N * H : 0);  // the d_weight sgemm's B
  const float* hidden_fp32 = nullptr;
  if constexpr (FP32) {
    hidden_fp32 = hidden;
  } else {
    if (need_w) hidden_fp32 = rows_as_fp32(hidden, N, H, hidden_converted);
  }
  clock("pack_hidden");

  Buffer<float> packed(cblas_sgemm_pack_get_size(NASH_FAST_CBLAS_A_MATRIX, int(rows_per_pack), int(BLOCK_T), int(H)) /
                           sizeof(float) + 1);
  Buffer<float> weight_converted(FP32 ? 0 : Vs * H);
  const int64_t ld_dz = N_pad + CACHE_LINE_PAD;
  Buffer<float> dz_t(Vs * ld_dz);                                   // d_z^T of the slice [Vs, N_pad]
  Buffer<float> d_hidden_acc(need_h && !FP32 ? N * H : 0);         // fp32 across slices
  float* d_hidden = need_h ? (FP32 ? static_cast<float*>(a.d_hidden) : d_hidden_acc.data()) : nullptr;
  Buffer<float> d_weight_rows(need_w && !FP32 ? Vs * H : 0);

  for (int64_t v0 = 0; v0 < V; v0 += Vs) {
    const int64_t nv = std::min(Vs, V - v0);
    const float* W = rows_as_fp32(weight + v0 * H, nv, H, weight_converted);
    steps.begin_slice();
    clock("pack");
    for (int64_t s0 = 0; s0 < nv; s0 += rows_per_pack) {
      const int64_t ns = std::min(rows_per_pack, nv - s0);
      mkl_pack_rows(W + s0 * H, ns, H, packed.data());
      clock("pack");
      at::parallel_for(0, num_token_blocks, 1, [&](int64_t t_begin, int64_t t_end) {
        MklSequential sequential;
        Buffer<float> tile(rows_per_pack * BLOCK_T);
        float* my_d_bias = steps.thread_d_bias();
        for (int64_t tb = t_begin; tb < t_end; ++tb) {
          const int64_t t0 = tb * BLOCK_T;
          mkl_logits_tile(packed.data(), ns, H, hidden_packed.data() + tb * H * BLOCK_T, tile.data());
          for (int64_t r0 = 0; r0 < ns; r0 += BLOCK_V) {
            const int64_t vrows = std::min(BLOCK_V, ns - r0), row = s0 + r0;  // row within the slice
            float* sub = tile.data() + r0 * BLOCK_T;
            backward_epilogue(sub, steps.tile(v0 + row, vrows, t0), steps.lse(t0), steps.grad(t0),
                              my_d_bias ? my_d_bias + row : nullptr);
            for (int64_t v = 0; v < vrows; ++v) store_row<float>(sub + v * BLOCK_T, dz_t.data() + (row + v) * ld_dz + t0);
          }
        }
      });
      clock("dz");
    }
    if (need_h) {  // d_hidden [N, H] (+)= d_z [N, nv] W[slice] [nv, H]
      sgemm_row_major('T', 'N', N, H, nv, 1.0f, dz_t.data(), ld_dz, W, H, v0 > 0 ? 1.0f : 0.0f, d_hidden, H);
      clock("d_hidden");
    }
    if (need_w) {  // d_weight[slice] [nv, H] = d_z^T [nv, N] hidden [N, H], written once
      auto* d_weight = static_cast<scalar_t*>(a.d_weight) + v0 * H;
      float* out = FP32 ? reinterpret_cast<float*>(d_weight) : d_weight_rows.data();
      sgemm_row_major('N', 'N', nv, H, N, 1.0f, dz_t.data(), ld_dz, hidden_fp32, H, 0.0f, out, H);
      if constexpr (!FP32) store_rows(out, nv, H, d_weight);
      clock("d_weight");
    }
    steps.end_slice(v0, nv);
  }
  if constexpr (!FP32) {
    if (need_h) store_rows(d_hidden, N, H, static_cast<scalar_t*>(a.d_hidden));
  }
  steps.write_d_bias();
  clock("output");
}

#define NASH_FAST_INSTANTIATE(scalar_t)                      \
  template void forward_mkl<scalar_t>(const ForwardArgs&); \
  template void backward_mkl<scalar_t>(const BackwardArgs&);
NASH_FAST_INSTANTIATE(float)
NASH_FAST_INSTANTIATE(at::BFloat16)
NASH_FAST_INSTANTIATE(at::Half)
#undef NASH_FAST_INSTANTIATE

}  // namespace CPU_CAPABILITY
}  // namespace nash_fast::cpu
