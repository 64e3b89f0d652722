// Parallel loops over tasks whose neighbours share data, balanced at run time.
//
// Why: at::parallel_for hands each thread one fixed share. On a shared machine a thread that loses its CPU for a
// while (steal time reached ~45% at times on the VM we measured) keeps the whole call waiting while the others
// idle. Here each thread still starts on its own contiguous share, in order, so that consecutive tasks reuse what
// the one before left in its caches, and a thread that has finished takes tasks one at a time from the back of the
// share with the most left.

#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>

#include <c10/util/Exception.h>

namespace hybridattn_csrc {

// A thread's share [front, back) packed into one word, so that its owner (taking the front) and the others
// (taking the back) agree on which tasks are left with a single compare-and-swap.
class TaskShares {
 public:
  TaskShares(int64_t tasks, int64_t parts) : parts_(parts), shares_(new std::atomic<uint64_t>[parts]) {
    for (int64_t p = 0; p < parts; ++p) shares_[p].store(pack(tasks * p / parts, tasks * (p + 1) / parts));
  }
  // The next task of thread `part`: its own front first, then the back of the largest share left; -1 when none.
  int64_t next(int64_t part) {
    const int64_t own = take(part, /*front=*/true);
    if (own >= 0) return own;
    while (true) {
      int64_t victim = -1, most = 0;
      for (int64_t p = 0; p < parts_; ++p) {
        const uint64_t s = shares_[p].load(std::memory_order_relaxed);
        if (back(s) - front(s) > most) {
          most = back(s) - front(s);
          victim = p;
        }
      }
      if (victim < 0) return -1;
      const int64_t task = take(victim, /*front=*/false);
      if (task >= 0) return task;
    }
  }

 private:
  static uint64_t pack(int64_t f, int64_t b) { return (uint64_t(f) << 32) | uint64_t(b); }
  static int64_t front(uint64_t s) { return int64_t(s >> 32); }
  static int64_t back(uint64_t s) { return int64_t(s & 0xFFFFFFFFu); }
  int64_t take(int64_t p, bool from_front) {
    uint64_t s = shares_[p].load(std::memory_order_relaxed);
    while (front(s) < back(s)) {
      const uint64_t taken = from_front ? pack(front(s) + 1, back(s)) : pack(front(s), back(s) - 1);
      if (shares_[p].compare_exchange_weak(s, taken, std::memory_order_relaxed)) {
        return from_front ? front(s) : back(s) - 1;
      }
    }
    return -1;
  }
  int64_t parts_;
  std::unique_ptr<std::atomic<uint64_t>[]> shares_;
};

// Calls make_state() once per thread and then run(state, task) for every task in [0, tasks), each exactly once.
template <typename MakeState, typename Run>
void parallel_tasks(int64_t tasks, MakeState make_state, Run run) {
  TORCH_CHECK(tasks < (int64_t(1) << 32), "parallel_tasks: at most 2^32 - 1 tasks, got ", tasks);
  if (tasks <= 0) return;
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tasks));
  TaskShares shares(tasks, parts);
  // grain 1 over `parts` indices: each thread gets one part (or several, when the pool has fewer threads)
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    auto state = make_state();
    for (int64_t part = begin; part < end; ++part)
      for (int64_t task = shares.next(part); task >= 0; task = shares.next(part)) run(state, task);
  });
}

}  // namespace hybridattn_csrc
