// fp32 GEMMs through Intel MKL, which PyTorch's x86-64 wheels link into libtorch_cpu (BLAS_INFO=mkl).
//
// Why MKL for fp32: measured (2 threads, N=4096, H=1024, V=32000, forward+backward), oneDNN's fp32 brgemm
// path takes 5.4-5.6 s and this one 4.2 s. The logits tiles run at the same rate either way (0.9-1.0 s per
// 2NHV pass); the gradient GEMMs are where brgemm loses (d_hidden 1.3-1.4 s, d_weight 2.0 s, against
// 0.93-1.06 s each as one MKL sgemm per vocabulary slice). The tiles use MKL's packed GEMM
// (cblas_sgemm_pack once per vocabulary sub-slice, cblas_sgemm_compute per token block).
//
// The symbols are declared weak: a torch built on another BLAS (or none) still loads nash_fast._C, and
// mkl_available() sends the fp32 path to brgemm there. NASH_FAST_CPU_MKL=0 does the same (tests).
#pragma once

#include <cstddef>
#include <cstdint>

extern "C" {
// CBLAS enum values (mkl_cblas.h).
enum { NASH_FAST_CBLAS_ROW_MAJOR = 101, NASH_FAST_CBLAS_NO_TRANS = 111, NASH_FAST_CBLAS_TRANS = 112,
       NASH_FAST_CBLAS_PACKED = 151, NASH_FAST_CBLAS_A_MATRIX = 161 };

// Column-major BLAS sgemm (libtorch_cpu exports the Fortran binding, not cblas_sgemm).
void sgemm_(const char* trans_a, const char* trans_b, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
std::size_t cblas_sgemm_pack_get_size(int identifier, int m, int n, int k) __attribute__((weak));
void cblas_sgemm_pack(int layout, int identifier, int trans, int m, int n, int k, float alpha, const float* src,
                      int ld, float* dest) __attribute__((weak));
void cblas_sgemm_compute(int layout, int trans_a, int trans_b, int m, int n, int k, const float* a, int lda,
                         const float* b, int ldb, float beta, float* c, int ldc) __attribute__((weak));
// Threads MKL uses in the calling thread (0: back to the global setting); returns the previous value.
// (The lower-case name is the Fortran binding, which takes a pointer.)
int MKL_Set_Num_Threads_Local(int n) __attribute__((weak));
}

namespace nash_fast::cpu {

bool mkl_available();

// Row-major C[m, n] = alpha op(A)[m, k] op(B)[k, n] + beta C (trans_*: 'N' or 'T'), through the column-major
// sgemm_: a row-major matrix is its transpose column-major, so this is C^T = op(B)^T op(A)^T.
inline void sgemm_row_major(char trans_a, char trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* A,
                            int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  const int m_ = int(n), n_ = int(m), k_ = int(k), lda_ = int(ldb), ldb_ = int(lda), ldc_ = int(ldc);
  sgemm_(&trans_b, &trans_a, &m_, &n_, &k_, &alpha, B, &lda_, A, &ldb_, &beta, C, &ldc_);
}  // the symbols above resolved, and NASH_FAST_CPU_MKL is not 0

// MKL runs single-threaded in this thread while the guard lives: the tile GEMMs are called from inside
// at::parallel_for, where MKL's own threading would split each small product across the cores again.
class MklSequential {
 public:
  MklSequential() : previous_(MKL_Set_Num_Threads_Local(1)) {}
  ~MklSequential() { MKL_Set_Num_Threads_Local(previous_); }
  MklSequential(const MklSequential&) = delete;
  MklSequential& operator=(const MklSequential&) = delete;

 private:
  int previous_;
};

}  // namespace nash_fast::cpu
