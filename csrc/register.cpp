// The nash_fast operator library: schemas, CPU kernels and Meta (shape-only) kernels, so that
// torch.compile traces the ops without running them. Loaded from Python as the module nash_fast._C.
#include <Python.h>
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

namespace nash_fast::cpu {
std::tuple<at::Tensor, at::Tensor> token_logprobs_forward(const at::Tensor& hidden, const at::Tensor& weight,
                                                          const std::optional<at::Tensor>& bias,
                                                          const at::Tensor& labels, std::optional<double> softcap,
                                                          c10::string_view float32_matmul_precision);
std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_backward(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& labels, std::optional<double> softcap, const at::Tensor& lse, const at::Tensor& grad,
    bool need_hidden, bool need_weight, bool need_bias, int64_t max_chunk_elements, double filter_eps,
    c10::string_view float32_matmul_precision);
std::string cpu_isa(at::ScalarType dtype);
std::string cpu_gemm(at::ScalarType dtype);
int64_t cpu_parallel_threads();
}  // namespace nash_fast::cpu

namespace {

std::tuple<at::Tensor, at::Tensor> token_logprobs_forward_meta(const at::Tensor& hidden, const at::Tensor&,
                                                               const std::optional<at::Tensor>&, const at::Tensor&,
                                                               std::optional<double>, c10::string_view) {
  auto out = at::empty({hidden.size(0)}, hidden.options().dtype(at::kFloat));
  return {out, at::empty_like(out)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_backward_meta(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor&,
    std::optional<double>, const at::Tensor&, const at::Tensor&, bool need_hidden, bool need_weight, bool need_bias,
    int64_t, double, c10::string_view) {
  return {need_hidden ? at::empty_like(hidden) : at::empty({0}, hidden.options()),
          need_weight ? at::empty_like(weight) : at::empty({0}, weight.options()),
          need_bias && bias.has_value() ? at::empty_like(*bias) : at::empty({0}, weight.options())};
}

}  // namespace

TORCH_LIBRARY(nash_fast, m) {
  // logp_i = log softmax(cap(W h_i + b))_{y_i} and lse_i, for [N, H] hidden with every label in [0, V).
  // float32_matmul_precision: torch.get_float32_matmul_precision() at call time; "medium" lets fp32 inputs multiply
  // as bf16 (rounded once, fp32 accumulation) where the CPU has the vnni path; "highest" and "high" are exact.
  m.def("token_logprobs_forward(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, float? softcap,"
        " str float32_matmul_precision=\"highest\") -> (Tensor logp, Tensor lse)");
  // Gradients of sum_i grad_i logp_i; a gradient that is not needed comes back as an empty tensor.
  // filter_eps > 0: the d_hidden and d_weight GEMMs skip d_z blocks whose softmax values are all < filter_eps
  // (nash_fast.sequence_logprobs's filter_eps); 0: exact.
  m.def("token_logprobs_backward(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, float? softcap,"
        " Tensor lse, Tensor grad, bool need_hidden, bool need_weight, bool need_bias, int max_chunk_elements,"
        " float filter_eps=0.0, str float32_matmul_precision=\"highest\")"
        " -> (Tensor d_hidden, Tensor d_weight, Tensor d_bias)");
  // The CPU code path inputs of `dtype` take: vnni, avx512, avx2 or portable.
  m.def("cpu_isa(ScalarType dtype) -> str", &nash_fast::cpu::cpu_isa);
  // The GEMMs that path runs on: brgemm-vnni (16-bit operands: AMX tiles or AVX512-BF16/FP16), mkl (fp32 operands through MKL's
  // packed sgemm) or brgemm (fp32 operands through oneDNN, where MKL is absent or NASH_FAST_CPU_MKL=0).
  m.def("cpu_gemm(ScalarType dtype) -> str", &nash_fast::cpu::cpu_gemm);
  // How many threads an at::parallel_for of the kernels runs on now (torch.get_num_threads() when the
  // library was built with OpenMP; 1 without, which is the regression tests/test_native_build.py catches).
  m.def("cpu_parallel_threads() -> int", &nash_fast::cpu::cpu_parallel_threads);
}

TORCH_LIBRARY_IMPL(nash_fast, CPU, m) {
  m.impl("token_logprobs_forward", &nash_fast::cpu::token_logprobs_forward);
  m.impl("token_logprobs_backward", &nash_fast::cpu::token_logprobs_backward);
}

TORCH_LIBRARY_IMPL(nash_fast, Meta, m) {
  m.impl("token_logprobs_forward", &token_logprobs_forward_meta);
  m.impl("token_logprobs_backward", &token_logprobs_backward_meta);
}

// An importable module: `import nash_fast._C` loads the library and runs the registrations above.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "nash_fast operator library", -1, nullptr};
  return PyModule_Create(&module);
}
