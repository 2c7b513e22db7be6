// regression_loss forward with its gradient: one read of pred and target gives both the per-row
// loss and d(loss)/d(pred), so the backward pass is a scale of the stored gradient (or nothing).
//
//   pred, target: [M, C] contiguous, fp32 / bf16 / fp16 (each its own dtype)
//   x:            pred - target
//   beta == 0:    l = x^2                                    dl/dx = 2 x
//   beta > 0:     l = 0.5 x^2 / beta if |x| < beta           dl/dx = x / beta
//                     |x| - 0.5 beta otherwise               dl/dx = sign(x)
//   returns:      rows [M] fp32 = scale * sum_c l, and grad [M, C] fp32 = d(loss)/d(pred) for
//                 loss = sum of rows (or their mean: `mean`, 1/M folded in), or an empty [0]
//                 tensor when need_grad is false. All arithmetic in fp32.
//
// The stored gradient is fp32 whatever pred's dtype: a bf16 gradient rounded here and rounded
// again after the upstream scale would carry twice PyTorch's error. regression_loss_bwd scales
// and casts in one pass; for an fp32 pred and an upstream of 1 the backward does nothing.
#include <omp.h>

#include <cmath>

#include "ops.h"

namespace d2v {
namespace {

template <typename P, typename T, bool kGrad>
D2V_INLINE float loss_row(const P* __restrict pred, const T* __restrict target,
                          float* __restrict grad,
                          int64_t c_size, float beta, float grad_factor) {
  float sum = 0.0f;
  if (beta == 0.0f) {
    const float twice = 2.0f * grad_factor;
#pragma omp simd reduction(+ : sum)
    for (int64_t c = 0; c < c_size; ++c) {
      float x = load(pred, c) - load(target, c);
      sum += x * x;
      if constexpr (kGrad) grad[c] = twice * x;
    }
    return sum;
  }
  const float half_beta = 0.5f * beta;
  const float slope = grad_factor / beta;
#pragma omp simd reduction(+ : sum)
  for (int64_t c = 0; c < c_size; ++c) {
    float x = load(pred, c) - load(target, c);
    float magnitude = std::fabs(x);
    bool quadratic = magnitude < beta;
    sum += quadratic ? 0.5f * (x * x) / beta : magnitude - half_beta;
    if constexpr (kGrad) {
      float linear = x > 0.0f ? grad_factor : -grad_factor;
      grad[c] = quadratic ? x * slope : linear;
    }
  }
  return sum;
}

D2V_SIMD_CLONES void loss_rows_leaf(const void* pred, Dtype pred_dtype, const void* target,
                                    Dtype target_dtype, void* grad, int64_t begin, int64_t end,
                                    int64_t c_size, float beta, float scale, float grad_factor,
                                    float* rows) {
  D2V_DISPATCH_DTYPE(pred_dtype, P, {
    D2V_DISPATCH_DTYPE(target_dtype, T, {
      for (int64_t m = begin; m < end; ++m) {
        const int64_t offset = m * c_size;
        float* g = grad ? static_cast<float*>(grad) + offset : nullptr;
        const P* x = static_cast<const P*>(pred) + offset;
        const T* y = static_cast<const T*>(target) + offset;
        // The gradient switch is a template argument so that both loops vectorise cleanly.
        const float sum = g ? loss_row<P, T, true>(x, y, g, c_size, beta, grad_factor)
                            : loss_row<P, T, false>(x, y, nullptr, c_size, beta, grad_factor);
        rows[m] = sum * scale;
      }
    });
  });
}

// out[m] = grad[m] * upstream[m or 0], cast to out's dtype.
template <typename O>
D2V_INLINE void scale_rows(const float* grad, const float* upstream, bool per_row, O* out,
                           int64_t begin, int64_t end, int64_t c_size) {
  for (int64_t m = begin; m < end; ++m) {
    const float u = upstream[per_row ? m : 0];
    const float* g = grad + m * c_size;
    O* y = out + m * c_size;
#pragma omp simd
    for (int64_t c = 0; c < c_size; ++c) store(y, c, g[c] * u);
  }
}

D2V_SIMD_CLONES void scale_rows_leaf(const float* grad, const float* upstream, bool per_row,
                                     void* out, Dtype out_dtype, int64_t begin, int64_t end,
                                     int64_t c_size) {
  D2V_DISPATCH_DTYPE(out_dtype, O,
                     scale_rows(grad, upstream, per_row, static_cast<O*>(out), begin, end, c_size));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> regression_loss_fwd(const at::Tensor& pred,
                                                       const at::Tensor& target, double beta,
                                                       double scale, bool mean,
                                                       bool need_grad) {
  TORCH_CHECK(pred.dim() == 2 && pred.sizes() == target.sizes(),
              "regression_loss: pred and target must both be [M, C], got ", pred.sizes(), " and ",
              target.sizes());
  TORCH_CHECK(pred.is_cpu() && target.is_cpu() && pred.is_contiguous() && target.is_contiguous(),
              "regression_loss: pred and target must be contiguous CPU tensors");
  TORCH_CHECK(dtype_of(pred) != Dtype::kNone && dtype_of(target) != Dtype::kNone,
              "regression_loss: pred and target must be fp32, bf16 or fp16, got ",
              pred.scalar_type(), " and ", target.scalar_type());
  TORCH_CHECK(beta >= 0.0, "regression_loss: beta must be >= 0, got ", beta);
  const int64_t m_size = pred.size(0), c_size = pred.size(1);
  at::Tensor rows = at::empty({m_size}, pred.options().dtype(at::kFloat));
  at::Tensor grad = at::empty(need_grad ? pred.sizes() : at::IntArrayRef{0},
                              pred.options().dtype(at::kFloat));
  if (m_size == 0) return {rows, grad};
  const void* p = pred.const_data_ptr();
  const void* t = target.const_data_ptr();
  void* g = need_grad ? grad.mutable_data_ptr() : nullptr;
  float* r = rows.mutable_data_ptr<float>();
  const Dtype pd = dtype_of(pred), td = dtype_of(target);
  const float b = static_cast<float>(beta), s = static_cast<float>(scale);
  // The mean's 1/M is folded into the stored gradient: backward with an upstream of 1 (the usual
  // loss.backward()) then has nothing to scale.
  const float f = static_cast<float>(mean ? scale / static_cast<double>(m_size) : scale);
  const int threads = threads_for(m_size * c_size);
  // Contiguous blocks of rows per thread: each streams its own part of pred and target.
#pragma omp parallel num_threads(threads)
  {
    const int64_t parts = omp_get_num_threads(), id = omp_get_thread_num();
    const int64_t begin = m_size * id / parts, end = m_size * (id + 1) / parts;
    loss_rows_leaf(p, pd, t, td, g, begin, end, c_size, b, s, f, r);
  }
  return {rows, grad};
}

at::Tensor regression_loss_bwd(const at::Tensor& grad, const at::Tensor& upstream,
                               int64_t out_dtype) {
  TORCH_CHECK(grad.dim() == 2 && grad.scalar_type() == at::kFloat && grad.is_contiguous() &&
                  grad.is_cpu(),
              "regression_loss_bwd: grad must be a contiguous fp32 [M, C] CPU tensor");
  const int64_t m_size = grad.size(0), c_size = grad.size(1);
  at::Tensor u = upstream.to(at::kFloat).contiguous();
  const bool per_row = u.dim() == 1;
  TORCH_CHECK(u.numel() == (per_row ? m_size : 1), "regression_loss_bwd: upstream has ",
              u.numel(), " elements for ", m_size, " rows");
  TORCH_CHECK(out_dtype >= 0 && out_dtype <= 2, "regression_loss_bwd: output dtype code ",
              out_dtype, " is not 0 (fp32), 1 (bf16) or 2 (fp16)");
  const at::ScalarType types[] = {at::kFloat, at::kBFloat16, at::kHalf};
  at::Tensor out = at::empty(grad.sizes(), grad.options().dtype(types[out_dtype]));
  if (m_size == 0) return out;
  const float* g = grad.const_data_ptr<float>();
  const float* up = u.const_data_ptr<float>();
  void* y = out.mutable_data_ptr();
  const Dtype od = dtype_of(out);
#pragma omp parallel num_threads(threads_for(m_size * c_size))
  {
    const int64_t parts = omp_get_num_threads(), id = omp_get_thread_num();
    scale_rows_leaf(g, up, per_row, y, od, m_size * id / parts, m_size * (id + 1) / parts, c_size);
  }
  return out;
}

}  // namespace d2v
