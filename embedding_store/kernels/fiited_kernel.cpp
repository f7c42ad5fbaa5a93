// FIITED pool lookup and fused row-wise Adagrad update on the CPU (see embedding_store/kernels/__init__.py).
//
// Storage (embedding_store/pools.py): pool (t, p) of T tables x P widths holds rows of dims[p] float32 columns
// at weights[woff[t*P+p] + row*dims[p] ...] and one momentum at momentum[moff[t*P+p] + row]. An id's code is
// p << 24 | row. Bags are (t, b) at t*B + b of offsets (T*B+1,); the output is (B, T*D), bag (t, b) at columns
// [t*D, t*D + D): its rows' first dims[p] columns summed, the rest zero.
//
// Backward + update (what fbgemm's EXACT_ROWWISE_ADAGRAD does on the CPU): the gradient of one occurrence is the
// first d columns of its bag's output gradient; occurrences of the same physical row are summed first (in batch
// order), then per row: momentum += sum(g^2)/d; w -= g * lr / (sqrt(momentum) + eps), all in float.
//
// Parallel over bags (forward) and over distinct rows (update) with ATen's parallel_for (OpenMP in the torch
// builds we use, so one thread pool, sized by torch.set_num_threads). Rows of a bag and of a group are summed
// sequentially, so results do not depend on the thread count.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kPoolShift = 24;  // = embedding_store.config.POOL_SHIFT (tests/test_fiited_kernel.py checks)
constexpr int64_t kRowMask = (int64_t(1) << kPoolShift) - 1;
// bags / rows per parallel task: a bag or row is tens of floats of work, and waking the thread pool costs more
// than a small batch's whole pass (much more when other processes share the cores), so small batches run serially
constexpr int64_t kGrain = 1024;

void check_inputs(const at::Tensor& codes, const at::Tensor& offsets, const at::Tensor& woff,
                  const at::Tensor& dims, int64_t B) {
  TORCH_CHECK(codes.device().is_cpu() && codes.scalar_type() == at::kInt && codes.is_contiguous(),
              "fiited kernel: codes must be a contiguous CPU int32 tensor");
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.is_contiguous() && offsets.dim() == 1,
              "fiited kernel: offsets must be a contiguous int64 vector");
  TORCH_CHECK(woff.scalar_type() == at::kLong && dims.scalar_type() == at::kLong,
              "fiited kernel: woff and dims must be int64");
  TORCH_CHECK(B > 0 && (offsets.numel() - 1) % B == 0, "fiited kernel: offsets has ", offsets.numel(),
              " entries, not T*B+1 for B=", B);
}

at::Tensor fiited_forward(const at::Tensor& weights, const at::Tensor& codes, const at::Tensor& offsets,
                          const at::Tensor& woff, const at::Tensor& dims, int64_t B, int64_t D) {
  check_inputs(codes, offsets, woff, dims, B);
  TORCH_CHECK(weights.scalar_type() == at::kFloat && weights.is_contiguous(), "fiited kernel: float weights");
  const int64_t TB = offsets.numel() - 1, T = TB / B, P = dims.numel();
  auto out = at::empty({B, T * D}, weights.options());
  const float* w = weights.data_ptr<float>();
  const int32_t* c = codes.data_ptr<int32_t>();
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t* wo = woff.data_ptr<int64_t>();
  const int64_t* dm = dims.data_ptr<int64_t>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, TB, kGrain, [&](int64_t lo, int64_t hi) {
    for (int64_t bag = lo; bag < hi; ++bag) {
      const int64_t t = bag / B, b = bag % B;
      float* dst = o + b * T * D + t * D;
      std::memset(dst, 0, sizeof(float) * D);
      for (int64_t i = off[bag]; i < off[bag + 1]; ++i) {
        const int64_t code = c[i], p = code >> kPoolShift, d = dm[p];
        const float* src = w + wo[t * P + p] + (code & kRowMask) * d;
        for (int64_t j = 0; j < d; ++j) dst[j] += src[j];
      }
    }
  });
  return out;
}

// Stable LSD radix sort of v (key << 32 | position) by the key's bits only (positions start ascending).
void radix_sort_keys(std::vector<uint64_t>& v, int key_bits) {
  std::vector<uint64_t> tmp(v.size());
  constexpr int kDigit = 11;
  constexpr size_t kBuckets = size_t(1) << kDigit;
  for (int shift = 32; shift < 32 + key_bits; shift += kDigit) {
    std::vector<size_t> count(kBuckets + 1, 0);
    for (uint64_t x : v) ++count[((x >> shift) & (kBuckets - 1)) + 1];
    for (size_t k = 0; k < kBuckets; ++k) count[k + 1] += count[k];
    for (uint64_t x : v) tmp[count[(x >> shift) & (kBuckets - 1)]++] = x;
    v.swap(tmp);
  }
}

void fiited_backward_update(const at::Tensor& grad_in, const at::Tensor& codes, const at::Tensor& offsets,
                            at::Tensor weights, at::Tensor momentum, const at::Tensor& woff,
                            const at::Tensor& moff, const at::Tensor& dims, int64_t B, int64_t D, double lr,
                            double eps) {
  check_inputs(codes, offsets, woff, dims, B);
  TORCH_CHECK(weights.scalar_type() == at::kFloat && weights.is_contiguous() &&
                  momentum.scalar_type() == at::kFloat && momentum.is_contiguous(),
              "fiited kernel: weights and momentum must be contiguous float32");
  const at::Tensor grad = grad_in.contiguous();
  const int64_t TB = offsets.numel() - 1, T = TB / B, P = dims.numel(), N = codes.numel();
  TORCH_CHECK(grad.size(0) == B && grad.size(1) == T * D, "fiited kernel: gradient shape ", grad.sizes(),
              " is not (", B, ", ", T * D, ")");
  TORCH_CHECK(N < (int64_t(1) << 32), "fiited kernel: too many ids in one batch");
  const int64_t M = momentum.numel();
  TORCH_CHECK(M < (int64_t(1) << 32), "fiited kernel: more than 2^32 rows");
  if (N == 0) return;
  const float* g = grad.data_ptr<float>();
  const int32_t* c = codes.data_ptr<int32_t>();
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t* wo = woff.data_ptr<int64_t>();
  const int64_t* mo = moff.data_ptr<int64_t>();
  const int64_t* dm = dims.data_ptr<int64_t>();
  float* w = weights.data_ptr<float>();
  float* m = momentum.data_ptr<float>();

  // every occurrence: its physical row (the momentum index, unique over all pools) and its bag
  std::vector<uint64_t> keyed(N);
  std::vector<int32_t> bag_of(N);
  at::parallel_for(0, TB, kGrain, [&](int64_t lo, int64_t hi) {
    for (int64_t bag = lo; bag < hi; ++bag) {
      const int64_t t = bag / B;
      for (int64_t i = off[bag]; i < off[bag + 1]; ++i) {
        const int64_t code = c[i];
        const uint64_t row = uint64_t(mo[t * P + (code >> kPoolShift)] + (code & kRowMask));
        keyed[i] = (row << 32) | uint64_t(i);
        bag_of[i] = int32_t(bag);
      }
    }
  });
  int key_bits = 1;
  while ((int64_t(1) << key_bits) < M) ++key_bits;
  radix_sort_keys(keyed, key_bits);
  std::vector<int64_t> starts;  // group boundaries: one group per distinct row
  starts.reserve(N + 1);
  for (int64_t i = 0; i < N; ++i)
    if (i == 0 || (keyed[i] >> 32) != (keyed[i - 1] >> 32)) starts.push_back(i);
  starts.push_back(N);
  const int64_t G = int64_t(starts.size()) - 1;
  const float flr = float(lr), feps = float(eps);
  at::parallel_for(0, G, kGrain, [&](int64_t lo, int64_t hi) {
    std::vector<float> acc(D);
    for (int64_t k = lo; k < hi; ++k) {
      const int64_t s = starts[k], e = starts[k + 1];
      const int64_t first = int64_t(keyed[s] & 0xffffffffu);
      const int64_t code = c[first], p = code >> kPoolShift, d = dm[p];
      const int64_t t = bag_of[first] / B;
      std::fill(acc.begin(), acc.begin() + d, 0.0f);
      for (int64_t q = s; q < e; ++q) {
        const int64_t bag = bag_of[int64_t(keyed[q] & 0xffffffffu)];
        const float* src = g + (bag % B) * T * D + t * D;
        for (int64_t j = 0; j < d; ++j) acc[j] += src[j];
      }
      float sq = 0.0f;
      for (int64_t j = 0; j < d; ++j) sq += acc[j] * acc[j];
      const int64_t mi = int64_t(keyed[s] >> 32);
      const float mom = m[mi] + sq / float(d);
      m[mi] = mom;
      const float mult = flr / (std::sqrt(mom) + feps);
      float* dst = w + wo[t * P + p] + (code & kRowMask) * d;
      for (int64_t j = 0; j < d; ++j) dst[j] -= acc[j] * mult;
    }
  });
}

}  // namespace

TORCH_LIBRARY(streamrec_fiited, m) {
  m.def("forward(Tensor weights, Tensor codes, Tensor offsets, Tensor woff, Tensor dims, int B, int D) -> Tensor");
  m.def("backward_update(Tensor grad, Tensor codes, Tensor offsets, Tensor(a!) weights, Tensor(b!) momentum, "
        "Tensor woff, Tensor moff, Tensor dims, int B, int D, float lr, float eps) -> ()");
}

TORCH_LIBRARY_IMPL(streamrec_fiited, CPU, m) {
  m.impl("forward", &fiited_forward);
  m.impl("backward_update", &fiited_backward_update);
}
