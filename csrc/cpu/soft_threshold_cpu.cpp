// Fused soft-threshold forward and backward on the CPU (SPEC §1).
//
// forward:  out = sign(w) * relu(|w| - g), g = sigmoid(s), and nnz(out), in one read of w.
// backward: grad_w = G * m (exact) or G (ste), m = 1[|w| - g > 0], and grad_s = -g(1-g) * sum(G * sign(w) * m),
//           in one read of G and w.
//
// The tensor is cut into fixed chunks of kChunk elements; every chunk writes its partial count/sum into its
// own slot and the slots are summed in index order, so results do not depend on the number of threads.
// Inner loops are branch-free `omp simd` loops compiled for AVX-512, AVX2 and baseline x86-64 and picked at
// run time (target_clones).
//
// Streaming stores: a result too large to stay in cache until its reader comes is written with
// non-temporal stores (AVX-512), which skip the read-for-ownership of every output line: 12 -> 8 bytes
// of traffic per element forward, 16 -> 12 backward. Measured on the 2-core EPYC (family 26), 23M floats:
// forward 5.2 -> 4.2 ms, backward 8.9 -> 5.9 ms; but on outputs that fit in L3 they are slower (2M floats:
// forward 0.15 -> 0.22 ms), since the reader then finds them in cache. So: dL/dw, read by the optimizer only
// after the rest of the backward pass, streams when it exceeds the cores' L2; w_hat, read by the layer right
// away, when it exceeds half of L3 (forward_streaming_bytes). ADAPMTL_CPU_STREAMING_STORES=0 / 1 turns them
// off / on at every size.
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define ADAPMTL_STREAMING_STORES 1
#endif

#include "common.h"
#include "cpu/buffer_pool.h"
#include "cpu/cpu_info.h"
#include "cpu/soft_threshold_cpu.h"

namespace adapmtl {
namespace {

std::atomic<int64_t> streamed_forward{0}, streamed_backward{0};  // soft_threshold_streamed_calls()

constexpr int64_t kChunk = 16384;
// Below this many chunks the work runs on the calling thread (thread wake-up costs more than it saves).
constexpr int64_t kChunksPerTask = 4;

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ADAPMTL_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define ADAPMTL_MULTIVERSION
#endif

// NaN in w stays NaN (a <= 0 is false for NaN) and counts as a non-zero, like the reference.
template <typename T>
ADAPMTL_MULTIVERSION int32_t forward_chunk(const T* __restrict w, T* __restrict out, int64_t n, T g) {
  int32_t count = 0;  // a chunk holds < 2^31 elements; 32-bit lanes vectorise alongside float
#pragma omp simd reduction(+ : count)
  for (int64_t i = 0; i < n; ++i) {
    const T x = w[i];
    const T a = std::abs(x) - g;
    const T r = a <= T(0) ? T(0) : a;
    out[i] = std::copysign(r, x);
    count += r != T(0) ? 1 : 0;
  }
  return count;
}

// Returns sum(G * sign(w) * m) over the chunk; writes grad_w.
template <typename T, bool kSte>
ADAPMTL_MULTIVERSION T backward_chunk(const T* __restrict grad, const T* __restrict w, T* __restrict grad_w, int64_t n,
                                      T g) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) {
    const T x = w[i];
    const T G = grad[i];
    const bool keep = std::abs(x) - g > T(0);
    const T masked = keep ? G : T(0);
    grad_w[i] = kSte ? G : masked;
    sum += x < T(0) ? -masked : masked;  // masked * sign(x); x != 0 wherever masked != 0
  }
  return sum;
}

// Which sizes stream (see the top of the file): 'a' by size, '0' never, '1' always (where AVX-512 is).
char streaming_mode() {
  static const char mode = [] {
    const char* v = std::getenv("ADAPMTL_CPU_STREAMING_STORES");
    if (v == nullptr || *v == '\0') return 'a';
    TORCH_CHECK_VALUE(std::strcmp(v, "0") == 0 || std::strcmp(v, "1") == 0,
                      "ADAPMTL_CPU_STREAMING_STORES must be 0 or 1 (unset: by size), got '", v, "'");
    return v[0];
  }();
  return mode;
}

#ifdef ADAPMTL_STREAMING_STORES
bool cpu_streams() {
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  return avx512;
}

// The AVX-512 loops of forward_chunk / backward_chunk with non-temporal stores; the same operations
// element by element (|w| - g compared with 0, NaN kept, -0 for a zeroed negative weight), so results
// match the cached path's bit for bit except for the order of backward's per-chunk sum. `out` / `grad_w`
// must be 64-byte aligned (every chunk of a CPU tensor is: kChunk elements from a 64-byte-aligned base).
// Vector types per element type: 16 floats or 8 doubles.
template <typename T>
struct Zmm;
template <>
struct Zmm<float> {
  using V = __m512;
  using M = __mmask16;
  static constexpr int64_t kLanes = 16;
  __attribute__((target("avx512f"))) static V load(const float* p) { return _mm512_loadu_ps(p); }
  __attribute__((target("avx512f"))) static V set1(float x) { return _mm512_set1_ps(x); }
  __attribute__((target("avx512f"))) static __m512i sign() { return _mm512_set1_epi32(int32_t(0x80000000u)); }
  __attribute__((target("avx512f"))) static __m512i bits(V x) { return _mm512_castps_si512(x); }
  __attribute__((target("avx512f"))) static V from_bits(__m512i x) { return _mm512_castsi512_ps(x); }
  __attribute__((target("avx512f"))) static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  template <int kCmp>
  __attribute__((target("avx512f"))) static M cmp(V a, V b) { return _mm512_cmp_ps_mask(a, b, kCmp); }
  __attribute__((target("avx512f"))) static V blend_zero(M k, V a) { return _mm512_mask_mov_ps(a, k, V{}); }
  __attribute__((target("avx512f"))) static V keep(M k, V a) { return _mm512_maskz_mov_ps(k, a); }
  __attribute__((target("avx512f"))) static V add(V acc, M k, V a) { return _mm512_mask_add_ps(acc, k, acc, a); }
  __attribute__((target("avx512f"))) static V subm(V acc, M k, V a) { return _mm512_mask_sub_ps(acc, k, acc, a); }
  __attribute__((target("avx512f"))) static void stream(float* p, V x) { _mm512_stream_ps(p, x); }
  __attribute__((target("avx512f"))) static float sum(V x) { return _mm512_reduce_add_ps(x); }
};
template <>
struct Zmm<double> {
  using V = __m512d;
  using M = __mmask8;
  static constexpr int64_t kLanes = 8;
  __attribute__((target("avx512f"))) static V load(const double* p) { return _mm512_loadu_pd(p); }
  __attribute__((target("avx512f"))) static V set1(double x) { return _mm512_set1_pd(x); }
  __attribute__((target("avx512f"))) static __m512i sign() { return _mm512_set1_epi64(int64_t(0x8000000000000000ull)); }
  __attribute__((target("avx512f"))) static __m512i bits(V x) { return _mm512_castpd_si512(x); }
  __attribute__((target("avx512f"))) static V from_bits(__m512i x) { return _mm512_castsi512_pd(x); }
  __attribute__((target("avx512f"))) static V sub(V a, V b) { return _mm512_sub_pd(a, b); }
  template <int kCmp>
  __attribute__((target("avx512f"))) static M cmp(V a, V b) { return _mm512_cmp_pd_mask(a, b, kCmp); }
  __attribute__((target("avx512f"))) static V blend_zero(M k, V a) { return _mm512_mask_mov_pd(a, k, V{}); }
  __attribute__((target("avx512f"))) static V keep(M k, V a) { return _mm512_maskz_mov_pd(k, a); }
  __attribute__((target("avx512f"))) static V add(V acc, M k, V a) { return _mm512_mask_add_pd(acc, k, acc, a); }
  __attribute__((target("avx512f"))) static V subm(V acc, M k, V a) { return _mm512_mask_sub_pd(acc, k, acc, a); }
  __attribute__((target("avx512f"))) static void stream(double* p, V x) { _mm512_stream_pd(p, x); }
  __attribute__((target("avx512f"))) static double sum(V x) { return _mm512_reduce_add_pd(x); }
};

template <typename T>
__attribute__((target("avx512f"))) int32_t forward_chunk_streaming(const T* __restrict w, T* __restrict out,
                                                                   int64_t n, T g) {
  using Z = Zmm<T>;
  const auto gv = Z::set1(g), zero = Z::set1(T(0));
  const __m512i sign = Z::sign();
  int32_t count = 0;
  int64_t i = 0;
  for (; i + Z::kLanes <= n; i += Z::kLanes) {
    const auto x = Z::load(w + i);
    const __m512i xb = Z::bits(x);
    const auto a = Z::sub(Z::from_bits(_mm512_andnot_si512(sign, xb)), gv);     // |x| - g
    const auto r = Z::blend_zero(Z::template cmp<_CMP_LE_OQ>(a, zero), a);      // NaN stays
    count += __builtin_popcount(unsigned(Z::template cmp<_CMP_NEQ_UQ>(r, zero)));  // NaN counts
    Z::stream(out + i, Z::from_bits(_mm512_or_si512(Z::bits(r), _mm512_and_si512(sign, xb))));  // r >= 0 or +NaN
  }
  _mm_sfence();  // the streamed lines are visible before the parallel region's join
  return count + forward_chunk<T>(w + i, out + i, n - i, g);
}

template <typename T, bool kSte>
__attribute__((target("avx512f"))) T backward_chunk_streaming(const T* __restrict grad, const T* __restrict w,
                                                              T* __restrict grad_w, int64_t n, T g) {
  using Z = Zmm<T>;
  const auto gv = Z::set1(g), zero = Z::set1(T(0));
  const __m512i sign = Z::sign();
  auto acc = zero;
  int64_t i = 0;
  for (; i + Z::kLanes <= n; i += Z::kLanes) {
    const auto x = Z::load(w + i), G = Z::load(grad + i);
    const auto keep = Z::template cmp<_CMP_GT_OQ>(Z::sub(Z::from_bits(_mm512_andnot_si512(sign, Z::bits(x))), gv), zero);
    const auto negative = Z::template cmp<_CMP_LT_OQ>(x, zero);
    Z::stream(grad_w + i, kSte ? G : Z::keep(keep, G));
    acc = Z::add(acc, keep & ~negative, G);
    acc = Z::subm(acc, keep & negative, G);
  }
  _mm_sfence();
  return Z::sum(acc) + backward_chunk<T, kSte>(grad + i, w + i, grad_w + i, n - i, g);
}
#endif

// Whether a result of `bytes` (into `out`) streams; `min_bytes` is its size rule (top of the file).
bool streams(const void* out, int64_t bytes, int64_t min_bytes) {
  const char mode = streaming_mode();  // a bad setting is an error on every machine, not only where it applies
#ifdef ADAPMTL_STREAMING_STORES
  if (mode == '0' || !cpu_streams() || reinterpret_cast<uintptr_t>(out) % 64 != 0) return false;
  return mode == '1' || bytes >= min_bytes;
#else
  (void)mode, (void)out, (void)bytes, (void)min_bytes;
  return false;
#endif
}

// dL/dw waits for the optimizer: streams beyond the L2 of the cores working on it. w_hat is read at once by
// its layer: streams only where it could not stay in L3 for that read anyway. The L3 counted is at most
// 16 MiB per thread: a VM may report its host's whole L3, which other tenants share (the 2-core Xeon VM
// reads 480 MiB; there, 23M floats forward: 6.7 ms stored, 4.3 ms streamed; 1-3M floats: the same).
int64_t backward_streaming_bytes() { return cache_sizes().l2 * std::max(1, at::get_num_threads()); }
int64_t forward_streaming_bytes() {
  return std::min<int64_t>(cache_sizes().l3, (int64_t(16) << 20) * std::max(1, at::get_num_threads())) / 2;
}

int64_t num_chunks(int64_t n) { return (n + kChunk - 1) / kChunk; }

// g = sigmoid(s) exactly as the reference computes it (in s's dtype), then in w's dtype.
double threshold_of(const at::Tensor& s) { return at::sigmoid(s.reshape({})).item<double>(); }

std::tuple<at::Tensor, at::Tensor> soft_threshold_forward_cpu(const at::Tensor& w_in, const at::Tensor& s,
                                                              bool /*ste*/) {
  check_soft_threshold_args("soft_threshold_forward", w_in, s);
  const at::Tensor w = w_in.contiguous();
  at::Tensor out = pooled_empty(w.sizes(), w.options());
  const int64_t n = w.numel();
  const int64_t chunks = num_chunks(n);
  std::vector<int64_t> counts(chunks, 0);
  const double g = threshold_of(s);
  const bool stream = streams(out.data_ptr(), int64_t(out.nbytes()), forward_streaming_bytes());
  if (stream) streamed_forward.fetch_add(1, std::memory_order_relaxed);
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "soft_threshold_forward_cpu", [&] {
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const scalar_t gt = static_cast<scalar_t>(g);
    at::parallel_for(0, chunks, kChunksPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const int64_t start = c * kChunk, len = std::min(kChunk, n - start);
#ifdef ADAPMTL_STREAMING_STORES
        if (stream) {
          counts[c] = forward_chunk_streaming<scalar_t>(wp + start, op + start, len, gt);
          continue;
        }
#endif
        counts[c] = forward_chunk<scalar_t>(wp + start, op + start, len, gt);
      }
    });
  });
  int64_t nnz = 0;
  for (int64_t c : counts) nnz += c;
  return {out, at::scalar_tensor(nnz, w.options().dtype(at::kLong))};
}

std::tuple<at::Tensor, at::Tensor> soft_threshold_backward_cpu(const at::Tensor& grad_in, const at::Tensor& w_in,
                                                               const at::Tensor& s, bool ste) {
  check_soft_threshold_args("soft_threshold_backward", w_in, s);
  check_grad_out("soft_threshold_backward", grad_in, w_in);
  const at::Tensor w = w_in.contiguous();
  const at::Tensor grad = grad_in.contiguous();
  at::Tensor grad_w = pooled_empty(w.sizes(), w.options());
  const int64_t n = w.numel();
  const int64_t chunks = num_chunks(n);
  std::vector<double> partials(chunks, 0.0);
  const double g = threshold_of(s);
  const bool stream = streams(grad_w.data_ptr(), int64_t(grad_w.nbytes()), backward_streaming_bytes());
  if (stream) streamed_backward.fetch_add(1, std::memory_order_relaxed);
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "soft_threshold_backward_cpu", [&] {
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    scalar_t* gwp = grad_w.mutable_data_ptr<scalar_t>();
    const scalar_t gt = static_cast<scalar_t>(g);
    at::parallel_for(0, chunks, kChunksPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const int64_t start = c * kChunk;
        const int64_t len = std::min(kChunk, n - start);
#ifdef ADAPMTL_STREAMING_STORES
        if (stream) {
          partials[c] = ste ? backward_chunk_streaming<scalar_t, true>(gp + start, wp + start, gwp + start, len, gt)
                            : backward_chunk_streaming<scalar_t, false>(gp + start, wp + start, gwp + start, len, gt);
          continue;
        }
#endif
        partials[c] = ste ? backward_chunk<scalar_t, true>(gp + start, wp + start, gwp + start, len, gt)
                          : backward_chunk<scalar_t, false>(gp + start, wp + start, gwp + start, len, gt);
      }
    });
  });
  double sum = 0.0;
  for (double p : partials) sum += p;
  const double grad_s = -g * (1.0 - g) * sum;
  return {grad_w, at::full(s.sizes(), grad_s, s.options())};
}

}  // namespace

std::pair<int64_t, int64_t> soft_threshold_streamed_calls() {
  return {streamed_forward.load(std::memory_order_relaxed), streamed_backward.load(std::memory_order_relaxed)};
}

TORCH_LIBRARY_IMPL(adapmtl, CPU, m) {
  m.impl("soft_threshold_forward", &soft_threshold_forward_cpu);
  m.impl("soft_threshold_backward", &soft_threshold_backward_cpu);
}

}  // namespace adapmtl
