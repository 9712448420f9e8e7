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

template <typename Body>
void ParallelFor(ffi::ThreadPool& pool, std::int64_t n, const Body& body) {
  const std::int64_t chunks = (n + kChunk - 1) / kChunk;
  const std::int64_t workers = std::min<std::int64_t>(std::max<std::int64_t>(pool.num_threads(), 1), chunks);
  if (workers <= 1) {
    body(0, n);
    return;
  }
  struct Progress {
    std::atomic<std::int64_t> next{0};
    std::atomic<std::int64_t> done{0};
  };
  auto progress = std::make_shared<Progress>();
  // A helper that starts after every chunk is claimed touches no buffer.
  auto work = [progress, chunks, n, body]() {
    for (std::int64_t c; (c = progress->next.fetch_add(1)) < chunks;) {
      body(c * kChunk, std::min(n, (c + 1) * kChunk));
      progress->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (std::int64_t w = 1; w < workers; ++w) pool.Schedule([work] { work(); });
  work();
  while (progress->done.load(std::memory_order_acquire) < chunks) std::this_thread::yield();
}

template <typename G, typename S>
void Dispatch(ffi::ThreadPool& pool, const ffi::AnyBuffer& g, const ffi::AnyBuffer& e_g2,
              const ffi::AnyBuffer& e_dx2, ffi::AnyBuffer& step, ffi::AnyBuffer& new_e_g2,
              ffi::AnyBuffer& new_e_dx2, Hyper h) {
  const auto* g_data = static_cast<const G*>(g.untyped_data());
  const auto* e_g2_data = static_cast<const S*>(e_g2.untyped_data());
  const auto* e_dx2_data = static_cast<const S*>(e_dx2.untyped_data());
  auto* step_data = static_cast<G*>(step.untyped_data());
  auto* new_e_g2_data = static_cast<S*>(new_e_g2.untyped_data());
  auto* new_e_dx2_data = static_cast<S*>(new_e_dx2.untyped_data());
  ParallelFor(pool, static_cast<std::int64_t>(g.element_count()),
              [=](std::int64_t begin, std::int64_t end) {
                UpdateRange(g_data, e_g2_data, e_dx2_data, step_data, new_e_g2_data,
                            new_e_dx2_data, begin, end, h);
              });
}

bool IsSupported(ffi::DataType t) { return t == ffi::DataType::F32 || t == ffi::DataType::BF16; }

ffi::Error AdadeltaImpl(ffi::ThreadPool pool, ffi::AnyBuffer g, ffi::AnyBuffer e_g2,
                        ffi::AnyBuffer e_dx2, ffi::Result<ffi::AnyBuffer> step,
                        ffi::Result<ffi::AnyBuffer> new_e_g2,
                        ffi::Result<ffi::AnyBuffer> new_e_dx2, float rho, float one_minus_rho,
                        float eps) {
  const ffi::DataType grad_type = g.element_type();
  const ffi::DataType state_type = e_g2.element_type();
  const bool grad_f32 = grad_type == ffi::DataType::F32;
  const bool state_f32 = state_type == ffi::DataType::F32;
  if (!IsSupported(grad_type) || !IsSupported(state_type) || (grad_f32 && !state_f32) ||
      e_dx2.element_type() != state_type || step->element_type() != grad_type ||
      new_e_g2->element_type() != state_type || new_e_dx2->element_type() != state_type) {
    return ffi::Error::InvalidArgument(
        "optax_adadelta native update: (gradient, state) dtypes must be (float32, float32), "
        "(bfloat16, float32) or (bfloat16, bfloat16)");
  }
  const std::size_t n = g.element_count();
  if (e_g2.element_count() != n || e_dx2.element_count() != n) {
    return ffi::Error::InvalidArgument(
        "optax_adadelta native update: gradient and state sizes differ");
  }
  const Hyper h{rho, one_minus_rho, eps};
  if (grad_f32) {
    Dispatch<float, float>(pool, g, e_g2, e_dx2, *step, *new_e_g2, *new_e_dx2, h);
  } else if (state_f32) {
    Dispatch<bf16_bits, float>(pool, g, e_g2, e_dx2, *step, *new_e_g2, *new_e_dx2, h);
  } else {
    Dispatch<bf16_bits, bf16_bits>(pool, g, e_g2, e_dx2, *step, *new_e_g2, *new_e_dx2, h);
  }
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

namespace {

PyObject* AdadeltaHandler(PyObject*, PyObject*) {
  return PyCapsule_New(reinterpret_cast<void*>(Adadelta), nullptr, nullptr);
}

PyMethodDef kMethods[] = {
    {"adadelta_handler", AdadeltaHandler, METH_NOARGS,
     "The XLA FFI handler of the fused Adadelta update, as a capsule."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_kernel",
                       "Native CPU kernel of optax_adadelta (XLA FFI).", -1, kMethods};

}  // namespace

PyMODINIT_FUNC PyInit__kernel() { return PyModule_Create(&kModule); }
