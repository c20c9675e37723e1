#pragma once
// What the bridge has handed to each gateway I/O thread and that thread has
// not run yet, bounded (--max-thread-backlog). Asio's own queue of posted
// handlers has no bound: while an I/O thread is behind (its CPU taken by
// its connections), the bridge, reading the broker as fast as it comes,
// would queue deliveries for it without end.
//
// Posts are made on one thread (the bridge's), which also makes each
// thread's count on its first post; the counts fall on the I/O threads as
// the handlers run.
#include <atomic>
#include <cstddef>
#include <deque>
#include <utility>

#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <prometheus/counter.h>

#include "gateway/io.hpp"

namespace sidecast::gateway {

class thread_backlog {
 public:
  /// `refused` counts the deliveries refused (the weights).
  thread_backlog(std::size_t bound, prometheus::Counter& refused) : bound_{bound}, refused_{refused} {}
  thread_backlog(const thread_backlog&) = delete;
  thread_backlog& operator=(const thread_backlog&) = delete;

  enum class kind {
    sheddable,  // refused when the thread's backlog would pass the bound
    owed,       // counted, never refused: bounded elsewhere (replies: by the requests in flight)
  };

  /// Posts `handler` to `ex`, counting `weight` deliveries (the sockets it
  /// reaches) until it has run. Refuses a sheddable one that would take the
  /// thread's backlog past the bound: false, nothing posted, counted.
  template <typename Handler>
  bool post(const io_executor& ex, Handler&& handler, std::size_t weight = 1, kind k = kind::sheddable) {
    if (k == kind::sheddable && refuses(ex, weight)) return false;
    auto& queued = count_of(ex);
    queued.fetch_add(weight, std::memory_order_relaxed);
    boost::asio::post(ex, [&queued, weight, handler = std::forward<Handler>(handler)]() mutable {
      struct release {
        std::atomic<std::size_t>& queued;
        std::size_t weight;
        ~release() { queued.fetch_sub(weight, std::memory_order_relaxed); }
      } done{queued, weight};  // also when the handler throws
      handler();
    });
    return true;
  }

  /// Whether post() would refuse `weight` more for `ex`'s thread now; a
  /// refusal is counted. On the posting thread a false answer holds until
  /// that thread posts again (the other threads only take away).
  bool refuses(const io_executor& ex, std::size_t weight = 1) {
    if (count_of(ex).load(std::memory_order_relaxed) + weight <= bound_) return false;
    refused_.Increment(static_cast<double>(weight));
    return true;
  }

  /// Deliveries posted to `ex`'s thread and not yet run (ask on the posting thread).
  std::size_t queued(const io_executor& ex) { return count_of(ex).load(std::memory_order_relaxed); }

 private:
  struct count {
    const boost::asio::io_context* context;
    std::atomic<std::size_t> queued{0};
  };

  std::atomic<std::size_t>& count_of(const io_executor& ex) {
    const auto* context = &ex.context();
    for (auto& c : counts_)
      if (c.context == context) return c.queued;
    return counts_.emplace_back(context).queued;  // a deque: the others stay where they are
  }

  std::size_t bound_;
  prometheus::Counter& refused_;
  std::deque<count> counts_;  // one per I/O thread: a few, searched in order
};

}  // namespace sidecast::gateway
