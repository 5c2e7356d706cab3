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
#include "sequence_logprobs.h"
#include "mkl.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <utility>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <new>
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

// Offset of element (k, n) in a B operand with row stride ld.
template <typename op_t>
inline int64_t b_offset(int64_t k, int64_t n, int64_t ld) {
  if constexpr (is_vnni<op_t>()) {
    return ((k >> 1) * ld + n) * 2 + (k & 1);
  } else {
    return k * ld + n;
  }
}

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

// Rows v, v + 1 of a d_z^T tile as VNNI pairs [BLOCK_T, 2] of op_t (the d_hidden GEMM's B operand);
// odd == nullptr pairs row v with zeros. Rounds to nearest even, as the scalar conversions do.
template <typename op_t>
inline void store_row_pair(const float* even, const float* odd, op_t* dst) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<op_t, at::BFloat16>) {
    const __m512i ones = _mm512_set1_epi32(1), bias = _mm512_set1_epi32(0x7FFF);
    const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
    auto rounded = [&](const float* src) {  // bf16 in the upper 16 bits of each 32-bit lane
      const __m512i bits = _mm512_castps_si512(_mm512_loadu_ps(src));
      const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), ones);
      return _mm512_add_epi32(bits, _mm512_add_epi32(bias, lsb));
    };
    for (int64_t t = 0; t < BLOCK_T; t += 16) {
      const __m512i lo = _mm512_srli_epi32(rounded(even + t), 16);
      const __m512i hi = odd ? _mm512_and_si512(rounded(odd + t), high) : _mm512_setzero_si512();
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

// x + bias, soft-capped: c tanh(x / c).
inline fVec logit(fVec x, float bias, float softcap, float inv_softcap) {
  x = x + fVec(bias);
  if (softcap > 0) x = fVec(softcap) * (x * fVec(inv_softcap)).tanh();
  return x;
}

inline float logit_scalar(float x, float bias, float softcap, float inv_softcap) {
  x = x + bias;
  if (softcap > 0) x = softcap * std::tanh(x * inv_softcap);
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

// Replaces a z^T tile by d_z^T = g (onehot - exp(s - lse)) cap'; lse and grad are [BLOCK_T] with pad
// lanes (grad 0), which get 0. Adds each row's sum (the final d_z) to d_bias when given. With live (one flag per
// FILTER_ROWS rows of the tile), also records which row groups hold a softmax value >= eps (group_is_live).
void backward_epilogue(float* tile, const TileContext& c, const float* lse, const float* grad, float* d_bias,
                       float eps = 0.0f, uint8_t* live = nullptr) {
  float s_label[BLOCK_T];
  for (int64_t t = 0; t < c.tokens; ++t) {  // the target entries, before the tile is overwritten
    const int64_t local = c.labels[t] - c.col0;
    if (local >= 0 && local < c.vrows)
      s_label[t] = logit_scalar(tile[local * BLOCK_T + t], c.bias ? c.bias[local] : 0.0f, c.softcap, c.inv_softcap);
  }
  fVec shift[TOKEN_VECS], neg_g[TOKEN_VECS];
  for (int64_t q = 0; q < TOKEN_VECS; ++q) {
    shift[q] = fVec::loadu(lse + q * LANES);
    neg_g[q] = fVec(0.0f) - fVec::loadu(grad + q * LANES);
  }
  const fVec one(1.0f), inv_cap(c.inv_softcap);
  const bool padded = c.tokens < BLOCK_T;
  fVec valid[TOKEN_VECS];
  if (padded) token_lanes(c.tokens, valid);
  fVec max_p(0.0f);
  for (int64_t v = 0; v < c.vrows; ++v) {
    const float b = c.bias ? c.bias[v] : 0.0f;
    float* row = tile + v * BLOCK_T;
    for (int64_t q = 0; q < TOKEN_VECS; ++q) {
      const fVec s = logit(fVec::loadu(row + q * LANES), b, c.softcap, c.inv_softcap);
      const fVec p = vexp(s - shift[q]);
      if (live) max_p = at::vec::maximum(max_p, p);
      fVec d = p * neg_g[q];
      if (c.softcap > 0) {
        const fVec t = s * inv_cap;
        d = d * (one - t * t);
      }
      if (padded) d = fVec::blendv(fVec(0.0f), d, valid[q]);
      d.store(row + q * LANES);
    }
    if (live && ((v + 1) % FILTER_ROWS == 0 || v + 1 == c.vrows)) {
      live[v / FILTER_ROWS] = group_is_live(max_p, eps);
      max_p = fVec(0.0f);
    }
  }
  if (live) mark_label_groups(c, live);
  for (int64_t t = 0; t < c.tokens; ++t) {
    const int64_t local = c.labels[t] - c.col0;
    if (local < 0 || local >= c.vrows) continue;
    const float s = s_label[t], g = grad[t];
    float cap = 1.0f;
    if (c.softcap > 0) {
      const float u = s * c.inv_softcap;
      cap = 1.0f - u * u;
    }
    tile[local * BLOCK_T + t] = (1.0f - std::exp(s - lse[t])) * g * cap;
  }
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
// bf16 (round to nearest even) of 16 fp32 lanes, in the upper half of each 32-bit lane.
inline __m512i bf16_upper(__m512 x) {
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  return _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb));
}

// The vnni path's epilogue in one pass (bf16 operands, d_bias not needed): d_z^T = g (onehot - exp(s - lse)) cap'
// goes straight from registers to the slice's row-major buffer (dz_rows: row 0 of the tile, stride ld_dz; the
// d_weight GEMM's A) and to the token block's vocabulary pairs (dz_pairs: pair row 0 of the tile; the d_hidden
// GEMM's B); either may be nullptr. Same arithmetic as backward_epilogue.
void backward_epilogue_bf16(const float* tile, const TileContext& c, const float* lse, const float* grad,
                            at::BFloat16* dz_rows, int64_t ld_dz, at::BFloat16* dz_pairs, float eps = 0.0f,
                            uint8_t* live = nullptr) {
  float fixed[BLOCK_T];
  int64_t fixed_row[BLOCK_T];
  for (int64_t t = 0; t < BLOCK_T; ++t) {  // the target entries, from the logits before anything is written
    const int64_t local = t < c.tokens ? c.labels[t] - c.col0 : -1;
    fixed_row[t] = (local >= 0 && local < c.vrows) ? local : -1;
    if (fixed_row[t] < 0) continue;
    const float s = logit_scalar(tile[local * BLOCK_T + t], c.bias ? c.bias[local] : 0.0f, c.softcap, c.inv_softcap);
    float cap = 1.0f;
    if (c.softcap > 0) {
      const float u = s * c.inv_softcap;
      cap = 1.0f - u * u;
    }
    fixed[t] = (1.0f - std::exp(s - lse[t])) * grad[t] * cap;
  }
  fVec shift[TOKEN_VECS], neg_g[TOKEN_VECS];
  for (int64_t q = 0; q < TOKEN_VECS; ++q) {
    shift[q] = fVec::loadu(lse + q * LANES);
    neg_g[q] = fVec(0.0f) - fVec::loadu(grad + q * LANES);
  }
  const fVec one(1.0f), inv_cap(c.inv_softcap);
  const bool padded = c.tokens < BLOCK_T;
  fVec valid[TOKEN_VECS];
  if (padded) token_lanes(c.tokens, valid);
  fVec max_p(0.0f);
  auto d_of = [&](int64_t v, int64_t q) {
    const fVec s = logit(fVec::loadu(tile + v * BLOCK_T + q * LANES), c.bias ? c.bias[v] : 0.0f, c.softcap,
                         c.inv_softcap);
    const fVec p = vexp(s - shift[q]);
    if (live) max_p = at::vec::maximum(max_p, p);
    fVec d = p * neg_g[q];
    if (c.softcap > 0) {
      const fVec t = s * inv_cap;
      d = d * (one - t * t);
    }
    if (padded) d = fVec::blendv(fVec(0.0f), d, valid[q]);
    return __m512(d);
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
  for (int64_t t = 0; t < BLOCK_T; ++t) {
    const int64_t local = fixed_row[t];
    if (local < 0) continue;
    const at::BFloat16 d(fixed[t]);
    if (dz_rows) dz_rows[local * ld_dz + t] = d;
    if (dz_pairs) dz_pairs[((local / 2) * BLOCK_T + t) * 2 + (local & 1)] = d;
  }
}
#endif

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

// lse = max + log(sum of exp), logp = target - lse, from the per-token running values.
inline void finish_forward(const ForwardArgs& a, const float* run_max, const float* run_sum, const float* target) {
  at::parallel_for(0, a.N, 4096, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      a.lse[i] = run_max[i] + std::log(run_sum[i]);
      a.logp[i] = target[i] - a.lse[i];
    }
  });
}

// Per-token backward inputs padded to whole token blocks: pad lanes get lse = +inf and grad = 0, so their
// d_z = exp(s - inf) * 0 = 0 whatever their (bias-only) logits are.
inline Buffer<float> padded_tokens(const float* values, int64_t N, int64_t N_pad, float fill) {
  Buffer<float> out(N_pad, fill);
  std::copy(values, values + N, out.begin());
  return out;
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

// ------------------------------------------------------------------------------------------ forward

template <typename scalar_t, typename op_t>
void forward_impl(const ForwardArgs& a) {
  const int64_t N = a.N, H = a.H, V = a.V;
  const auto* hidden = static_cast<const scalar_t*>(a.hidden);
  const auto* weight = static_cast<const scalar_t*>(a.weight);
  const int64_t K = is_vnni<op_t>() ? round_up(H, 2) : H;  // VNNI pairs need an even depth
  const bool weight_as_is = std::is_same_v<scalar_t, op_t> && K == H;
  const float inv_softcap = a.softcap > 0 ? 1.0f / a.softcap : 0.0f;
  const Buffer<float> bias = bias_fp32<scalar_t>(a.bias, V);

  PhaseClock clock("forward");
  const int64_t num_token_blocks = ceil_div(N, BLOCK_T);
  Buffer<op_t> hidden_packed(num_token_blocks * K * BLOCK_T);
  pack_hidden_blocks(hidden, N, H, K, hidden_packed.data());
  const int64_t Vs = std::clamp(FORWARD_SLICE_BYTES / int64_t(sizeof(op_t) * K) / BLOCK_V * BLOCK_V, BLOCK_V,
                                round_up(V, BLOCK_V));
  Buffer<op_t> weight_rows(weight_as_is ? 0 : Vs * K);
  Buffer<float> run_max(num_token_blocks * BLOCK_T, NEG_INF), run_sum(num_token_blocks * BLOCK_T, 0.0f);
  Buffer<float> target(num_token_blocks * BLOCK_T, 0.0f);
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
        for (int64_t q = 0; q < TOKEN_VECS; ++q) {
          m[q] = fVec::loadu(run_max.data() + t0 + q * LANES);
          s[q] = fVec::loadu(run_sum.data() + t0 + q * LANES);
        }
        for (int64_t r0 = 0; r0 < nv; r0 += BLOCK_V) {
          const int64_t vrows = std::min(BLOCK_V, nv - r0);
          gemm<op_t>(vrows, BLOCK_T, K, K, BLOCK_T, BLOCK_T, false, W + r0 * K,
                     hidden_packed.data() + tb * K * BLOCK_T, tile);
          const TileContext c{vrows, std::min(BLOCK_T, N - t0), v0 + r0, a.bias ? bias.data() + v0 + r0 : nullptr,
                              a.softcap, inv_softcap, a.labels + t0};
          forward_epilogue(tile, c, m, s, target.data() + t0);
        }
        for (int64_t q = 0; q < TOKEN_VECS; ++q) {
          m[q].store(run_max.data() + t0 + q * LANES);
          s[q].store(run_sum.data() + t0 + q * LANES);
        }
      }
      release_tiles<op_t>();
    });
    clock("tiles");
  }
  finish_forward(a, run_max.data(), run_sum.data(), target.data());
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
  const float inv_softcap = a.softcap > 0 ? 1.0f / a.softcap : 0.0f;
  const Buffer<float> bias = bias_fp32<scalar_t>(a.bias, V);

  const Buffer<float> lse = padded_tokens(a.lse, N, N_pad, std::numeric_limits<float>::infinity());
  const Buffer<float> grad = padded_tokens(a.grad, N, N_pad, 0.0f);

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
  Buffer<float> d_bias(need_b ? V : 0, 0.0f);
  const int num_threads = at::get_num_threads();
  Buffer<float> d_bias_partial(need_b ? num_threads * Vs : 0);
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
    if (need_b) std::fill(d_bias_partial.begin(), d_bias_partial.end(), 0.0f);
    clock("pack");

    // (A) d_z^T tiles, parallel over token blocks.
    at::parallel_for(0, num_token_blocks, 1, [&](int64_t t_begin, int64_t t_end) {
      alignas(64) float tile[BLOCK_V * BLOCK_T];
      float* my_d_bias = need_b ? d_bias_partial.data() + at::get_thread_num() * Vs : nullptr;
      for (int64_t tb = t_begin; tb < t_end; ++tb) {
        const int64_t t0 = tb * BLOCK_T, tokens = std::min(BLOCK_T, N - t0);
        for (int64_t r0 = 0; r0 < nv; r0 += BLOCK_V) {
          const int64_t vrows = std::min(BLOCK_V, nv - r0);
          gemm<op_t>(vrows, BLOCK_T, K, K, BLOCK_T, BLOCK_T, false, W + r0 * K, hidden_packed.data() + tb * K * BLOCK_T,
                     tile);
          const TileContext c{vrows, tokens, v0 + r0, a.bias ? bias.data() + v0 + r0 : nullptr, a.softcap,
                              inv_softcap, a.labels + t0};
          uint8_t* my_live = filter ? live.data() + tb * groups + r0 / FILTER_ROWS : nullptr;
#if defined(CPU_CAPABILITY_AVX512)
          if constexpr (std::is_same_v<op_t, at::BFloat16>) {
            if (!need_b) {
              backward_epilogue_bf16(tile, c, lse.data() + t0, grad.data() + t0,
                                     dz_t.empty() ? nullptr : dz_t.data() + r0 * ld_dz + t0, ld_dz,
                                     dz_pairs.empty() ? nullptr : dz_pairs.data() + tb * Vs * BLOCK_T + r0 * BLOCK_T,
                                     eps, my_live);
              continue;
            }
          }
#endif
          backward_epilogue(tile, c, lse.data() + t0, grad.data() + t0, my_d_bias ? my_d_bias + r0 : nullptr, eps,
                            my_live);
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
    if (need_b)
      for (int t = 0; t < num_threads; ++t)
        for (int64_t v = 0; v < nv; ++v) d_bias[v0 + v] += d_bias_partial[t * Vs + v];
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
  if (need_b) {
    auto* out = static_cast<scalar_t*>(a.d_bias);
    for (int64_t v = 0; v < V; ++v) out[v] = static_cast<scalar_t>(d_bias[v]);
  }
  clock("output");
}

// ------------------------------------------------------------------------------------------ fp32 on MKL

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

template <typename scalar_t>
void forward_mkl(const ForwardArgs& a) {
  const int64_t N = a.N, H = a.H, V = a.V;
  const auto* hidden = static_cast<const scalar_t*>(a.hidden);
  const auto* weight = static_cast<const scalar_t*>(a.weight);
  const float inv_softcap = a.softcap > 0 ? 1.0f / a.softcap : 0.0f;
  const Buffer<float> bias = bias_fp32<scalar_t>(a.bias, V);

  PhaseClock clock("forward(mkl)");
  const int64_t num_token_blocks = ceil_div(N, BLOCK_T);
  Buffer<float> hidden_packed(num_token_blocks * H * BLOCK_T);
  pack_hidden_blocks(hidden, N, H, H, hidden_packed.data());
  const int64_t rows_per_pack = mkl_subslice_rows(H, V);
  Buffer<float> packed(cblas_sgemm_pack_get_size(NASH_FAST_CBLAS_A_MATRIX, int(rows_per_pack), int(BLOCK_T), int(H)) /
                           sizeof(float) + 1);
  Buffer<float> converted(std::is_same_v<scalar_t, float> ? 0 : rows_per_pack * H);
  Buffer<float> run_max(num_token_blocks * BLOCK_T, NEG_INF), run_sum(num_token_blocks * BLOCK_T, 0.0f);
  Buffer<float> target(num_token_blocks * BLOCK_T, 0.0f);
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
        for (int64_t q = 0; q < TOKEN_VECS; ++q) {
          m[q] = fVec::loadu(run_max.data() + t0 + q * LANES);
          s[q] = fVec::loadu(run_sum.data() + t0 + q * LANES);
        }
        mkl_logits_tile(packed.data(), nv, H, hidden_packed.data() + tb * H * BLOCK_T, tile.data());
        for (int64_t r0 = 0; r0 < nv; r0 += BLOCK_V) {
          const TileContext c{std::min(BLOCK_V, nv - r0), std::min(BLOCK_T, N - t0), v0 + r0,
                              a.bias ? bias.data() + v0 + r0 : nullptr, a.softcap, inv_softcap, a.labels + t0};
          forward_epilogue(tile.data() + r0 * BLOCK_T, c, m, s, target.data() + t0);
        }
        for (int64_t q = 0; q < TOKEN_VECS; ++q) {
          m[q].store(run_max.data() + t0 + q * LANES);
          s[q].store(run_sum.data() + t0 + q * LANES);
        }
      }
    });
    clock("tiles");
  }
  finish_forward(a, run_max.data(), run_sum.data(), target.data());
}

// fp32 rows [rows x H] into a 16-bit (or fp32) destination, rounded once.
template <typename scalar_t>
void store_rows(const float* src, int64_t rows, int64_t H, scalar_t* dst) {
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) row_from_fp32(src + r * H, H, dst + r * H);
  });
}

template <typename scalar_t>
void backward_mkl(const BackwardArgs& a) {
  constexpr bool FP32 = std::is_same_v<scalar_t, float>;
  PhaseClock clock("backward(mkl)");
  const int64_t N = a.N, H = a.H, V = a.V;
  const bool need_h = a.d_hidden != nullptr, need_w = a.d_weight != nullptr, need_b = a.d_bias != nullptr;
  const auto* hidden = static_cast<const scalar_t*>(a.hidden);
  const auto* weight = static_cast<const scalar_t*>(a.weight);
  const int64_t num_token_blocks = ceil_div(N, BLOCK_T);
  const int64_t N_pad = num_token_blocks * BLOCK_T;
  const int64_t rows_per_pack = mkl_subslice_rows(H, V);
  // d_z^T is kept once, in fp32 (the vnni path keeps it twice in 16 bits): twice max_chunk_elements entries,
  // so that the slice (the depth of the d_hidden sgemm) is wide enough for MKL to run near its peak.
  const int64_t Vs = std::clamp(2 * a.max_chunk_elements / N_pad / rows_per_pack * rows_per_pack, rows_per_pack,
                                round_up(V, rows_per_pack));
  const float inv_softcap = a.softcap > 0 ? 1.0f / a.softcap : 0.0f;
  const Buffer<float> bias = bias_fp32<scalar_t>(a.bias, V);

  const Buffer<float> lse = padded_tokens(a.lse, N, N_pad, std::numeric_limits<float>::infinity());
  const Buffer<float> grad = padded_tokens(a.grad, N, N_pad, 0.0f);

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
  Buffer<float> d_bias(need_b ? V : 0, 0.0f);
  const int num_threads = at::get_num_threads();
  Buffer<float> d_bias_partial(need_b ? num_threads * Vs : 0);

  for (int64_t v0 = 0; v0 < V; v0 += Vs) {
    const int64_t nv = std::min(Vs, V - v0);
    const float* W = rows_as_fp32(weight + v0 * H, nv, H, weight_converted);
    if (need_b) std::fill(d_bias_partial.begin(), d_bias_partial.end(), 0.0f);
    clock("pack");
    for (int64_t s0 = 0; s0 < nv; s0 += rows_per_pack) {
      const int64_t ns = std::min(rows_per_pack, nv - s0);
      mkl_pack_rows(W + s0 * H, ns, H, packed.data());
      clock("pack");
      at::parallel_for(0, num_token_blocks, 1, [&](int64_t t_begin, int64_t t_end) {
        MklSequential sequential;
        Buffer<float> tile(rows_per_pack * BLOCK_T);
        float* my_d_bias = need_b ? d_bias_partial.data() + at::get_thread_num() * Vs : nullptr;
        for (int64_t tb = t_begin; tb < t_end; ++tb) {
          const int64_t t0 = tb * BLOCK_T, tokens = std::min(BLOCK_T, N - t0);
          mkl_logits_tile(packed.data(), ns, H, hidden_packed.data() + tb * H * BLOCK_T, tile.data());
          for (int64_t r0 = 0; r0 < ns; r0 += BLOCK_V) {
            const int64_t vrows = std::min(BLOCK_V, ns - r0), row = s0 + r0;  // row within the slice
            const TileContext c{vrows, tokens, v0 + row, a.bias ? bias.data() + v0 + row : nullptr, a.softcap,
                                inv_softcap, a.labels + t0};
            float* sub = tile.data() + r0 * BLOCK_T;
            backward_epilogue(sub, c, lse.data() + t0, grad.data() + t0, my_d_bias ? my_d_bias + row : nullptr);
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
    if (need_b)
      for (int t = 0; t < num_threads; ++t)
        for (int64_t v = 0; v < nv; ++v) d_bias[v0 + v] += d_bias_partial[t * Vs + v];
  }
  if constexpr (!FP32) {
    if (need_h) store_rows(d_hidden, N, H, static_cast<scalar_t*>(a.d_hidden));
  }
  if (need_b) {
    auto* out = static_cast<scalar_t*>(a.d_bias);
    for (int64_t v = 0; v < V; ++v) out[v] = static_cast<scalar_t>(d_bias[v]);
  }
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
