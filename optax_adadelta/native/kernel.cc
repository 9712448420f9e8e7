// Adadelta's update of every leaf of a step in one loop over memory, for XLA on CPU.
//
// The XLA FFI handler `optax_adadelta_update` takes (g, E[g²], E[Δx²]) for each leaf and
// returns (Δx, E[g²], E[Δx²]), computing per coordinate in float32 (bfloat16 operands are
// widened exactly and results rounded to nearest even, as XLA does) the equations of
// adadelta.h, the operations of `_rules.default` in its order. XLA's CPU backend contracts
// ρ·E + (1−ρ)·x² into fma(ρ, E, (1−ρ)·x²) where the CPU has FMA; the kernel does the same, so
// the results match XLA's to the bit there (and to 1 ulp anywhere). Built for the baseline
// ISA with clones for AVX2+FMA and AVX-512 chosen at load time (x86-64 Linux), so one build
// runs on any x86-64 machine and still vectorises. Averages are updated in place (the caller
// aliases them); every coordinate is read before it is written.

#include <cstdint>
#include <optional>

#include "adadelta.h"

namespace ffi = xla::ffi;

namespace {

using namespace optax_adadelta;  // NOLINT: Adadelta's equations and the shared plumbing

template <bool kFma, typename G, typename S>
OPTAX_ADADELTA_INLINE void UpdateRange(const G* g, const S* e_g2, const S* e_dx2, G* step,
                                       S* new_e_g2, S* new_e_dx2, std::int64_t n, Hyper h) {
  // Outputs alias inputs exactly or not at all, so the iterations are independent.
#pragma GCC ivdep
  for (std::int64_t i = 0; i < n; ++i) {
    const float grad = Widen(g[i]);
    const float old_e_dx2 = Widen(e_dx2[i]);
    const Updated u = Update<kFma ? Fused::kDecay : Fused::kNone>(grad, Widen(e_g2[i]), old_e_dx2,
                                                                  old_e_dx2 + h.eps, h);
    Narrow(u.step, &step[i]);
    Narrow(u.e_g2, &new_e_g2[i]);
    Narrow(u.e_dx2, &new_e_dx2[i]);
  }
}

// One leaf's six buffers.
struct Leaf {
  enum class Types { kF32, kBf16F32State, kBf16 };
  const void* in[3];
  void* out[3];
  std::int64_t size, block;  // block: 1, any coordinate may start a task
  Types types;
};

template <typename G, typename S, bool kFma>
OPTAX_ADADELTA_INLINE void RunTyped(const Leaf& l, std::int64_t b, std::int64_t e, Hyper h) {
  UpdateRange<kFma>(static_cast<const G*>(l.in[0]) + b, static_cast<const S*>(l.in[1]) + b,
                    static_cast<const S*>(l.in[2]) + b, static_cast<G*>(l.out[0]) + b,
                    static_cast<S*>(l.out[1]) + b, static_cast<S*>(l.out[2]) + b, e - b, h);
}

template <bool kFma>
OPTAX_ADADELTA_INLINE void RunLeaf(const Leaf& l, std::int64_t b, std::int64_t e, Hyper h) {
  switch (l.types) {
    case Leaf::Types::kF32:
      return RunTyped<float, float, kFma>(l, b, e, h);
    case Leaf::Types::kBf16F32State:
      return RunTyped<bf16_bits, float, kFma>(l, b, e, h);
    case Leaf::Types::kBf16:
      return RunTyped<bf16_bits, bf16_bits, kFma>(l, b, e, h);
  }
}

// The one function compiled per instruction set; the loader picks the widest the CPU has.
OPTAX_ADADELTA_CLONES void Run(const Leaf& l, std::int64_t b, std::int64_t e, Hyper h,
                               bool fma) {
  if (fma) {
    RunLeaf<true>(l, b, e, h);
  } else {
    RunLeaf<false>(l, b, e, h);
  }
}

bool IsSupported(ffi::DataType t) { return t == ffi::DataType::F32 || t == ffi::DataType::BF16; }

std::optional<Leaf> Describe(std::array<ffi::AnyBuffer, 3>& in,
                             std::array<ffi::Result<ffi::AnyBuffer>, 3>& out) {
  const ffi::DataType grad = in[0].element_type(), state = in[1].element_type();
  const bool ok = IsSupported(grad) && IsSupported(state) &&
                  !(grad == ffi::DataType::F32 && state == ffi::DataType::BF16) &&
                  in[2].element_type() == state &&
                  in[1].element_count() == in[0].element_count() &&
                  in[2].element_count() == in[0].element_count();
  if (!ok) return std::nullopt;
  const Leaf::Types types = grad == ffi::DataType::F32     ? Leaf::Types::kF32
                            : state == ffi::DataType::F32 ? Leaf::Types::kBf16F32State
                                                           : Leaf::Types::kBf16;
  return Leaf{{in[0].untyped_data(), in[1].untyped_data(), in[2].untyped_data()},
              {out[0]->untyped_data(), out[1]->untyped_data(), out[2]->untyped_data()},
              static_cast<std::int64_t>(in[0].element_count()),
              1,
              types};
}

constexpr Kernel kFloatKernel{
    "optax_adadelta native update",
    "(gradient, state) dtypes (float32, float32), (bfloat16, float32) or (bfloat16, bfloat16) "
    "and equal sizes",
    /*leaf_starts_task=*/false};

ffi::Error UpdateImpl(ffi::ThreadPool pool, ffi::RemainingArgs args, ffi::RemainingRets rets,
                      float rho, float one_minus_rho, float eps) {
  const Hyper h{rho, one_minus_rho, eps};
  return UpdateLeaves<Leaf, 3, 3>(kFloatKernel, pool, args, rets, h, Describe, Run);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(optax_adadelta_update, UpdateImpl,
                              BindUpdate());  // (g, E[g²], E[Δx²]) -> (Δx, E[g²], E[Δx²])
