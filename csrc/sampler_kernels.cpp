// The fused CPU sampler, compiled three times from one lane-wise body: AVX-512, AVX2 and baseline
// x86-64, chosen at run time (never -march=native: the binary runs on any x86-64).
//
// One pass over the elements: a block of 16 elements reads theta, v and its segments' (a, b) once,
// computes sigma, then for every group of four samples makes one Philox4x32-10 call per element and
// writes the four samples (rows s of out) directly. The last, partial block runs the same vector code
// on zero-padded inputs and stores only its valid lanes, so tail elements get the same bits as
// elements inside a block.
#include "sampler_kernels.h"

#include <algorithm>

#include "sampler_math.h"

namespace l2m_fast_cpu {
static_assert(kBlock == kLanes, "parallel splits must be whole vector blocks");

namespace {

L2M_INLINE void segment_params(const SampleArgs& A, int64_t j0, int n, int64_t& g, float* a_l, float* b_l) {
  // g: a cursor on the segment of element j0 (elements only increase within a range).
  const int64_t G = A.num_segments;
  while (g + 1 < G && A.bounds[g + 1] <= j0) ++g;
  if (A.bounds[g + 1] >= j0 + n || g + 1 == G) {
    for (int k = 0; k < kLanes; ++k) {
      a_l[k] = A.a[g];
      b_l[k] = A.b[g];
    }
    return;
  }
  int64_t gg = g;
  for (int k = 0; k < kLanes; ++k) {
    if (k < n) {
      while (gg + 1 < G && A.bounds[gg + 1] <= j0 + k) ++gg;
    }
    a_l[k] = A.a[gg];
    b_l[k] = A.b[gg];
  }
}

template <int kOut>
L2M_INLINE void store_row(void* row, f32v x, int n) {
  if constexpr (kOut == kOutFloat32) {
    if (n == kLanes) {
      store_v(row, x);
    } else {
      float tmp[kLanes];
      store_v(tmp, x);
      std::memcpy(row, tmp, sizeof(float) * n);
    }
  } else {
    const u16v h = kOut == kOutBFloat16 ? to_bf16_bits(x) : to_f16_bits(x);
    if (n == kLanes) {
      store_v(row, h);
    } else {
      uint16_t tmp[kLanes];
      store_v(tmp, h);
      std::memcpy(row, tmp, sizeof(uint16_t) * n);
    }
  }
}

template <int kOut, int kVar>
L2M_INLINE void sample_range_impl(const SampleArgs& A, int64_t j_begin, int64_t j_end) {
  constexpr int kBytes = kOut == kOutFloat32 ? 4 : 2;
  const int64_t S = A.num_samples;
  const int64_t P = A.num_elements;
  if (S <= 0 || j_begin >= j_end) return;
  char* const out = static_cast<char*>(A.out);
  const uint64_t q_first = A.sample_offset >> 2;
  const uint64_t q_last = (A.sample_offset + static_cast<uint64_t>(S) - 1) >> 2;
  // Segment of j_begin: the last g with bounds[g] <= j_begin (empty segments skipped by the cursor).
  int64_t g = std::upper_bound(A.bounds, A.bounds + A.num_segments, j_begin) - A.bounds - 1;
  g = std::max<int64_t>(g, 0);

  u32v lane_iota;
  for (int k = 0; k < kLanes; ++k) lane_iota[k] = static_cast<uint32_t>(k);

  for (int64_t j0 = j_begin; j0 < j_end; j0 += kLanes) {
    const int n = static_cast<int>(std::min<int64_t>(kLanes, j_end - j0));
    f32v theta, v;
    if (n == kLanes) {
      theta = load_v<f32v>(A.theta + j0);
      v = load_v<f32v>(A.v + j0);
    } else {
      float t_l[kLanes] = {}, v_l[kLanes] = {};
      std::memcpy(t_l, A.theta + j0, sizeof(float) * n);
      std::memcpy(v_l, A.v + j0, sizeof(float) * n);
      theta = load_v<f32v>(t_l);
      v = load_v<f32v>(v_l);
    }
    float a_l[kLanes], b_l[kLanes];
    segment_params(A, j0, n, g, a_l, b_l);
    const f32v prec = load_v<f32v>(a_l) * v + load_v<f32v>(b_l);
    const f32v sigma = 1.0f / sqrt_v(prec);

    // Global element index i = i0 + j (< 2^63): counter words (i lo, i hi).
    const uint64_t i_first = A.element_offset + static_cast<uint64_t>(j0);
    const u32v c0 = static_cast<uint32_t>(i_first) + lane_iota;
    const u32v carry = (u32v)(c0 < static_cast<uint32_t>(i_first));  // all-ones where the low word wrapped
    const u32v c1 = static_cast<uint32_t>(i_first >> 32) - carry;

    f32v acc = {};
    for (uint64_t q = q_first; q <= q_last; ++q) {
      u32v r0, r1, r2, r3;
      if constexpr (kVar == kNoPhilox || kVar == kStoresOnly) {
        const uint32_t qq = static_cast<uint32_t>(q);
        r0 = c0 * kPhiloxM0 + qq;
        r1 = c0 * kPhiloxM1 ^ c1;
        r2 = (c0 + qq) * kPhiloxW0;
        r3 = (c0 ^ qq) * kPhiloxW1;
      } else {
        r0 = c0;
        r1 = c1;
        r2 = (u32v){} + static_cast<uint32_t>(q);
        r3 = (u32v){};
        philox4x32_10(r0, r1, r2, r3, A.key0, A.key1);
      }
      f32v z[4];
      if constexpr (kVar == kNoBoxMuller || kVar == kStoresOnly) {
        z[0] = uniform_open0(r0);
        z[1] = uniform_open1(r1);
        z[2] = uniform_open0(r2);
        z[3] = uniform_open1(r3);
      } else {
        box_muller(uniform_open0(r0), uniform_open1(r1), z[0], z[1]);
        box_muller(uniform_open0(r2), uniform_open1(r3), z[2], z[3]);
      }
      const int64_t s_base = static_cast<int64_t>(4 * q - A.sample_offset);  // may be -3..-1 first
#pragma GCC unroll 4
      for (int w = 0; w < 4; ++w) {
        const int64_t s = s_base + w;
        if (s < 0 || s >= S) continue;
        const f32v x = theta + sigma * z[w];
        if constexpr (kVar == kNoStores) {
          acc = acc + x;
        } else {
          store_row<kOut>(out + (s * P + j0) * kBytes, x, n);
        }
      }
    }
    if constexpr (kVar == kNoStores) store_row<kOut>(out + j0 * kBytes, acc, n);
  }
}

L2M_INLINE void philox_words_impl(const uint32_t* counters, uint32_t* words, int64_t n, uint32_t k0, uint32_t k1) {
  for (int64_t i0 = 0; i0 < n; i0 += kLanes) {
    const int m = static_cast<int>(std::min<int64_t>(kLanes, n - i0));
    u32v c[4] = {};
    for (int k = 0; k < m; ++k)
      for (int w = 0; w < 4; ++w) c[w][k] = counters[(i0 + k) * 4 + w];
    philox4x32_10(c[0], c[1], c[2], c[3], k0, k1);
    for (int k = 0; k < m; ++k)
      for (int w = 0; w < 4; ++w) words[(i0 + k) * 4 + w] = c[w][k];
  }
}

#define L2M_ISA_KERNELS(NAME, TARGET)                                                                 \
  template <int kOut, int kVar>                                                                      \
  TARGET void range_##NAME(const SampleArgs& A, int64_t j_begin, int64_t j_end) {                   \
    sample_range_impl<kOut, kVar>(A, j_begin, j_end);                                                \
  }                                                                                                  \
  TARGET void philox_##NAME(const uint32_t* c, uint32_t* w, int64_t n, uint32_t k0, uint32_t k1) {  \
    philox_words_impl(c, w, n, k0, k1);                                                              \
  }                                                                                                  \
  RangeFn table_##NAME(int out_kind, int variant) {                                                  \
    if (out_kind == kOutFloat32) {                                                                   \
      switch (variant) {                                                                             \
        case kFull: return &range_##NAME<kOutFloat32, kFull>;                                        \
        case kNoBoxMuller: return &range_##NAME<kOutFloat32, kNoBoxMuller>;                          \
        case kNoPhilox: return &range_##NAME<kOutFloat32, kNoPhilox>;                                \
        case kNoStores: return &range_##NAME<kOutFloat32, kNoStores>;                                \
        case kStoresOnly: return &range_##NAME<kOutFloat32, kStoresOnly>;                            \
        default: return nullptr;                                                                     \
      }                                                                                              \
    }                                                                                                \
    if (variant != kFull) return nullptr;                                                            \
    if (out_kind == kOutBFloat16) return &range_##NAME<kOutBFloat16, kFull>;                         \
    if (out_kind == kOutFloat16) return &range_##NAME<kOutFloat16, kFull>;                           \
    return nullptr;                                                                                  \
  }

#define L2M_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,bmi2")))
#define L2M_TARGET_AVX2 __attribute__((target("avx2,fma,bmi2")))
#define L2M_TARGET_BASE

L2M_ISA_KERNELS(avx512, L2M_TARGET_AVX512)
L2M_ISA_KERNELS(avx2, L2M_TARGET_AVX2)
L2M_ISA_KERNELS(base, L2M_TARGET_BASE)

int detect_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx2") &&
      __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2"))
    return kIsaAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2"))
    return kIsaAvx2;
  return kIsaBase;
}

}  // namespace

int best_isa() {
  static const int isa = detect_isa();
  return isa;
}

const char* isa_name(int isa) {
  switch (isa) {
    case kIsaAvx512: return "avx512";
    case kIsaAvx2: return "avx2";
    case kIsaBase: return "x86-64";
    default: return "unknown";
  }
}

RangeFn range_kernel(int isa, int out_kind, int variant) {
  if (isa == kIsaAuto) isa = best_isa();
  if (isa < kIsaBase || isa > best_isa()) return nullptr;
  switch (isa) {
    case kIsaAvx512: return table_avx512(out_kind, variant);
    case kIsaAvx2: return table_avx2(out_kind, variant);
    default: return table_base(out_kind, variant);
  }
}

void philox_words(int isa, const uint32_t* counters, uint32_t* words, int64_t n, uint32_t key0, uint32_t key1) {
  if (isa == kIsaAuto || isa > best_isa()) isa = best_isa();
  switch (isa) {
    case kIsaAvx512: philox_avx512(counters, words, n, key0, key1); break;
    case kIsaAvx2: philox_avx2(counters, words, n, key0, key1); break;
    default: philox_base(counters, words, n, key0, key1); break;
  }
}

}  // namespace l2m_fast_cpu
