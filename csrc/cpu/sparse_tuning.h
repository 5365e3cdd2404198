// The CPU sparse kernel's tunable choices, their defaults from this machine's caches, and the optional
// autotuner that times them per convolution (cuDNN's benchmark mode, for the CPU kernel).
//
// Choices (Tuning): the block layout (the cost model's, channel-major or tap-major), output rows per
// register tile, output channels per register tile (one, a panel of 4 or 8, or one vector of them: channel-vector
// tiles, sparse_conv_cpu.cpp), the non-zeros a row segment holds at least, the bytes of input a block keeps (a share of
// L1d) and the output channels per work item (their parked tiles a share of L2). The defaults depend only on
// the cache sizes, read at run time, so results are deterministic. ADAPMTL_CPU_SPARSE_CONFIG forces any of
// them ("layout=tap,rows=1,min_segment=20,oc_chunk=256,l1_budget=20480,panel=1"; tests use it to run every
// configuration the autotuner may pick).
//
// Autotuning (off by default; ADAPMTL_CPU_AUTOTUNE=1 or adapmtl.ops.set_cpu_autotune): at the first call of
// each (CPU, threads, dtype, shapes, stride, padding, dilation, non-zeros), a short staged search times the
// candidates on the call's own input and keeps the fastest, for the process and, with a cache file
// (ADAPMTL_CPU_AUTOTUNE_CACHE or set_cpu_autotune(cache_file=)), across processes: one line per entry,
// keyed by the CPU model and capability (tuning_machine), so a file copied to another machine is not used there.
// The file is untrusted input: only a regular file is read, at most 4 MiB of it, opened without blocking; a line that
// does not parse into a valid configuration (or is over 1 KiB) is skipped, with one warning. Every candidate
// computes the same convolution; they differ in summation order (last-bit rounding), so with autotuning on, results
// can differ between processes as they can with cudnn.benchmark.
#pragma once
#include <torch/extension.h>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <sstream>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "cpu/cpu_info.h"
#include "cpu/env.h"

namespace adapmtl {

// What an autotuning cache entry was measured on: the CPU model and the kernels' capability (cpu_info.h), since a
// configuration tuned for the AVX-512 kernels need not suit the same CPU under ATEN_CPU_CAPABILITY=avx2.
inline std::string tuning_machine() { return cpu_model() + " " + cpu_capability_name(); }

// Tuning::panel for channel-vector tiles: one vector of output channels (16 fp32, 8 fp64) x one vector of pixels.
constexpr int64_t kVectorPanel = -1;

struct Tuning {
  int layout = -1;            // -1: the cost model's choice; 0: channel-major; 1: tap-major
  int64_t rows = 0;           // output rows per register tile (1..8; at most 2 where a row is 2+ vectors); 0: 2,
                              // or up to 8 for rows of one vector (sparse_conv_cpu.cpp, tile_rows)
  double min_segment = 40.0;  // non-zeros a row segment holds at least (on average)
  int64_t l1_budget = 0;      // bytes of input a block keeps for one work item
  int64_t oc_chunk = 128;     // output channels per work item
  int64_t panel = 0;          // output channels per register tile: 1, 4 or 8, or kVectorPanel ("vector"); 0: chosen
                              // from the weight's column patterns (sparse_conv_cpu.cpp, choose_panel)

  std::string str() const {
    std::ostringstream o;
    o << "layout=" << (layout < 0 ? "auto" : layout ? "tap" : "channel") << ",rows=";
    if (rows == 0) o << "auto";
    else o << rows;
    o << ",min_segment=" << min_segment << ",l1_budget=" << l1_budget << ",oc_chunk=" << oc_chunk << ",panel=";
    if (panel == 0) o << "auto";
    else if (panel == kVectorPanel) o << "vector";
    else o << panel;
    return o.str();
  }
};

// The defaults on this machine: 5/8 of L1d per block (20 KiB of 32, measured on the 2-core EPYC), and output
// channel chunks whose parked tiles (rows x 64 columns x 8 bytes at most) take 1/16 of L2.
inline Tuning default_tuning() {
  Tuning t;
  t.l1_budget = cache_sizes().l1d * 5 / 8;
  t.oc_chunk = std::clamp<int64_t>(cache_sizes().l2 / 16 / (2 * 64 * 4), 32, 1024);
  return t;
}

// Parses "key=value,..." into `t` (keys not given keep their value); an unknown key or a bad value raises ValueError naming `source`
// (or returns false when `source` is null: the lines of an untrusted cache file are skipped, not fatal).
inline bool parse_tuning(const std::string& text, Tuning& t, const char* source) {
  std::stringstream items(text);
  std::string item;
  const auto fail = [&](const std::string& why) {
    TORCH_CHECK_VALUE(source == nullptr, "adapmtl: ", source, " must be comma-separated key=value pairs of ",
                      "layout (auto|channel|tap), rows (auto|1..8), min_segment (1..1000), l1_budget (1024..16777216 "
                      "bytes), oc_chunk (1..65536), panel (auto|1|4|8|vector): ", why, " in '", text, "'");
    return false;
  };
  while (std::getline(items, item, ',')) {
    const auto eq = item.find('=');
    if (eq == std::string::npos) return fail("'" + item + "' has no '='");
    const std::string key = item.substr(0, eq), value = item.substr(eq + 1);
    char* end = nullptr;
    const double number = std::strtod(value.c_str(), &end);
    const bool numeric = !value.empty() && end && *end == '\0';
    if (key == "layout") {
      if (value == "auto") t.layout = -1;
      else if (value == "channel") t.layout = 0;
      else if (value == "tap") t.layout = 1;
      else return fail("layout '" + value + "'");
    } else if (key == "rows" && value == "auto") {
      t.rows = 0;
    } else if (key == "rows" && numeric && number >= 1 && number <= 8 && number == int64_t(number)) {
      t.rows = int64_t(number);
    } else if (key == "min_segment" && numeric && number >= 1 && number <= 1000) {
      t.min_segment = number;
    } else if (key == "l1_budget" && numeric && number >= 1024 && number <= (16 << 20) && number == int64_t(number)) {
      t.l1_budget = int64_t(number);
    } else if (key == "oc_chunk" && numeric && number >= 1 && number <= 65536 && number == int64_t(number)) {
      t.oc_chunk = int64_t(number);
    } else if (key == "panel" && value == "auto") {
      t.panel = 0;
    } else if (key == "panel" && value == "vector") {
      t.panel = kVectorPanel;
    } else if (key == "panel" && numeric && (number == 1 || number == 4 || number == 8)) {
      t.panel = int64_t(number);
    } else {
      return fail("'" + item + "'");
    }
  }
  // Panels run over channel-major blocks only (one row per tile; a forced rows=2 is not used by them).
  if (t.layout == 1 && t.panel > 1) return fail("panel=" + std::to_string(t.panel) + " with layout=tap");
  return true;
}

// The configuration a call runs with, unless the autotuner picks one: the defaults, with
// ADAPMTL_CPU_SPARSE_CONFIG applied (read every call, so tests can switch it).
inline Tuning configured_tuning(bool* forced = nullptr) {
  Tuning t = default_tuning();
  const char* env = std::getenv("ADAPMTL_CPU_SPARSE_CONFIG");
  const bool set = env && *env;
  if (set) parse_tuning(env, t, "environment variable ADAPMTL_CPU_SPARSE_CONFIG");
  if (forced) *forced = set;
  return t;
}

// The output-channel chunks the search tries: powers of two, and this machine's default.
inline std::vector<int64_t> candidate_chunks() {
  std::vector<int64_t> chunks{64, 128, 256, 512};
  if (std::find(chunks.begin(), chunks.end(), default_tuning().oc_chunk) == chunks.end())
    chunks.push_back(default_tuning().oc_chunk);
  return chunks;
}

// The (layout, rows, panel) triples the search tries: one output channel per tile in either layout and
// each tile height (2, 1, and the default's taller tiles where rows are one vector: `tall_rows`), the
// channel panels (channel-major, one row: their accumulators fill the registers), and channel-vector tiles
// (either layout) where the weight's channels come in uniform vectors (`channel_vectors`).
inline std::vector<std::tuple<int, int64_t, int64_t>> candidate_shapes(bool with_tap_major, bool tall_rows,
                                                                       bool channel_vectors) {
  std::vector<std::tuple<int, int64_t, int64_t>> out;
  for (int layout : {0, 1}) {
    if (layout == 1 && !with_tap_major) continue;
    if (tall_rows) out.emplace_back(layout, 0, 1);
    for (int64_t rows : {2, 1}) out.emplace_back(layout, rows, 1);
  }
  for (int64_t panel : {4, 8}) out.emplace_back(0, 1, panel);
  for (int layout : {0, 1})
    if (channel_vectors && (layout == 0 || with_tap_major)) out.emplace_back(layout, 1, kVectorPanel);
  return out;
}

// Every configuration the staged search may time: those shapes (the tall tiles included) x min_segment x oc_chunk
// on the defaults.
inline std::vector<Tuning> candidate_tunings(bool with_tap_major) {
  std::vector<Tuning> out;
  for (const auto& [layout, rows, panel] : candidate_shapes(with_tap_major, true, true))
    for (double seg : {10.0, 20.0, 40.0, 80.0})
      for (int64_t chunk : candidate_chunks()) {
        Tuning t = default_tuning();
        t.layout = layout, t.rows = rows, t.panel = panel, t.min_segment = seg, t.oc_chunk = chunk;
        out.push_back(t);
      }
  return out;
}

// Sparse conv/linear calls of this process by output channels per register tile (1, 4, 8, vector): the tests
// check which kernel the weight's structure selects.
inline std::atomic<int64_t>* panel_calls() {
  static std::atomic<int64_t> calls[4];
  return calls;
}

inline void count_panel_call(int64_t panel) {
  panel_calls()[panel == kVectorPanel ? 3 : panel == 8 ? 2 : panel == 4 ? 1 : 0].fetch_add(1);
}

class Autotuner {
 public:
  static Autotuner& instance() {
    static Autotuner* tuner = new Autotuner();
    return *tuner;
  }

  bool enabled() const { return enabled_.load(std::memory_order_relaxed); }  // every conv call asks: no lock

  void configure(bool enabled, const std::string& cache_file) {
    std::lock_guard<std::mutex> lock(mutex_);
    enabled_ = enabled;
    if (cache_file != file_) {
      file_ = cache_file;
      loaded_ = false;
    }
  }

  // The tuned configuration for `key`, timing the candidates with `time_ms(tuning)` the first time.
  template <typename TimeFn>
  Tuning tuning_for(const std::string& key, bool with_tap_major, bool tall_rows, bool channel_vectors,
                    const TimeFn& time_ms) {
    const std::string full = tuning_machine() + "|" + key;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      load_locked();
      const auto it = table_.find(full);
      if (it != table_.end()) {
        ++hits_;
        return it->second;
      }
    }
    const Tuning best = search(with_tap_major, tall_rows, channel_vectors, time_ms);  // outside the lock: it runs the kernel
    std::lock_guard<std::mutex> lock(mutex_);
    ++searches_;
    table_[full] = best;
    if (!file_.empty() && !append_entry(full + "\t" + best.str() + "\n")) {
      TORCH_WARN_ONCE("adapmtl: cannot append to the autotuning cache file '", file_,
                      "' (not a writable regular file); tuning stays in memory");
    }
    return best;
  }

  std::tuple<bool, std::string, int64_t, int64_t, int64_t, int64_t> info() {
    std::lock_guard<std::mutex> lock(mutex_);
    load_locked();
    return {enabled_.load(), file_, int64_t(table_.size()), searches_, hits_, skipped_};
  }

  void clear() {
    std::lock_guard<std::mutex> lock(mutex_);
    table_.clear();
    loaded_ = false;
    searches_ = hits_ = skipped_ = 0;
  }

 private:
  Autotuner() {
    enabled_ = env_flag("ADAPMTL_CPU_AUTOTUNE", false);  // a bad value: an error at the first use, every use
    const char* file = std::getenv("ADAPMTL_CPU_AUTOTUNE_CACHE");
    file_ = file ? file : "";
  }

  // Stage by stage, each stage's values on the best so far: (layout, rows, panel), then min_segment, then oc_chunk.
  // A candidate's time is the fastest of three runs after a warm-up run (the least disturbed by a shared
  // machine's noise).
  template <typename TimeFn>
  static Tuning search(bool with_tap_major, bool tall_rows, bool channel_vectors, const TimeFn& time_ms) {
    const auto measure = [&](const Tuning& t) {
      time_ms(t);
      return std::min({time_ms(t), time_ms(t), time_ms(t)});
    };
    Tuning best = default_tuning();
    best.layout = 0, best.panel = 1;
    double best_ms = 1e300;
    for (const auto& [layout, rows, panel] : candidate_shapes(with_tap_major, tall_rows, channel_vectors)) {
      Tuning t = default_tuning();
      t.layout = layout, t.rows = rows, t.panel = panel;
      const double ms = measure(t);
      if (ms < best_ms) best_ms = ms, best = t;
    }
    for (double seg : {10.0, 20.0, 80.0}) {  // 40 is the default, timed above
      Tuning t = best;
      t.min_segment = seg;
      const double ms = measure(t);
      if (ms < best_ms) best_ms = ms, best = t;
    }
    for (int64_t chunk : candidate_chunks()) {
      if (chunk == best.oc_chunk) continue;
      Tuning t = best;
      t.oc_chunk = chunk;
      const double ms = measure(t);
      if (ms < best_ms) best_ms = ms, best = t;
    }
    return best;
  }

  // The cache file is untrusted: only a regular file is read (a FIFO, a device or a directory is skipped, opened
  // without blocking), at most kMaxFileBytes of it, and a line longer than kMaxLineBytes counts as malformed.
  static constexpr int64_t kMaxFileBytes = int64_t(4) << 20;
  static constexpr size_t kMaxLineBytes = 1024;

  // Opens file_ for reading or appending; -1 (and a warning) unless it is a regular file.
  int open_regular(int flags) {
    const int fd = ::open(file_.c_str(), flags | O_NONBLOCK | O_CLOEXEC, 0644);
    if (fd < 0) return -1;
    struct stat st;
    if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
      ::close(fd);
      TORCH_WARN_ONCE("adapmtl: the autotuning cache file '", file_, "' is not a regular file; it is not used");
      return -1;
    }
    return fd;
  }

  bool append_entry(const std::string& entry) {
    const int fd = open_regular(O_WRONLY | O_APPEND | O_CREAT);
    if (fd < 0) return false;
    const bool ok = ::write(fd, entry.data(), entry.size()) == ssize_t(entry.size());
    ::close(fd);
    return ok;
  }

  void load_locked() {
    if (loaded_) return;
    loaded_ = true;
    if (file_.empty()) return;
    const int fd = open_regular(O_RDONLY);
    if (fd < 0) return;
    std::string text;
    char buf[65536];
    ssize_t n;
    while (int64_t(text.size()) <= kMaxFileBytes && (n = ::read(fd, buf, sizeof buf)) > 0) text.append(buf, size_t(n));
    ::close(fd);
    if (int64_t(text.size()) > kMaxFileBytes) {
      TORCH_WARN("adapmtl: the autotuning cache file '", file_, "' is larger than ", kMaxFileBytes,
                 " bytes; only its first ", kMaxFileBytes, " bytes are read");
      text.resize(size_t(kMaxFileBytes));
      text.resize(text.rfind('\n') == std::string::npos ? 0 : text.rfind('\n') + 1);  // whole lines only
    }
    std::istringstream f(text);
    std::string line;
    int64_t bad = 0;
    while (std::getline(f, line)) {
      if (line.empty() || line[0] == '#') continue;
      if (line.size() > kMaxLineBytes) {
        ++bad;
        continue;
      }
      const auto tab = line.find('\t');
      Tuning t = default_tuning();
      if (tab == std::string::npos || tab == 0 || !parse_tuning(line.substr(tab + 1), t, nullptr) || t.layout < 0) {
        ++bad;
        continue;
      }
      table_[line.substr(0, tab)] = t;
    }
    skipped_ += bad;
    if (bad) TORCH_WARN("adapmtl: skipped ", bad, " malformed line(s) of the autotuning cache file '", file_, "'");
  }

  std::mutex mutex_;
  std::atomic<bool> enabled_{false};
  bool loaded_ = false;
  std::string file_;
  std::unordered_map<std::string, Tuning> table_;
  int64_t searches_ = 0, hits_ = 0, skipped_ = 0;
};

}  // namespace adapmtl
