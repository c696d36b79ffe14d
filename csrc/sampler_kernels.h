// Interface between the torch-facing ops (sampler_op.cpp) and the ISA-specific kernels
// (sampler_kernels.cpp): the sampler, Philox, and the loops of the value checks. Plain C++ only: no
// torch header crosses into the kernels.
#pragma once

#include <cstdint>

namespace l2m_fast_cpu {

// Elements per parallel block: a whole number of super-blocks (vector lanes x unroll) of every ISA.
constexpr int kBlock = 32;

enum OutKind : int { kOutFloat32 = 0, kOutBFloat16 = 1, kOutFloat16 = 2 };

// What a kernel variant computes; everything but kFull is for finding the limiting part.
enum Variant : int {
  kFull = 0,          // the contract
  kNoBoxMuller = 1,   // Philox and stores; z = the uniforms (no log, sqrt, sin, cos)
  kNoPhilox = 2,      // Box-Muller and stores; words from a cheap counter hash (no Philox rounds)
  kNoStores = 3,      // Philox and Box-Muller; one store per element block instead of S
  kStoresOnly = 4,    // stores of theta + sigma * u with u from the counter (no Philox, no Box-Muller)
  kNumVariants = 5,
};

enum Isa : int { kIsaAuto = -1, kIsaBase = 0, kIsaAvx2 = 1, kIsaAvx512 = 2 };

struct SampleArgs {
  const float* theta;       // (P,)
  const float* v;           // (P,)
  const float* a;           // (G,)
  const float* b;           // (G,)
  const int64_t* bounds;    // (G + 1,), checked: bounds[0] = 0, non-decreasing, bounds[G] = P
  int64_t num_segments;     // G >= 1
  int64_t num_samples;      // S
  int64_t num_elements;     // P
  uint64_t sample_offset;   // s0, with s0 + S <= 2^32
  uint64_t element_offset;  // i0, with i0 + P <= 2^63 - 1
  uint32_t key0, key1;      // Philox key from the seed
  void* out;                // (S, P), element type given by out_kind
  int out_kind;
  int check_values;         // nonzero: also test v and the precision (BadValue flags returned)
};

// Writes out[:, j_begin:j_end] (local element indices, 0 <= j_begin <= j_end <= P); with
// A.check_values, returns the BadValue flags (kBadNonFinite | kBadNegative | kBadPrecision) of
// v[j_begin:j_end], else 0.
using RangeFn = unsigned (*)(const SampleArgs&, int64_t j_begin, int64_t j_end);

// Best ISA this CPU supports (kIsaBase, kIsaAvx2 or kIsaAvx512).
int best_isa();
const char* isa_name(int isa);

// The kernel for an ISA (kIsaAuto: the best one), output kind and variant; nullptr if the
// combination does not exist (variants other than kFull exist for float32 output only) or the CPU
// lacks the ISA.
RangeFn range_kernel(int isa, int out_kind, int variant);

// Philox4x32-10 words of n counters: counters and words are (n, 4) uint32 row-major.
void philox_words(int isa, const uint32_t* counters, uint32_t* words, int64_t n, uint32_t key0, uint32_t key1);

// ---------------------------------------------------------------- value checks

// What a check found in a run of values (bit flags).
enum BadValue : unsigned {
  kBadNonFinite = 1,  // NaN or +-inf
  kBadNegative = 2,   // < 0 (-0.0 is not negative)
  kBadPrecision = 4,  // a v + b not > 0 (scan only)
};

enum SrcKind : int { kSrcFloat32 = 0, kSrcFloat64 = 1, kSrcBFloat16 = 2, kSrcFloat16 = 3 };

// dst[i] = float(src[i]) for i < n, both contiguous (src of kind src_kind, rounded to nearest as
// Tensor.copy_ does); with `check`, returns the kBadNonFinite | kBadNegative flags of the values
// written, else 0.
unsigned copy_to_float(int src_kind, float* dst, const void* src, int64_t n, bool check);

// Flags of v[0..n) in one segment with coefficients (a, b): kBadNonFinite, kBadNegative, and
// kBadPrecision where a v + b (float32, no fused multiply-add, as in the sampler) is not positive.
unsigned scan_values(const float* v, int64_t n, float a, float b);

}  // namespace l2m_fast_cpu
