// The generator's threads and connection set-up: one io_context per thread,
// connection i lives on thread i % threads, and every per-thread counter is
// written by its own thread only (read by others with relaxed loads).
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>

#include "bench/loadgen/sio_client.hpp"
#include "bench/loadgen/stats.hpp"

namespace sidecast::bench {

// A counter owned by one thread: increments are plain load + store (no
// locked instruction), other threads may read it at any time.
struct counter {
  std::atomic<std::uint64_t> v{0};
  void add(std::uint64_t n = 1) noexcept { v.store(v.load(std::memory_order_relaxed) + n, std::memory_order_relaxed); }
  std::uint64_t get() const noexcept { return v.load(std::memory_order_relaxed); }
};

// What one generator thread owns.
struct worker_thread {
  asio::io_context ioc{1};
  std::thread thread;
  histogram latency;       // send → arrival at the socket (sio_client::arrived_ns), ns
  histogram read_latency;  // send → the generator's thread got to it, ns
  counter received;    // messages received (any time)
  counter in_window;   // ... that arrived during the measured window
  counter cohort;      // ... that were sent during the measured window
  counter rejected;    // error acks (rate limited, busy)
  counter closed;      // connections the server closed or that failed
  counter sent;        // messages sent (any time)
  counter sent_cohort;      // messages sent during the measured window
  counter rejected_cohort;  // error acks for messages sent during the window
  counter skipped;     // fixed rate: sends skipped because the window was full
};

// A connection's place: its client and its thread, plus whatever the
// scenario keeps per connection.
struct slot {
  std::shared_ptr<sio_client> client;
  worker_thread* thread = nullptr;
  std::size_t index = 0;
  std::uint64_t next_id = 0;
  std::uint64_t outstanding = 0;
  std::uint64_t acked = 0;
  std::vector<std::int64_t> sent_at;  // ring: send time by ack id % size
  std::shared_ptr<void> extra;        // scenario state (timers)
};

struct runtime_options {
  unsigned threads = 1;
  client_options client;            // server endpoint; `source` is filled per connection
  unsigned source_ips = 253;        // 127.0.0.2 .. 127.0.0.(1+source_ips); 0: no bind
  bool polling = false;
  std::size_t concurrency = 200;    // connection attempts in flight
};

class runtime {
 public:
  explicit runtime(runtime_options o);
  ~runtime();
  runtime(const runtime&) = delete;
  runtime& operator=(const runtime&) = delete;

  std::vector<std::unique_ptr<worker_thread>>& threads() { return threads_; }

  // Opens n connections (index i on thread i % threads), at most
  // `concurrency` in flight. `handlers(slot&)` gives each its callbacks; the
  // runtime wraps on_ready/on_close to count. Returns when all are ready or
  // failed, or at the deadline. Call once.
  struct connect_result {
    std::size_t ready = 0;
    std::size_t failed = 0;
    double seconds = 0;
    std::string first_error;
  };
  connect_result connect(std::size_t n, std::function<client_handlers(slot&)> handlers,
                         std::chrono::steady_clock::time_point deadline);

  std::vector<slot>& slots() { return slots_; }

  // Runs f(slot&) on each slot's thread (asynchronously).
  void for_each_slot(const std::function<void(slot&)>& f);

  // Closes every client, then stops the threads and joins them.
  void shutdown();

 private:
  void launch_next();

  runtime_options opt_;
  std::vector<std::unique_ptr<worker_thread>> threads_;
  std::vector<asio::executor_work_guard<asio::io_context::executor_type>> guards_;
  std::vector<slot> slots_;
  std::function<client_handlers(slot&)> make_handlers_;
  std::atomic<std::size_t> next_{0};
  std::atomic<std::size_t> ready_{0};
  std::atomic<std::size_t> failed_{0};
  std::mutex error_mutex_;
  std::string first_error_;  // the first close reason seen, for the report
  bool stopped_ = false;
};

}  // namespace sidecast::bench
