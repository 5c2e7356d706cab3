// The tile GEMMs and everything around them that both GEMM back ends use (brgemm: sequence_logprobs_kernel.cpp;
// MKL: sequence_logprobs_mkl.cpp): operand packing, the logits tiles' epilogues (bias, soft-cap, log-sum-exp,
// d_z) and the steps before and after the tiles. Compiled per ISA like vec.h.
#pragma once

#include "vec.h"

#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <chrono>
#include <cstdio>
#include <string>

namespace nash_fast::cpu {
namespace CPU_CAPABILITY {
namespace {

// ------------------------------------------------------------------------------------------ GEMM calls

template <typename op_t>
constexpr bool is_vnni() {
  return !std::is_same_v<op_t, float>;
}

// C[M, N] (+)= A[M, K] B[K, N]: A row-major (lda); B with row stride ldb, in VNNI pairs along K for
// 16-bit operands ([K/2, ldb, 2]) or row-major for fp32; C fp32 row-major (ldc).
template <typename op_t>
inline void gemm(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc, bool add_C, const op_t* A,
                 const op_t* B, float* C) {
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add_C, A, B, C, /*is_vnni=*/is_vnni<op_t>());
}

// The same product with K split into chunks of at most GEMM_K_CHUNK (accumulating into C): brgemm
// streams its A and B panels once per call, so a long K (the slice width, the token count) would not
// stay in L1/L2 while the kernel walks its M x N sub-tiles.
constexpr int64_t GEMM_K_CHUNK = 1024;

template <typename op_t>
inline void gemm_long_k(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc, bool add_C,
                        const op_t* A, const op_t* B, float* C) {
  for (int64_t k0 = 0; k0 < K; k0 += GEMM_K_CHUNK) {
    const int64_t kc = std::min(GEMM_K_CHUNK, K - k0);  // GEMM_K_CHUNK is even: VNNI pairs stay whole
    const op_t* B_chunk = B + k0 * ldb;  // fp32: k0 rows of ldb; VNNI: k0 / 2 pair rows of 2 ldb
    gemm<op_t>(M, N, kc, lda, ldb, ldc, add_C || k0 > 0, A + k0, B_chunk, C);
  }
}

template <typename op_t>
inline void release_tiles() {
  if constexpr (is_vnni<op_t>()) at::native::cpublas::brgemm_release();
}

// Offset of element (k, n) in a B operand with row stride ld.
template <typename op_t>
inline int64_t b_offset(int64_t k, int64_t n, int64_t ld) {
  if constexpr (is_vnni<op_t>()) {
    return ((k >> 1) * ld + n) * 2 + (k & 1);
  } else {
    return k * ld + n;
  }
}

// ------------------------------------------------------------------------------------------ packing

// hidden^T of one token block as the logits' B operand: [K, BLOCK_T] (zero for tokens >= rows, k >= H).
template <typename scalar_t, typename op_t>
void pack_hidden_for_logits(const scalar_t* hidden, int64_t rows, int64_t H, int64_t K, op_t* out) {
  std::fill(out, out + K * BLOCK_T, op_t(0));
  if constexpr (std::is_same_v<scalar_t, op_t> && sizeof(op_t) == 2) {
    if (K == H) {  // VNNI pairs (k, k + 1) are 32-bit words: a [rows, H / 2] -> [H / 2, rows] word transpose
      at::vec::transpose_mxn<float>(reinterpret_cast<const float*>(hidden), H / 2, reinterpret_cast<float*>(out),
                                    BLOCK_T, int(rows), int(H / 2));
      return;
    }
  }
  if constexpr (std::is_same_v<scalar_t, op_t> && std::is_same_v<op_t, float>) {
    at::vec::transpose_mxn<float>(hidden, H, out, BLOCK_T, int(rows), int(H));
    return;
  }
  for (int64_t t = 0; t < rows; ++t)
    for (int64_t k = 0; k < H; ++k) out[b_offset<op_t>(k, t, BLOCK_T)] = cast<op_t>(hidden[t * H + k]);
}

// hidden as the d_weight GEMM's B operand, one BLOCK_H column block: [Np, BLOCK_H], VNNI pairs along tokens.
template <typename scalar_t, typename op_t>
void pack_hidden_for_dweight(const scalar_t* hidden, int64_t N, int64_t Np, int64_t H, int64_t h0, op_t* out) {
  const int64_t cols = std::min(BLOCK_H, H - h0);
  std::fill(out, out + Np * BLOCK_H, op_t(0));
  if constexpr (std::is_same_v<scalar_t, op_t> && sizeof(op_t) == 2) {  // interleave token rows t, t + 1
    const auto* h16 = reinterpret_cast<const uint16_t*>(hidden);
    auto* out32 = reinterpret_cast<uint32_t*>(out);
    for (int64_t t = 0; t < N; t += 2) {
      const uint16_t* even = h16 + t * H + h0;
      const uint16_t* odd = t + 1 < N ? even + H : nullptr;
      uint32_t* dst = out32 + (t / 2) * BLOCK_H;
      if (odd) {
        for (int64_t j = 0; j < cols; ++j) dst[j] = uint32_t(even[j]) | (uint32_t(odd[j]) << 16);
      } else {
        for (int64_t j = 0; j < cols; ++j) dst[j] = uint32_t(even[j]);
      }
    }
    return;
  }
  for (int64_t t = 0; t < N; ++t)
    for (int64_t j = 0; j < cols; ++j) out[b_offset<op_t>(t, j, BLOCK_H)] = cast<op_t>(hidden[t * H + h0 + j]);
}

// rows x H of weight as a row-major A operand of K columns (converted, zero-padded).
template <typename scalar_t, typename op_t>
void copy_rows(const scalar_t* W, int64_t rows, int64_t H, int64_t K, op_t* out) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t k = 0; k < H; ++k) out[r * K + k] = cast<op_t>(W[r * H + k]);
    for (int64_t k = H; k < K; ++k) out[r * K + k] = op_t(0);
  }
}

// W[slice]^T as the d_hidden GEMM's A operand: [H, ld] row-major (columns >= nv zero). Same-dtype copies go
// through ATen's register transposes (32 x 32 16-bit / 16 x 16 fp32 blocks on AVX-512); conversions, element
// by element in 32 x 32 blocks.
template <typename scalar_t, typename op_t>
void transpose_weight_rows(const scalar_t* W, int64_t nv, int64_t H, int64_t ld, op_t* out, int64_t h_begin,
                           int64_t h_end) {
  constexpr int64_t T = std::is_same_v<op_t, float> ? 16 : 32;
  for (int64_t h0 = h_begin; h0 < h_end; h0 += T) {
    const int64_t h1 = std::min(h_end, h0 + T);
    for (int64_t v0 = 0; v0 < nv; v0 += T) {
      const int64_t v1 = std::min(nv, v0 + T);
      if constexpr (std::is_same_v<scalar_t, op_t>) {
        at::vec::transpose_mxn<op_t>(W + v0 * H + h0, H, out + h0 * ld + v0, ld, int(v1 - v0), int(h1 - h0));
      } else {
        for (int64_t h = h0; h < h1; ++h)
          for (int64_t v = v0; v < v1; ++v) out[h * ld + v] = cast<op_t>(W[v * H + h]);
      }
    }
    for (int64_t h = h0; h < h1; ++h) std::fill(out + h * ld + nv, out + (h + 1) * ld, op_t(0));
  }
}

// ------------------------------------------------------------------------------------------ epilogues

// x + bias, soft-capped: c tanh(x / c). *slope (when given and soft-capped): ds/dx = 1 - tanh^2, from the tanh
// itself, so it is exactly 0 where the tanh saturates to +-1 (x = -inf: a masked entry). Recovering the tanh as
// s * (1/c) is off by up to 2^-150 / (1/c) relative when 1/c is subnormal (c near 3.4e38): a slope of ~1e-7
// there, times a -inf weight in d_hidden, gave -inf where float64 gives 0 x -inf = NaN.
inline fVec logit(fVec x, float bias, float softcap, float inv_softcap, fVec* slope = nullptr) {
  x = x + fVec(bias);
  if (softcap > 0) {
    const fVec t = (x * fVec(inv_softcap)).tanh();
    if (slope) *slope = fVec(1.0f) - t * t;
    x = fVec(softcap) * t;
  }
  return x;
}

inline float logit_scalar(float x, float bias, float softcap, float inv_softcap, float* slope = nullptr) {
  x = x + bias;
  if (softcap > 0) {
    const float t = std::tanh(x * inv_softcap);
    if (slope) *slope = 1.0f - t * t;
    x = softcap * t;
  }
  return x;
}

struct TileContext {
  int64_t vrows;          // valid vocabulary rows of the tile
  int64_t tokens;         // valid token columns
  int64_t col0;           // vocabulary index of row 0
  const float* bias;      // [vrows] or nullptr (already offset)
  float softcap, inv_softcap;
  const int64_t* labels;  // [tokens]
};

// Folds a z^T tile into the running per-token (max, sum of exp) and picks targets; pad lanes are ignored.
// One pass: exponentials are taken against the running max as it stood before the tile (a first tile,
// or one whose max exceeds it by more than RESCALE_MARGIN, is redone against its own max, so no term
// exceeds e^RESCALE_MARGIN and nothing overflows); then the sum is rescaled to the new max.
// A masked vocabulary (-inf logits: a -inf bias, -inf weights) makes maxima -inf; every exponential is taken
// against shift(m), which is m, or 0 where m = -inf: exp(-inf - 0) = 0, where exp(-inf - (-inf)) would be NaN.
constexpr float RESCALE_MARGIN = 16.0f;

inline fVec shift_of(const fVec& m) { return fVec::blendv(fVec(0.0f), m, m > fVec(NEG_INF)); }

void forward_epilogue(float* tile, const TileContext& c, fVec* run_max, fVec* run_sum, float* target) {
  const bool transform = c.bias != nullptr || c.softcap > 0;
  fVec tile_max[TOKEN_VECS], sum[TOKEN_VECS], shift[TOKEN_VECS];
  for (int64_t q = 0; q < TOKEN_VECS; ++q) {
    tile_max[q] = fVec(NEG_INF);
    sum[q] = fVec(0.0f);
    shift[q] = shift_of(run_max[q]);  // while run_max = -inf: 0, and any finite tile max forces the redo below
  }
  for (int64_t v = 0; v < c.vrows; ++v) {
    const float b = c.bias ? c.bias[v] : 0.0f;
    float* row = tile + v * BLOCK_T;
    for (int64_t q = 0; q < TOKEN_VECS; ++q) {
      fVec x = fVec::loadu(row + q * LANES);
      if (transform) {
        x = logit(x, b, c.softcap, c.inv_softcap);
        x.store(row + q * LANES);
      }
      tile_max[q] = at::vec::maximum(tile_max[q], x);
      sum[q] = sum[q] + vexp(x - shift[q]);
    }
  }
  for (int64_t q = 0; q < TOKEN_VECS; ++q) {
    float m_old[LANES], m_tile[LANES];
    run_max[q].store(m_old);
    tile_max[q].store(m_tile);
    bool redo = false;
    for (int64_t l = 0; l < LANES; ++l) redo |= !(m_tile[l] <= m_old[l] + RESCALE_MARGIN);
    // Lanes whose max stays -inf keep run_sum = 0: their sums are 0 and every factor is exp(-inf - 0) = 0.
    const fVec m_new = at::vec::maximum(run_max[q], tile_max[q]);
    const fVec new_shift = shift_of(m_new);
    if (redo) {  // against the tile's own max (first tile: m_old = -inf); lanes of an all -inf tile add 0
      const fVec tile_shift = shift_of(tile_max[q]);
      sum[q] = fVec(0.0f);
      for (int64_t v = 0; v < c.vrows; ++v) sum[q] = sum[q] + vexp(fVec::loadu(tile + v * BLOCK_T + q * LANES) - tile_shift);
      run_sum[q] = run_sum[q] * vexp(run_max[q] - new_shift) + sum[q] * vexp(tile_max[q] - new_shift);
    } else {
      run_sum[q] = (run_sum[q] + sum[q]) * vexp(shift[q] - new_shift);
    }
    run_max[q] = m_new;
  }
  for (int64_t t = 0; t < c.tokens; ++t) {
    const int64_t local = c.labels[t] - c.col0;
    if (local >= 0 && local < c.vrows) target[t] = tile[local * BLOCK_T + t];
  }
}

// Lanes of the tokens a tile holds (t < tokens), as blend masks. Pad lanes (no token: zero hidden) are set to
// d_z = 0 outright: exp(s - lse) * 0 is NaN there when a -inf weight meets the zero pad (-inf * 0), and the
// d_bias row sums and the vnni path's d_weight GEMM (its token depth rounded up to even) read pad lanes.
inline void token_lanes(int64_t tokens, fVec* valid) {
  alignas(64) float index[BLOCK_T];
  for (int64_t t = 0; t < BLOCK_T; ++t) index[t] = float(t);
  for (int64_t q = 0; q < TOKEN_VECS; ++q) valid[q] = fVec::loadu(index + q * LANES) < fVec(float(tokens));
}

// Gradient filtering: live[g] = 0 when every softmax value p = exp(s - lse) of rows [g FILTER_ROWS, (g + 1)
// FILTER_ROWS) of the tile is < eps (max_p: their running vector maximum; a NaN keeps the block live, as
// !(NaN < eps)); rows holding a token's label are marked live afterwards (mark_label_groups), since there
// |onehot - p| = 1 - p is not small. Pad lanes have p = exp(s - inf) = 0.
inline uint8_t group_is_live(const fVec& max_p, float eps) {
  const float m = at::vec::vec_reduce_all<float>([](fVec& x, fVec& y) { return at::vec::maximum(x, y); }, max_p);
  return !(m < eps);
}

inline void mark_label_groups(const TileContext& c, uint8_t* live) {
  for (int64_t t = 0; t < c.tokens; ++t) {
    const int64_t local = c.labels[t] - c.col0;
    if (local >= 0 && local < c.vrows) live[local / FILTER_ROWS] = 1;
  }
}

// d_z^T = g (onehot - exp(s - lse)) cap' of one z^T tile, the arithmetic of both backward epilogues; lse and grad
// are [BLOCK_T] with pad lanes (grad 0), which get 0. The label entries (onehot = 1) are computed when this is
// built, from the logits before an epilogue overwrites them, and written after the rest by for_labels.
class DzTile {
 public:
  DzTile(const float* tile, const TileContext& c, const float* lse, const float* grad)
      : c_(c), padded_(c.tokens < BLOCK_T) {
    for (int64_t t = 0; t < BLOCK_T; ++t) {
      const int64_t local = t < c.tokens ? c.labels[t] - c.col0 : -1;
      label_row_[t] = (local >= 0 && local < c.vrows) ? local : -1;
      if (label_row_[t] < 0) continue;
      float cap = 1.0f;
      const float s =
          logit_scalar(tile[local * BLOCK_T + t], c.bias ? c.bias[local] : 0.0f, c.softcap, c.inv_softcap, &cap);
      label_dz_[t] = (1.0f - std::exp(s - lse[t])) * grad[t] * cap;
    }
    for (int64_t q = 0; q < TOKEN_VECS; ++q) {
      shift_[q] = fVec::loadu(lse + q * LANES);
      neg_g_[q] = fVec(0.0f) - fVec::loadu(grad + q * LANES);
    }
    if (padded_) token_lanes(c.tokens, valid_);
  }

  // -g exp(s - lse) cap' for the lanes [q LANES, (q + 1) LANES) of a row with logits z and bias b (the entry
  // wherever the row is not the label); folds exp(s - lse) into *max_p when max_p is given.
  fVec operator()(const fVec& z, float b, int64_t q, fVec* max_p) const {
    fVec cap;
    const fVec s = logit(z, b, c_.softcap, c_.inv_softcap, &cap);
    const fVec p = vexp(s - shift_[q]);
    if (max_p) *max_p = at::vec::maximum(*max_p, p);
    fVec d = p * neg_g_[q];
    if (c_.softcap > 0) d = d * cap;
    if (padded_) d = fVec::blendv(fVec(0.0f), d, valid_[q]);
    return d;
  }

  // fn(row, token, d) for each label entry of the tile.
  template <typename Fn>
  void for_labels(Fn&& fn) const {
    for (int64_t t = 0; t < BLOCK_T; ++t)
      if (label_row_[t] >= 0) fn(label_row_[t], t, label_dz_[t]);
  }

 private:
  const TileContext& c_;
  const bool padded_;
  fVec shift_[TOKEN_VECS], neg_g_[TOKEN_VECS], valid_[TOKEN_VECS];
  float label_dz_[BLOCK_T];
  int64_t label_row_[BLOCK_T];
};

// Replaces a z^T tile by d_z^T (DzTile). Adds each row's sum (the final d_z) to d_bias when given. With live (one
// flag per FILTER_ROWS rows of the tile), also records which row groups hold a softmax value >= eps (group_is_live).
void backward_epilogue(float* tile, const TileContext& c, const float* lse, const float* grad, float* d_bias,
                       float eps = 0.0f, uint8_t* live = nullptr) {
  const DzTile dz(tile, c, lse, grad);
  fVec max_p(0.0f);
  for (int64_t v = 0; v < c.vrows; ++v) {
    const float b = c.bias ? c.bias[v] : 0.0f;
    float* row = tile + v * BLOCK_T;
    for (int64_t q = 0; q < TOKEN_VECS; ++q)
      dz(fVec::loadu(row + q * LANES), b, q, live ? &max_p : nullptr).store(row + q * LANES);
    if (live && ((v + 1) % FILTER_ROWS == 0 || v + 1 == c.vrows)) {
      live[v / FILTER_ROWS] = group_is_live(max_p, eps);
      max_p = fVec(0.0f);
    }
  }
  if (live) mark_label_groups(c, live);
  dz.for_labels([&](int64_t local, int64_t t, float d) { tile[local * BLOCK_T + t] = d; });
  if (d_bias) {
    for (int64_t v = 0; v < c.vrows; ++v) {
      const float* row = tile + v * BLOCK_T;
      fVec sum(0.0f);
      for (int64_t q = 0; q < TOKEN_VECS; ++q) sum = sum + fVec::loadu(row + q * LANES);
      d_bias[v] += at::vec::vec_reduce_all<float>([](fVec& x, fVec& y) { return x + y; }, sum);
    }
  }
}

#if defined(CPU_CAPABILITY_AVX512)
// The vnni path's epilogue in one pass (bf16 operands, d_bias not needed): d_z^T (DzTile) goes straight from
// registers to the slice's row-major buffer (dz_rows: row 0 of the tile, stride ld_dz; the d_weight GEMM's A)
// and to the token block's vocabulary pairs (dz_pairs: pair row 0 of the tile; the d_hidden GEMM's B); either
// may be nullptr. The same values as backward_epilogue, rounded once to bf16.
void backward_epilogue_bf16(const float* tile, const TileContext& c, const float* lse, const float* grad,
                            at::BFloat16* dz_rows, int64_t ld_dz, at::BFloat16* dz_pairs, float eps = 0.0f,
                            uint8_t* live = nullptr) {
  const DzTile dz(tile, c, lse, grad);
  fVec max_p(0.0f);
  auto d_of = [&](int64_t v, int64_t q) {
    return __m512(dz(fVec::loadu(tile + v * BLOCK_T + q * LANES), c.bias ? c.bias[v] : 0.0f, q,
                     live ? &max_p : nullptr));
  };
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int64_t v = 0; v < c.vrows; v += 2) {
    const bool odd = v + 1 < c.vrows;
    for (int64_t q = 0; q < TOKEN_VECS; ++q) {
      const __m512i e = bf16_upper(d_of(v, q));
      const __m512i o = odd ? bf16_upper(d_of(v + 1, q)) : _mm512_setzero_si512();
      if (dz_rows) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dz_rows + v * ld_dz + q * LANES),
                            _mm512_cvtepi32_epi16(_mm512_srli_epi32(e, 16)));
        if (odd)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dz_rows + (v + 1) * ld_dz + q * LANES),
                              _mm512_cvtepi32_epi16(_mm512_srli_epi32(o, 16)));
      }
      if (dz_pairs)
        _mm512_storeu_si512(reinterpret_cast<void*>(dz_pairs + (v / 2) * BLOCK_T * 2 + q * LANES * 2),
                            _mm512_or_si512(_mm512_srli_epi32(e, 16), _mm512_and_si512(o, high)));
    }
    if (live && ((v + 2) % FILTER_ROWS == 0 || v + 2 >= c.vrows)) {  // FILTER_ROWS is even: pairs stay inside
      live[v / FILTER_ROWS] = group_is_live(max_p, eps);
      max_p = fVec(0.0f);
    }
  }
  if (live) mark_label_groups(c, live);
  dz.for_labels([&](int64_t local, int64_t t, float value) {
    const at::BFloat16 d(value);
    if (dz_rows) dz_rows[local * ld_dz + t] = d;
    if (dz_pairs) dz_pairs[((local / 2) * BLOCK_T + t) * 2 + (local & 1)] = d;
  });
}
#endif

// ------------------------------------------------------------------------------------------ shared steps

// The bias as fp32 ([V], empty without one).
template <typename scalar_t>
Buffer<float> bias_fp32(const void* bias, int64_t V) {
  Buffer<float> out(bias ? V : 0);
  for (int64_t v = 0; bias && v < V; ++v) out[v] = static_cast<float>(static_cast<const scalar_t*>(bias)[v]);
  return out;
}

// Every token block's hidden^T as the logits' B operand, [ceil(N / BLOCK_T), K, BLOCK_T], in parallel.
template <typename scalar_t, typename op_t>
void pack_hidden_blocks(const scalar_t* hidden, int64_t N, int64_t H, int64_t K, op_t* out) {
  at::parallel_for(0, ceil_div(N, BLOCK_T), 1, [&](int64_t b0, int64_t b1) {
    for (int64_t tb = b0; tb < b1; ++tb)
      pack_hidden_for_logits(hidden + tb * BLOCK_T * H, std::min(BLOCK_T, N - tb * BLOCK_T), H, K,
                             out + tb * K * BLOCK_T);
  });
}

// Both forward back ends around their GEMMs: the bias in fp32, the tiles' epilogue contexts, and per token
// (padded to whole token blocks) the running max and sum of exponentials over the vocabulary seen so far and
// the label's logit; finish() turns them into lse = max + log(sum) and logp = target - lse.
template <typename scalar_t>
class ForwardSteps {
 public:
  explicit ForwardSteps(const ForwardArgs& a)
      : a_(a),
        inv_softcap_(a.softcap > 0 ? 1.0f / a.softcap : 0.0f),
        bias_(bias_fp32<scalar_t>(a.bias, a.V)),
        run_max_(round_up(a.N, BLOCK_T), NEG_INF),
        run_sum_(round_up(a.N, BLOCK_T), 0.0f),
        target_(round_up(a.N, BLOCK_T), 0.0f) {}

  // The running values of the token block starting at t0, into registers (m: max, s: sum) and back.
  void load(int64_t t0, fVec* m, fVec* s) const {
    for (int64_t q = 0; q < TOKEN_VECS; ++q) {
      m[q] = fVec::loadu(run_max_.data() + t0 + q * LANES);
      s[q] = fVec::loadu(run_sum_.data() + t0 + q * LANES);
    }
  }
  void store(int64_t t0, const fVec* m, const fVec* s) {
    for (int64_t q = 0; q < TOKEN_VECS; ++q) {
      m[q].store(run_max_.data() + t0 + q * LANES);
      s[q].store(run_sum_.data() + t0 + q * LANES);
    }
  }

  // forward_epilogue of the z^T tile of vocabulary rows [col, col + vrows) x the token block starting at t0.
  void epilogue(float* tile, int64_t col, int64_t vrows, int64_t t0, fVec* m, fVec* s) {
    const TileContext c{vrows, std::min(BLOCK_T, a_.N - t0), col, a_.bias ? bias_.data() + col : nullptr,
                        a_.softcap, inv_softcap_, a_.labels + t0};
    forward_epilogue(tile, c, m, s, target_.data() + t0);
  }

  void finish() const {
    at::parallel_for(0, a_.N, 4096, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        a_.lse[i] = run_max_[i] + std::log(run_sum_[i]);
        a_.logp[i] = target_[i] - a_.lse[i];
      }
    });
  }

 private:
  const ForwardArgs& a_;
  const float inv_softcap_;
  const Buffer<float> bias_;
  Buffer<float> run_max_, run_sum_, target_;
};

// Both backward back ends around their GEMMs: the bias in fp32, the tiles' epilogue contexts, lse and grad
// padded to whole token blocks, and d_bias. Pad lanes get lse = +inf and grad = 0, so their d_z =
// exp(s - inf) * 0 = 0 whatever their (bias-only) logits are. d_bias is summed per thread over a vocabulary
// slice of at most Vs rows (the epilogues add into thread_d_bias()), the threads' sums are added in thread order
// after each slice (end_slice) and rounded once to the output dtype at the end (write_d_bias).
template <typename scalar_t>
class BackwardSteps {
 public:
  BackwardSteps(const BackwardArgs& a, int64_t Vs)
      : a_(a),
        Vs_(Vs),
        inv_softcap_(a.softcap > 0 ? 1.0f / a.softcap : 0.0f),
        bias_(bias_fp32<scalar_t>(a.bias, a.V)),
        lse_(padded_tokens(a.lse, a.N, std::numeric_limits<float>::infinity())),
        grad_(padded_tokens(a.grad, a.N, 0.0f)),
        d_bias_(a.d_bias ? a.V : 0, 0.0f),
        num_threads_(at::get_num_threads()),
        d_bias_partial_(a.d_bias ? num_threads_ * Vs : 0) {}

  // The epilogue's view of the z^T tile of vocabulary rows [col, col + vrows) x the token block starting at t0,
  // and that block's lse and grad.
  TileContext tile(int64_t col, int64_t vrows, int64_t t0) const {
    return {vrows, std::min(BLOCK_T, a_.N - t0), col, a_.bias ? bias_.data() + col : nullptr, a_.softcap,
            inv_softcap_, a_.labels + t0};
  }
  const float* lse(int64_t t0) const { return lse_.data() + t0; }
  const float* grad(int64_t t0) const { return grad_.data() + t0; }

  void begin_slice() {
    if (a_.d_bias) std::fill(d_bias_partial_.begin(), d_bias_partial_.end(), 0.0f);
  }
  // The calling thread's d_bias sums for the slice, by row within the slice (nullptr without d_bias).
  float* thread_d_bias() { return a_.d_bias ? d_bias_partial_.data() + at::get_thread_num() * Vs_ : nullptr; }
  // After the slice of nv rows from v0.
  void end_slice(int64_t v0, int64_t nv) {
    if (a_.d_bias)
      for (int t = 0; t < num_threads_; ++t)
        for (int64_t v = 0; v < nv; ++v) d_bias_[v0 + v] += d_bias_partial_[t * Vs_ + v];
  }
  void write_d_bias() const {
    if (!a_.d_bias) return;
    auto* out = static_cast<scalar_t*>(a_.d_bias);
    for (int64_t v = 0; v < a_.V; ++v) out[v] = static_cast<scalar_t>(d_bias_[v]);
  }

 private:
  static Buffer<float> padded_tokens(const float* values, int64_t N, float fill) {
    Buffer<float> out(round_up(N, BLOCK_T), fill);
    std::copy(values, values + N, out.begin());
    return out;
  }

  const BackwardArgs& a_;
  const int64_t Vs_;
  const float inv_softcap_;
  const Buffer<float> bias_, lse_, grad_;
  Buffer<float> d_bias_;
  const int num_threads_;
  Buffer<float> d_bias_partial_;
};

// NASH_FAST_PROFILE=1: wall seconds per phase of each call, printed to stderr (for tuning).
class PhaseClock {
 public:
  explicit PhaseClock(const char* what) : what_(what), on_(std::getenv("NASH_FAST_PROFILE") != nullptr) { lap(); }
  void operator()(const char* phase) {
    if (!on_) return;
    const double now = lap();
    for (auto& [name, seconds] : phases_)
      if (name == phase) {
        seconds += now;
        return;
      }
    phases_.emplace_back(phase, now);
  }
  ~PhaseClock() {
    if (!on_) return;
    std::string line = std::string("[nash_fast] ") + what_;
    for (const auto& [name, seconds] : phases_) line += " " + name + "=" + std::to_string(seconds);
    std::fprintf(stderr, "%s\n", line.c_str());
  }

 private:
  double lap() {
    const auto now = std::chrono::steady_clock::now();
    const double elapsed = std::chrono::duration<double>(now - last_).count();
    last_ = now;
    return elapsed;
  }
  const char* what_;
  bool on_;
  std::chrono::steady_clock::time_point last_ = std::chrono::steady_clock::now();
  std::vector<std::pair<std::string, double>> phases_;
};

}  // namespace

// The fp32 path on MKL (sequence_logprobs_mkl.cpp; instantiated for float, BFloat16 and Half inputs), for
// CPUs where mkl_available().
template <typename scalar_t>
void forward_mkl(const ForwardArgs& a);
template <typename scalar_t>
void backward_mkl(const BackwardArgs& a);

}  // namespace CPU_CAPABILITY
}  // namespace nash_fast::cpu
