// ema_update_: ema[i] <- decay * ema[i] + (1 - decay) * student[i] over a whole parameter list,
// and shadow[i] <- ema[i] (cast to the shadow's dtype) in the same pass.
//
//   ema:     N fp32 tensors, updated in place
//   student: N tensors of the same shapes, fp32 / bf16 / fp16
//   shadow:  optional N tensors of the same shapes, fp32 / bf16 / fp16, overwritten
//
// One call walks a flat work list of equal-sized chunks cut across all tensors, so OpenMP balances
// a ViT's 768-element biases against its 2.4M-element matrices. The list of pointers and chunks (a
// "plan") is built once per parameter list and cached, keyed on the data pointers: the per-step
// call only re-checks pointers, dtypes and shapes in C++ (ema_update_cached), and the Python side
// validates and builds a plan only on a miss.
#include <mutex>

#include "ops.h"

namespace d2v {
namespace {

// Elements per chunk: 256 KiB of fp32 EMA, large enough to amortise the loop set-up and small
// enough that a ViT-B list (86M elements) splits into ~1300 chunks.
constexpr int64_t kChunk = 1 << 16;
constexpr size_t kMaxPlans = 8;

struct Entry {
  float* ema;
  const void* student;
  void* shadow;  // nullptr when there is no shadow
  int64_t numel;
  Dtype student_dtype;
  Dtype shadow_dtype;  // kNone when there is no shadow
};

struct Chunk {
  int64_t entry;
  int64_t begin;
  int64_t length;
};

struct Plan {
  std::vector<Entry> entries;
  std::vector<Chunk> chunks;
  int64_t total = 0;
};

std::mutex cache_mutex;
std::vector<Plan> cache;  // most recently used first

template <typename S, typename H>
D2V_INLINE void ema_body(float* __restrict ema, const S* __restrict student, H* __restrict shadow,
                         int64_t n, float decay, float alpha) {
  // Same rounding as the reference's ema.mul_(decay).add_(student, alpha=1 - decay): the product
  // is rounded, then the add is fused with the scaling of the student.
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float updated = __builtin_fmaf(load(student, i), alpha, ema[i] * decay);
    ema[i] = updated;
    if constexpr (!std::is_same_v<H, void>) store(shadow, i, updated);
  }
}

D2V_SIMD_CLONES void ema_chunk(const Entry& e, int64_t begin, int64_t n, float decay, float alpha) {
  float* ema = e.ema + begin;
  D2V_DISPATCH_DTYPE(e.student_dtype, S, {
    const S* student = static_cast<const S*>(e.student) + begin;
    if (e.shadow_dtype == Dtype::kNone) {
      ema_body<S, void>(ema, student, nullptr, n, decay, alpha);
    } else {
      D2V_DISPATCH_DTYPE(e.shadow_dtype, H, {
        ema_body<S, H>(ema, student, static_cast<H*>(e.shadow) + begin, n, decay, alpha);
      });
    }
  });
}

void run(const Plan& plan, double decay) {
  const float d = static_cast<float>(decay);
  const float alpha = static_cast<float>(1.0 - decay);
  const int64_t count = static_cast<int64_t>(plan.chunks.size());
  // Static schedule: equal chunks, and each thread gets one contiguous run of memory.
#pragma omp parallel for schedule(static) num_threads(threads_for(plan.total))
  for (int64_t i = 0; i < count; ++i) {
    const Chunk& c = plan.chunks[i];
    ema_chunk(plan.entries[c.entry], c.begin, c.length, d, alpha);
  }
}

// Whether `t` is the tensor an entry recorded (pointer, dtype, layout); shapes are compared
// against the ema tensor by the caller.
bool same(const at::Tensor& t, const void* ptr, Dtype dtype, int64_t numel) {
  return t.is_cpu() && t.is_contiguous() && t.const_data_ptr() == ptr && dtype_of(t) == dtype &&
         t.numel() == numel;
}

bool matches(const Plan& plan, const std::vector<at::Tensor>& ema,
             const std::vector<at::Tensor>& student,
             const std::optional<std::vector<at::Tensor>>& shadow) {
  const size_t n = plan.entries.size();
  if (ema.size() != n || student.size() != n || (shadow && shadow->size() != n)) return false;
  if (n > 0 && (ema[0].const_data_ptr() != plan.entries[0].ema ||
                (plan.entries[0].shadow == nullptr) != !shadow.has_value())) {
    return false;
  }
  for (size_t i = 0; i < n; ++i) {
    const Entry& e = plan.entries[i];
    if (!same(ema[i], e.ema, Dtype::kFloat, e.numel) ||
        !same(student[i], e.student, e.student_dtype, e.numel) ||
        student[i].sizes() != ema[i].sizes()) {
      return false;
    }
    if (shadow && (!same((*shadow)[i], e.shadow, e.shadow_dtype, e.numel) ||
                   (*shadow)[i].sizes() != ema[i].sizes())) {
      return false;
    }
  }
  return true;
}

Plan build(const std::vector<at::Tensor>& ema, const std::vector<at::Tensor>& student,
           const std::optional<std::vector<at::Tensor>>& shadow) {
  TORCH_CHECK(ema.size() == student.size(), "ema_update_: ", ema.size(), " ema but ",
              student.size(), " student tensors");
  TORCH_CHECK(!shadow || shadow->size() == ema.size(), "ema_update_: ", ema.size(),
              " ema but ", shadow->size(), " shadow tensors");
  Plan plan;
  plan.entries.reserve(ema.size());
  for (size_t i = 0; i < ema.size(); ++i) {
    const at::Tensor& e = ema[i];
    const at::Tensor& s = student[i];
    TORCH_CHECK(e.is_cpu() && e.scalar_type() == at::kFloat && e.is_contiguous(),
                "ema_update_: ema[", i, "] must be a contiguous float32 CPU tensor");
    TORCH_CHECK(s.is_cpu() && s.is_contiguous() && dtype_of(s) != Dtype::kNone,
                "ema_update_: student[", i, "] must be a contiguous fp32/bf16/fp16 CPU tensor");
    TORCH_CHECK(s.sizes() == e.sizes(), "ema_update_: student[", i, "] has shape ", s.sizes(),
                ", ema has ", e.sizes());
    Entry entry{e.mutable_data_ptr<float>(), s.const_data_ptr(), nullptr, e.numel(),
                dtype_of(s), Dtype::kNone};
    if (shadow) {
      const at::Tensor& h = (*shadow)[i];
      TORCH_CHECK(h.is_cpu() && h.is_contiguous() && dtype_of(h) != Dtype::kNone,
                  "ema_update_: shadow[", i, "] must be a contiguous fp32/bf16/fp16 CPU tensor");
      TORCH_CHECK(h.sizes() == e.sizes(), "ema_update_: shadow[", i, "] has shape ", h.sizes(),
                  ", ema has ", e.sizes());
      entry.shadow = h.mutable_data_ptr();
      entry.shadow_dtype = dtype_of(h);
    }
    for (int64_t begin = 0; begin < entry.numel; begin += kChunk) {
      const int64_t length = std::min(kChunk, entry.numel - begin);
      plan.chunks.push_back({static_cast<int64_t>(i), begin, length});
    }
    plan.total += entry.numel;
    plan.entries.push_back(entry);
  }
  return plan;
}

// In-place writes through raw pointers bypass autograd's version counters; bump them as the
// reference's mul_/copy_ would, so a stale saved tensor is still detected.
void bump_versions(const std::vector<at::Tensor>& tensors) {
  for (const at::Tensor& t : tensors) {
    if (!t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
  }
}

void finish(const std::vector<at::Tensor>& ema,
            const std::optional<std::vector<at::Tensor>>& shadow) {
  bump_versions(ema);
  if (shadow) bump_versions(*shadow);
}

}  // namespace

bool ema_update_cached(const std::vector<at::Tensor>& ema, const std::vector<at::Tensor>& student,
                       const std::optional<std::vector<at::Tensor>>& shadow, double decay) {
  if (!(decay >= 0.0 && decay <= 1.0)) return false;
  const Plan* hit = nullptr;
  {
    std::lock_guard<std::mutex> lock(cache_mutex);
    for (size_t i = 0; i < cache.size(); ++i) {
      if (matches(cache[i], ema, student, shadow)) {
        std::rotate(cache.begin(), cache.begin() + i, cache.begin() + i + 1);
        hit = &cache.front();
        break;
      }
    }
    if (hit == nullptr) return false;
    // Run under the lock: a concurrent call could otherwise evict the plan while it is in use.
    run(*hit, decay);
  }
  finish(ema, shadow);
  return true;
}

void ema_update_(const std::vector<at::Tensor>& ema, const std::vector<at::Tensor>& student,
                 const std::optional<std::vector<at::Tensor>>& shadow, double decay) {
  TORCH_CHECK(decay >= 0.0 && decay <= 1.0, "ema_update_: decay must lie in [0, 1], got ", decay);
  Plan plan = build(ema, student, shadow);
  std::lock_guard<std::mutex> lock(cache_mutex);
  run(plan, decay);
  cache.insert(cache.begin(), std::move(plan));
  if (cache.size() > kMaxPlans) cache.pop_back();
  finish(ema, shadow);
}

void ema_clear_cache() {
  std::lock_guard<std::mutex> lock(cache_mutex);
  cache.clear();
}

int64_t ema_cache_size() {
  std::lock_guard<std::mutex> lock(cache_mutex);
  return static_cast<int64_t>(cache.size());
}

}  // namespace d2v
