// Load-to-use latency of a random pointer chase over a buffer of a given size, sampled over time: how much
// of the last-level cache this VM actually gets, and how that moves while other tenants of the host run.
// Built and run by benchmarks/bench_memory_latency.py (gcc -O2); one thread.
//   memory_latency MB SECONDS  ->  one line per sample: "<t> <ns per load>"
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(int argc, char** argv) {
  if (argc != 3) return 2;
  const size_t lines = (size_t)atof(argv[1]) * 1024 * 1024 / 64;
  const double seconds = atof(argv[2]);
  if (lines < 2 || seconds <= 0) return 2;
  // one pointer per 64-byte line, the lines linked in a random cycle (no prefetcher can follow it)
  uint64_t* next = aligned_alloc(64, lines * 64);
  size_t* order = malloc(lines * sizeof(size_t));
  if (!next || !order) return 1;
  for (size_t i = 0; i < lines; ++i) order[i] = i;
  uint64_t state = 88172645463325252ull;
  for (size_t i = lines - 1; i > 0; --i) {
    state ^= state << 13, state ^= state >> 7, state ^= state << 17;
    const size_t j = state % (i + 1), t = order[i];
    order[i] = order[j], order[j] = t;
  }
  for (size_t i = 0; i < lines; ++i) next[order[i] * 8] = order[(i + 1) % lines] * 8;
  const int chase = 1000000;
  uint64_t p = 0;
  for (int k = 0; k < chase; ++k) p = next[p];  // warm up
  const double t0 = now();
  while (now() - t0 < seconds) {
    const double a = now();
    for (int k = 0; k < chase; ++k) p = next[p];
    printf("%.3f %.2f\n", a - t0, (now() - a) / chase * 1e9);
  }
  fprintf(stderr, "%llu\n", (unsigned long long)p);  // keeps the chase
  return 0;
}
