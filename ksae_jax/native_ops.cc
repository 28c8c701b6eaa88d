// The TopK SAE's row kernels for XLA:CPU, through the XLA FFI (ksae_jax/native_ops.py
// builds this file with the host's compiler and registers its handlers):
//   ksae_scatter_rows: out (n, d) = sum over (b, j) of coef[b, j] * rows[b] into row idx[b, j]
//   ksae_gather_sum:   out (B, d) = sum_j coef[b, j] * table[idx[b, j]]
//   ksae_gather_dot:   out (B, k) = <rows[b], table[idx[b, j]]>
//   ksae_top_k:        (values, idx) (B, k) = lax.top_k(x + bias, k), row by row
//   ksae_pixel_gather: out (N, I, C) = sum_r src[b, tab[i, r]] over r with tab[i, r] in range:
//                      a convolution's patches (im2col) and their adjoint (col2im), per image
// XLA:CPU adds a scatter one row at a time into a zeroed (n, d) buffer. Here the B k pairs
// are counting-sorted by latent once, and each output row is summed in cache and written
// once. The work is split into chunks that the caller and XLA's intra-op threads claim from
// one counter, so that nothing waits on a thread that never comes. Indices outside [0, n)
// are skipped (lax.top_k never makes them).
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Claims {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

// body(c) for every chunk c in [0, chunks), on the caller and up to the pool's threads.
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t chunks, const F& body) {
  int64_t helpers = std::min<int64_t>(pool.num_threads() - 1, chunks - 1);
  if (helpers <= 0) {
    for (int64_t c = 0; c < chunks; ++c) body(c);
    return;
  }
  auto claims = std::make_shared<Claims>();
  // A helper that starts after the last chunk was claimed touches only `claims`.
  auto work = [claims, chunks, &body]() {
    for (int64_t c; (c = claims->next.fetch_add(1)) < chunks;) {
      body(c);
      claims->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([work] { work(); });
  work();
  while (claims->done.load(std::memory_order_acquire) < chunks) std::this_thread::yield();
}

// row[0:d] += sum_p weight(p) * src(p)[0:d] over p < count, four source rows per pass so that
// `row` is loaded and stored a quarter as often.
template <typename W, typename S>
void AddScaledRows(float* row, int64_t d, int64_t count, const W& weight, const S& src) {
  int64_t p = 0;
  for (; p + 4 <= count; p += 4) {
    const float w0 = weight(p), w1 = weight(p + 1), w2 = weight(p + 2), w3 = weight(p + 3);
    const float *s0 = src(p), *s1 = src(p + 1), *s2 = src(p + 2), *s3 = src(p + 3);
#pragma omp simd
    for (int64_t t = 0; t < d; ++t)
      row[t] += (w0 * s0[t] + w1 * s1[t]) + (w2 * s2[t] + w3 * s3[t]);
  }
  for (; p < count; ++p) {
    const float w0 = weight(p);
    const float* s0 = src(p);
#pragma omp simd
    for (int64_t t = 0; t < d; ++t) row[t] += w0 * s0[t];
  }
}

constexpr int64_t kLatentsPerChunk = 64;
constexpr int64_t kRowsPerChunk = 32;

int64_t Chunks(int64_t total, int64_t per) { return (total + per - 1) / per; }

// body(begin, end) for the consecutive ranges of `per` items that cover [0, total), in parallel.
template <typename F>
void ParallelRanges(ffi::ThreadPool& pool, int64_t total, int64_t per, const F& body) {
  ParallelFor(pool, Chunks(total, per), [&](int64_t chunk) {
    body(chunk * per, std::min(total, (chunk + 1) * per));
  });
}

ffi::Error ScatterRows(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> coef,
                       ffi::Buffer<ffi::S32> idx, ffi::Buffer<ffi::F32> rows,
                       ffi::ResultBuffer<ffi::F32> out) {
  const int64_t pairs = idx.element_count(), d = rows.dimensions().back();
  const int64_t batch = rows.element_count() / d, k = pairs / batch;
  const int64_t n = out->element_count() / d;
  const int32_t* ids = idx.typed_data();
  std::vector<int64_t> start(n + 1, 0), order(pairs);
  for (int64_t e = 0; e < pairs; ++e)
    if (ids[e] >= 0 && ids[e] < n) ++start[ids[e] + 1];
  for (int64_t i = 0; i < n; ++i) start[i + 1] += start[i];
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t e = 0; e < pairs; ++e)  // e in order: each latent's pairs keep (b, j) order
    if (ids[e] >= 0 && ids[e] < n) order[fill[ids[e]]++] = e;
  const float* c = coef.typed_data();
  const float* x = rows.typed_data();
  float* o = out->typed_data();
  ParallelRanges(pool, n, kLatentsPerChunk, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float* row = o + i * d;
      std::fill(row, row + d, 0.0f);
      const int64_t* pair = order.data() + start[i];
      AddScaledRows(row, d, start[i + 1] - start[i],
                    [&](int64_t p) { return c[pair[p]]; },
                    [&](int64_t p) { return x + (pair[p] / k) * d; });
    }
  });
  return ffi::Error::Success();
}

ffi::Error GatherSum(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> coef,
                     ffi::Buffer<ffi::S32> idx, ffi::Buffer<ffi::F32> table,
                     ffi::ResultBuffer<ffi::F32> out) {
  const int64_t d = table.dimensions().back(), n = table.element_count() / d;
  const int64_t batch = out->element_count() / d, k = idx.element_count() / batch;
  const int32_t* ids = idx.typed_data();
  const float* c = coef.typed_data();
  const float* w = table.typed_data();
  float* o = out->typed_data();
  ParallelRanges(pool, batch, kRowsPerChunk, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      float* row = o + b * d;
      std::fill(row, row + d, 0.0f);
      const int32_t* kept = ids + b * k;
      AddScaledRows(row, d, k,
                    [&](int64_t j) { return kept[j] >= 0 && kept[j] < n ? c[b * k + j] : 0.0f; },
                    [&](int64_t j) { return w + int64_t{std::clamp<int32_t>(kept[j], 0, n - 1)} * d; });
    }
  });
  return ffi::Error::Success();
}

ffi::Error GatherDot(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> rows,
                     ffi::Buffer<ffi::S32> idx, ffi::Buffer<ffi::F32> table,
                     ffi::ResultBuffer<ffi::F32> out) {
  const int64_t d = table.dimensions().back(), n = table.element_count() / d;
  const int64_t batch = rows.element_count() / d, k = idx.element_count() / batch;
  const int32_t* ids = idx.typed_data();
  const float* x = rows.typed_data();
  const float* w = table.typed_data();
  float* o = out->typed_data();
  ParallelRanges(pool, batch, kRowsPerChunk, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const float* a = x + b * d;
      const int32_t* kept = ids + b * k;
      auto src = [&](int64_t j) { return w + int64_t{std::clamp<int32_t>(kept[j], 0, n - 1)} * d; };
      auto put = [&](int64_t j, float s) { o[b * k + j] = kept[j] >= 0 && kept[j] < n ? s : 0.0f; };
      int64_t j = 0;
      for (; j + 4 <= k; j += 4) {  // four dots per pass over `a`
        const float *s0 = src(j), *s1 = src(j + 1), *s2 = src(j + 2), *s3 = src(j + 3);
        float d0 = 0.0f, d1 = 0.0f, d2 = 0.0f, d3 = 0.0f;
#pragma omp simd reduction(+ : d0, d1, d2, d3)
        for (int64_t t = 0; t < d; ++t) {
          d0 += a[t] * s0[t];
          d1 += a[t] * s1[t];
          d2 += a[t] * s2[t];
          d3 += a[t] * s3[t];
        }
        put(j, d0), put(j + 1, d1), put(j + 2, d2), put(j + 3, d3);
      }
      for (; j < k; ++j) {
        const float* s0 = src(j);
        float d0 = 0.0f;
#pragma omp simd reduction(+ : d0)
        for (int64_t t = 0; t < d; ++t) d0 += a[t] * s0[t];
        put(j, d0);
      }
    }
  });
  return ffi::Error::Success();
}

// lax.top_k's order as an integer: -NaN < -inf < ... < -0 < +0 < ... < +inf < +NaN.
inline int32_t OrderKey(float value) {
  int32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits ^ ((bits >> 31) & 0x7fffffff);
}

constexpr int64_t kScanBlock = 16;

// The k best of r[0:n] + bias[0:n] into key/id, best first, ties to the lower index (lax.top_k):
// entries come in index order, so a later one enters only when strictly better than the
// k-th kept, and blocks of kScanBlock whose best key is not better are skipped whole.
void TopKRow(const float* r, const float* bias, int64_t n, int64_t k, int32_t* key,
             int32_t* id) {
  int64_t kept = 0;
  auto offer = [&](int32_t v, int32_t i) {
    if (kept == k && v <= key[k - 1]) return;
    int64_t p = kept < k ? kept++ : k - 1;
    for (; p > 0 && v > key[p - 1]; --p) key[p] = key[p - 1], id[p] = id[p - 1];
    key[p] = v, id[p] = i;
  };
  int64_t i = 0;
  for (; i < std::min(n, k); ++i) offer(OrderKey(r[i] + bias[i]), static_cast<int32_t>(i));
  for (; i + kScanBlock <= n; i += kScanBlock) {
    int32_t best = INT32_MIN;
#pragma omp simd reduction(max : best)
    for (int64_t t = 0; t < kScanBlock; ++t) best = std::max(best, OrderKey(r[i + t] + bias[i + t]));
    if (best <= key[k - 1]) continue;
    for (int64_t t = 0; t < kScanBlock; ++t)
      offer(OrderKey(r[i + t] + bias[i + t]), static_cast<int32_t>(i + t));
  }
  for (; i < n; ++i) offer(OrderKey(r[i] + bias[i]), static_cast<int32_t>(i));
}

ffi::Error TopK(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> bias,
                ffi::ResultBuffer<ffi::F32> values, ffi::ResultBuffer<ffi::S32> idx) {
  const int64_t n = bias.element_count(), batch = x.element_count() / n;
  const int64_t k = values->element_count() / batch;
  if (k < 1 || k > n) return ffi::Error::InvalidArgument("ksae_top_k: k must lie in [1, n]");
  const float* xs = x.typed_data();
  const float* b = bias.typed_data();
  float* v = values->typed_data();
  int32_t* ids = idx->typed_data();
  ParallelRanges(pool, batch, kRowsPerChunk, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> key(k);
    for (int64_t row = begin; row < end; ++row) {
      int32_t* kept = ids + row * k;
      TopKRow(xs + row * n, b, n, k, key.data(), kept);
      for (int64_t j = 0; j < k; ++j) v[row * k + j] = xs[row * n + kept[j]] + b[kept[j]];
    }
  });
  return ffi::Error::Success();
}

constexpr int64_t kImagesPerChunk = 8;

ffi::Error PixelGather(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> src, ffi::Buffer<ffi::S32> tab,
                       ffi::ResultBuffer<ffi::F32> out) {
  if (src.dimensions().size() != 3 || tab.dimensions().size() != 2)
    return ffi::Error::InvalidArgument("ksae_pixel_gather: src (N, P, C), tab (I, R)");
  const int64_t batch = src.dimensions()[0], pixels = src.dimensions()[1];
  const int64_t c = src.dimensions()[2];
  const int64_t rows = tab.dimensions()[0], reads = tab.dimensions()[1];
  const int32_t* t = tab.typed_data();
  const float* s = src.typed_data();
  float* o = out->typed_data();
  ParallelRanges(pool, batch, kImagesPerChunk, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const float* image = s + b * pixels * c;
      for (int64_t i = 0; i < rows; ++i) {
        float* row = o + (b * rows + i) * c;
        const int32_t* read = t + i * reads;
        auto valid = [&](int64_t r) { return read[r] >= 0 && read[r] < pixels; };
        int64_t r = 0;
        while (r < reads && !valid(r)) ++r;
        if (r == reads) {  // padding only
          std::memset(row, 0, c * sizeof(float));
          continue;
        }
        std::memcpy(row, image + read[r] * c, c * sizeof(float));
        for (++r; r < reads; ++r) {
          if (!valid(r)) continue;
          const float* from = image + read[r] * c;
#pragma omp simd
          for (int64_t j = 0; j < c; ++j) row[j] += from[j];
        }
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

#define KSAE_HANDLER(name, fn)                                               \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, fn,                                            \
                                ffi::Ffi::Bind()                                     \
                                    .Ctx<ffi::ThreadPool>()                          \
                                    .Arg<ffi::Buffer<ffi::F32>>()                    \
                                    .Arg<ffi::Buffer<ffi::S32>>()                    \
                                    .Arg<ffi::Buffer<ffi::F32>>()                    \
                                    .Ret<ffi::Buffer<ffi::F32>>());

KSAE_HANDLER(KsaeScatterRows, ScatterRows)
KSAE_HANDLER(KsaeGatherSum, GatherSum)
KSAE_HANDLER(KsaeGatherDot, GatherDot)

XLA_FFI_DEFINE_HANDLER_SYMBOL(KsaeTopK, TopK,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(KsaePixelGather, PixelGather,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
