// Adadelta's equations for the native kernels (kernel.cc, kernel_8bit.cc), and what else both
// share: bfloat16 conversions, the instruction-set clones, the FMA question, the cutting of a
// call's leaves into tasks on XLA's thread pool, and the handler that validates and runs them.
//
// Per coordinate, in float32, the operations of `_rules.default` in its order (Algorithm 1 of
// Zeiler 2012):
//
//   E[g²]  <- ρ E[g²] + (1−ρ) g²
//   Δx     <- g · √((E[Δx²] + ε) / (E[g²] + ε))      (E[Δx²] still the previous one; scaled
//                                                   by exact powers of two: `Step`)
//   E[Δx²] <- ρ E[Δx²] + (1−ρ) Δx²
//
// Each kernel matches the bits of its XLA twin, so each fuses a·b + c where XLA's CPU backend
// fuses that twin's expression (`Fused`); the build contracts nothing else (-ffp-contract=off).

#ifndef OPTAX_ADADELTA_NATIVE_ADADELTA_H_
#define OPTAX_ADADELTA_NATIVE_ADADELTA_H_

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__)
#define OPTAX_ADADELTA_CLONES \
  __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#else
#define OPTAX_ADADELTA_CLONES
#endif
#define OPTAX_ADADELTA_INLINE __attribute__((always_inline)) inline

namespace optax_adadelta {

namespace ffi = xla::ffi;

// The handlers' attributes "rho", "one_minus_rho" and "eps" (1 − ρ is computed once, by Python,
// as XLA's constant folding would).
struct Hyper {
  float rho, one_minus_rho, eps;
};

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

// Which product of ρ·E + (1−ρ)·x² XLA fuses with the sum, where the CPU has FMA: ρ·E in the
// float rule; (1−ρ)·x² in the 8-bit one, where E, dequantized, is itself a product (LLVM fuses
// the other multiply). kNone: no FMA.
enum class Fused { kNone, kDecay, kNew };

// ρ·E + (1−ρ)·x², a running average of squares.
template <Fused kFused>
OPTAX_ADADELTA_INLINE float Average(float old, float x, const Hyper& h) {
  if constexpr (kFused == Fused::kDecay) return std::fma(h.rho, old, h.one_minus_rho * (x * x));
  if constexpr (kFused == Fused::kNew) return std::fma(h.one_minus_rho, x * x, h.rho * old);
  return h.rho * old + h.one_minus_rho * (x * x);
}

// Δx = g · √((E[Δx²] + ε) / (E[g²] + ε)), given the new E[g²] and E[Δx²] + ε, the ratio times
// 2³² inside the root, the step times 2⁻¹⁶ after it (`_rules.RATIO_SCALE`, `STEP_SCALE`). Both
// are exact, so the bits are those of the unscaled formula wherever its ratio is a normal float;
// unscaled, the ratio underflowed to 0 for large finite gradients (|g| ≈ 1e17 at ρ = 0.95).
OPTAX_ADADELTA_INLINE float Step(float grad, float e_g2, float eps, float e_dx2_plus_eps) {
  constexpr float kRatioScale = 4294967296.0f, kStepScale = 1.0f / 65536.0f;  // 2³², 2⁻¹⁶
  return grad * std::sqrt(e_dx2_plus_eps * kRatioScale / (e_g2 + eps)) * kStepScale;
}

struct Updated {
  float step, e_g2, e_dx2;
};

// One coordinate's update (the equations above) from the previous E[g²] and E[Δx²];
// `e_dx2_plus_eps` is E[Δx²] + ε as the kernel's XLA twin forms it (the 8-bit one fuses it).
template <Fused kFused>
OPTAX_ADADELTA_INLINE Updated Update(float grad, float e_g2, float e_dx2, float e_dx2_plus_eps,
                                     const Hyper& h) {
  const float new_e_g2 = Average<kFused>(e_g2, grad, h);
  const float step = Step(grad, new_e_g2, h.eps, e_dx2_plus_eps);
  return {step, new_e_g2, Average<kFused>(e_dx2, step, h)};
}

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

// Runs body(c) for c in [0, chunks) on the calling thread and XLA's intra-op pool. The caller
// works too and waits only for chunks already claimed, so a busy pool cannot deadlock it.
template <typename Body>
void ParallelFor(ffi::ThreadPool& pool, std::int64_t chunks, const Body& body) {
  const std::int64_t workers =
      std::min<std::int64_t>(std::max<std::int64_t>(pool.num_threads(), 1), chunks);
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

constexpr std::int64_t kChunk = 1 << 15;  // coordinates per task: 128 KiB per float32 array

// Runs run(leaf, first, last) on blocks [first, last) of each leaf, every block once (a leaf has
// `size` coordinates in blocks of `block`: 1 for the float kernel). The leaves are laid end to
// end and cut into tasks of kChunk coordinates: small leaves share a task, large ones are split
// across threads; a block goes to the task where it starts. With `leaf_starts_task`, each leaf
// starts a task of its own (the 8-bit kernel: a small leaf's work is already a task's worth).
template <typename Leaf, typename RunBlocks>
void RunInChunks(ffi::ThreadPool& pool, const std::vector<Leaf>& leaves, bool leaf_starts_task,
                 const RunBlocks& run) {
  std::vector<std::int64_t> starts;  // leaf i holds coordinates [starts[i], starts[i] + size)
  std::int64_t total = 0;
  for (const Leaf& leaf : leaves) {
    if (leaf_starts_task) total = (total + kChunk - 1) / kChunk * kChunk;
    starts.push_back(total);
    total += leaf.size;
  }
  const auto blocks_before = [](std::int64_t coordinate, const Leaf& leaf) {
    return (coordinate + leaf.block - 1) / leaf.block;  // blocks starting before `coordinate`
  };
  ParallelFor(pool, (total + kChunk - 1) / kChunk, [&](std::int64_t c) {
    const std::int64_t begin = c * kChunk, end = std::min(total, begin + kChunk);
    std::size_t i = std::upper_bound(starts.begin(), starts.end(), begin) - starts.begin() - 1;
    for (; i < leaves.size() && starts[i] < end; ++i) {
      const Leaf& leaf = leaves[i];  // its coordinates [from, to) are in this task
      const std::int64_t from = std::max(begin - starts[i], std::int64_t{0});
      const std::int64_t to = std::min(end - starts[i], leaf.size);
      const std::int64_t first = blocks_before(from, leaf), last = blocks_before(to, leaf);
      if (first < last) run(leaf, first, last);
    }
  });
}

// What a kernel's errors say (the name they start with, what it needs of each leaf) and how
// its leaves are cut into tasks (`RunInChunks`).
struct Kernel {
  const char* name;
  const char* leaf_needs;
  bool leaf_starts_task;
};

// The binding both handlers share; a kernel appends its own attributes.
inline auto BindUpdate() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .RemainingArgs()
      .RemainingRets()
      .Attr<float>("rho")
      .Attr<float>("one_minus_rho")
      .Attr<float>("eps");
}

template <std::size_t... I>
auto Operands(const ffi::RemainingArgs& args, std::size_t first, std::index_sequence<I...>) {
  return std::array<ffi::AnyBuffer, sizeof...(I)>{*args.get<ffi::AnyBuffer>(first + I)...};
}

template <std::size_t... I>
auto Results(const ffi::RemainingRets& rets, std::size_t first, std::index_sequence<I...>) {
  return std::array<ffi::Result<ffi::AnyBuffer>, sizeof...(I)>{
      *rets.get<ffi::AnyBuffer>(first + I)...};
}

// A handler's body: reads each leaf's kArgs operands and kRets results (result k has operand
// k's dtype and size, updated in place where the caller aliases them), lets the kernel describe
// the leaf (`describe(operands, results)`: its Leaf, or nullopt where it refuses the leaf), then
// runs run(leaf, first block, last block, hyper, fma) over all of them in chunks.
template <typename Leaf, std::size_t kArgs, std::size_t kRets, typename KernelHyper,
          typename Describe, typename Run>
ffi::Error UpdateLeaves(const Kernel& kernel, ffi::ThreadPool& pool,
                        const ffi::RemainingArgs& args, const ffi::RemainingRets& rets,
                        const KernelHyper& h, const Describe& describe, const Run& run) {
  static_assert(kRets <= kArgs && kArgs <= 6);
  static const char* const kCount[] = {"zero", "one", "two", "three", "four", "five", "six"};
  if (args.size() % kArgs != 0 || rets.size() != args.size() / kArgs * kRets) {
    return ffi::Error::InvalidArgument(std::string(kernel.name) + ": " + kCount[kArgs] +
                                       " arguments and " + kCount[kRets] + " results per leaf");
  }
  std::vector<Leaf> leaves;
  for (std::size_t i = 0, r = 0; i < args.size(); i += kArgs, r += kRets) {
    auto in = Operands(args, i, std::make_index_sequence<kArgs>());
    auto out = Results(rets, r, std::make_index_sequence<kRets>());
    bool alike = true;
    for (std::size_t k = 0; k < kRets; ++k) {
      alike = alike && out[k]->element_type() == in[k].element_type() &&
              out[k]->element_count() == in[k].element_count();
    }
    const std::optional<Leaf> leaf = alike ? describe(in, out) : std::nullopt;
    if (!leaf) {
      return ffi::Error::InvalidArgument(std::string(kernel.name) + ": each leaf needs " +
                                         kernel.leaf_needs);
    }
    leaves.push_back(*leaf);
  }
  const bool fma = HasFma();
  RunInChunks(pool, leaves, kernel.leaf_starts_task,
              [&](const Leaf& leaf, std::int64_t first, std::int64_t last) {
                run(leaf, first, last, h, fma);
              });
  return ffi::Error::Success();
}

}  // namespace optax_adadelta

#endif  // OPTAX_ADADELTA_NATIVE_ADADELTA_H_
