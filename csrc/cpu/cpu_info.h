// What the CPU kernels ask of the machine: its cache sizes, model name and vector capability, read once at run time.
#pragma once
#include <ATen/Version.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <fstream>
#include <string>

namespace adapmtl {

struct CacheSizes {
  int64_t l1d = 32 << 10, l2 = 1 << 20;  // per core; the fallbacks where the OS does not say
  int64_t l3 = 8 << 20;                   // last level, shared by the cores of a socket (or a slice of one)
};

// Read once: sysconf (glibc asks cpuid), else sysfs.
inline const CacheSizes& cache_sizes() {
  static const CacheSizes sizes = [] {
    CacheSizes c;
    const auto sysfs = [](int index) -> int64_t {
      std::ifstream f("/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/size");
      int64_t kb = 0;
      char unit = 0;
      if (f >> kb >> unit && unit == 'K') return kb << 10;
      return 0;
    };
#ifdef _SC_LEVEL1_DCACHE_SIZE
    const int64_t l1 = sysconf(_SC_LEVEL1_DCACHE_SIZE), l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
    const int64_t l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
#else
    const int64_t l1 = 0, l2 = 0, l3 = 0;
#endif
    c.l1d = l1 > 0 ? l1 : (sysfs(0) > 0 ? sysfs(0) : c.l1d);
    c.l2 = l2 > 0 ? l2 : (sysfs(2) > 0 ? sysfs(2) : c.l2);
    // L3: sysfs first, which gives the slice the cores share; glibc's sysconf may give the whole package's
    // (402653184 bytes, twelve 32 MiB slices, on the 2-core EPYC VM).
    c.l3 = sysfs(3) > 0 ? sysfs(3) : (l3 > 0 ? l3 : std::max(c.l3, c.l2));
    return c;
  }();
  return sizes;
}

// "model name" of /proc/cpuinfo with the family and model numbers (two EPYCs can share a name).
inline const std::string& cpu_model() {
  static const std::string model = [] {
    std::ifstream f("/proc/cpuinfo");
    std::string line, name = "unknown", family, number;
    while (std::getline(f, line)) {
      const auto colon = line.find(':');
      if (colon == std::string::npos) continue;
      std::string key = line.substr(0, colon), value = colon + 2 <= line.size() ? line.substr(colon + 2) : "";
      while (!key.empty() && (key.back() == ' ' || key.back() == '\t')) key.pop_back();
      if (key == "model name" && name == "unknown") name = value;
      if (key == "cpu family" && family.empty()) family = value;
      if (key == "model" && number.empty()) number = value;
      if (key.empty()) break;  // the first processor's block only
    }
    for (char& ch : name)
      if (ch == '|' || ch == '\t') ch = ' ';
    return name + " (family " + family + ", model " + number + ")";
  }();
  return model;
}

// The vector instructions the sparse convolution's kernels use: torch's CPU capability (ATen's own dispatch: AVX512
// needs AVX-512 F/BW/DQ/VL and FMA, AVX2 needs AVX2 and FMA), so ATEN_CPU_CAPABILITY=default|avx2|avx512 lowers
// ours with torch's -- to test the lower kernels on any machine, or to match a fleet's oldest CPU.
enum class CpuCapability { baseline, avx2, avx512 };

inline CpuCapability cpu_capability() {
  static const CpuCapability capability = [] {
    const std::string name = at::get_cpu_capability();
    return name == "AVX512" ? CpuCapability::avx512 : name == "AVX2" ? CpuCapability::avx2 : CpuCapability::baseline;
  }();
  return capability;
}

inline const char* cpu_capability_name() {
  switch (cpu_capability()) {
    case CpuCapability::avx512: return "AVX512";
    case CpuCapability::avx2: return "AVX2";
    case CpuCapability::baseline: break;
  }
  return "DEFAULT";
}

}  // namespace adapmtl
