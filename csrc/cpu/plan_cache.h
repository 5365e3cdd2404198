// Encoded sparse-conv plans kept across calls (sparse_conv_cpu.cpp: run_conv).
//
// Encoding a weight for a call -- per non-zero its offset into the packed input, grouped by block, or a channel
// panel's column patterns -- depends only on the weight's three CSR arrays and on the call's shape and
// configuration, yet it was redone every call: 0.35 ms for one channel's plan and 0.6-2.2 ms for a 4-panel's on
// a 1x1 1024->1024 conv at 90% (2-core EPYC, docs/cpu_sparse_kernel.md), next to a kernel of 3.7-5 ms at 41x41.
// Here a plan is kept under that shape and configuration and the arrays' addresses, and reused only while
// the arrays hold exactly the bytes it was encoded from: the entry keeps a copy and compares it, so a weight
// changed in place (through .data or numpy too, which no version counter sees) or a new weight at a freed
// one's address is encoded again, never run with a stale plan. The comparison streams the weight once.
//
// At most ADAPMTL_CPU_PLAN_CACHE_MB megabytes (default 256; 0 turns the cache off) and kMaxEntries plans,
// least recently used out first; a plan larger than the whole budget is used once and not kept.
#pragma once
#include <torch/extension.h>

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
  // arrays rp [rows + 1], ci [nnz], vals [nnz * value_bytes]: the kept one if the arrays are unchanged, else
  // encode() (returns a Plan by value) whose result is kept when it fits. bytes(plan) is its size.
  template <typename Plan, typename Encode, typename Bytes>
  std::shared_ptr<const Plan> get(const std::vector<int64_t>& shape, const int32_t* rp, int64_t rows,
                                  const int32_t* ci, int64_t nnz, const void* vals, int64_t value_bytes,
                                  const Encode& encode, const Bytes& bytes) {
    const int64_t limit = limit_bytes();  // a bad ADAPMTL_CPU_PLAN_CACHE_MB raises here, at every call
    const Arrays arrays{rp, rows + 1, ci, nnz, vals, nnz * value_bytes};
    if (limit > 0) {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto it = entries_.begin(); it != entries_.end(); ++it) {
        if ((*it)->shape != shape || !(*it)->same_place(arrays)) continue;
        if (!(*it)->same_bytes(arrays)) {  // changed in place: encoded again below
          held_ -= (*it)->bytes;
          entries_.erase(it);
          break;
        }
        entries_.splice(entries_.begin(), entries_, it);  // most recently used first
        ++hits_;
        return std::static_pointer_cast<const Plan>((*it)->plan);
      }
    }
    auto plan = std::make_shared<const Plan>(encode());  // outside the lock: it is the slow part
    misses_.fetch_add(1);
    if (limit == 0) return plan;
    auto entry = std::make_shared<Entry>(shape, arrays, plan);
    entry->bytes += bytes(*plan);
    std::lock_guard<std::mutex> lock(mutex_);
    if (entry->bytes > limit) return plan;
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
    std::vector<int32_t> rp, ci;          // the bytes the plan was encoded from
    std::vector<char> vals;
    std::shared_ptr<const void> plan;
    int64_t bytes;

    Entry(const std::vector<int64_t>& shape_, const Arrays& a, std::shared_ptr<const void> plan_)
        : shape(shape_), rp_at(a.rp), ci_at(a.ci), vals_at(a.vals), rp(a.rp, a.rp + a.rp_len),
          ci(a.ci, a.ci + a.nnz), vals(static_cast<const char*>(a.vals), static_cast<const char*>(a.vals) + a.val_bytes),
          plan(std::move(plan_)),
          bytes(int64_t(shape.size() * 8 + rp.size() * 4 + ci.size() * 4 + vals.size()) + 256) {}

    bool same_place(const Arrays& a) const {
      return rp_at == a.rp && ci_at == a.ci && vals_at == a.vals && int64_t(rp.size()) == a.rp_len &&
             int64_t(ci.size()) == a.nnz && int64_t(vals.size()) == a.val_bytes;
    }
    bool same_bytes(const Arrays& a) const {
      const auto same = [](const void* x, const void* y, size_t n) { return n == 0 || std::memcmp(x, y, n) == 0; };
      return same(rp.data(), a.rp, rp.size() * 4) && same(ci.data(), a.ci, ci.size() * 4) &&
             same(vals.data(), a.vals, vals.size());
    }
  };

  static int64_t limit_bytes() { return env_int("ADAPMTL_CPU_PLAN_CACHE_MB", 256, 0, int64_t(1) << 30) << 20; }

  std::mutex mutex_;
  std::list<std::shared_ptr<Entry>> entries_;  // most recently used first
  int64_t held_ = 0, hits_ = 0;
  std::atomic<int64_t> misses_{0};
};

}  // namespace adapmtl
