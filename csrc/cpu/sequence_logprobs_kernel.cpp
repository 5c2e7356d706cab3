// Token log-probability kernels, compiled once per vector ISA (CPU_CAPABILITY = AVX512, AVX2, DEFAULT).
//
// Tiles are vocabulary-major: z^T [BLOCK_V entries x BLOCK_T tokens] = W[block] (A: weight rows as they
// are) x hidden^T (B: each token block's hidden, packed once per call). A token is a vector lane, so
// the softmax reductions over the vocabulary are vertical vector ops, and d_z^T comes out in the
// layout the d_weight GEMM reads.
//
// Forward, per vocabulary slice (FORWARD_SLICE_BYTES of weight, kept in L2), parallel over token
// blocks: for each BLOCK_V block, one brgemm tile, then the epilogue adds the bias, soft-caps, folds
// the tile into each token's running max and sum of exponentials, and picks target logits. At the end
// lse = max + log(sum), logp = target - lse. Nothing of size N x V.
// Backward, per vocabulary slice (N x Vs <= max_chunk_elements):
//   (A) parallel over token blocks: recompute each z^T tile; d_z^T = g (onehot - exp(s - lse)) cap';
//       d_bias partial sums; d_z^T goes to the slice buffer [Vs, N] (for B) and, paired along the
//       vocabulary, to the token block's own buffer (for C);
//   (C) inside the token block: d_hidden^T[:, block] += W[slice]^T d_z^T[slice, block] (fp32, [H, N]);
//   (B) parallel over (vocabulary block, H block): d_weight[slice] = d_z^T[slice] hidden, written once.
// GEMM operands (op_t): the input's 16-bit type on the `vnni` path (VNNI layout; d_z rounded once to it,
// as GPU paths do for tensor cores), fp32 otherwise (16-bit inputs converted exactly; d_z kept in fp32).
//
// This file: the brgemm back end (forward_impl, backward_impl) and the entry points, which send fp32 operands to
// the MKL back end (sequence_logprobs_mkl.cpp) where MKL is linked. Both use the packing, epilogues and shared
// steps of gemm.h and the vector primitives of vec.h.
#include "sequence_logprobs.h"
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

// ------------------------------------------------------------------------------------------ forward

template <typename scalar_t, typename op_t>
void forward_impl(const ForwardArgs& a) {
  const int64_t N = a.N, H = a.H, V = a.V;
  const auto* hidden = static_cast<const scalar_t*>(a.hidden);
  const auto* weight = static_cast<const scalar_t*>(a.weight);
  const int64_t K = is_vnni<op_t>() ? round_up(H, 2) : H;  // VNNI pairs need an even depth
  const bool weight_as_is = std::is_same_v<scalar_t, op_t> && K == H;
  ForwardSteps<scalar_t> steps(a);

  PhaseClock clock("forward");
  const int64_t num_token_blocks = ceil_div(N, BLOCK_T);
  Buffer<op_t> hidden_packed(num_token_blocks * K * BLOCK_T);
  pack_hidden_blocks(hidden, N, H, K, hidden_packed.data());
  const int64_t Vs = std::clamp(FORWARD_SLICE_BYTES / int64_t(sizeof(op_t) * K) / BLOCK_V * BLOCK_V, BLOCK_V,
                                round_up(V, BLOCK_V));
  Buffer<op_t> weight_rows(weight_as_is ? 0 : Vs * K);
  clock("pack");

  for (int64_t v0 = 0; v0 < V; v0 += Vs) {
    const int64_t nv = std::min(Vs, V - v0);
    const op_t* W = reinterpret_cast<const op_t*>(weight + v0 * H);
    if (!weight_as_is) {
      at::parallel_for(0, nv, 64, [&](int64_t r0, int64_t r1) {
        copy_rows(weight + (v0 + r0) * H, r1 - r0, H, K, weight_rows.data() + r0 * K);
      });
      W = weight_rows.data();
      clock("pack");
    }
    at::parallel_for(0, num_token_blocks, 1, [&](int64_t t_begin, int64_t t_end) {
      alignas(64) float tile[BLOCK_V * BLOCK_T];
      for (int64_t tb = t_begin; tb < t_end; ++tb) {
        const int64_t t0 = tb * BLOCK_T;
        fVec m[TOKEN_VECS], s[TOKEN_VECS];
        steps.load(t0, m, s);
        for (int64_t r0 = 0; r0 < nv; r0 += BLOCK_V) {
          const int64_t vrows = std::min(BLOCK_V, nv - r0);
          gemm<op_t>(vrows, BLOCK_T, K, K, BLOCK_T, BLOCK_T, false, W + r0 * K,
                     hidden_packed.data() + tb * K * BLOCK_T, tile);
          steps.epilogue(tile, v0 + r0, vrows, t0, m, s);
        }
        steps.store(t0, m, s);
      }
      release_tiles<op_t>();
    });
    clock("tiles");
  }
  steps.finish();
}

// ------------------------------------------------------------------------------------------ backward

template <typename scalar_t, typename op_t>
void backward_impl(const BackwardArgs& a) {
  constexpr bool VNNI = is_vnni<op_t>();
  PhaseClock clock("backward");
  const int64_t N = a.N, H = a.H, V = a.V;
  const bool need_h = a.d_hidden != nullptr, need_w = a.d_weight != nullptr, need_b = a.d_bias != nullptr;
  const auto* hidden = static_cast<const scalar_t*>(a.hidden);
  const auto* weight = static_cast<const scalar_t*>(a.weight);
  const int64_t K = VNNI ? round_up(H, 2) : H;           // depth of the logits GEMM
  const bool weight_as_is = std::is_same_v<scalar_t, op_t> && K == H;
  const int64_t num_token_blocks = ceil_div(N, BLOCK_T);
  const int64_t N_pad = num_token_blocks * BLOCK_T;     // row stride of the d_z^T slice
  const int64_t Np = VNNI ? round_up(N, 2) : N;          // depth of the d_weight GEMM
  const int64_t num_h_blocks = ceil_div(H, BLOCK_H);
  const int64_t Vs = std::clamp(a.max_chunk_elements / N_pad / BLOCK_V * BLOCK_V, std::min(MIN_BACKWARD_SLICE, round_up(V, BLOCK_V)),
                                round_up(V, BLOCK_V));
  BackwardSteps<scalar_t> steps(a, Vs);

  Buffer<op_t> hidden_packed(num_token_blocks * K * BLOCK_T);
  Buffer<op_t> hidden_dweight(need_w ? (VNNI ? num_h_blocks * Np * BLOCK_H : (std::is_same_v<scalar_t, float> ? 0 : N * H)) : 0);
  at::parallel_for(0, num_token_blocks + (need_w && VNNI ? num_h_blocks : 0), 1, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      if (u < num_token_blocks)
        pack_hidden_for_logits(hidden + u * BLOCK_T * H, std::min(BLOCK_T, N - u * BLOCK_T), H, K,
                               hidden_packed.data() + u * K * BLOCK_T);
      else
        pack_hidden_for_dweight(hidden, N, Np, H, (u - num_token_blocks) * BLOCK_H,
                                hidden_dweight.data() + (u - num_token_blocks) * Np * BLOCK_H);
    }
  });
  if (need_w && !VNNI && !std::is_same_v<scalar_t, float>) copy_rows(hidden, N, H, H, hidden_dweight.data());
  clock("pack_hidden");
  const op_t* hidden_b = !need_w ? nullptr
                         : (!VNNI && std::is_same_v<scalar_t, float>) ? reinterpret_cast<const op_t*>(hidden)
                                                                       : hidden_dweight.data();

  Buffer<float> d_hidden_t(need_h ? H * N : 0);  // d_hidden^T [H, N], fp32 across slices (slice 0 writes it)
  Buffer<op_t> weight_rows(weight_as_is ? 0 : Vs * K);
  // Row strides of the slice buffers are padded by a cache line: rows a power of two apart would all
  // fall into the same L1/L2 sets when a GEMM reads 16 of them at once.
  const int64_t ld_wt = Vs + CACHE_LINE_PAD, ld_dz = N_pad + CACHE_LINE_PAD;
  Buffer<op_t> weight_t(need_h ? H * ld_wt : 0);  // W[slice]^T [H, Vs]
  // d_z^T of the slice: row-major [Vs, N_pad] (A of d_weight; in fp32 also B of d_hidden), and on the
  // VNNI path per token block paired along the vocabulary, [N / BLOCK_T, Vs / 2, BLOCK_T, 2] (B of d_hidden).
  Buffer<op_t> dz_t((need_w || (need_h && !VNNI)) ? Vs * ld_dz : 0);
  Buffer<op_t> dz_pairs(VNNI && need_h ? Vs * N_pad : 0);
  // Gradient filtering: live[tb * groups + g] says whether rows [g FILTER_ROWS, (g + 1) FILTER_ROWS) of the slice x
  // token block tb hold a softmax value >= eps or a label (written by the epilogues in (A)); (C) and (B) then run
  // their GEMMs over runs of live blocks only. Without filtering the GEMMs below are the exact ones of before.
  const float eps = a.filter_eps;
  const bool filter = eps > 0;
  const int64_t groups = ceil_div(Vs, FILTER_ROWS);
  Buffer<uint8_t> live(filter ? num_token_blocks * groups : 0);
  // Calls fn(first, end) for each maximal run [first, end) of nonzero flags[i * stride], i < count.
  auto for_runs = [](const uint8_t* flags, int64_t count, int64_t stride, auto&& fn) {
    for (int64_t i = 0; i < count;) {
      if (!flags[i * stride]) {
        ++i;
        continue;
      }
      int64_t j = i + 1;
      while (j < count && flags[j * stride]) ++j;
      fn(i, j);
      i = j;
    }
  };

  for (int64_t v0 = 0; v0 < V; v0 += Vs) {
    const int64_t nv = std::min(Vs, V - v0);
    const int64_t Kc = VNNI ? round_up(nv, 2) : nv;  // depth of the d_hidden GEMM
    const op_t* W = reinterpret_cast<const op_t*>(weight + v0 * H);
    const int64_t h_chunks = need_h ? ceil_div(H, 32) : 0;
    at::parallel_for(0, (weight_as_is ? 0 : ceil_div(nv, 64)) + h_chunks, 1, [&](int64_t u0, int64_t u1) {
      for (int64_t u = u0; u < u1; ++u) {
        if (u < h_chunks) {
          transpose_weight_rows(weight + v0 * H, nv, H, ld_wt, weight_t.data(), u * 32, std::min(H, u * 32 + 32));
        } else {
          const int64_t r0 = (u - h_chunks) * 64, r1 = std::min(nv, r0 + 64);
          copy_rows(weight + (v0 + r0) * H, r1 - r0, H, K, weight_rows.data() + r0 * K);
        }
      }
    });
    if (!weight_as_is) W = weight_rows.data();
    steps.begin_slice();
    clock("pack");

    // (A) d_z^T tiles, parallel over token blocks.
    at::parallel_for(0, num_token_blocks, 1, [&](int64_t t_begin, int64_t t_end) {
      alignas(64) float tile[BLOCK_V * BLOCK_T];
      float* my_d_bias = steps.thread_d_bias();
      for (int64_t tb = t_begin; tb < t_end; ++tb) {
        const int64_t t0 = tb * BLOCK_T;
        for (int64_t r0 = 0; r0 < nv; r0 += BLOCK_V) {
          const int64_t vrows = std::min(BLOCK_V, nv - r0);
          gemm<op_t>(vrows, BLOCK_T, K, K, BLOCK_T, BLOCK_T, false, W + r0 * K, hidden_packed.data() + tb * K * BLOCK_T,
                     tile);
          const TileContext c = steps.tile(v0 + r0, vrows, t0);
          uint8_t* my_live = filter ? live.data() + tb * groups + r0 / FILTER_ROWS : nullptr;
#if defined(CPU_CAPABILITY_AVX512)
          if constexpr (std::is_same_v<op_t, at::BFloat16>) {
            if (!need_b) {
              backward_epilogue_bf16(tile, c, steps.lse(t0), steps.grad(t0),
                                     dz_t.empty() ? nullptr : dz_t.data() + r0 * ld_dz + t0, ld_dz,
                                     dz_pairs.empty() ? nullptr : dz_pairs.data() + tb * Vs * BLOCK_T + r0 * BLOCK_T,
                                     eps, my_live);
              continue;
            }
          }
#endif
          backward_epilogue(tile, c, steps.lse(t0), steps.grad(t0), my_d_bias ? my_d_bias + r0 : nullptr, eps, my_live);
          if (!dz_t.empty())
            for (int64_t v = 0; v < vrows; ++v) store_row<op_t>(tile + v * BLOCK_T, dz_t.data() + (r0 + v) * ld_dz + t0);
          if (!dz_pairs.empty())
            for (int64_t v = 0; v < vrows; v += 2)
              store_row_pair<op_t>(tile + v * BLOCK_T, v + 1 < vrows ? tile + (v + 1) * BLOCK_T : nullptr,
                                   dz_pairs.data() + tb * Vs * BLOCK_T + (r0 + v) * BLOCK_T);
        }
      }
      release_tiles<op_t>();
    });
    clock("dz");

    // (C) d_hidden^T += W[slice]^T d_z^T: [BLOCK_HT, BLOCK_T] tiles, H-block-major so that the
    // BLOCK_HT rows of W^T stay in L2 while the token blocks pass.
    if (need_h) {
      const int64_t nhb = ceil_div(H, BLOCK_HT);
      at::parallel_for(0, nhb * num_token_blocks, 1, [&](int64_t u0, int64_t u1) {
        for (int64_t u = u0; u < u1; ++u) {
          const int64_t h0 = (u / num_token_blocks) * BLOCK_HT, t0 = (u % num_token_blocks) * BLOCK_T;
          const int64_t rows = std::min(BLOCK_HT, H - h0), tokens = std::min(BLOCK_T, N - t0);
          float* C = d_hidden_t.data() + h0 * N + t0;
          if (!filter) {
            const op_t* B = VNNI ? dz_pairs.data() + t0 * Vs : dz_t.data() + t0;
            gemm_long_k<op_t>(rows, tokens, Kc, ld_wt, VNNI ? BLOCK_T : ld_dz, N, v0 > 0, weight_t.data() + h0 * ld_wt,
                              B, C);
            continue;
          }
          // Only the live row groups of this token block: each run is one product of depth k1 - k0.
          bool written = v0 > 0;
          for_runs(live.data() + (t0 / BLOCK_T) * groups, ceil_div(nv, FILTER_ROWS), 1, [&](int64_t g0, int64_t g1) {
            const int64_t k0 = g0 * FILTER_ROWS, k1 = std::min(g1 * FILTER_ROWS, Kc);  // FILTER_ROWS is even
            const op_t* B = VNNI ? dz_pairs.data() + t0 * Vs + k0 * BLOCK_T : dz_t.data() + k0 * ld_dz + t0;
            gemm_long_k<op_t>(rows, tokens, k1 - k0, ld_wt, VNNI ? BLOCK_T : ld_dz, N, written,
                              weight_t.data() + h0 * ld_wt + k0, B, C);
            written = true;
          });
          if (!written)
            for (int64_t h = 0; h < rows; ++h) std::fill(C + h * N, C + h * N + tokens, 0.0f);
        }
        release_tiles<op_t>();
      });
      clock("d_hidden");
    }

    // (B) d_weight[slice] = d_z^T hidden, written once. A unit is BLOCK_V vocabulary rows x H_GROUP column
    // blocks with fp32 accumulators; the token depth is walked in GEMM_K_CHUNK chunks on the outside, so
    // each chunk of d_z^T rows is read once from memory and reused from L2 by the unit's column blocks.
    if (need_w) {
      auto* d_weight = static_cast<scalar_t*>(a.d_weight);
      const int64_t nvb = ceil_div(nv, BLOCK_V), h_groups = ceil_div(num_h_blocks, H_GROUP);
      const int64_t K_w = VNNI ? Np : N;  // depth of the d_weight GEMM
      at::parallel_for(0, nvb * h_groups, 1, [&](int64_t u0, int64_t u1) {
        Buffer<float> acc(BLOCK_V * H_GROUP * BLOCK_H);
        constexpr int64_t ld_acc = H_GROUP * BLOCK_H;
        for (int64_t u = u0; u < u1; ++u) {
          const int64_t vb = u / h_groups, hb0 = (u % h_groups) * H_GROUP, hb1 = std::min(num_h_blocks, hb0 + H_GROUP);
          const int64_t r0 = vb * BLOCK_V, vrows = std::min(BLOCK_V, nv - r0);
          if (filter) {  // per row group: the token blocks where it is live, in runs (depth k0..k1 of each)
            for (int64_t q0 = 0; q0 < vrows; q0 += FILTER_ROWS) {
              const int64_t grows = std::min(FILTER_ROWS, vrows - q0);
              bool written = false;
              for_runs(live.data() + (r0 + q0) / FILTER_ROWS, num_token_blocks, groups, [&](int64_t b0, int64_t b1) {
                const int64_t k_end = std::min(b1 * BLOCK_T, K_w);
                for (int64_t k0 = b0 * BLOCK_T; k0 < k_end; k0 += GEMM_K_CHUNK) {  // BLOCK_T, GEMM_K_CHUNK even
                  const int64_t kc = std::min(GEMM_K_CHUNK, k_end - k0);
                  for (int64_t hb = hb0; hb < hb1; ++hb) {
                    const int64_t h0 = hb * BLOCK_H, cols = std::min(BLOCK_H, H - h0);
                    const op_t* B = VNNI ? hidden_b + hb * Np * BLOCK_H + k0 * BLOCK_H : hidden_b + k0 * H + h0;
                    gemm<op_t>(grows, cols, kc, ld_dz, VNNI ? BLOCK_H : H, ld_acc, written,
                               dz_t.data() + (r0 + q0) * ld_dz + k0, B, acc.data() + q0 * ld_acc + (hb - hb0) * BLOCK_H);
                  }
                  written = true;
                }
              });
              if (!written) std::fill(acc.data() + q0 * ld_acc, acc.data() + (q0 + grows) * ld_acc, 0.0f);
            }
          }
          for (int64_t k0 = 0; k0 < (filter ? 0 : K_w); k0 += GEMM_K_CHUNK) {
            const int64_t kc = std::min(GEMM_K_CHUNK, K_w - k0);
            for (int64_t hb = hb0; hb < hb1; ++hb) {
              const int64_t h0 = hb * BLOCK_H, cols = std::min(BLOCK_H, H - h0);
              const op_t* B = VNNI ? hidden_b + hb * Np * BLOCK_H + k0 * BLOCK_H : hidden_b + k0 * H + h0;
              gemm<op_t>(vrows, cols, kc, ld_dz, VNNI ? BLOCK_H : H, ld_acc, k0 > 0, dz_t.data() + r0 * ld_dz + k0, B,
                         acc.data() + (hb - hb0) * BLOCK_H);
            }
          }
          const int64_t h_begin = hb0 * BLOCK_H, h_end = std::min(H, hb1 * BLOCK_H);
          for (int64_t v = 0; v < vrows; ++v) {
            scalar_t* dst = d_weight + (v0 + r0 + v) * H;
            const float* src = acc.data() + v * ld_acc - h_begin;
            for (int64_t h = h_begin; h < h_end; ++h) dst[h] = static_cast<scalar_t>(src[h]);
          }
        }
        release_tiles<op_t>();
      });
      clock("d_weight");
    }
    steps.end_slice(v0, nv);
  }

  clock("d_bias");
  if (need_h) {  // d_hidden = (d_hidden^T)^T, rounded once to the input dtype
    auto* out = static_cast<scalar_t*>(a.d_hidden);
    at::parallel_for(0, ceil_div(N, 16), 1, [&](int64_t b0, int64_t b1) {
      Buffer<float> rows(16 * H);  // 16 tokens' d_hidden rows in fp32, from a register transpose
      for (int64_t n0 = b0 * 16; n0 < std::min(N, b1 * 16); n0 += 16) {
        const int64_t n = std::min<int64_t>(16, N - n0);
        at::vec::transpose_mxn<float>(d_hidden_t.data() + n0, N, rows.data(), H, int(H), int(n));
        for (int64_t r = 0; r < n; ++r) row_from_fp32(rows.data() + r * H, H, out + (n0 + r) * H);
      }
    });
  }
  steps.write_d_bias();
  clock("output");
}

template <typename scalar_t, typename op_t>
struct Forward {
  static void run(const ForwardArgs& a) {
    if constexpr (std::is_same_v<op_t, float>) {
      if (mkl_available()) return forward_mkl<scalar_t>(a);
    }
    forward_impl<scalar_t, op_t>(a);
  }
};
template <typename scalar_t, typename op_t>
struct Backward {
  static void run(const BackwardArgs& a) {
    // Filtering skips blocks inside the two gradient GEMMs, which MKL runs as one sgemm each: it takes the
    // brgemm path (bench/gradient_filter.py measures both).
    if constexpr (std::is_same_v<op_t, float>) {
      if (mkl_available() && !(a.filter_eps > 0)) return backward_mkl<scalar_t>(a);
    }
    backward_impl<scalar_t, op_t>(a);
  }
};

template <template <typename, typename> class Fn, typename Args>
void dispatch(const Args& args, bool vnni) {
  switch (args.dtype) {
    case at::kBFloat16:
      vnni ? Fn<at::BFloat16, at::BFloat16>::run(args) : Fn<at::BFloat16, float>::run(args);
      break;
    case at::kHalf:
      vnni ? Fn<at::Half, at::Half>::run(args) : Fn<at::Half, float>::run(args);
      break;
    case at::kFloat:  // vnni here only for bf16 products (float32 matmul precision "medium")
      vnni && args.bf16_products ? Fn<float, at::BFloat16>::run(args) : Fn<float, float>::run(args);
      break;
    default:
      TORCH_CHECK_VALUE(false, "nash_fast CPU kernels take float32, bfloat16 or float16, got ", args.dtype);
  }
}

}  // namespace

void token_logprobs_forward(const ForwardArgs& args, bool vnni) { dispatch<Forward>(args, vnni); }
void token_logprobs_backward(const BackwardArgs& args, bool vnni) { dispatch<Backward>(args, vnni); }

}  // namespace CPU_CAPABILITY
}  // namespace nash_fast::cpu
