// The fused CPU sampler and the loops of the value checks, compiled three times from one lane-wise body
// each (sampler_impl.inc, checks_impl.inc): AVX-512 (16 lanes), AVX2 (8 lanes) and baseline x86-64
// (4 lanes), chosen at run time. Never -march=native: the binary runs on any x86-64 CPU.
//
// The sampler makes one pass over the elements: a super-block of vector blocks reads theta, v and its
// segments' (a, b) once, computes sigma, then for every group of four samples makes one Philox4x32-10
// call per element and writes the samples of that group that are wanted (rows s of out) directly;
// what no wanted sample uses (a Box-Muller pair, a sine, Philox words) is not computed. The last,
// partial super-block runs the same vector code on zero-padded inputs and stores only its valid lanes,
// so tail elements get the same bits as elements inside a block.
#include "sampler_kernels.h"

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#define L2M_INLINE static inline __attribute__((always_inline))

namespace l2m_fast_cpu {
namespace {
constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
}  // namespace
}  // namespace l2m_fast_cpu

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,bmi2")
#define L2M_NS avx512
#define L2M_LANES 16
#include "sampler_impl.inc"
#include "checks_impl.inc"
#undef L2M_NS
#undef L2M_LANES
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,bmi2")
#define L2M_NS avx2
#define L2M_LANES 8
#include "sampler_impl.inc"
#include "checks_impl.inc"
#undef L2M_NS
#undef L2M_LANES
#pragma GCC pop_options

#define L2M_NS base
#define L2M_LANES 4
#include "sampler_impl.inc"
#include "checks_impl.inc"
#undef L2M_NS
#undef L2M_LANES

namespace l2m_fast_cpu {
namespace {

#define L2M_ISA_TABLE(NS, TARGET)                                                                   \
  template <int kOut, int kVar>                                                                    \
  TARGET unsigned range_##NS(const SampleArgs& A, int64_t j_begin, int64_t j_end) {               \
    return NS::sample_range_impl<kOut, kVar>(A, j_begin, j_end);                                   \
  }                                                                                                \
  TARGET void philox_##NS(const uint32_t* c, uint32_t* w, int64_t n, uint32_t k0, uint32_t k1) {  \
    NS::philox_words_impl(c, w, n, k0, k1);                                                        \
  }                                                                                                \
  TARGET unsigned copy_##NS(int kind, float* d, const void* s, int64_t n, bool check) {             \
    return NS::copy_to_float(kind, d, s, n, check);                                                \
  }                                                                                                \
  TARGET unsigned scan_##NS(const float* v, int64_t n, float a, float b) {                        \
    return NS::scan_run(v, n, a, b);                                                               \
  }                                                                                                \
  RangeFn table_##NS(int out_kind, int variant) {                                                  \
    if (out_kind == kOutFloat32) {                                                                 \
      switch (variant) {                                                                           \
        case kFull: return &range_##NS<kOutFloat32, kFull>;                                        \
        case kNoBoxMuller: return &range_##NS<kOutFloat32, kNoBoxMuller>;                          \
        case kNoPhilox: return &range_##NS<kOutFloat32, kNoPhilox>;                                \
        case kNoStores: return &range_##NS<kOutFloat32, kNoStores>;                                \
        case kStoresOnly: return &range_##NS<kOutFloat32, kStoresOnly>;                            \
        default: return nullptr;                                                                   \
      }                                                                                            \
    }                                                                                              \
    if (variant != kFull) return nullptr;                                                          \
    if (out_kind == kOutBFloat16) return &range_##NS<kOutBFloat16, kFull>;                         \
    if (out_kind == kOutFloat16) return &range_##NS<kOutFloat16, kFull>;                           \
    return nullptr;                                                                                \
  }

L2M_ISA_TABLE(avx512, __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,bmi2"))))
L2M_ISA_TABLE(avx2, __attribute__((target("avx2,fma,bmi2"))))
L2M_ISA_TABLE(base, )

int detect_isa() {
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2");
  if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
    return kIsaAvx512;
  return avx2 ? kIsaAvx2 : kIsaBase;
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

unsigned copy_to_float(int src_kind, float* dst, const void* src, int64_t n, bool check) {
  switch (best_isa()) {
    case kIsaAvx512: return copy_avx512(src_kind, dst, src, n, check);
    case kIsaAvx2: return copy_avx2(src_kind, dst, src, n, check);
    default: return copy_base(src_kind, dst, src, n, check);
  }
}

unsigned scan_values(const float* v, int64_t n, float a, float b) {
  switch (best_isa()) {
    case kIsaAvx512: return scan_avx512(v, n, a, b);
    case kIsaAvx2: return scan_avx2(v, n, a, b);
    default: return scan_base(v, n, a, b);
  }
}

}  // namespace l2m_fast_cpu
