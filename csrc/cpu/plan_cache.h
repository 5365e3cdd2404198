// Encoded sparse-conv plans kept across calls (sparse_conv_cpu.cpp: run_conv).
//
// Encoding a weight for a call -- per non-zero its offset into the packed input, grouped by block, or a channel
// panel's column patterns -- depends only on the weight's three CSR arrays and on the call's shape and
// configuration, yet it was redone every call: 0.35 ms for one channel's plan and 0.6-2.2 ms for a 4-panel's on
// a 1x1 1024->1024 conv at 90% (2-core EPYC, docs/cpu_sparse_kernel.md), next to a kernel of 3.7-5 ms at 41x41.
// Here a plan is kept under that shape and configuration and the arrays' addresses, and reused only while
// the arrays hold exactly the bytes it was encoded from: the entry keeps a copy and compares it, so a weight
// changed in place (through .data or numpy too, which no version counter sees) or a new weight at a freed
// one's address is encoded again, never run with a stale plan. A plan that reads the values in place at run
// time (one channel's, the common case) keeps and compares only the structure (row_ptr, col_idx); the
// comparison runs across the threads, as the encoding does. Measured (bench_peer.py --plan-cache-ab, 2-core
// EPYC): 1.03-1.11x on every row, head convs and whole models.
//
// At most ADAPMTL_CPU_PLAN_CACHE_MB megabytes (default 256; 0 turns the cache off) and kMaxEntries plans,
// least recently used out first; a plan larger than the whole budget is used once and not kept.
#pragma once
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <list>
#include <memory>
#include <mutex>
#include <tuple>
#include <vector>

#include "cpu/env.h"

namespace adapmtl {

class PlanCache {
 public:
  static PlanCache& instance() {
    static PlanCache* cache = new PlanCache();  // never destroyed: kernels may run during static teardown
    return *cache;
  }

  // The plan of `shape` (everything the encoding reads besides the arrays, the plan's type included) for the
  // arrays rp [rows + 1], ci [nnz], vals [nnz * value_bytes]: the kept one if the arrays it was encoded from are
  // unchanged, else encode() (returns a Plan by value), kept when it fits. bytes(plan) is its size;
  // holds_values(plan) says whether it holds the values (else only rp and ci are kept and compared: a plan
  // that reads the weight's values in place at run time depends on nothing else).
  template <typename Plan, typename Encode, typename Bytes, typename HoldsValues>
  std::shared_ptr<const Plan> get(const std::vector<int64_t>& shape, const int32_t* rp, int64_t rows,
                                  const int32_t* ci, int64_t nnz, const void* vals, int64_t value_bytes,
                                  const Encode& encode, const Bytes& bytes, const HoldsValues& holds_values) {
    const int64_t limit = limit_bytes();  // a bad ADAPMTL_CPU_PLAN_CACHE_MB raises here, at every call
    const Arrays arrays{rp, rows + 1, ci, nnz, vals, nnz * value_bytes};
    if (limit > 0) {
      std::shared_ptr<Entry> found;
      {
        std::lock_guard<std::mutex> lock(mutex_);
        for (const auto& e : entries_)
          if (e->same_place(arrays) && e->shape == shape) {  // the pointers first: the cheaper test
            found = e;
            break;
          }
      }
      // Compared outside the lock and across the threads: entries are never changed once made.
      if (found && found->same_bytes(arrays)) {
        std::lock_guard<std::mutex> lock(mutex_);
        const auto it = std::find(entries_.begin(), entries_.end(), found);
        if (it != entries_.end()) entries_.splice(entries_.begin(), entries_, it);  // most recently used first
        ++hits_;
        return std::static_pointer_cast<const Plan>(found->plan);
      }
      if (found) drop(found);  // changed in place: encoded again below
    }
    auto plan = std::make_shared<const Plan>(encode());  // outside the lock: it is the slow part
    misses_.fetch_add(1);
    if (limit == 0) return plan;
    const bool keep_values = holds_values(*plan);
    const int64_t size = Entry::size_of(shape, arrays, keep_values) + bytes(*plan);
    if (size > limit) return plan;  // before copying anything: such a plan would be copied at every call
    auto entry = std::make_shared<Entry>(shape, arrays, keep_values, plan);
    entry->bytes = size;
    std::lock_guard<std::mutex> lock(mutex_);
    entries_.push_front(entry);
    held_ += entry->bytes;
    while (held_ > limit || int64_t(entries_.size()) > kMaxEntries) {
      held_ -= entries_.back()->bytes;
      entries_.pop_back();
    }
    return plan;
  }

  // (hits, misses, plans kept, bytes kept)
  std::tuple<int64_t, int64_t, int64_t, int64_t> info() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {hits_, misses_.load(), int64_t(entries_.size()), held_};
  }

  void clear() {
    std::lock_guard<std::mutex> lock(mutex_);
    entries_.clear();
    held_ = hits_ = 0;
    misses_ = 0;
  }

  static constexpr int64_t kMaxEntries = 4096;

 private:
  struct Arrays {
    const int32_t* rp;
    int64_t rp_len;
    const int32_t* ci;
    int64_t nnz;
    const void* vals;
    int64_t val_bytes;
  };

  struct Entry {
    std::vector<int64_t> shape;
    const void *rp_at, *ci_at, *vals_at;  // where the arrays were: a lookup key only, never dereferenced
    int64_t val_bytes;
    std::vector<int32_t> rp, ci;  // the bytes the plan was encoded from
    std::vector<char> vals;       // ... empty when the plan does not hold the values
    std::shared_ptr<const void> plan;
    int64_t bytes;

    Entry(const std::vector<int64_t>& shape_, const Arrays& a, bool keep_values, std::shared_ptr<const void> plan_)
        : shape(shape_), rp_at(a.rp), ci_at(a.ci), vals_at(a.vals), val_bytes(a.val_bytes), rp(a.rp, a.rp + a.rp_len),
          ci(a.ci, a.ci + a.nnz),
          vals(keep_values ? static_cast<const char*>(a.vals) : nullptr,
               keep_values ? static_cast<const char*>(a.vals) + a.val_bytes : nullptr),
          plan(std::move(plan_)),
          bytes(size_of(shape_, a, keep_values)) {}

    // What an entry's key and copies take (its plan's bytes come on top).
    static int64_t size_of(const std::vector<int64_t>& shape, const Arrays& a, bool keep_values) {
      return int64_t(shape.size()) * 8 + a.rp_len * 4 + a.nnz * 4 + (keep_values ? a.val_bytes : 0) + 256;
    }

    bool same_place(const Arrays& a) const {
      return rp_at == a.rp && ci_at == a.ci && vals_at == a.vals && int64_t(rp.size()) == a.rp_len &&
             int64_t(ci.size()) == a.nnz && val_bytes == a.val_bytes;
    }
    bool same_bytes(const Arrays& a) const {
      return same(rp.data(), a.rp, rp.size() * 4) && same(ci.data(), a.ci, ci.size() * 4) &&
             same(vals.data(), a.vals, vals.size());
    }
  };

  // memcmp in 1 MiB pieces over the threads (a large weight's comparison on one thread cost more than encoding
  // it on all of them: measured on ResNet-34's convs).
  static bool same(const void* x, const void* y, size_t n) {
    constexpr int64_t kPiece = int64_t(1) << 20;
    if (n == 0) return true;
    const char *a = static_cast<const char*>(x), *b = static_cast<const char*>(y);
    if (int64_t(n) <= kPiece) return std::memcmp(a, b, n) == 0;
    std::atomic<bool> differ{false};
    at::parallel_for(0, (int64_t(n) + kPiece - 1) / kPiece, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end && !differ.load(std::memory_order_relaxed); ++i) {
        const int64_t at = i * kPiece, len = std::min<int64_t>(kPiece, int64_t(n) - at);
        if (std::memcmp(a + at, b + at, size_t(len)) != 0) differ = true;
      }
    });
    return !differ;
  }

  void drop(const std::shared_ptr<Entry>& entry) {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto it = std::find(entries_.begin(), entries_.end(), entry);
    if (it == entries_.end()) return;
    held_ -= entry->bytes;
    entries_.erase(it);
  }

  static int64_t limit_bytes() { return env_int("ADAPMTL_CPU_PLAN_CACHE_MB", 256, 0, int64_t(1) << 30) << 20; }

  std::mutex mutex_;
  std::list<std::shared_ptr<Entry>> entries_;  // most recently used first
  int64_t held_ = 0, hits_ = 0;
  std::atomic<int64_t> misses_{0};
};

}  // namespace adapmtl
