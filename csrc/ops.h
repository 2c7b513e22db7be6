// Entry points of the CPU kernels (one .cpp per op), bound to Python in bindings.cpp.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <optional>
#include <tuple>
#include <vector>

#include "simd.h"

namespace d2v {

// The kernel Dtype of a tensor, or kNone where the kernels have no native path for it.
inline Dtype dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return Dtype::kFloat;
    case at::kBFloat16:
      return Dtype::kBFloat16;
    case at::kHalf:
      return Dtype::kHalf;
    default:
      return Dtype::kNone;
  }
}

// Threads for a parallel region: torch's setting (torch.set_num_threads), or 1 for small work
// where waking the OpenMP team costs more than it saves.
inline int threads_for(int64_t work_elements) {
  constexpr int64_t kSerialBelow = 1 << 18;
  return work_elements < kSerialBelow ? 1 : at::get_num_threads();
}

// ema_update.cpp
bool ema_update_cached(const std::vector<at::Tensor>& ema, const std::vector<at::Tensor>& student,
                       const std::optional<std::vector<at::Tensor>>& shadow, double decay);
void ema_update_(const std::vector<at::Tensor>& ema, const std::vector<at::Tensor>& student,
                 const std::optional<std::vector<at::Tensor>>& shadow, double decay);
void ema_clear_cache();
int64_t ema_cache_size();

// make_targets.cpp; norms: 0 = none, 1 = instance, 2 = layer
at::Tensor make_targets(const std::vector<at::Tensor>& layers, int64_t layer_norm,
                        int64_t final_norm, const std::optional<at::Tensor>& mask,
                        const std::optional<at::Tensor>& padding_mask, double eps,
                        int64_t repeat = 1);

// regression_loss.cpp
std::tuple<at::Tensor, at::Tensor> regression_loss_fwd(const at::Tensor& pred,
                                                       const at::Tensor& target, double beta,
                                                       double scale, bool mean,
                                                       bool need_grad);
at::Tensor regression_loss_bwd(const at::Tensor& grad, const at::Tensor& upstream,
                               int64_t out_dtype);  // 0 fp32, 1 bf16, 2 fp16

}  // namespace d2v
