// Environment settings of the CPU kernels, parsed strictly: a value that is not exactly what the variable takes
// is an error naming the variable (ValueError in Python), never a silent default.
#pragma once
#include <torch/extension.h>

#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <string>

namespace adapmtl {

// A whole decimal number in [lo, hi] ("" or unset: `fallback`).
inline int64_t env_int(const char* name, int64_t fallback, int64_t lo, int64_t hi) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  char* end = nullptr;
  errno = 0;
  const long long x = std::strtoll(v, &end, 10);
  const bool digits = *v >= '0' && *v <= '9';  // no sign, no space, no "0x"
  TORCH_CHECK_VALUE(digits && end != nullptr && *end == '\0' && errno == 0 && x >= lo && x <= hi, name,
                    " must be a whole number from ", lo, " to ", hi, ", got '", std::string(v).substr(0, 64), "'");
  return int64_t(x);
}

// "0" or "1" ("" or unset: `fallback`).
inline bool env_flag(const char* name, bool fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  const std::string s(v);
  TORCH_CHECK_VALUE(s == "0" || s == "1", name, " must be 0 or 1, got '", s.substr(0, 64), "'");
  return s == "1";
}

}  // namespace adapmtl
