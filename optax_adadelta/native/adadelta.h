// What the native kernels (kernel.cc, kernel_8bit.cc) share: Adadelta's step, bfloat16
// conversions, the instruction-set clones, the FMA question and a parallel loop on XLA's
// thread pool.

#ifndef OPTAX_ADADELTA_KERNEL_COMMON_H_
#define OPTAX_ADADELTA_KERNEL_COMMON_H_

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__)
#define OPTAX_ADADELTA_CLONES \
  __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#else
#define OPTAX_ADADELTA_CLONES
#endif

namespace optax_adadelta {

namespace ffi = xla::ffi;

using bf16_bits = std::uint16_t;

inline float Widen(float x) { return x; }
inline float Widen(bf16_bits x) {
  std::uint32_t bits = static_cast<std::uint32_t>(x) << 16;
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

inline void Narrow(float x, float* out) { *out = x; }
inline void Narrow(float x, bf16_bits* out) {
  std::uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) {  // NaN stays a (quiet) NaN
    *out = static_cast<bf16_bits>((bits >> 16) | 0x0040u);
    return;
  }
  bits += 0x7fffu + ((bits >> 16) & 1u);  // round to nearest, ties to even
  *out = static_cast<bf16_bits>(bits >> 16);
}

// Whether XLA's CPU backend, which compiles for this machine, contracts a·b + c here.
inline bool HasFma() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool fma = __builtin_cpu_supports("fma");
  return fma;
#elif defined(__aarch64__)
  return true;
#else
  return false;
#endif
}

// Adadelta's step Δx = g · √((E[Δx²] + ε) / (E[g²] + ε)), given the new E[g²] and E[Δx²] + ε
// (the 8-bit kernel fuses that sum as XLA does there), in the order of `_rules.default`, so XLA
// gives the same bits: the ratio times 2³² inside the root, the step times 2⁻¹⁶ after it. Both
// are exact, so the bits are those of the unscaled formula wherever its ratio is a normal float;
// unscaled, the ratio underflowed to 0 for large finite gradients (|g| ≈ 1e17 at ρ = 0.95).
inline float Step(float grad, float e_g2, float eps, float e_dx2_plus_eps) {
  constexpr float kRatioScale = 4294967296.0f, kStepScale = 1.0f / 65536.0f;  // 2³², 2⁻¹⁶
  return grad * std::sqrt(e_dx2_plus_eps * kRatioScale / (e_g2 + eps)) * kStepScale;
}

// Runs body(c) for c in [0, chunks) on the calling thread and XLA's intra-op pool. The caller
// works too and waits only for chunks already claimed, so a busy pool cannot deadlock it.
template <typename Body>
void ParallelFor(ffi::ThreadPool& pool, std::int64_t chunks, const Body& body) {
  const std::int64_t workers = std::min<std::int64_t>(std::max<std::int64_t>(pool.num_threads(), 1), chunks);
  struct Progress {
    std::atomic<std::int64_t> next{0}, done{0};
  };
  auto progress = std::make_shared<Progress>();
  auto work = [progress, chunks, &body] {
    for (std::int64_t c; (c = progress->next.fetch_add(1)) < chunks;) {
      body(c);
      progress->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (std::int64_t w = 1; w < workers; ++w) pool.Schedule([work] { work(); });
  work();
  while (progress->done.load(std::memory_order_acquire) < chunks) std::this_thread::yield();
}


}  // namespace optax_adadelta

#endif  // OPTAX_ADADELTA_KERNEL_COMMON_H_
