// nash_fast::token_logprobs_forward / _backward on CPU tensors: argument checks, outputs, dispatch to
// the kernel compiled for the active instruction-set path (isa.cpp).
#include "sequence_logprobs.h"
#include "mkl.h"

#include <ATen/ATen.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>
#include <optional>
#include <tuple>

namespace nash_fast::cpu {

namespace {

void check_inputs(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const at::Tensor& labels) {
  TORCH_CHECK_VALUE(hidden.dim() == 2 && weight.dim() == 2, "hidden must be [N, H] and weight [V, H]");
  TORCH_CHECK_VALUE(hidden.size(1) == weight.size(1), "hidden width ", hidden.size(1), " does not match weight width ",
                    weight.size(1));
  TORCH_CHECK_VALUE(weight.size(0) > 0, "weight has an empty vocabulary (V = 0)");
  TORCH_CHECK_VALUE(hidden.scalar_type() == weight.scalar_type(), "hidden dtype ", hidden.scalar_type(),
                    " differs from weight dtype ", weight.scalar_type());
  const auto dtype = hidden.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
                    "the native CPU backend takes float32, bfloat16 or float16 inputs, got ", dtype);
  TORCH_CHECK_VALUE(hidden.device().is_cpu() && weight.device().is_cpu() && labels.device().is_cpu(),
                    "the native backend runs on CPU tensors");
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == hidden.size(0), "labels must be [N] with N = ",
                    hidden.size(0));
  TORCH_CHECK_VALUE(!at::isFloatingType(labels.scalar_type()) && labels.scalar_type() != at::kBool,
                    "labels must be an integer tensor");
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0) && bias->scalar_type() == dtype &&
                          bias->device().is_cpu(),
                      "bias must be a [V] tensor of the weight's dtype on the CPU");
  }
  if (hidden.size(0) > 0) {
    const auto [low, high] = at::aminmax(labels);
    TORCH_CHECK_VALUE(low.item<int64_t>() >= 0 && high.item<int64_t>() < weight.size(0), "labels must be in [0, ",
                      weight.size(0), ") here (ignored tokens are removed before this op)");
  }
}

// The soft-cap as the kernels' fp32 c (0: none). A cap beyond float32's range has no fp32 value (it would
// round to inf: NaN logits); one below float32's smallest normal number, 2^-126, is computed as 2^-126, whose
// reciprocal is finite (a subnormal c would round to 0, read as "no cap", or give 1/c = inf). Every capped
// logit lies in [-c, c], so that moves each by at most 2^-126 (c tanh(z / c) grows monotonically in c, by
// less than 1 per unit of c): below float32's resolution at any log-probability but an exact 0.
float softcap_value(std::optional<double> softcap) {
  if (!softcap.has_value()) return 0.0f;
  TORCH_CHECK_VALUE(*softcap > 0 && *softcap <= std::numeric_limits<float>::max(),
                    "softcap must be a positive finite number no larger than float32's largest (3.4e38) or None, got ",
                    *softcap);
  return std::max(static_cast<float>(*softcap), std::numeric_limits<float>::min());
}

// H = 0: every logit is the bias (0 without one), the same for every token. The tile kernels size their
// slices by H (a division by zero), so these few [V]-sized ATen ops compute it instead, with the kernels'
// fp32 arithmetic: s = c tanh(z (1/c)), lse = log sum_v exp(s_v), logp_i = s_{y_i} - lse.
at::Tensor zero_width_logits(const at::Tensor& weight, const std::optional<at::Tensor>& bias, float softcap) {
  at::Tensor s = bias.has_value() ? bias->to(at::kFloat) : at::zeros({weight.size(0)}, weight.options().dtype(at::kFloat));
  if (softcap > 0) s = at::tanh(s * (1.0f / softcap)) * softcap;
  return s;
}

// torch.get_float32_matmul_precision() as the Python wrapper passes it: true when fp32 inputs may multiply as bf16
// (PyTorch's "medium": bf16 products, fp32 accumulation) and this CPU has the vnni path for bf16. "high" (TF32 or
// bf16x3 where available) stays exact fp32 here: bf16x3 is three bf16 products per fp32 one, and bf16 dot
// products run at twice the fp32 FMA rate on AVX512-BF16 (measured: bench/gradient_filter.py --precision), so
// it would be about 1.5x slower than the exact fp32 GEMM it replaces.
bool bf16_products(at::ScalarType dtype, c10::string_view precision) {
  TORCH_CHECK_VALUE(precision == "highest" || precision == "high" || precision == "medium",
                    "float32_matmul_precision must be 'highest', 'high' or 'medium', got '", std::string(precision), "'");
  return dtype == at::kFloat && precision == "medium" && active_isa(at::kBFloat16) == Isa::Vnni &&
         active_isa(at::kFloat) == Isa::Avx512;
}

// The entry points of one compiled copy of the kernels; nullptr where this build has no copy for that ISA
// (isa.cpp never selects its path then).
struct Kernels {
  void (*forward)(const ForwardArgs&, bool) = nullptr;
  void (*backward)(const BackwardArgs&, bool) = nullptr;
};

#define NASH_FAST_KERNELS(CAPABILITY) Kernels{&CAPABILITY::token_logprobs_forward, &CAPABILITY::token_logprobs_backward}
#ifdef NASH_FAST_HAVE_AVX512
constexpr Kernels AVX512_KERNELS = NASH_FAST_KERNELS(AVX512);
#else
constexpr Kernels AVX512_KERNELS{};
#endif
#ifdef NASH_FAST_HAVE_AVX2
constexpr Kernels AVX2_KERNELS = NASH_FAST_KERNELS(AVX2);
#else
constexpr Kernels AVX2_KERNELS{};
#endif
constexpr Kernels DEFAULT_KERNELS = NASH_FAST_KERNELS(DEFAULT);
#undef NASH_FAST_KERNELS

// Runs `kernel` (&Kernels::forward or &Kernels::backward) of the copy compiled for the active path.
template <typename Args>
void run(void (*Kernels::*kernel)(const Args&, bool), const Args& args) {
  const Isa isa = active_isa(args.dtype);
  switch (isa) {
    case Isa::Vnni:
    case Isa::Avx512:
      TORCH_CHECK(AVX512_KERNELS.*kernel != nullptr, "internal: no AVX-512 kernels in this build");
      (AVX512_KERNELS.*kernel)(args, isa == Isa::Vnni || args.bf16_products);
      return;
    case Isa::Avx2:
      TORCH_CHECK(AVX2_KERNELS.*kernel != nullptr, "internal: no AVX2 kernels in this build");
      (AVX2_KERNELS.*kernel)(args, false);
      return;
    default:
      (DEFAULT_KERNELS.*kernel)(args, false);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> token_logprobs_forward(const at::Tensor& hidden_in, const at::Tensor& weight_in,
                                                          const std::optional<at::Tensor>& bias_in,
                                                          const at::Tensor& labels_in, std::optional<double> softcap,
                                                          c10::string_view float32_matmul_precision) {
  check_inputs(hidden_in, weight_in, bias_in, labels_in);
  softcap_value(softcap);  // checked before any early return
  const bool bf16 = bf16_products(hidden_in.scalar_type(), float32_matmul_precision);
  const auto hidden = hidden_in.contiguous(), weight = weight_in.contiguous();
  const auto labels = labels_in.to(at::kLong).contiguous();
  const auto bias = bias_in.has_value() ? std::optional<at::Tensor>(bias_in->contiguous()) : std::nullopt;
  const int64_t N = hidden.size(0);
  auto logp = at::empty({N}, hidden.options().dtype(at::kFloat));
  auto lse = at::empty({N}, hidden.options().dtype(at::kFloat));
  if (N == 0) return {logp, lse};
  if (hidden.size(1) == 0) {
    const at::Tensor s = zero_width_logits(weight, bias, softcap_value(softcap));
    lse.fill_(at::logsumexp(s, 0));  // -inf when every logit is -inf (logp is then NaN, as in float64)
    at::sub_out(logp, s.index_select(0, labels), lse);
    return {logp, lse};
  }
  ForwardArgs args{hidden.scalar_type(), hidden.data_ptr(), weight.data_ptr(), bias ? bias->data_ptr() : nullptr,
                   labels.data_ptr<int64_t>(), softcap_value(softcap), N, hidden.size(1), weight.size(0),
                   logp.data_ptr<float>(), lse.data_ptr<float>(), bf16};
  run(&Kernels::forward, args);
  return {logp, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_backward(
    const at::Tensor& hidden_in, const at::Tensor& weight_in, const std::optional<at::Tensor>& bias_in,
    const at::Tensor& labels_in, std::optional<double> softcap, const at::Tensor& lse_in, const at::Tensor& grad_in,
    bool need_hidden, bool need_weight, bool need_bias, int64_t max_chunk_elements, double filter_eps,
    c10::string_view float32_matmul_precision) {
  check_inputs(hidden_in, weight_in, bias_in, labels_in);
  softcap_value(softcap);  // checked before any early return
  TORCH_CHECK_VALUE(filter_eps >= 0 && filter_eps < 1, "filter_eps must be in [0, 1) (0: exact), got ", filter_eps);
  const bool bf16 = bf16_products(hidden_in.scalar_type(), float32_matmul_precision);
  const int64_t N = hidden_in.size(0);
  TORCH_CHECK_VALUE(lse_in.numel() == N && grad_in.numel() == N, "lse and grad must have N = ", N, " elements");
  TORCH_CHECK_VALUE(max_chunk_elements > 0, "max_chunk_elements must be positive");
  const auto hidden = hidden_in.contiguous(), weight = weight_in.contiguous();
  const auto labels = labels_in.to(at::kLong).contiguous();
  const auto bias = bias_in.has_value() ? std::optional<at::Tensor>(bias_in->contiguous()) : std::nullopt;
  const auto lse = lse_in.to(at::kFloat).contiguous(), grad = grad_in.to(at::kFloat).contiguous();
  need_bias = need_bias && bias.has_value();
  auto d_hidden = need_hidden ? at::empty_like(hidden) : at::empty({0}, hidden.options());
  auto d_weight = need_weight ? at::empty_like(weight) : at::empty({0}, weight.options());
  auto d_bias = need_bias ? at::empty_like(*bias) : at::empty({0}, weight.options());
  if (N == 0) {
    d_hidden.zero_();
    d_weight.zero_();
    d_bias.zero_();
    return {d_hidden, d_weight, d_bias};
  }
  if (!need_hidden && !need_weight && !need_bias) return {d_hidden, d_weight, d_bias};
  if (hidden.size(1) == 0) {  // d_hidden [N, 0] and d_weight [V, 0] are empty; d_bias as the kernels form it:
    // d_bias_v = cap'_v (sum_{i: y_i = v} g_i - sum_i g_i exp(s_v - lse_i)),  cap'_v = 1 - (s_v / c)^2,
    // the second sum over token chunks of max_chunk_elements / V (no [N, V] buffer).
    if (!need_bias) return {d_hidden, d_weight, d_bias};
    const float cap = softcap_value(softcap);
    const at::Tensor s = zero_width_logits(weight, bias, cap);
    const int64_t V = weight.size(0), chunk = std::max<int64_t>(1, max_chunk_elements / V);
    at::Tensor acc = at::zeros({V}, s.options()).index_add_(0, labels, grad);
    for (int64_t i0 = 0; i0 < N; i0 += chunk) {
      const int64_t i1 = std::min(N, i0 + chunk);
      const at::Tensor p = at::exp(s.unsqueeze(0) - lse.slice(0, i0, i1).unsqueeze(1));  // [chunk, V]
      acc.sub_(at::mv(p.t(), grad.slice(0, i0, i1)));
    }
    if (cap > 0) {
      const at::Tensor t = s * (1.0f / cap);
      acc.mul_(1 - t * t);
    }
    d_bias.copy_(acc);
    return {d_hidden, d_weight, d_bias};
  }
  BackwardArgs args{hidden.scalar_type(), hidden.data_ptr(), weight.data_ptr(), bias ? bias->data_ptr() : nullptr,
                    labels.data_ptr<int64_t>(), softcap_value(softcap), N, hidden.size(1), weight.size(0),
                    lse.data_ptr<float>(), grad.data_ptr<float>(), need_hidden ? d_hidden.data_ptr() : nullptr,
                    need_weight ? d_weight.data_ptr() : nullptr, need_bias ? d_bias.data_ptr() : nullptr,
                    max_chunk_elements, static_cast<float>(filter_eps), bf16};
  run(&Kernels::backward, args);
  return {d_hidden, d_weight, d_bias};
}

std::string cpu_isa(at::ScalarType dtype) { return isa_name(active_isa(dtype)); }

std::string cpu_gemm(at::ScalarType dtype) {
  if (active_isa(dtype) == Isa::Vnni) return "brgemm-vnni";
  return mkl_available() ? "mkl" : "brgemm";
}

int64_t cpu_parallel_threads() {
  std::vector<int> used(std::max(at::get_num_threads(), 1), 0);
  at::parallel_for(0, 64 * int64_t(used.size()), 1, [&](int64_t, int64_t) {
    const int tid = at::get_thread_num();
    if (tid >= 0 && tid < int(used.size())) used[tid] = 1;
  });
  return std::accumulate(used.begin(), used.end(), int64_t(0));
}

}  // namespace nash_fast::cpu
