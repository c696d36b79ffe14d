// Lane-wise building blocks of the fused CPU sampler, written once with GCC vector extensions.
//
// Every function here is `always_inline` and has no target attribute of its own: it is inlined into
// the per-ISA entry points of sampler_kernels.cpp and compiled there for AVX-512, AVX2 or baseline
// x86-64. All operations are lane-wise and the extension is compiled with -ffp-contract=off, so a
// lane's result does not depend on the ISA, the vector position or the neighbouring lanes: the
// padded tail, every thread split and every ISA give the same bits.
//
// No torch header is included here (no torch inline function is compiled with a wider target).
#pragma once

#include <cstdint>
#include <cstring>

namespace l2m_fast_cpu {

constexpr int kLanes = 16;  // one zmm of float32; two ymm on AVX2, four xmm on baseline

typedef uint32_t u32v __attribute__((vector_size(kLanes * 4)));
typedef int32_t i32v __attribute__((vector_size(kLanes * 4)));
typedef float f32v __attribute__((vector_size(kLanes * 4)));
typedef uint16_t u16v __attribute__((vector_size(kLanes * 2)));
typedef uint64_t u64h __attribute__((vector_size(kLanes * 4)));  // same bytes as u32v, 8 lanes of 64 bits

#define L2M_INLINE static inline __attribute__((always_inline))

// ---------------------------------------------------------------- Philox4x32-10 (Salmon et al. 2011)

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

// High 32 bits of the 64-bit products m * x, lane-wise. Even and odd 32-bit lanes are multiplied as
// zero-extended 64-bit lanes (vpmuludq), then the high words are put back in place.
L2M_INLINE u32v mulhi32(uint32_t m, u32v x) {
  const u64h lo_mask = (u64h){} + 0xFFFFFFFFull;
  const u64h even = ((u64h)x & lo_mask) * (uint64_t)m;
  const u64h odd = ((u64h)x >> 32) * (uint64_t)m;
  return (u32v)((even >> 32) | (odd & ~lo_mask));
}

L2M_INLINE void philox4x32_10(u32v& c0, u32v& c1, u32v& c2, u32v& c3, uint32_t k0, uint32_t k1) {
#pragma GCC unroll 10
  for (int r = 0; r < 10; ++r) {
    const u32v hi0 = mulhi32(kPhiloxM0, c0);
    const u32v lo0 = c0 * kPhiloxM0;
    const u32v hi1 = mulhi32(kPhiloxM1, c2);
    const u32v lo1 = c2 * kPhiloxM1;
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
}

// ---------------------------------------------------------------- uniforms (exact in float32)

L2M_INLINE f32v uniform_open0(u32v r) {  // ((r >> 8) + 1) * 2^-24, in (0, 1]
  return __builtin_convertvector((i32v)((r >> 8) + 1u), f32v) * 0x1p-24f;
}

L2M_INLINE f32v uniform_open1(u32v r) {  // (r >> 8) * 2^-24, in [0, 1)
  return __builtin_convertvector((i32v)(r >> 8), f32v) * 0x1p-24f;
}

// ---------------------------------------------------------------- transcendentals (Cephes-style)

L2M_INLINE f32v splat(float x) { return (f32v){} + x; }

// Natural log for normal positive x (here x in [2^-24, 1]): x = m 2^e with m in [sqrt(1/2), sqrt(2)),
// log x = e ln2 + log1p(m - 1), log1p by the Cephes logf polynomial, ln2 split in two parts.
L2M_INLINE f32v log_pos(f32v x) {
  const u32v bits = (u32v)x;
  i32v e = (i32v)((bits >> 23) & 0xFFu) - 126;
  f32v m = (f32v)((bits & 0x007FFFFFu) | 0x3F000000u);  // in [0.5, 1)
  const i32v small = m < 0.707106781186547524f;
  e = e + small;                                  // small is -1 where true
  const f32v madd = (f32v)((u32v)m & (u32v)small);  // m where small, else 0
  m = (m - 1.0f) + madd;                           // m - 1 or 2m - 1, exact
  const f32v fe = __builtin_convertvector(e, f32v);
  const f32v z = m * m;
  f32v y = splat(7.0376836292e-2f);
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y = y + fe * -2.12194440e-4f;
  y = y - 0.5f * z;
  return (m + y) + fe * 0.693359375f;
}

// sin and cos of x in [0, 2^20): reduction by multiples of pi/4 (three-part Cody-Waite constant),
// Cephes sinf/cosf polynomials on [-pi/4, pi/4], octant selects polynomial and sign.
L2M_INLINE void sincos_pos(f32v x, f32v& s, f32v& c) {
  i32v j = __builtin_convertvector(x * 1.27323954473516f, i32v);  // truncation, x >= 0
  j = (j + 1) & ~1;
  const f32v y = __builtin_convertvector(j, f32v);
  x = ((x - y * 0.78515625f) - y * 2.4187564849853515625e-4f) - y * 3.77489497744594108e-8f;
  const f32v z = x * x;
  f32v pc = splat(2.443315711809948e-5f);
  pc = pc * z - 1.388731625493765e-3f;
  pc = pc * z + 4.166664568298827e-2f;
  pc = pc * z * z;
  pc = pc - 0.5f * z;
  pc = pc + 1.0f;
  f32v ps = splat(-1.9515295891e-4f);
  ps = ps * z + 8.3321608736e-3f;
  ps = ps * z - 1.6666654611e-1f;
  ps = ps * z * x;
  ps = ps + x;
  const i32v use_sin = (j & 2) == 0;
  const u32v sign_s = (u32v)(j & 4) << 29;
  const u32v sign_c = (u32v)(~(j - 2) & 4) << 29;
  s = (f32v)((u32v)(use_sin ? ps : pc) ^ sign_s);
  c = (f32v)((u32v)(use_sin ? pc : ps) ^ sign_c);
}

L2M_INLINE f32v sqrt_v(f32v x) {  // correctly rounded (vsqrtps with -fno-math-errno)
  f32v r;
  for (int k = 0; k < kLanes; ++k) r[k] = __builtin_sqrtf(x[k]);
  return r;
}

// Box-Muller of DESIGN section 3: (rad cos(2 pi ub), rad sin(2 pi ub)), rad = sqrt(-2 ln ua).
L2M_INLINE void box_muller(f32v ua, f32v ub, f32v& z_cos, f32v& z_sin) {
  const f32v rad = sqrt_v(-2.0f * log_pos(ua));
  f32v s, c;
  sincos_pos(ub * 6.28318530717958647692f, s, c);
  z_cos = rad * c;
  z_sin = rad * s;
}

// ---------------------------------------------------------------- output conversions

// float32 -> bfloat16 bits, round to nearest even, NaN -> 0x7FC0 (as c10::BFloat16).
L2M_INLINE u16v to_bf16_bits(f32v f) {
  const u32v u = (u32v)f;
  const u32v rounded = (u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16;
  const i32v nan = f != f;
  return __builtin_convertvector(nan ? (u32v){} + 0x7FC0u : rounded, u16v);
}

// float32 -> IEEE half bits, round to nearest even (c10 fp16_ieee_from_fp32_value, lane-wise).
L2M_INLINE u16v to_f16_bits(f32v f) {
  const u32v w = (u32v)f;
  const f32v absf = (f32v)(w & 0x7FFFFFFFu);
  f32v base = (absf * 0x1.0p+112f) * 0x1.0p-110f;
  const u32v shl1_w = w + w;
  const u32v sign = w & 0x80000000u;
  u32v bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? (u32v){} + 0x71000000u : bias;
  base = (f32v)((bias >> 1) + 0x07800000u) + base;
  const u32v bits = (u32v)base;
  const u32v exp_bits = (bits >> 13) & 0x00007C00u;
  const u32v mantissa_bits = bits & 0x00000FFFu;
  const u32v nonsign = exp_bits + mantissa_bits;
  const u32v h = (sign >> 16) | (shl1_w > 0xFF000000u ? (u32v){} + 0x7E00u : nonsign);
  return __builtin_convertvector(h, u16v);
}

template <typename V>
L2M_INLINE V load_v(const void* p) {
  V r;
  std::memcpy(&r, p, sizeof(V));
  return r;
}

template <typename V>
L2M_INLINE void store_v(void* p, V x) {
  std::memcpy(p, &x, sizeof(V));
}

}  // namespace l2m_fast_cpu
