// Adadelta's update of every leaf of a step in one loop over memory, for XLA on CPU.
//
// The XLA FFI handler `optax_adadelta_update` takes (g, E[g²], E[Δx²]) for each leaf and
// returns (Δx, E[g²], E[Δx²]), computing per coordinate in float32 (bfloat16 operands are
// widened exactly and results rounded to nearest even, as XLA does):
//
//   E[g²]  <- ρ E[g²] + (1−ρ) g²
//   Δx     <- g · √((E[Δx²] + ε) / (E[g²] + ε))      (E[Δx²] still the previous one; scaled
//                                                   by exact powers of two: `Step`)
//   E[Δx²] <- ρ E[Δx²] + (1−ρ) Δx²
//
// the operations of `_rules.default`, in its order. XLA's CPU backend contracts
// ρ·E + (1−ρ)·x² into a fused multiply-add where the CPU has one; MulAdd does the same, so
// the results match XLA's to the bit there (and to 1 ulp anywhere). Built for the baseline
// ISA with clones for AVX2+FMA and AVX-512 chosen at load time (x86-64 Linux), so one build
// runs on any x86-64 machine and still vectorises. Averages are updated in place (the caller
// aliases them); every coordinate is read before it is written.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "adadelta.h"

namespace ffi = xla::ffi;

namespace {

using namespace optax_adadelta;  // NOLINT: the shared helpers of adadelta.h

struct Hyper {
  float rho, one_minus_rho, eps;
};

template <bool kFma, typename G, typename S>
__attribute__((always_inline)) inline void UpdateRange(const G* g, const S* e_g2,
                                                       const S* e_dx2, G* step, S* new_e_g2,
                                                       S* new_e_dx2, std::int64_t n, Hyper h) {
  // Outputs alias inputs exactly or not at all, so the iterations are independent.
#pragma GCC ivdep
  for (std::int64_t i = 0; i < n; ++i) {
    const float grad = Widen(g[i]);
    const float old_e_dx2 = Widen(e_dx2[i]);
    const float g2 = h.one_minus_rho * (grad * grad);
    const float avg_g2 = kFma ? std::fma(h.rho, Widen(e_g2[i]), g2) : h.rho * Widen(e_g2[i]) + g2;
    const float delta = Step(grad, avg_g2, h.eps, old_e_dx2 + h.eps);
    const float dx2 = h.one_minus_rho * (delta * delta);
    const float avg_dx2 = kFma ? std::fma(h.rho, old_e_dx2, dx2) : h.rho * old_e_dx2 + dx2;
    Narrow(delta, &step[i]);
    Narrow(avg_g2, &new_e_g2[i]);
    Narrow(avg_dx2, &new_e_dx2[i]);
  }
}

// One leaf's six buffers, offset to a range of its coordinates.
struct Leaf {
  enum class Types { kF32, kBf16F32State, kBf16 };
  const void* in[3];
  void* out[3];
  std::int64_t size;
  Types types;
};

template <typename G, typename S, bool kFma>
__attribute__((always_inline)) inline void RunTyped(const Leaf& l, std::int64_t b,
                                                    std::int64_t e, Hyper h) {
  UpdateRange<kFma>(static_cast<const G*>(l.in[0]) + b, static_cast<const S*>(l.in[1]) + b,
                    static_cast<const S*>(l.in[2]) + b, static_cast<G*>(l.out[0]) + b,
                    static_cast<S*>(l.out[1]) + b, static_cast<S*>(l.out[2]) + b, e - b, h);
}

template <bool kFma>
__attribute__((always_inline)) inline void RunLeaf(const Leaf& l, std::int64_t b,
                                                   std::int64_t e, Hyper h) {
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

ffi::ErrorOr<Leaf> Describe(ffi::AnyBuffer in[3], ffi::Result<ffi::AnyBuffer> out[3]) {
  const ffi::DataType grad = in[0].element_type(), state = in[1].element_type();
  bool ok = IsSupported(grad) && IsSupported(state) &&
            !(grad == ffi::DataType::F32 && state == ffi::DataType::BF16);
  for (int k = 0; k < 3; ++k) {
    ok = ok && in[k].element_count() == in[0].element_count() &&
         out[k]->element_count() == in[0].element_count() &&
         out[k]->element_type() == in[k].element_type();
  }
  ok = ok && in[2].element_type() == state;
  if (!ok) {
    return ffi::Unexpected(ffi::Error::InvalidArgument(
        "optax_adadelta native update: each leaf needs (gradient, state) dtypes (float32, "
        "float32), (bfloat16, float32) or (bfloat16, bfloat16) and equal sizes"));
  }
  const Leaf::Types types = grad == ffi::DataType::F32     ? Leaf::Types::kF32
                            : state == ffi::DataType::F32 ? Leaf::Types::kBf16F32State
                                                           : Leaf::Types::kBf16;
  return Leaf{{in[0].untyped_data(), in[1].untyped_data(), in[2].untyped_data()},
              {out[0]->untyped_data(), out[1]->untyped_data(), out[2]->untyped_data()},
              static_cast<std::int64_t>(in[0].element_count()),
              types};
}

constexpr std::int64_t kChunk = 1 << 15;  // coordinates per task: 128 KiB per float32 array

// Leaves are laid end to end and cut into chunks of kChunk coordinates: small leaves share a
// chunk, large ones are split across threads.
ffi::Error UpdateImpl(ffi::ThreadPool pool, ffi::RemainingArgs args, ffi::RemainingRets rets,
                      float rho, float one_minus_rho, float eps) {
  if (args.size() % 3 != 0 || rets.size() != args.size()) {
    return ffi::Error::InvalidArgument(
        "optax_adadelta native update: three arguments and three results per leaf");
  }
  std::vector<Leaf> leaves;
  std::vector<std::int64_t> offsets{0};  // leaf i holds coordinates [offsets[i], offsets[i+1])
  for (std::size_t i = 0; i < args.size(); i += 3) {
    ffi::AnyBuffer in[3] = {*args.get<ffi::AnyBuffer>(i), *args.get<ffi::AnyBuffer>(i + 1),
                            *args.get<ffi::AnyBuffer>(i + 2)};
    ffi::Result<ffi::AnyBuffer> out[3] = {*rets.get<ffi::AnyBuffer>(i),
                                          *rets.get<ffi::AnyBuffer>(i + 1),
                                          *rets.get<ffi::AnyBuffer>(i + 2)};
    const ffi::ErrorOr<Leaf> leaf = Describe(in, out);
    if (leaf.has_error()) return leaf.error();
    leaves.push_back(*leaf);
    offsets.push_back(offsets.back() + leaf->size);
  }
  const Hyper h{rho, one_minus_rho, eps};
  const bool fma = HasFma();
  const std::int64_t total = offsets.back();
  ParallelFor(pool, (total + kChunk - 1) / kChunk, [&](std::int64_t c) {
    const std::int64_t begin = c * kChunk, end = std::min(total, begin + kChunk);
    std::size_t i = std::upper_bound(offsets.begin(), offsets.end(), begin) - offsets.begin() - 1;
    for (; i < leaves.size() && offsets[i] < end; ++i) {
      Run(leaves[i], std::max(begin, offsets[i]) - offsets[i],
          std::min(end, offsets[i + 1]) - offsets[i], h, fma);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(optax_adadelta_update, UpdateImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .RemainingArgs()  // (g, E[g²], E[Δx²]) per leaf
                                  .RemainingRets()  // (Δx, E[g²], E[Δx²]) per leaf
                                  .Attr<float>("rho")
                                  .Attr<float>("one_minus_rho")
                                  .Attr<float>("eps"));
