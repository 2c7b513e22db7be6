// Shared by the CPU kernels: element loads/stores in fp32 for the three storage dtypes, and the
// function-multiversioning attribute that gives each hot loop an AVX-512 and an AVX2 build.
//
// Why multiversioning instead of -march=native: the extension is built once and may run on another
// x86 machine; target_clones compiles a hot function three times (x86-64-v4 = AVX-512, v3 = AVX2 +
// FMA + F16C, and the baseline) and picks one at load time from cpuid. Only leaf functions (no
// OpenMP region inside) carry the attribute: GCC outlines `omp parallel` bodies into separate
// functions that would not inherit the clone's target. Template bodies are `D2V_INLINE` so that
// they are compiled inside each clone with its instruction set.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define D2V_SIMD_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define D2V_SIMD_CLONES
#endif
#define D2V_INLINE inline __attribute__((always_inline))

namespace d2v {

// bf16 <-> fp32 written as integer arithmetic, bit-identical to c10::BFloat16 (round to nearest
// even, NaN -> 0x7FC0): c10's own conversion has a branch that keeps GCC from vectorising loops.
D2V_INLINE float bf16_to_float(uint16_t h) {
  uint32_t bits = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

D2V_INLINE uint16_t float_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  return f != f ? uint16_t(0x7FC0) : uint16_t(rounded);
}

// fp16: c10's portable bit-manipulation conversions are branch-free and vectorise as they are.
template <typename T>
D2V_INLINE float load(const T* p, int64_t i);
template <>
D2V_INLINE float load<float>(const float* p, int64_t i) { return p[i]; }
template <>
D2V_INLINE float load<c10::BFloat16>(const c10::BFloat16* p, int64_t i) {
  return bf16_to_float(p[i].x);
}
template <>
D2V_INLINE float load<c10::Half>(const c10::Half* p, int64_t i) {
  return c10::detail::fp16_ieee_to_fp32_value(p[i].x);
}

template <typename T>
D2V_INLINE void store(T* p, int64_t i, float v);
template <>
D2V_INLINE void store<float>(float* p, int64_t i, float v) { p[i] = v; }
template <>
D2V_INLINE void store<c10::BFloat16>(c10::BFloat16* p, int64_t i, float v) {
  p[i].x = float_to_bf16(v);
}
template <>
D2V_INLINE void store<c10::Half>(c10::Half* p, int64_t i, float v) {
  p[i].x = c10::detail::fp16_ieee_from_fp32_value(v);
}

// The storage dtypes the kernels read and write natively (others are converted in ops/cpp.py).
enum class Dtype : int8_t { kFloat = 0, kBFloat16 = 1, kHalf = 2, kNone = 3 };

}  // namespace d2v

// Runs the statement(s) with TYPE bound to the C++ type of a Dtype (kNone runs nothing).
#define D2V_DISPATCH_DTYPE(DT, TYPE, ...)              \
  switch (DT) {                                        \
    case ::d2v::Dtype::kFloat: {                       \
      using TYPE = float;                              \
      __VA_ARGS__;                                     \
      break;                                           \
    }                                                  \
    case ::d2v::Dtype::kBFloat16: {                    \
      using TYPE = c10::BFloat16;                      \
      __VA_ARGS__;                                     \
      break;                                           \
    }                                                  \
    case ::d2v::Dtype::kHalf: {                        \
      using TYPE = c10::Half;                          \
      __VA_ARGS__;                                     \
      break;                                           \
    }                                                  \
    default:                                           \
      break;                                           \
  }
