// Adadelta on the 8-bit state (`_low_memory.py`) in one pass over memory, for XLA on CPU.
//
// The XLA FFI handler `optax_adadelta_update_8bit` takes the code tables LEVELS and
// INVERSE_GAPS, then for each leaf (g, codes and scale of E[g²], codes and scale of E[Δx²],
// the leaf's random key) and returns (Δx, codes and scale of E[g²], codes and scale of
// E[Δx²]); under vmap a leaf holds several problems, each with its own key. Block by block (a block's codes and its scale are contiguous), in float32:
//
//   E      <- LEVELS[code] · scale                          (dequantize, both averages)
//   Δx, E  <- Algorithm 1, the operations of `_kernel.cc`
//   scale  <- the block's largest new E; x = E · (1/scale)
//   code   <- c + (p > u), c the largest code with LEVELS[c] <= x (<= 254),
//             p = (x − LEVELS[c]) · INVERSE_GAPS[c], u = 1/2 or (16 random bits + ½)/2¹⁶;
//             255 for the block's largest value
//
// the operations of `_low_memory.quantize` and `dequantize` in their order, so that the
// kernel and XLA store the same codes (the random bits are the same hash of the key and
// the coordinate's index in the leaf). The block's float32 averages live on the stack only:
// XLA's own lowering writes and reads five float32 arrays of the parameter's size.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "_kernel_common.h"

namespace ffi = xla::ffi;

namespace {

using namespace optax_adadelta;  // NOLINT: the shared helpers of _kernel_common.h

constexpr std::int64_t kMaxBlock = 256;  // _low_memory.MAX_BLOCK
constexpr int kBias = 1400;              // _low_memory._BIAS

struct Hyper {
  float rho, one_minus_rho, eps;
  bool stochastic;
};

struct Tables {
  const float* levels;        // 256 values, LEVELS[0] = 0, LEVELS[255] = 1
  const float* inverse_gaps;  // 1/(LEVELS[c+1] − LEVELS[c])
};

// One leaf's buffers; the codes and scales of each average are updated in place.
struct Leaf {
  const void* g;
  void* step;
  const std::uint8_t* codes_in[2];
  const float* scale_in[2];
  std::uint8_t* codes_out[2];
  float* scale_out[2];
  const std::uint32_t* keys;  // one per problem: a vmap axis makes several in one leaf
  std::int64_t size, block, problem;  // problem: elements of one problem (size / keys)
  bool bf16;
};

inline std::uint32_t Mix(std::uint32_t x) {  // _low_memory._mix
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  return x ^ (x >> 16);
}

// _low_memory._code_below: an estimate from the float's bits, settled by one comparison.
inline int CodeBelow(float x, const float* levels) {
  std::uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  const std::int32_t magnitude = static_cast<std::int32_t>(bits & 0x7FFFFFFFu);
  const std::int32_t octaves = (magnitude - (127 << 23)) >> 15;  // arithmetic shift
  std::int32_t estimate = (octaves * 254 + 6144 * (255 + kBias)) / 6144 - kBias;
  estimate = std::min(std::max(estimate, 0), 254);
  estimate += x >= levels[estimate + 1] ? 1 : 0;
  return std::min(estimate, 254);
}

inline float NanMax(float m, float v) { return (v > m || v != v) ? v : m; }  // as XLA's max

// Codes for the block's new averages `values`; returns its scale.
inline float Quantize(const float* values, std::int64_t n, std::uint8_t* codes, Tables t,
                      const std::uint32_t* bits, int shift) {
  float scale = -INFINITY;
  for (std::int64_t i = 0; i < n; ++i) scale = NanMax(scale, values[i]);
  const float inverse = 1.0f / (scale > 0 ? scale : 1.0f);
  for (std::int64_t i = 0; i < n; ++i) {
    const float x = values[i] * inverse;
    const int low = CodeBelow(x, t.levels);
    const float p = (x - t.levels[low]) * t.inverse_gaps[low];
    const float u = bits ? (static_cast<float>((bits[i] >> shift) & 0xFFFFu) + 0.5f) *
                               (1.0f / 65536.0f)
                         : 0.5f;
    codes[i] = values[i] >= scale ? 255 : static_cast<std::uint8_t>(low + (p > u ? 1 : 0));
  }
  return scale;
}

template <bool kFma, typename G>
__attribute__((always_inline)) inline void UpdateBlocks(const Leaf& l, std::int64_t first,
                                                        std::int64_t last, Hyper h,
                                                        Tables t) {
  const G* g = static_cast<const G*>(l.g);
  G* step = static_cast<G*>(l.step);
  float e_g2[kMaxBlock], e_dx2[kMaxBlock];
  std::uint32_t bits[kMaxBlock];
  const std::int64_t n = l.block;
  constexpr bool kF32 = std::is_same<G, float>::value;
  for (std::int64_t b = first; b < last; ++b) {
    const std::int64_t o = b * n;
    const float scale_g2 = l.scale_in[0][b], scale_dx2 = l.scale_in[1][b];
#pragma GCC ivdep
    for (std::int64_t i = 0; i < n; ++i) {
      const float grad = Widen(g[o + i]);
      const float old_e_g2 = t.levels[l.codes_in[0][o + i]] * scale_g2;
      const float old_e_dx2 = t.levels[l.codes_in[1][o + i]] * scale_dx2;
      const float g2 = h.one_minus_rho * (grad * grad);
      const float avg_g2 = !kFma ? h.rho * old_e_g2 + g2
                           : kF32 ? std::fma(h.one_minus_rho, grad * grad, h.rho * old_e_g2)
                                  : std::fma(h.rho, old_e_g2, g2);
      const float dx2_eps = kFma ? std::fma(t.levels[l.codes_in[1][o + i]], scale_dx2, h.eps) : old_e_dx2 + h.eps;
      const float delta = grad * std::sqrt(dx2_eps / (avg_g2 + h.eps));
      const float dx2 = h.one_minus_rho * (delta * delta);
      e_g2[i] = avg_g2;
      e_dx2[i] = !kFma ? h.rho * old_e_dx2 + dx2
                 : kF32 ? std::fma(h.one_minus_rho, delta * delta, h.rho * old_e_dx2)
                        : std::fma(h.rho, old_e_dx2, dx2);
      Narrow(delta, &step[o + i]);
    }
    const std::uint32_t* random = nullptr;
    if (h.stochastic) {
      const std::int64_t p = o / l.problem;  // blocks do not straddle problems
      const std::uint32_t key = l.keys[p], start = static_cast<std::uint32_t>(o - p * l.problem);
      for (std::int64_t i = 0; i < n; ++i) {
        bits[i] = Mix((start + static_cast<std::uint32_t>(i)) ^ key);
      }
      random = bits;
    }
    l.scale_out[0][b] = Quantize(e_g2, n, l.codes_out[0] + o, t, random, 16);
    l.scale_out[1][b] = Quantize(e_dx2, n, l.codes_out[1] + o, t, random, 0);
  }
}

// The one function compiled per instruction set; the loader picks the widest the CPU has.
OPTAX_ADADELTA_CLONES void Run(const Leaf& l, std::int64_t first, std::int64_t last,
                               Hyper h, Tables t, bool fma) {
  if (l.bf16) {
    fma ? UpdateBlocks<true, bf16_bits>(l, first, last, h, t)
        : UpdateBlocks<false, bf16_bits>(l, first, last, h, t);
  } else {
    fma ? UpdateBlocks<true, float>(l, first, last, h, t)
        : UpdateBlocks<false, float>(l, first, last, h, t);
  }
}

ffi::ErrorOr<Leaf> Describe(ffi::RemainingArgs& args, ffi::RemainingRets& rets,
                            std::size_t i, std::size_t r) {
  ffi::AnyBuffer in[6] = {*args.get<ffi::AnyBuffer>(i), *args.get<ffi::AnyBuffer>(i + 1),
                          *args.get<ffi::AnyBuffer>(i + 2), *args.get<ffi::AnyBuffer>(i + 3),
                          *args.get<ffi::AnyBuffer>(i + 4), *args.get<ffi::AnyBuffer>(i + 5)};
  ffi::Result<ffi::AnyBuffer> out[5] = {
      *rets.get<ffi::AnyBuffer>(r), *rets.get<ffi::AnyBuffer>(r + 1),
      *rets.get<ffi::AnyBuffer>(r + 2), *rets.get<ffi::AnyBuffer>(r + 3),
      *rets.get<ffi::AnyBuffer>(r + 4)};
  const std::int64_t size = static_cast<std::int64_t>(in[0].element_count());
  const std::int64_t blocks = static_cast<std::int64_t>(in[2].element_count());
  const ffi::DataType grad = in[0].element_type();
  bool ok = (grad == ffi::DataType::F32 || grad == ffi::DataType::BF16) && blocks > 0 &&
            size % blocks == 0 && size / blocks <= kMaxBlock &&
            in[5].element_type() == ffi::DataType::U32 && in[5].element_count() > 0 &&
            blocks % static_cast<std::int64_t>(in[5].element_count()) == 0;
  for (int k = 0; k < 2; ++k) {
    ok = ok && in[1 + 2 * k].element_type() == ffi::DataType::U8 &&
         in[1 + 2 * k].element_count() == static_cast<std::size_t>(size) &&
         in[2 + 2 * k].element_type() == ffi::DataType::F32 &&
         in[2 + 2 * k].element_count() == static_cast<std::size_t>(blocks);
  }
  for (int k = 0; k < 5; ++k) {
    ok = ok && out[k]->element_type() == in[k].element_type() &&
         out[k]->element_count() == in[k].element_count();
  }
  if (!ok) {
    return ffi::Unexpected(ffi::Error::InvalidArgument(
        "optax_adadelta native 8-bit update: each leaf needs a float32 or bfloat16 "
        "gradient, uint8 codes of its size, float32 scales of blocks of at most 256 codes, "
        "and uint32 keys, one per problem of whole blocks"));
  }
  Leaf leaf;
  leaf.g = in[0].untyped_data();
  leaf.step = out[0]->untyped_data();
  for (int k = 0; k < 2; ++k) {
    leaf.codes_in[k] = static_cast<const std::uint8_t*>(in[1 + 2 * k].untyped_data());
    leaf.scale_in[k] = static_cast<const float*>(in[2 + 2 * k].untyped_data());
    leaf.codes_out[k] = static_cast<std::uint8_t*>(out[1 + 2 * k]->untyped_data());
    leaf.scale_out[k] = static_cast<float*>(out[2 + 2 * k]->untyped_data());
  }
  leaf.keys = static_cast<const std::uint32_t*>(in[5].untyped_data());
  leaf.size = size;
  leaf.block = size / blocks;
  leaf.problem = size / static_cast<std::int64_t>(in[5].element_count());
  leaf.bf16 = grad == ffi::DataType::BF16;
  return leaf;
}

constexpr std::int64_t kChunk = 1 << 15;  // coordinates per task, whole blocks

ffi::Error UpdateImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> levels,
                      ffi::Buffer<ffi::F32> inverse_gaps, ffi::RemainingArgs args,
                      ffi::RemainingRets rets, float rho, float one_minus_rho, float eps,
                      bool stochastic) {
  if (args.size() % 6 != 0 || rets.size() != args.size() / 6 * 5 ||
      levels.element_count() != 256 || inverse_gaps.element_count() != 256) {
    return ffi::Error::InvalidArgument(
        "optax_adadelta native 8-bit update: two tables of 256, then six arguments and "
        "five results per leaf");
  }
  struct Task {
    std::size_t leaf;
    std::int64_t first, last;  // blocks
  };
  std::vector<Leaf> leaves;
  std::vector<Task> tasks;
  for (std::size_t i = 0, r = 0; i < args.size(); i += 6, r += 5) {
    const ffi::ErrorOr<Leaf> leaf = Describe(args, rets, i, r);
    if (leaf.has_error()) return leaf.error();
    leaves.push_back(*leaf);
    const std::int64_t blocks = leaf->size / leaf->block;
    const std::int64_t per_task = std::max<std::int64_t>(1, kChunk / leaf->block);
    for (std::int64_t b = 0; b < blocks; b += per_task) {
      tasks.push_back({leaves.size() - 1, b, std::min(blocks, b + per_task)});
    }
  }
  const Hyper h{rho, one_minus_rho, eps, stochastic};
  const Tables t{levels.typed_data(), inverse_gaps.typed_data()};
  const bool fma = HasFma();
  ParallelFor(pool, static_cast<std::int64_t>(tasks.size()), [&](std::int64_t c) {
    const Task& task = tasks[c];
    Run(leaves[task.leaf], task.first, task.last, h, t, fma);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(optax_adadelta_update_8bit, UpdateImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // LEVELS
                                  .Arg<ffi::Buffer<ffi::F32>>()  // INVERSE_GAPS
                                  .RemainingArgs()  // (g, codes, scale, codes, scale, key)
                                  .RemainingRets()  // (Δx, codes, scale, codes, scale)
                                  .Attr<float>("rho")
                                  .Attr<float>("one_minus_rho")
                                  .Attr<float>("eps")
                                  .Attr<bool>("stochastic"));
