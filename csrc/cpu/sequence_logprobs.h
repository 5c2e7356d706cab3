// Token log-probabilities on the CPU: entry points of the kernels compiled once per vector ISA.
//
// For scored tokens i (every label a valid class id), hidden h_i in R^H, LM-head weight W [V, H],
// optional bias b and soft-cap c:
//     z_iv = W_v . h_i + b_v          (fp32 accumulation)      s_iv = c tanh(z_iv / c) or z_iv
//     lse_i = log sum_v exp(s_iv)     logp_i = s_{i, y_i} - lse_i
//     d_z_iv = g_i (onehot(y_i)_v - exp(s_iv - lse_i)) (1 - (s_iv / c)^2)
//     d_hidden = d_z W,  d_weight = d_z^T h,  d_bias = sum_i d_z_i
// FLOPs: 2NHV forward; the backward recomputes the logits (2NHV) and runs the two gradient GEMMs
// (2NHV each, each skipped when that gradient is not needed).
#pragma once

#include "common.h"

namespace nash_fast::cpu {

#define NASH_FAST_DECLARE_KERNELS(CAPABILITY)                      \
  namespace CAPABILITY {                                           \
  void token_logprobs_forward(const ForwardArgs& args, bool vnni);   \
  void token_logprobs_backward(const BackwardArgs& args, bool vnni); \
  }

NASH_FAST_DECLARE_KERNELS(DEFAULT)
#ifdef NASH_FAST_HAVE_AVX2
NASH_FAST_DECLARE_KERNELS(AVX2)
#endif
#ifdef NASH_FAST_HAVE_AVX512
NASH_FAST_DECLARE_KERNELS(AVX512)
#endif

#undef NASH_FAST_DECLARE_KERNELS

}  // namespace nash_fast::cpu
