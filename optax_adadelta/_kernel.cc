// Adadelta's per-coordinate update as one loop over memory, for XLA on CPU.
//
// The XLA FFI handler `Adadelta` computes, per coordinate, in float32 (bfloat16
// operands are widened exactly and results rounded to nearest even, as XLA does):
//
//   E[g²]  <- ρ E[g²] + (1−ρ) g²
//   Δx     <- g · √((E[Δx²] + ε) / (E[g²] + ε))      (E[Δx²] still the previous one)
//   E[Δx²] <- ρ E[Δx²] + (1−ρ) Δx²
//
// the same operations in the same order as `_adadelta_coordinates` in _adadelta.py,
// including the one fused multiply-add per average that XLA's CPU backend forms (see
// MulAdd), so the results are bit-identical to XLA's jitted ones. Build flags:
// -fno-math-errno lets the compiler vectorise sqrtf; -ffp-contract=off keeps it from
// forming any other fused multiply-add. The buffers are aliased in place by the caller (input i -> output i), so
// each coordinate is read completely before it is written.
//
// The handler `AdadeltaGroup` does the same for many leaves in one call: XLA's cost of a
// call (about 20 µs) would otherwise dominate a step over a thousand small leaves.
//
// Large arrays are split into chunks shared with XLA's intra-op thread pool. The calling
// thread works on chunks too and only waits for chunks that other threads have claimed
// (and are running), so it cannot deadlock even when every pool thread is busy.

#include <Python.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using bf16_bits = std::uint16_t;

inline float Widen(float x) { return x; }

inline float Widen(bf16_bits x) {
  std::uint32_t bits = static_cast<std::uint32_t>(x) << 16;
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

template <typename T>
T Narrow(float x);

template <>
inline float Narrow<float>(float x) {
  return x;
}

template <>
inline bf16_bits Narrow<bf16_bits>(float x) {
  std::uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) {  // NaN stays NaN (quiet), sign kept
    return static_cast<bf16_bits>((bits >> 16) | 0x0040u);
  }
  bits += 0x7fffu + ((bits >> 16) & 1u);  // round to nearest, ties to even
  return static_cast<bf16_bits>(bits >> 16);
}

// a·b + c as XLA's CPU backend computes ρ·E + (1−ρ)·x²: LLVM contracts the first product
// and the addition into one fused multiply-add where the CPU has one (x86 FMA3, AArch64).
inline float MulAdd(float a, float b, float c) {
#if defined(__FMA__) || defined(__aarch64__)
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

struct Hyper {
  float rho, one_minus_rho, eps;
};

template <typename G, typename S>
void UpdateRange(const G* g, const S* e_g2, const S* e_dx2, G* step, S* new_e_g2,
                 S* new_e_dx2, std::int64_t begin, std::int64_t end, Hyper h) {
  // Outputs alias inputs exactly (in place), never with an offset, so the iterations are
  // independent; without this the compiler's overlap check sends in-place calls to its
  // scalar loop.
#pragma GCC ivdep
  for (std::int64_t i = begin; i < end; ++i) {
    const float grad = Widen(g[i]);
    const float old_e_dx2 = Widen(e_dx2[i]);
    const float avg_g2 = MulAdd(h.rho, Widen(e_g2[i]), h.one_minus_rho * (grad * grad));
    const float delta = grad * std::sqrt((old_e_dx2 + h.eps) / (avg_g2 + h.eps));
    const float avg_dx2 = MulAdd(h.rho, old_e_dx2, h.one_minus_rho * (delta * delta));
    step[i] = Narrow<G>(delta);
    new_e_g2[i] = Narrow<S>(avg_g2);
    new_e_dx2[i] = Narrow<S>(avg_dx2);
  }
}

constexpr std::int64_t kChunk = 1 << 15;  // coordinates per task: 128 KiB per float32 array

// Runs body(c) for c in [0, chunks), on the calling thread and pool threads.
template <typename Body>
void ParallelFor(ffi::ThreadPool& pool, std::int64_t chunks, const Body& body) {
  const std::int64_t workers = std::min<std::int64_t>(std::max<std::int64_t>(pool.num_threads(), 1), chunks);
  if (workers <= 1) {
    for (std::int64_t c = 0; c < chunks; ++c) body(c);
    return;
  }
  struct Progress {
    std::atomic<std::int64_t> next{0};
    std::atomic<std::int64_t> done{0};
  };
  auto progress = std::make_shared<Progress>();
  // A helper that starts after every chunk is claimed touches nothing that `body` refers to.
  auto work = [progress, chunks, &body]() {
    for (std::int64_t c; (c = progress->next.fetch_add(1)) < chunks;) {
      body(c);
      progress->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (std::int64_t w = 1; w < workers; ++w) pool.Schedule([work] { work(); });
  work();
  while (progress->done.load(std::memory_order_acquire) < chunks) std::this_thread::yield();
}

// One leaf: its six buffers and which of the supported dtype pairs they hold.
struct Leaf {
  enum class Types { kF32, kBf16F32State, kBf16 };
  const void* g;
  const void* e_g2;
  const void* e_dx2;
  void* step;
  void* new_e_g2;
  void* new_e_dx2;
  std::int64_t size;
  Types types;

  void Update(std::int64_t begin, std::int64_t end, Hyper h) const {
    switch (types) {
      case Types::kF32:
        return Run<float, float>(begin, end, h);
      case Types::kBf16F32State:
        return Run<bf16_bits, float>(begin, end, h);
      case Types::kBf16:
        return Run<bf16_bits, bf16_bits>(begin, end, h);
    }
  }

  template <typename G, typename S>
  void Run(std::int64_t begin, std::int64_t end, Hyper h) const {
    UpdateRange(static_cast<const G*>(g), static_cast<const S*>(e_g2),
                static_cast<const S*>(e_dx2), static_cast<G*>(step), static_cast<S*>(new_e_g2),
                static_cast<S*>(new_e_dx2), begin, end, h);
  }
};

bool IsSupported(ffi::DataType t) { return t == ffi::DataType::F32 || t == ffi::DataType::BF16; }

ffi::ErrorOr<Leaf> Describe(const ffi::AnyBuffer& g, const ffi::AnyBuffer& e_g2,
                            const ffi::AnyBuffer& e_dx2, ffi::AnyBuffer& step,
                            ffi::AnyBuffer& new_e_g2, ffi::AnyBuffer& new_e_dx2) {
  const ffi::DataType grad_type = g.element_type();
  const ffi::DataType state_type = e_g2.element_type();
  const bool grad_f32 = grad_type == ffi::DataType::F32;
  const bool state_f32 = state_type == ffi::DataType::F32;
  if (!IsSupported(grad_type) || !IsSupported(state_type) || (grad_f32 && !state_f32) ||
      e_dx2.element_type() != state_type || step.element_type() != grad_type ||
      new_e_g2.element_type() != state_type || new_e_dx2.element_type() != state_type) {
    return ffi::Unexpected(ffi::Error::InvalidArgument(
        "optax_adadelta native update: (gradient, state) dtypes must be (float32, float32), "
        "(bfloat16, float32) or (bfloat16, bfloat16)"));
  }
  const std::size_t n = g.element_count();
  if (e_g2.element_count() != n || e_dx2.element_count() != n || step.element_count() != n ||
      new_e_g2.element_count() != n || new_e_dx2.element_count() != n) {
    return ffi::Unexpected(ffi::Error::InvalidArgument(
        "optax_adadelta native update: gradient and state sizes differ"));
  }
  const Leaf::Types types = grad_f32    ? Leaf::Types::kF32
                            : state_f32 ? Leaf::Types::kBf16F32State
                                        : Leaf::Types::kBf16;
  return Leaf{g.untyped_data(),        e_g2.untyped_data(),     e_dx2.untyped_data(),
              step.untyped_data(),     new_e_g2.untyped_data(), new_e_dx2.untyped_data(),
              static_cast<std::int64_t>(n), types};
}

ffi::Error AdadeltaImpl(ffi::ThreadPool pool, ffi::AnyBuffer g, ffi::AnyBuffer e_g2,
                        ffi::AnyBuffer e_dx2, ffi::Result<ffi::AnyBuffer> step,
                        ffi::Result<ffi::AnyBuffer> new_e_g2,
                        ffi::Result<ffi::AnyBuffer> new_e_dx2, float rho, float one_minus_rho,
                        float eps) {
  const ffi::ErrorOr<Leaf> leaf = Describe(g, e_g2, e_dx2, *step, *new_e_g2, *new_e_dx2);
  if (leaf.has_error()) return leaf.error();
  const Hyper h{rho, one_minus_rho, eps};
  const std::int64_t n = leaf->size;
  ParallelFor(pool, (n + kChunk - 1) / kChunk, [&](std::int64_t c) {
    leaf->Update(c * kChunk, std::min(n, (c + 1) * kChunk), h);
  });
  return ffi::Error::Success();
}

// Many leaves in one call: arguments (g, E[g²], E[Δx²]) and results (Δx, E[g²], E[Δx²]) for
// leaf 0, then leaf 1, and so on. The leaves are laid end to end and cut into chunks of
// kChunk coordinates, so small leaves share a chunk and large ones are split.
ffi::Error AdadeltaGroupImpl(ffi::ThreadPool pool, ffi::RemainingArgs args,
                             ffi::RemainingRets rets, float rho, float one_minus_rho, float eps) {
  if (args.size() % 3 != 0 || rets.size() != args.size()) {
    return ffi::Error::InvalidArgument(
        "optax_adadelta native group update: expected three arguments and three results per "
        "leaf");
  }
  std::vector<Leaf> leaves;
  std::vector<std::int64_t> offsets{0};  // leaf i holds coordinates [offsets[i], offsets[i+1])
  leaves.reserve(args.size() / 3);
  offsets.reserve(args.size() / 3 + 1);
  for (std::size_t i = 0; i < args.size(); i += 3) {
    ffi::AnyBuffer in[3] = {*args.get<ffi::AnyBuffer>(i), *args.get<ffi::AnyBuffer>(i + 1),
                            *args.get<ffi::AnyBuffer>(i + 2)};
    ffi::Result<ffi::AnyBuffer> out[3] = {*rets.get<ffi::AnyBuffer>(i),
                                          *rets.get<ffi::AnyBuffer>(i + 1),
                                          *rets.get<ffi::AnyBuffer>(i + 2)};
    const ffi::ErrorOr<Leaf> leaf = Describe(in[0], in[1], in[2], *out[0], *out[1], *out[2]);
    if (leaf.has_error()) return leaf.error();
    leaves.push_back(*leaf);
    offsets.push_back(offsets.back() + leaf->size);
  }
  const Hyper h{rho, one_minus_rho, eps};
  const std::int64_t total = offsets.back();
  ParallelFor(pool, (total + kChunk - 1) / kChunk, [&](std::int64_t c) {
    const std::int64_t begin = c * kChunk;
    const std::int64_t end = std::min(total, begin + kChunk);
    std::size_t i = std::upper_bound(offsets.begin(), offsets.end(), begin) - offsets.begin() - 1;
    for (; i < leaves.size() && offsets[i] < end; ++i) {
      leaves[i].Update(std::max(begin, offsets[i]) - offsets[i],
                       std::min(end, offsets[i + 1]) - offsets[i], h);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Adadelta, AdadeltaImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // g
                                  .Arg<ffi::AnyBuffer>()  // E[g²]
                                  .Arg<ffi::AnyBuffer>()  // E[Δx²]
                                  .Ret<ffi::AnyBuffer>()  // Δx
                                  .Ret<ffi::AnyBuffer>()  // new E[g²]
                                  .Ret<ffi::AnyBuffer>()  // new E[Δx²]
                                  .Attr<float>("rho")
                                  .Attr<float>("one_minus_rho")
                                  .Attr<float>("eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(AdadeltaGroup, AdadeltaGroupImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .RemainingArgs()  // (g, E[g²], E[Δx²]) per leaf
                                  .RemainingRets()  // (Δx, new E[g²], new E[Δx²]) per leaf
                                  .Attr<float>("rho")
                                  .Attr<float>("one_minus_rho")
                                  .Attr<float>("eps"));

namespace {

PyObject* AdadeltaHandler(PyObject*, PyObject*) {
  return PyCapsule_New(reinterpret_cast<void*>(Adadelta), nullptr, nullptr);
}

PyObject* AdadeltaGroupHandler(PyObject*, PyObject*) {
  return PyCapsule_New(reinterpret_cast<void*>(AdadeltaGroup), nullptr, nullptr);
}

PyMethodDef kMethods[] = {
    {"adadelta_handler", AdadeltaHandler, METH_NOARGS,
     "The XLA FFI handler of the fused Adadelta update, as a capsule."},
    {"adadelta_group_handler", AdadeltaGroupHandler, METH_NOARGS,
     "The XLA FFI handler of the fused update of many leaves in one call, as a capsule."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_kernel",
                       "Native CPU kernel of optax_adadelta (XLA FFI).", -1, kMethods};

}  // namespace

PyMODINIT_FUNC PyInit__kernel() { return PyModule_Create(&kModule); }
