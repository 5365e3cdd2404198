// The prototype behind the CPU kernel's channel-vector tiles (docs/cpu_sparse_kernel.md, "Channel-vector tiles"):
// the ASPP 3x3 dilation-6 conv 512->1024 at 41x41 with its weight pruned in G x 1 blocks, one vector of G output
// channels at each of 16 consecutive output pixels of a row per register tile, each input element broadcast into
// an FMA. Every tap is computed (no dead-tap skipping), the output is stored transposed element by element.
//
//   g++ -O3 -march=native -fopenmp benchmarks/channel_vector_prototype.cpp -o /tmp/cvp
//   /tmp/cvp 0.1 16            # density 0.1, 16 x 1 blocks in 512-bit vectors (8: 8 x 1 blocks, 256-bit vectors)
//   COPIES=3 /tmp/cvp 0.1 16   # the input laid out as the pixel-vector tiles keep it: a copy per tap shift
//
// Prints the median of 9 runs at 1 and 2 threads and the useful GFLOP/s (2 x non-zeros x output pixels).
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

template <int G>
struct CV {
  typedef float type __attribute__((vector_size(G * 4)));
};

template <int G, int P>
__attribute__((noinline)) void run(const float* X, const int* off, const float* W, const int* gptr, int groups,
                                   float* out, int OH, int OW, int rowstep, int threads) {
  using V = typename CV<G>::type;
  const int tiles = (OW + P - 1) / P, items = OH * tiles;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int it = 0; it < items; ++it) {
    const int oy = it / tiles, t = it % tiles;
    const float* base = X + oy * rowstep + t * P;
    for (int g = 0; g < groups; ++g) {
      V acc[P];
      for (int i = 0; i < P; ++i) acc[i] = V{};
      for (int e = gptr[g]; e < gptr[g + 1]; ++e) {
        V w;
        std::memcpy(&w, W + size_t(e) * G, sizeof(V));
        const float* p = base + off[e];
#pragma GCC unroll 16
        for (int i = 0; i < P; ++i) acc[i] += w * p[i];
      }
      float tmp[P][G];
      std::memcpy(tmp, acc, sizeof(tmp));
      float* o = out + size_t(g) * G * OH * OW + oy * OW + t * P;
      const int count = std::min(P, OW - t * P);
      for (int l = 0; l < G; ++l)
        for (int i = 0; i < count; ++i) o[size_t(l) * OH * OW + i] = tmp[i][l];
    }
  }
}

int main(int argc, char** argv) {
  const double density = argc > 1 ? atof(argv[1]) : 0.1;
  const int G = argc > 2 ? atoi(argv[2]) : 16;
  const bool copies = getenv("COPIES") != nullptr;
  const int C = 512, OC = 1024, H = 41, d = 6, Hp = H + 2 * d;
  const int Wp = copies ? 3 * 48 : 64;  // a padded row (53 columns, rounded), or 3 aligned copies of 48
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> U(0, 1);
  std::vector<float> X(size_t(C) * Hp * Wp);
  for (auto& v : X) v = U(rng);
  const int groups = OC / G;
  std::vector<int> off, gptr{0};
  std::vector<float> W;
  for (int g = 0; g < groups; ++g) {
    for (int c = 0; c < C; ++c)
      for (int k = 0; k < 9; ++k)
        if (U(rng) < density) {
          off.push_back(c * Hp * Wp + (k / 3) * d * Wp + (copies ? (k % 3) * 48 : (k % 3) * d));
          for (int l = 0; l < G; ++l) W.push_back(U(rng));
        }
    gptr.push_back(int(off.size()));
  }
  std::vector<float> out(size_t(OC) * H * H);
  for (int threads : {1, 2}) {
    std::vector<double> ms;
    for (int r = 0; r < 9; ++r) {
      const auto t0 = std::chrono::steady_clock::now();
      if (G == 16) run<16, 16>(X.data(), off.data(), W.data(), gptr.data(), groups, out.data(), H, H, Wp, threads);
      else run<8, 16>(X.data(), off.data(), W.data(), gptr.data(), groups, out.data(), H, H, Wp, threads);
      ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    }
    std::sort(ms.begin(), ms.end());
    const double nnz = double(off.size()) * G;
    printf("%dx1 blocks, density %.2f, %s input, %d thread(s): %.2f ms, %.1f useful GFLOP/s\n", G, density,
           copies ? "3-copy" : "1-copy", threads, ms[4], 2 * nnz * H * H / ms[4] / 1e6);
  }
}
