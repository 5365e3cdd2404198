// The inner loop of the CPU sparse conv in isolation: how many vector multiply-adds per cycle it reaches
// and how many vector loads each one costs, for the register tilings an unstructured or block-sparse
// weight allows. Built and run by benchmarks/bench_kernel_roofline.py (g++ -O3 -march=native); one thread.
//
// Every variant streams the same kind of work the real kernel does inside one cache block: a list of
// (offset, value) non-zeros per output channel, each offset a 64-byte-aligned row of an input block that fits
// L2, and a register tile of accumulators that the non-zeros' products are added into.
//   single  : today's kernel. One output channel in registers (R rows x NV vectors); per non-zero one
//             broadcast value, R * NV input-vector loads, R * NV FMAs: 1 input load per FMA.
//   panel M : M output channels in registers (1 row x NV vectors each). Columns (input channel, tap) of the
//             panel are grouped by which of the M channels hold a non-zero there (a bit pattern); per column
//             NV input loads feed popcount(pattern) * NV FMAs, through one precompiled micro-kernel per
//             pattern (Sparse Register Tiling's scheme, without per-matrix code).
//   block M : the same with every column's pattern full, as a weight pruned in M x 1 blocks gives.
//   scatter M: M output channels' accumulators (NV vectors each) in an L1-resident array instead of registers,
//             so M can be large without 2^M micro-kernels: per column of the panel NV input loads, then per
//             non-zero (channel, value) NV accumulator read-modify-writes. No per-matrix code.
//   generated MxNV: per-matrix code, as a JIT would emit it (FBGEMM's generateSpMM keeps 24 output rows x 1
//             vector): M channels x NV vectors in registers, every column's offset an immediate and every
//             value a constant, no index or pattern dispatch at run time. This binary writes that code
//             (`emit`), bench_kernel_roofline.py compiles it to a shared object and this binary times it.
//   peak    : independent FMAs on registers only: the machine's FMA throughput, the unit of the others.
#include <chrono>
#include <dlfcn.h>
#include <fstream>
#include <string>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>
#include <algorithm>
#include <type_traits>

typedef float V __attribute__((vector_size(64)));
constexpr int L = 16;

static inline V load(const float* p) {
  V v;
  std::memcpy(&v, p, 64);
  return v;
}

template <int R, int NV>
__attribute__((noinline)) void run_single(const float* P, int64_t row_step, const int32_t* off, const float* val,
                                          const int32_t* seg, int OC, float* out) {
  for (int oc = 0; oc < OC; ++oc) {
    V acc[R][NV];
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < NV; ++i) acc[r][i] = V{};
    for (int k = seg[oc]; k < seg[oc + 1]; ++k) {
      const float v = val[k];
      const float* b = P + off[k];
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
        for (int i = 0; i < NV; ++i) acc[r][i] += v * load(b + r * row_step + i * L);
    }
    for (int r = 0; r < R; ++r) std::memcpy(out + (oc * R + r) * NV * L, &acc[r][0], sizeof(acc[r]));
  }
}

// Columns [k0, k1) of one pattern: NV loads, then one FMA per set bit per vector.
template <int M, int NV, int MASK>
inline __attribute__((always_inline)) void pattern_columns(V (&acc)[M][NV], const float* P, const int32_t* off,
                                                           const float* val, int k0, int k1) {
  constexpr int n = __builtin_popcount(MASK);
  for (int k = k0; k < k1; ++k) {
    const float* b = P + off[k];
    const float* w = val + int64_t(k) * n;
    V x[NV];
#pragma GCC unroll 8
    for (int i = 0; i < NV; ++i) x[i] = load(b + i * L);
    int j = 0;
#pragma GCC unroll 16
    for (int m = 0; m < M; ++m) {
      if (MASK & (1 << m)) {
        const float v = w[j++];
#pragma GCC unroll 8
        for (int i = 0; i < NV; ++i) acc[m][i] += v * x[i];
      }
    }
  }
}

template <int M, int NV, int MASK = 1>
inline __attribute__((always_inline)) void all_patterns(V (&acc)[M][NV], const float* P, const int32_t* off,
                                                        const float* val, const int32_t* pseg) {
  if constexpr (MASK < (1 << M)) {
    // values of pattern MASK start at val_start: stored per column, popcount each; pseg holds column ranges and
    // the value offset of each pattern's first column
    pattern_columns<M, NV, MASK>(acc, P, off, val + pseg[2 * (1 << M) + MASK] - int64_t(pseg[MASK]) * __builtin_popcount(MASK),
                                 pseg[MASK], pseg[MASK + 1]);
    all_patterns<M, NV, MASK + 1>(acc, P, off, val, pseg);
  }
}

template <int M, int NV>
__attribute__((noinline)) void run_panel(const float* P, const int32_t* off, const float* val, const int32_t* pseg,
                                         int panels, float* out) {
  const int stride = 3 * (1 << M);
  for (int p = 0; p < panels; ++p) {
    V acc[M][NV];
    for (int m = 0; m < M; ++m)
      for (int i = 0; i < NV; ++i) acc[m][i] = V{};
    all_patterns<M, NV>(acc, P, off, val, pseg + p * stride);
    for (int m = 0; m < M; ++m) std::memcpy(out + (p * M + m) * NV * L, &acc[m][0], sizeof(acc[m]));
  }
}

// Only the full pattern: a weight pruned in M x 1 blocks.
template <int M, int NV>
__attribute__((noinline)) void run_block(const float* P, const int32_t* off, const float* val, const int32_t* seg,
                                         int panels, float* out) {
  for (int p = 0; p < panels; ++p) {
    V acc[M][NV];
    for (int m = 0; m < M; ++m)
      for (int i = 0; i < NV; ++i) acc[m][i] = V{};
    pattern_columns<M, NV, (1 << M) - 1>(acc, P, off, val, seg[p], seg[p + 1]);
    for (int m = 0; m < M; ++m) std::memcpy(out + (p * M + m) * NV * L, &acc[m][0], sizeof(acc[m]));
  }
}

// Accumulators in memory: a panel's columns each list the (channel, value) pairs it holds.
template <int M, int NV>
__attribute__((noinline)) void run_scatter(const float* P, const int32_t* coff, const int32_t* cptr,
                                           const uint8_t* row, const float* val, const int32_t* pcol, int panels,
                                           float* out) {
  alignas(64) V acc[M][NV];
  for (int p = 0; p < panels; ++p) {
    for (int m = 0; m < M; ++m)
      for (int i = 0; i < NV; ++i) acc[m][i] = V{};
    for (int c = pcol[p]; c < pcol[p + 1]; ++c) {
      const float* b = P + coff[c];
      V x[NV];
#pragma GCC unroll 8
      for (int i = 0; i < NV; ++i) x[i] = load(b + i * L);
      for (int e = cptr[c]; e < cptr[c + 1]; ++e) {
        V* a = acc[row[e]];
        const float v = val[e];
#pragma GCC unroll 8
        for (int i = 0; i < NV; ++i) a[i] += v * x[i];
      }
    }
    for (int m = 0; m < M; ++m) std::memcpy(out + (p * M + m) * NV * L, &acc[m][0], sizeof(acc[m]));
  }
}

// The source of the `generated` variant: one function per panel of M channels, each a row of W vectors stored
// as run_single<1, W> stores it, computed NV vectors at a time (W / NV passes over the panel's columns, as
// FBGEMM's SpMM code runs once per vector of N); the column offsets are immediates, the values constants.
void emit_generated(const char* path, int M, int NV, int W, int OC, int NCOL, const std::vector<float>& dense) {
  std::ofstream f(path);
  f << "#include <cstring>\ntypedef float V __attribute__((vector_size(64)));\n"
       "static inline V ld(const float* p) { V v; std::memcpy(&v, p, 64); return v; }\n";
  const int panels = (OC + M - 1) / M;
  for (int p = 0; p < panels; ++p) {
    const int rows = std::min(M, OC - p * M);
    f << "__attribute__((noinline)) static void p" << p << "(const float* __restrict P, float* __restrict out) {\n";
    for (int pass = 0; pass < W / NV; ++pass) {
      f << " {\n";
      for (int m = 0; m < rows; ++m)
        for (int i = 0; i < NV; ++i) f << "  V a" << m << "_" << i << " = V{};\n";
      for (int j = 0; j < NCOL; ++j) {
        bool any = false;
        for (int m = 0; m < rows; ++m) any |= dense[size_t(p * M + m) * NCOL + j] != 0.f;
        if (!any) continue;
        f << "  {";
        // the empty asm pins each input vector in a register: one load per column, not one folded into every FMA
        for (int i = 0; i < NV; ++i)
          f << " V x" << i << " = ld(P + " << j * 4 * L + (pass * NV + i) * L << "); asm(\"\" : \"+v\"(x" << i << "));";
        for (int m = 0; m < rows; ++m) {
          const float v = dense[size_t(p * M + m) * NCOL + j];
          if (v == 0.f) continue;
          char lit[64];
          std::snprintf(lit, sizeof(lit), "%af", v);
          for (int i = 0; i < NV; ++i) f << " a" << m << "_" << i << " += " << lit << " * x" << i << ";";
        }
        f << " }\n";
      }
      for (int m = 0; m < rows; ++m)
        for (int i = 0; i < NV; ++i)
          f << "  std::memcpy(out + " << ((p * M + m) * W + pass * NV + i) * L << ", &a" << m << "_" << i << ", 64);\n";
      f << " }\n";
    }
    f << "}\n";
  }
  f << "extern \"C\" void run_generated(const float* P, float* out) {\n";
  for (int p = 0; p < panels; ++p) f << " p" << p << "(P, out);\n";
  f << "}\n";
}

// 12 independent chains (FMA latency 4 x 2 pipes + slack), registers only.
__attribute__((noinline)) void peak(int64_t iters) {
  for (int64_t t = 0; t < iters; ++t) {
    asm volatile(
        "vfmadd231ps %%zmm30, %%zmm31, %%zmm0\n\t"
        "vfmadd231ps %%zmm30, %%zmm31, %%zmm1\n\t"
        "vfmadd231ps %%zmm30, %%zmm31, %%zmm2\n\t"
        "vfmadd231ps %%zmm30, %%zmm31, %%zmm3\n\t"
        "vfmadd231ps %%zmm30, %%zmm31, %%zmm4\n\t"
        "vfmadd231ps %%zmm30, %%zmm31, %%zmm5\n\t"
        "vfmadd231ps %%zmm30, %%zmm31, %%zmm6\n\t"
        "vfmadd231ps %%zmm30, %%zmm31, %%zmm7\n\t"
        "vfmadd231ps %%zmm30, %%zmm31, %%zmm8\n\t"
        "vfmadd231ps %%zmm30, %%zmm31, %%zmm9\n\t"
        "vfmadd231ps %%zmm30, %%zmm31, %%zmm10\n\t"
        "vfmadd231ps %%zmm30, %%zmm31, %%zmm11\n\t" ::
            : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11");
  }
}

template <typename F>
double best_seconds(const F& f, int reps) {
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return best;
}

int main(int argc, char** argv) {
  const double density = argc > 1 ? std::atof(argv[1]) : 0.1;
  const int NCOL = argc > 2 ? std::atoi(argv[2]) : 432;  // columns of a cache block (48 channels x 9 taps)
  const int reps = argc > 3 ? std::atoi(argv[3]) : 20;   // runs of each variant; the fastest counts
  const int OC = 1024;
  const int64_t row_step = int64_t(NCOL) * 4 * L;  // row r of column j at j * 4L + r * row_step: L2-resident
  std::vector<float> P(size_t(2 * row_step + 8 * L), 1.0f);
  std::mt19937 rng(0);
  std::uniform_real_distribution<float> u(0.f, 1.f);
  std::vector<uint8_t> mask(size_t(OC) * NCOL);
  for (auto& m : mask) m = u(rng) < density;
  std::vector<float> out(size_t(OC) * 2 * 4 * L);
  // single: CSR of the mask
  std::vector<int32_t> seg{0}, off;
  std::vector<float> val;
  for (int oc = 0; oc < OC; ++oc) {
    for (int j = 0; j < NCOL; ++j)
      if (mask[size_t(oc) * NCOL + j]) off.push_back(j * 4 * L), val.push_back(u(rng));
    seg.push_back(int32_t(off.size()));
  }
  const double nnz = double(off.size());
  std::vector<float> dense(size_t(OC) * NCOL, 0.f);
  for (int oc = 0; oc < OC; ++oc)
    for (int k = seg[oc]; k < seg[oc + 1]; ++k) dense[size_t(oc) * NCOL + off[k] / (4 * L)] = val[k];
  // `emit PATH M NV`: write the generated variant's source for this weight and stop
  if (argc > 7 && std::string(argv[4]) == "emit") {
    emit_generated(argv[5], std::atoi(argv[6]), std::atoi(argv[7]), 3, OC, NCOL, dense);
    return 0;
  }
  const double peak_s = best_seconds([&] { peak(int64_t(1) << 24); }, 5);
  const double peak_fma = 12.0 * double(int64_t(1) << 24) / peak_s;  // vector FMAs per second
  std::printf("{\"density\": %.3f, \"columns\": %d, \"peak_vfma_per_s\": %.4g", density, NCOL, peak_fma);
  const auto report = [&](const char* name, double fmas, double loads, double s) {
    std::printf(", \"%s\": {\"vfma_per_peak\": %.3f, \"loads_per_fma\": %.3f, \"useful_vfma_per_peak\": %.3f}", name,
                fmas / s / peak_fma, loads / fmas, nnz * 3 / s / peak_fma);
  };
  // useful work: nnz x 3 vectors (one 48-column output row); single 2x3 does two rows, so half its time per row
  {
    const double s = best_seconds([&] { run_single<2, 3>(P.data(), row_step, off.data(), val.data(), seg.data(), OC, out.data()); }, reps) / 2;
    report("single_2x3", nnz * 3, nnz * 3 + 2 * nnz / 2, s);
  }
  {
    const double s = best_seconds([&] { run_single<1, 3>(P.data(), row_step, off.data(), val.data(), seg.data(), OC, out.data()); }, reps);
    report("single_1x3", nnz * 3, nnz * 3 + 2 * nnz, s);
  }
  // single_1x3's output is the reference of the variants below (same non-zeros, same per-channel order)
  const std::vector<float> ref = out;
  const auto max_error = [&] {
    double e = 0;
    for (size_t i = 0; i < size_t(OC) * 3 * L; ++i) e = std::max(e, double(std::abs(out[i] - ref[i])));
    return e;
  };
  const auto scatter = [&](auto Mc, const char* name) {
    constexpr int M = decltype(Mc)::value;
    const int panels = OC / M;
    std::vector<int32_t> coff, cptr{0}, pcol{0};
    std::vector<uint8_t> row;
    std::vector<float> sval;
    for (int p = 0; p < panels; ++p) {
      for (int j = 0; j < NCOL; ++j) {
        for (int m = 0; m < M; ++m)
          if (const float v = dense[size_t(p * M + m) * NCOL + j]; v != 0.f) row.push_back(uint8_t(m)), sval.push_back(v);
        if (int32_t(row.size()) > cptr.back()) coff.push_back(j * 4 * L), cptr.push_back(int32_t(row.size()));
      }
      pcol.push_back(int32_t(coff.size()));
    }
    std::fill(out.begin(), out.end(), 0.f);
    const double s = best_seconds([&] { run_scatter<M, 3>(P.data(), coff.data(), cptr.data(), row.data(), sval.data(), pcol.data(), panels, out.data()); }, reps);
    const double cols = double(coff.size());
    // loads: input vectors, the column's offset and range, and per non-zero its channel, value and 3 accumulators
    std::printf(", \"%s\": {\"vfma_per_peak\": %.3f, \"loads_per_fma\": %.3f, \"input_loads_per_fma\": %.3f, "
                "\"useful_vfma_per_peak\": %.3f, \"max_error\": %.3g}", name, nnz * 3 / s / peak_fma,
                (cols * 5 + nnz * 5) / (nnz * 3), cols * 3 / (nnz * 3), nnz * 3 / s / peak_fma, max_error());
  };
  scatter(std::integral_constant<int, 8>{}, "scatter_8");
  scatter(std::integral_constant<int, 32>{}, "scatter_32");
  // `NAME=LIB NAME=LIB ...`: shared objects built from `emit` (name generated_<M>x<NV>), timed here
  for (int a = 4; a < argc; ++a) {
    const std::string arg = argv[a];
    const size_t eq = arg.find('=');
    if (eq == std::string::npos) continue;
    const std::string name = arg.substr(0, eq);
    void* lib = dlopen(arg.substr(eq + 1).c_str(), RTLD_NOW);
    if (!lib) { std::fprintf(stderr, "%s\n", dlerror()); return 1; }
    const auto fn = reinterpret_cast<void (*)(const float*, float*)>(dlsym(lib, "run_generated"));
    std::fill(out.begin(), out.end(), 0.f);
    const double s = best_seconds([&] { fn(P.data(), out.data()); }, reps);
    int M = 0, NV = 0;
    std::sscanf(name.c_str(), "generated_%dx%d", &M, &NV);
    double cols = 0;  // columns of a panel holding any non-zero: one load per vector per pass
    for (int p = 0; p * M < OC; ++p)
      for (int j = 0; j < NCOL; ++j)
        for (int m = 0; m < M && p * M + m < OC; ++m)
          if (dense[size_t(p * M + m) * NCOL + j] != 0.f) { cols += 1; break; }
    // loads: input vectors, and one value broadcast per non-zero per pass (NV FMAs share it)
    std::printf(", \"%s\": {\"vfma_per_peak\": %.3f, \"loads_per_fma\": %.3f, \"input_loads_per_fma\": %.3f, "
                "\"useful_vfma_per_peak\": %.3f, \"max_error\": %.3g}", name.c_str(), nnz * 3 / s / peak_fma,
                (cols * 3 + nnz * 3.0 / NV) / (nnz * 3), cols / nnz, nnz * 3 / s / peak_fma, max_error());
  }
  // panel M: columns grouped by pattern within each panel of M channels
  const auto panel = [&](auto Mc, const char* name, auto full_c) {
    constexpr int M = decltype(Mc)::value;
    constexpr bool full = decltype(full_c)::value;
    const int panels = OC / M;
    std::vector<int32_t> pseg, poff;
    std::vector<float> pval;
    double cols = 0, fmas = 0;
    std::vector<uint8_t> pm = mask;
    if (full) {  // M x 1 blocks with the same density: a block is live with probability `density`
      for (int p = 0; p < panels; ++p)
        for (int j = 0; j < NCOL; ++j) {
          const uint8_t live = u(rng) < density;
          for (int m = 0; m < M; ++m) pm[size_t(p * M + m) * NCOL + j] = live;
        }
    }
    for (int p = 0; p < panels; ++p) {
      std::vector<std::vector<int>> by(1 << M);
      for (int j = 0; j < NCOL; ++j) {
        int pat = 0;
        for (int m = 0; m < M; ++m) pat |= pm[size_t(p * M + m) * NCOL + j] << m;
        if (pat) by[pat].push_back(j);
      }
      const size_t base = pseg.size();
      pseg.resize(base + 3 * (1 << M));
      for (int pat = 0; pat < (1 << M); ++pat) {
        pseg[base + pat] = int32_t(poff.size());
        pseg[base + 2 * (1 << M) + pat] = int32_t(pval.size());
        for (int j : by[pat]) {
          poff.push_back(j * 4 * L);
          for (int m = 0; m < M; ++m)
            if (pat >> m & 1) pval.push_back(u(rng));
        }
        cols += by[pat].size();
        fmas += double(by[pat].size()) * __builtin_popcount(pat) * 3;
      }
      pseg[base + (1 << M)] = int32_t(poff.size());
    }
    double s;
    if constexpr (full) {
      if constexpr (M <= 4) {  // every pattern's micro-kernel dispatched, as the extension's panel of 4 does
        const double s2 = best_seconds([&] { run_panel<M, 3>(P.data(), poff.data(), pval.data(), pseg.data(), panels, out.data()); }, reps);
        std::printf(", \"%s_all_patterns\": %.3f", name, fmas / s2 / peak_fma);
      }
      std::vector<int32_t> bseg;
      for (int p = 0; p < panels; ++p) bseg.push_back(pseg[p * 3 * (1 << M) + (1 << M) - 1]);
      bseg.push_back(int32_t(poff.size()));
      s = best_seconds([&] { run_block<M, 3>(P.data(), poff.data(), pval.data(), bseg.data(), panels, out.data()); }, reps);
    } else {
      s = best_seconds([&] { run_panel<M, 3>(P.data(), poff.data(), pval.data(), pseg.data(), panels, out.data()); }, reps);
    }
    const double nnz_here = fmas / 3;
    std::printf(", \"%s\": {\"vfma_per_peak\": %.3f, \"loads_per_fma\": %.3f, \"useful_vfma_per_peak\": %.3f}", name,
                fmas / s / peak_fma, (cols * 4 + nnz_here) / fmas, fmas / s / peak_fma);
  };
  using no = std::false_type;
  using yes = std::true_type;
  panel(std::integral_constant<int, 2>{}, "panel_2", no{});
  panel(std::integral_constant<int, 4>{}, "panel_4", no{});
  panel(std::integral_constant<int, 2>{}, "block_2", yes{});
  panel(std::integral_constant<int, 4>{}, "block_4", yes{});
  panel(std::integral_constant<int, 8>{}, "block_8", yes{});
  std::printf("}\n");
  return 0;
}
