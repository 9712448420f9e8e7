// Adadelta on the 8-bit state (`formats/eight_bit.py`) in one pass over memory, for XLA on CPU.
//
// The XLA FFI handler `optax_adadelta_update_8bit` takes for each leaf (g, codes and scale
// of E[g²], codes and scale of E[Δx²], the leaf's random keys) and returns (Δx, codes and
// scale of E[g²], codes and scale of E[Δx²]); under vmap a leaf holds several problems, one
// key each. Block by block (a block's codes are contiguous, its scale one float), in float32:
//
//   E      <- level(code) · scale                           (dequantize, both averages)
//   Δx, E  <- Adadelta's update, the equations of adadelta.h
//   scale  <- the block's largest new E (NaN if one is NaN); x = E · (1/scale)
//   code   <- c + (p > u), c the largest code with level(c) <= x (<= 254),
//             p = (x − level(c)) / (level(c + 1) − level(c)), u = 1/2 or
//             (16 random bits + ½)/2¹⁶, the same u for both averages of a coordinate;
//             255 for the block's largest value; E[g²]'s p, rounded stochastically and
//             c > 0, lifted by ½·ρ/(1+ρ)·p(1−p)·spread/(x + ε/S); E[g²] under the block's
//             floor level(1) (and above 0) coded 1, never 0
//
// the operations of `codes_8bit.quantize` and `dequantize` in their order, so that the
// kernel and XLA store the same codes (the random bits are the same hash of the key and the
// coordinate's index in the leaf). Where the CPU has FMA, XLA's CPU backend fuses
// ρ·E + (1−ρ)·x² here as fma((1−ρ), x², ρ·E) (`Fused::kNew`), E[Δx²] + ε as
// fma(level, scale, ε), and Horner's rule step by step; the kernel does the same. The block's
// float32 averages live on the stack: XLA's own lowering writes and reads five float32 arrays
// of the parameter's size.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>

#include "adadelta.h"

namespace ffi = xla::ffi;

namespace {

using namespace optax_adadelta;  // NOLINT: Adadelta's equations and the shared plumbing

constexpr std::int64_t kMaxBlock = 256;  // codes_8bit.MAX_BLOCK
constexpr int kBias = 1400;              // codes_8bit._BIAS

struct Hyper8bit : Hyper {
  bool stochastic;
  float lift;  // codes_8bit.lift_weight: ½·ρ/(1 + ρ)
};

// codes_8bit._POLYNOMIAL, as float32 (the values XLA's constants round to).
constexpr float kPolynomial[6] = {-0.005457850638777018f, 1.489393980591558e-05f,
                                  -2.7090141685448543e-08f, 3.682612895183901e-11f,
                                  -3.862069762302148e-14f, 2.6107046013841357e-17f};

// codes_8bit.level: E(c)/S for a code c in [0, 255], with multiply-adds fused as XLA fuses
// them (kFma) or not at all.
template <bool kFma>
OPTAX_ADADELTA_INLINE float Level(std::int32_t code) {
  const std::int32_t k12 = (255 - code) * 12;
  const std::int32_t q = (k12 * 8257) >> 20;
  const float r = static_cast<float>(k12 - q * 127);
  // Horner's rule, written out: a loop here would keep the caller's loop from vectorising.
  const auto step = [r](float acc, float c) { return kFma ? std::fma(r, acc, c) : c + r * acc; };
  float acc = step(kPolynomial[5], kPolynomial[4]);
  acc = step(acc, kPolynomial[3]);
  acc = step(acc, kPolynomial[2]);
  acc = step(acc, kPolynomial[1]);
  acc = step(acc, kPolynomial[0]);
  const float mantissa = step(acc, 1.0f);
  const std::uint32_t power_bits = static_cast<std::uint32_t>(127 - q) << 23;
  float power;
  std::memcpy(&power, &power_bits, sizeof(power));
  return code == 0 ? 0.0f : mantissa * power;
}

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

OPTAX_ADADELTA_INLINE std::uint32_t Mix(std::uint32_t x) {  // random_bits._mix
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  return x ^ (x >> 16);
}

// codes_8bit._code_below: an estimate from the float's bits, settled by one comparison.
template <bool kFma>
OPTAX_ADADELTA_INLINE int CodeBelow(float x) {
  std::uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  const std::int32_t magnitude = static_cast<std::int32_t>(bits & 0x7FFFFFFFu);
  const std::int32_t octaves = (magnitude - (127 << 23)) >> 15;  // arithmetic shift
  // ⌊n / 6144⌋ as ⌊⌊n / 2¹¹⌋ / 3⌋, exact for 0 <= n < 2³⁰ (here n < 2²⁵): vectorises
  const std::int32_t n = octaves * 254 + 6144 * (255 + kBias);
  std::int32_t estimate = (((n >> 11) * 43691) >> 17) - kBias;
  estimate = std::min(std::max(estimate, 0), 254);
  estimate += static_cast<std::int32_t>(x >= Level<kFma>(estimate + 1));
  return std::min(estimate, 254);
}

// The block's largest value, NaN if it holds one (as `quantize` makes XLA's). The values are
// non-negative or NaN: their bits, sign cleared, order as integers, NaN above +inf, and an
// integer maximum vectorises.
OPTAX_ADADELTA_INLINE float BlockMax(const float* values, std::int64_t n) {
  std::uint32_t largest = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    std::uint32_t bits;
    std::memcpy(&bits, &values[i], sizeof(bits));
    largest = std::max(largest, bits & 0x7FFFFFFFu);
  }
  float scale;
  std::memcpy(&scale, &largest, sizeof(scale));
  return scale;
}

// Codes for the block's new averages `values`; returns its scale. `bits`: 16 random bits per
// value at `shift` (stochastic rounding), else rounded to the nearer code. kSquaredGradient:
// E[g²]'s rounding, a positive value under the floor level(1)·S coded 1, never 0, and,
// rounded stochastically, its probability raised by weight·p(1 − p)·spread/(x + ε/S) above
// code 0 (`codes_8bit.quantize`'s floor_up and lift).
template <bool kFma, bool kStochastic, bool kSquaredGradient>
OPTAX_ADADELTA_INLINE float Quantize(const float* values, std::int64_t n,
                                                     std::uint8_t* codes, const std::uint32_t* bits,
                                                     int shift, float weight, float eps) {
  const float scale = BlockMax(values, n);
  const float inverse = 1.0f / (scale > 0 ? scale : 1.0f);
  for (std::int64_t i = 0; i < n; ++i) {
    const float x = values[i] * inverse;
    const int low = CodeBelow<kFma>(x);
    const float below = Level<kFma>(low);
    const float above = Level<kFma>(low + 1);
    const float spread = above - below;
    float p;
    if (kStochastic && kSquaredGradient) {  // p + w·p(1 − p)·spread/floor, one division
      const float floor = kFma ? std::fma(eps, inverse, x) : x + eps * inverse;
      const float w = low > 0 ? weight : 0.0f;
      const float lifted = kFma ? std::fma(w, above - x, floor) : floor + w * (above - x);
      p = (x - below) * lifted / (spread * floor);
    } else {
      p = (x - below) / spread;
    }
    float u = 0.5f;
    if (kStochastic) {
      u = (static_cast<float>((bits[i] >> shift) & 0xFFFFu) + 0.5f) * (1.0f / 65536.0f);
    }
    int rounded = low + static_cast<int>(p > u);
    if (kSquaredGradient) rounded = std::max(rounded, static_cast<int>(x > 0.0f));
    const int code = values[i] >= scale ? 255 : rounded;
    codes[i] = static_cast<std::uint8_t>(code);
  }
  return scale;
}

template <bool kFma, typename G>
OPTAX_ADADELTA_INLINE void UpdateBlocks(const Leaf& l, std::int64_t first, std::int64_t last,
                                        Hyper8bit h) {
  const G* g = static_cast<const G*>(l.g);
  G* step = static_cast<G*>(l.step);
  float e_g2[kMaxBlock], e_dx2[kMaxBlock];
  std::uint32_t bits[kMaxBlock];
  const std::int64_t n = l.block;
  for (std::int64_t b = first; b < last; ++b) {
    const std::int64_t o = b * n;
    const float scale_g2 = l.scale_in[0][b], scale_dx2 = l.scale_in[1][b];
#pragma GCC ivdep
    for (std::int64_t i = 0; i < n; ++i) {
      const float grad = Widen(g[o + i]);
      const float level_g2 = Level<kFma>(l.codes_in[0][o + i]);
      const float level_dx2 = Level<kFma>(l.codes_in[1][o + i]);
      const float old_e_dx2 = level_dx2 * scale_dx2;
      const float dx2_eps = kFma ? std::fma(level_dx2, scale_dx2, h.eps) : old_e_dx2 + h.eps;
      const Updated u = Update<kFma ? Fused::kNew : Fused::kNone>(grad, level_g2 * scale_g2,
                                                                  old_e_dx2, dx2_eps, h);
      e_g2[i] = u.e_g2;
      e_dx2[i] = u.e_dx2;
      Narrow(u.step, &step[o + i]);
    }
    if (h.stochastic) {
      const std::int64_t p = o / l.problem;  // blocks do not straddle problems
      const std::uint32_t key = l.keys[p], start = static_cast<std::uint32_t>(o - p * l.problem);
      for (std::int64_t i = 0; i < n; ++i) {
        bits[i] = Mix((start + static_cast<std::uint32_t>(i)) ^ key);
      }
      l.scale_out[0][b] =
          Quantize<kFma, true, true>(e_g2, n, l.codes_out[0] + o, bits, 16, h.lift, h.eps);
      l.scale_out[1][b] =
          Quantize<kFma, true, false>(e_dx2, n, l.codes_out[1] + o, bits, 16, 0.0f, 0.0f);
    } else {
      l.scale_out[0][b] =
          Quantize<kFma, false, true>(e_g2, n, l.codes_out[0] + o, bits, 16, 0.0f, 0.0f);
      l.scale_out[1][b] =
          Quantize<kFma, false, false>(e_dx2, n, l.codes_out[1] + o, bits, 0, 0.0f, 0.0f);
    }
  }
}

// The one function compiled per instruction set; the loader picks the widest the CPU has.
OPTAX_ADADELTA_CLONES void Run(const Leaf& l, std::int64_t first, std::int64_t last,
                               Hyper8bit h, bool fma) {
  if (l.bf16) {
    fma ? UpdateBlocks<true, bf16_bits>(l, first, last, h)
        : UpdateBlocks<false, bf16_bits>(l, first, last, h);
  } else {
    fma ? UpdateBlocks<true, float>(l, first, last, h)
        : UpdateBlocks<false, float>(l, first, last, h);
  }
}

std::optional<Leaf> Describe(std::array<ffi::AnyBuffer, 6>& in,
                             std::array<ffi::Result<ffi::AnyBuffer>, 5>& out) {
  const std::int64_t size = static_cast<std::int64_t>(in[0].element_count());
  const std::int64_t blocks = static_cast<std::int64_t>(in[2].element_count());
  const ffi::DataType grad = in[0].element_type();
  bool ok = (grad == ffi::DataType::F32 || grad == ffi::DataType::BF16) && blocks > 0 &&
            size % blocks == 0 && size >= blocks && size / blocks <= kMaxBlock &&
            in[5].element_type() == ffi::DataType::U32 && in[5].element_count() > 0 &&
            blocks % static_cast<std::int64_t>(in[5].element_count()) == 0;
  for (int k = 0; k < 2; ++k) {
    ok = ok && in[1 + 2 * k].element_type() == ffi::DataType::U8 &&
         in[1 + 2 * k].element_count() == static_cast<std::size_t>(size) &&
         in[2 + 2 * k].element_type() == ffi::DataType::F32 &&
         in[2 + 2 * k].element_count() == static_cast<std::size_t>(blocks);
  }
  if (!ok) return std::nullopt;
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

constexpr Kernel k8bitKernel{
    "optax_adadelta native 8-bit update",
    "a float32 or bfloat16 gradient, uint8 codes of its size, float32 scales of blocks of at "
    "most 256 codes, and uint32 keys, one per problem of whole blocks",
    /*leaf_starts_task=*/true};

ffi::Error UpdateImpl(ffi::ThreadPool pool, ffi::RemainingArgs args, ffi::RemainingRets rets,
                      float rho, float one_minus_rho, float eps, bool stochastic) {
  const Hyper8bit h{{rho, one_minus_rho, eps}, stochastic, 0.5f * (rho / (1.0f + rho))};
  return UpdateLeaves<Leaf, 6, 5>(k8bitKernel, pool, args, rets, h, Describe, Run);
}

}  // namespace

// (g, codes, scale, codes, scale, key) -> (Δx, codes, scale, codes, scale)
XLA_FFI_DEFINE_HANDLER_SYMBOL(optax_adadelta_update_8bit, UpdateImpl,
                              BindUpdate().Attr<bool>("stochastic"));
