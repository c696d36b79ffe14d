// torch.ops.l2m_fast_cpu: the CPU kernel of l2m_fast::sample_diag_gaussian_out, test-only ops, and the
// value checks (checks_op.inc).
//
// The Python op l2m_fast::sample_diag_gaussian_out (l2m_fast/ops/sample.py) registers a CPU kernel
// (l2m_fast/ops/cpu.py) that calls l2m_fast_cpu::sample_diag_gaussian_out. Every entry point checks
// the metadata of its arguments (shapes, dtypes, contiguity, devices, bounds, offsets) so that a call
// with garbage raises a clear error instead of reading or writing out of bounds. Values of v, a, b are
// not checked here (the public wrapper does it): a non-positive precision gives NaN or inf samples.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <atomic>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "sampler_kernels.h"
#include "checks_op.inc"

namespace l2m_fast_cpu {
namespace {

constexpr int64_t kMaxSamples = int64_t{1} << 32;  // sample indices are 32-bit (counter word 2 = s >> 2)
constexpr int64_t kGrainVectors = 64;               // element blocks of 16 per parallel_for grain

void check_vector(const at::Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.defined(), name, " is undefined");
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1, name, " must be 1-D, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

SampleArgs check_and_pack(const at::Tensor& theta, const at::Tensor& v, const at::Tensor& a, const at::Tensor& b,
                          const at::Tensor& bounds, int64_t seed, int64_t sample_offset, int64_t element_offset,
                          const at::Tensor& out) {
  check_vector(theta, "theta", at::kFloat);
  check_vector(v, "v", at::kFloat);
  check_vector(a, "a", at::kFloat);
  check_vector(b, "b", at::kFloat);
  check_vector(bounds, "bounds", at::kLong);
  const int64_t P = theta.numel();
  TORCH_CHECK(v.numel() == P, "theta and v must have the same number of elements, got ", P, " and ", v.numel());
  const int64_t G = a.numel();
  TORCH_CHECK(G >= 1, "a must have at least one segment");
  TORCH_CHECK(b.numel() == G, "a and b must have one value per segment, got ", G, " and ", b.numel());
  TORCH_CHECK(bounds.numel() == G + 1, "bounds must have G + 1 = ", G + 1, " entries, got ", bounds.numel());
  const int64_t* bd = bounds.data_ptr<int64_t>();
  TORCH_CHECK(bd[0] == 0, "bounds[0] must be 0, got ", bd[0]);
  TORCH_CHECK(bd[G] == P, "bounds[G] must be P = ", P, ", got ", bd[G]);
  for (int64_t g = 0; g < G; ++g) {
    TORCH_CHECK(bd[g] <= bd[g + 1], "bounds must be non-decreasing, got bounds[", g, "] = ", bd[g], " > bounds[",
                g + 1, "] = ", bd[g + 1]);
  }

  TORCH_CHECK(out.defined(), "out is undefined");
  TORCH_CHECK(out.device().is_cpu(), "out must be a CPU tensor, got ", out.device());
  const auto dt = out.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
              "out must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK(out.dim() == 2, "out must be 2-D (S, P), got shape ", out.sizes());
  TORCH_CHECK(out.size(1) == P, "out must have P = ", P, " columns, got shape ", out.sizes());
  TORCH_CHECK(out.is_contiguous(), "out must be contiguous");
  const int64_t S = out.size(0);

  TORCH_CHECK(sample_offset >= 0, "sample_offset must be >= 0, got ", sample_offset);
  TORCH_CHECK(sample_offset <= kMaxSamples - S, "sample_offset + S = ", sample_offset, " + ", S,
              " exceeds the 2^32 sample indices of the contract");
  TORCH_CHECK(element_offset >= 0, "element_offset must be >= 0, got ", element_offset);
  TORCH_CHECK(element_offset <= std::numeric_limits<int64_t>::max() - P, "element_offset + P = ", element_offset,
              " + ", P, " overflows the 63-bit element index");
  if (out.numel() > 0) {
    at::assert_no_overlap(out, theta);
    at::assert_no_overlap(out, v);
  }

  SampleArgs A{};
  A.theta = theta.data_ptr<float>();
  A.v = v.data_ptr<float>();
  A.a = a.data_ptr<float>();
  A.b = b.data_ptr<float>();
  A.bounds = bd;
  A.num_segments = G;
  A.num_samples = S;
  A.num_elements = P;
  A.sample_offset = static_cast<uint64_t>(sample_offset);
  A.element_offset = static_cast<uint64_t>(element_offset);
  uint64_t useed;
  std::memcpy(&useed, &seed, sizeof(useed));  // the signed int64 is the unsigned seed's bit pattern
  A.key0 = static_cast<uint32_t>(useed);
  A.key1 = static_cast<uint32_t>(useed >> 32);
  A.out = out.data_ptr();
  A.out_kind = dt == at::kFloat ? kOutFloat32 : (dt == at::kBFloat16 ? kOutBFloat16 : kOutFloat16);
  return A;
}

// Runs the kernel over all elements, in parallel; returns the BadValue flags found (A.check_values).
unsigned run(const SampleArgs& A, int64_t isa, int64_t variant) {
  TORCH_CHECK(isa >= kIsaAuto && isa <= kIsaAvx512, "isa must be -1 (auto), 0, 1 or 2, got ", isa);
  TORCH_CHECK(variant >= 0 && variant < kNumVariants, "variant must lie in [0, ", int(kNumVariants), "), got ",
              variant);
  const RangeFn fn = range_kernel(static_cast<int>(isa), A.out_kind, static_cast<int>(variant));
  TORCH_CHECK(fn != nullptr, "no kernel for isa ", isa, " (this CPU supports up to ", isa_name(best_isa()),
              "), output kind ", A.out_kind, ", variant ", variant, " (variants are float32-only)");
  if (A.num_samples == 0 || A.num_elements == 0) return 0;
  const int64_t P = A.num_elements;
  const int64_t num_vectors = (P + kBlock - 1) / kBlock;
  std::atomic<unsigned> flags{0};
  at::parallel_for(0, num_vectors, kGrainVectors, [&](int64_t begin, int64_t end) {
    const unsigned found = fn(A, begin * kBlock, std::min(end * kBlock, P));
    if (found) flags.fetch_or(found, std::memory_order_relaxed);
  });
  return flags.load();
}

void sample_diag_gaussian_out(const at::Tensor& theta, const at::Tensor& v, const at::Tensor& a, const at::Tensor& b,
                              const at::Tensor& bounds, int64_t seed, int64_t sample_offset, int64_t element_offset,
                              const at::Tensor& out) {
  run(check_and_pack(theta, v, a, b, bounds, seed, sample_offset, element_offset, out), kIsaAuto, kFull);
}

// The op with the value check fused in (S > 0): also tests v and a v + b on the way and returns the
// BadValue flags found (0: all finite, non-negative, positive precision). On nonzero flags out holds
// the samples of the bad values (NaN, inf); the caller reports the first offender.
int64_t sample_checked(const at::Tensor& theta, const at::Tensor& v, const at::Tensor& a, const at::Tensor& b,
                       const at::Tensor& bounds, int64_t seed, int64_t sample_offset, int64_t element_offset,
                       const at::Tensor& out) {
  SampleArgs A = check_and_pack(theta, v, a, b, bounds, seed, sample_offset, element_offset, out);
  TORCH_CHECK(A.num_samples > 0, "sample_checked needs S > 0 samples (the check rides on the sampling)");
  A.check_values = 1;
  return run(A, kIsaAuto, kFull);
}

void sample_variant(const at::Tensor& theta, const at::Tensor& v, const at::Tensor& a, const at::Tensor& b,
                    const at::Tensor& bounds, int64_t seed, int64_t sample_offset, int64_t element_offset,
                    const at::Tensor& out, int64_t isa, int64_t variant) {
  run(check_and_pack(theta, v, a, b, bounds, seed, sample_offset, element_offset, out), isa, variant);
}

at::Tensor philox4x32(const at::Tensor& counters, int64_t seed, int64_t isa) {
  TORCH_CHECK(counters.defined() && counters.device().is_cpu(), "counters must be a CPU tensor");
  TORCH_CHECK(counters.scalar_type() == at::kLong, "counters must be int64, got ", counters.scalar_type());
  TORCH_CHECK(counters.dim() == 2 && counters.size(1) == 4, "counters must have shape (N, 4), got ",
              counters.sizes());
  TORCH_CHECK(isa >= kIsaAuto && isa <= best_isa(), "isa ", isa, " is not available on this CPU");
  const at::Tensor c = counters.contiguous();
  const int64_t n = c.size(0);
  const int64_t* cp = c.data_ptr<int64_t>();
  std::vector<uint32_t> c32(static_cast<size_t>(n) * 4), w32(static_cast<size_t>(n) * 4);
  for (int64_t k = 0; k < n * 4; ++k) {
    TORCH_CHECK(cp[k] >= 0 && cp[k] <= 0xFFFFFFFFll, "counter words must lie in [0, 2^32), got ", cp[k]);
    c32[k] = static_cast<uint32_t>(cp[k]);
  }
  uint64_t useed;
  std::memcpy(&useed, &seed, sizeof(useed));
  philox_words(static_cast<int>(isa), c32.data(), w32.data(), n, static_cast<uint32_t>(useed),
               static_cast<uint32_t>(useed >> 32));
  at::Tensor words = at::empty({n, 4}, c.options());
  int64_t* wp = words.data_ptr<int64_t>();
  for (int64_t k = 0; k < n * 4; ++k) wp[k] = w32[k];
  return words;
}

int64_t best_isa_op() { return best_isa(); }

}  // namespace

TORCH_LIBRARY(l2m_fast_cpu, m) {
  m.def(
      "sample_diag_gaussian_out(Tensor theta, Tensor v, Tensor a, Tensor b, Tensor bounds, int seed, "
      "int sample_offset, int element_offset, Tensor(a!) out) -> ()");
  // Test and benchmark only: a chosen ISA (-1 auto, 0 x86-64, 1 avx2, 2 avx512) and kernel variant
  // (0 full, 1 no Box-Muller, 2 no Philox, 3 no stores, 4 stores only).
  m.def(
      "sample_variant(Tensor theta, Tensor v, Tensor a, Tensor b, Tensor bounds, int seed, "
      "int sample_offset, int element_offset, Tensor(a!) out, int isa, int variant) -> ()");
  m.def(
      "sample_checked(Tensor theta, Tensor v, Tensor a, Tensor b, Tensor bounds, int seed, "
      "int sample_offset, int element_offset, Tensor(a!) out) -> int");
  m.def("philox4x32(Tensor counters, int seed, int isa=-1) -> Tensor");
  m.def("best_isa() -> int", &best_isa_op);
  // Value checks (checks_op.inc): first offending indices, -1 where none.
  m.def("scan_values(Tensor v, Tensor a, Tensor b, Tensor bounds) -> int[]");
  m.def("copy_checked_(Tensor(a!) dst, Tensor src, bool check) -> int[]");
  m.def("advise_huge_pages(Tensor t) -> ()");
}

TORCH_LIBRARY_IMPL(l2m_fast_cpu, CPU, m) {
  m.impl("sample_diag_gaussian_out", &sample_diag_gaussian_out);
  m.impl("sample_variant", &sample_variant);
  m.impl("sample_checked", &sample_checked);
  m.impl("philox4x32", &philox4x32);
  m.impl("scan_values", &scan_values_op);
  m.impl("copy_checked_", &copy_checked_op);
  m.impl("advise_huge_pages", &advise_huge_pages);
}

}  // namespace l2m_fast_cpu
