/* The machine's limit for one Adadelta step, measured by benchmarks/step.py.
 *
 * adadelta_step_*: the whole step fused into one pass over memory, in place:
 *   E[g²]  = ρ E[g²] + (1 − ρ) g²
 *   Δx     = g · sqrt((E[Δx²] + ε) / (E[g²] + ε))     (previous E[Δx²], new E[g²])
 *   E[Δx²] = ρ E[Δx²] + (1 − ρ) Δx²
 *   p     −= lr · Δx
 * bandwidth_*: the same loads and stores with no square root and no division, so its
 * time is what the memory system allows for this traffic.
 *
 * Each function takes a whole tree as arrays of leaf pointers and sizes: one call per step
 * instead of one per leaf, because on 1,000 small leaves the per-call cost of ctypes would
 * otherwise be what is measured. One OpenMP region covers all leaves; `nowait` lets a thread
 * start its share of the next leaf without waiting for the others.
 *
 * The *_bf16 variants hold parameters and gradients as bfloat16 bit patterns (uint16) and
 * the accumulators as float32, the layout of the bf16 benchmark case: 22 bytes per
 * parameter instead of 28.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t h) {
  uint32_t bits = (uint32_t)h << 16;
  float x;
  memcpy(&x, &bits, sizeof x);
  return x;
}

/* Round to nearest even, like jnp.astype(bfloat16). NaN is not special-cased: the benchmark
 * data are finite, and the branch would cost what it is meant to measure. */
static inline uint16_t f32_to_bf16(float x) {
  uint32_t bits;
  memcpy(&bits, &x, sizeof bits);
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return (uint16_t)(bits >> 16);
}

/* Below this many parameters a step takes microseconds, less than waking a second thread. */
static int worth_threads(int64_t n_leaves, const int64_t *sizes) {
  int64_t total = 0;
  for (int64_t leaf = 0; leaf < n_leaves; ++leaf) total += sizes[leaf];
  return total >= (1 << 16);
}

void adadelta_step_f32(int64_t n_leaves, const int64_t *sizes, float *const *p,
                       const float *const *g, float *const *e_g2, float *const *e_dx2,
                       float rho, float one_minus_rho, float eps, float lr) {
#pragma omp parallel if (worth_threads(n_leaves, sizes))
  for (int64_t leaf = 0; leaf < n_leaves; ++leaf) {
    float *restrict pl = p[leaf], *restrict al = e_g2[leaf], *restrict bl = e_dx2[leaf];
    const float *restrict gl = g[leaf];
#pragma omp for simd schedule(static) nowait
    for (int64_t i = 0; i < sizes[leaf]; ++i) {
      float gi = gl[i];
      float new_e_g2 = rho * al[i] + one_minus_rho * (gi * gi);
      float dx = gi * sqrtf((bl[i] + eps) / (new_e_g2 + eps));
      al[i] = new_e_g2;
      bl[i] = rho * bl[i] + one_minus_rho * (dx * dx);
      pl[i] -= lr * dx;
    }
  }
}

void bandwidth_f32(int64_t n_leaves, const int64_t *sizes, float *const *p,
                   const float *const *g, float *const *e_g2, float *const *e_dx2, float rho,
                   float one_minus_rho, float eps, float lr) {
  (void)eps;
#pragma omp parallel if (worth_threads(n_leaves, sizes))
  for (int64_t leaf = 0; leaf < n_leaves; ++leaf) {
    float *restrict pl = p[leaf], *restrict al = e_g2[leaf], *restrict bl = e_dx2[leaf];
    const float *restrict gl = g[leaf];
#pragma omp for simd schedule(static) nowait
    for (int64_t i = 0; i < sizes[leaf]; ++i) {
      float gi = gl[i];
      /* Keeps both accumulators valid averages, so the fused step can share these buffers. */
      al[i] = rho * al[i] + one_minus_rho * (gi * gi);
      bl[i] = rho * bl[i] + one_minus_rho * (gi * gi);
      pl[i] -= lr * gi;
    }
  }
}

void adadelta_step_bf16(int64_t n_leaves, const int64_t *sizes, uint16_t *const *p,
                        const uint16_t *const *g, float *const *e_g2, float *const *e_dx2,
                        float rho, float one_minus_rho, float eps, float lr) {
#pragma omp parallel if (worth_threads(n_leaves, sizes))
  for (int64_t leaf = 0; leaf < n_leaves; ++leaf) {
    uint16_t *restrict pl = p[leaf];
    float *restrict al = e_g2[leaf], *restrict bl = e_dx2[leaf];
    const uint16_t *restrict gl = g[leaf];
#pragma omp for simd schedule(static) nowait
    for (int64_t i = 0; i < sizes[leaf]; ++i) {
      float gi = bf16_to_f32(gl[i]);
      float new_e_g2 = rho * al[i] + one_minus_rho * (gi * gi);
      float dx = gi * sqrtf((bl[i] + eps) / (new_e_g2 + eps));
      al[i] = new_e_g2;
      bl[i] = rho * bl[i] + one_minus_rho * (dx * dx);
      pl[i] = f32_to_bf16(bf16_to_f32(pl[i]) - lr * dx);
    }
  }
}

void bandwidth_bf16(int64_t n_leaves, const int64_t *sizes, uint16_t *const *p,
                    const uint16_t *const *g, float *const *e_g2, float *const *e_dx2,
                    float rho, float one_minus_rho, float eps, float lr) {
  (void)eps;
  (void)lr;
#pragma omp parallel if (worth_threads(n_leaves, sizes))
  for (int64_t leaf = 0; leaf < n_leaves; ++leaf) {
    uint16_t *restrict pl = p[leaf];
    float *restrict al = e_g2[leaf], *restrict bl = e_dx2[leaf];
    const uint16_t *restrict gl = g[leaf];
#pragma omp for simd schedule(static) nowait
    for (int64_t i = 0; i < sizes[leaf]; ++i) {
      uint16_t gi = gl[i];
      float gf = bf16_to_f32(gi);
      al[i] = rho * al[i] + one_minus_rho * (gf * gf);
      bl[i] = rho * bl[i] + one_minus_rho * (gf * gf);
      /* Integer arithmetic on the bits: a store of the same width without a rounding step. */
      pl[i] = (uint16_t)(pl[i] ^ (gi & 1u));
    }
  }
}
