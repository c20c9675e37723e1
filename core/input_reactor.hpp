#pragma once
// Runs the turns of a loop written for core::input_wait on an io_context's
// thread, instead of on a thread of its own that blocks in input_wait::wait.
//
// Why: `sidecast demo --threads 1` runs the broker, the built-in workers and
// the gateway in one process. With a thread each, one Socket.IO ack crossed
// four local:// hops, and at one connection each hop woke a sleeping thread
// (an eventfd write, a poll wake-up, a context switch: docs/performance-log.md).
// Driven by the gateway's io_context, the broker's and the worker's turns
// run on the gateway's thread between its own handlers, and a local://
// message to one of them schedules its turn (a post, no system call)
// instead of writing an eventfd.
//
// The loop's turn is the part of its blocking loop after wait(): it reads
// input.ready(), does its work, and ends with next(deadline), the part
// before wait(). next() asks the sources input_wait::look() asks, and
// schedules the next turn at once when one holds input; otherwise the turn
// runs when a descriptor fires (core/edge_wait.hpp, no system call per
// wait), when a hooked local:// doorbell is rung (poker()), or at the
// deadline.
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/asio_config.hpp"

#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>

#include "core/edge_wait.hpp"
#include "core/input_wait.hpp"
#include "core/local_link.hpp"

namespace sidecast::core {

class turn_runner;

/// Hooks for local:// doorbells (doorbell::hook) that run `on_rung` on an
/// io_context's thread: any number of rings before it runs make one run,
/// which gets the bits of the hooks rung. Rung from any thread; close()
/// (on the context's thread, or while no thread runs it) before what
/// `on_rung` uses goes, and before the context goes: rings after it do
/// nothing.
///
/// A ring from another thread posts the run. A ring from the context's own
/// thread (the demo's gateway → broker → worker → broker → gateway, all on
/// one thread) joins the context's turn_runner instead: one posted handler
/// runs every such run due, and the runs those make, in order, so a chain of
/// hops costs one pass of Asio's scheduler (one `epoll_wait`), not one per
/// hop.
class ring_poster : public std::enable_shared_from_this<ring_poster> {
 public:
  using rung_fn = std::function<void(std::uint64_t bits)>;
  static std::shared_ptr<ring_poster> make(boost::asio::io_context& context, rung_fn on_rung);
  ring_poster(boost::asio::io_context& context, rung_fn on_rung);  // use make()

  /// A hook that sets `bit` (< 64).
  ring_hook hook(unsigned bit);
  void close();

 private:
  friend class turn_runner;
  void ring(unsigned bit);
  void run();  // the context's thread

  std::mutex mutex_;  // guards context_ against close()
  boost::asio::io_context* context_;
  turn_runner& runner_;
  rung_fn on_rung_;   // the context's thread only
  std::atomic<std::uint64_t> bits_{0};
  std::atomic<bool> posted_{false};
};

class input_reactor {
 public:
  using time_point = std::chrono::steady_clock::time_point;

  /// `turn` runs on the thread that runs `context` (one thread may run it).
  /// `name` names the loop in the log when a turn throws (the loop then
  /// stops, as a thread of its own would).
  input_reactor(boost::asio::io_context& context, input_wait& input, std::function<void()> turn, std::string name);
  /// On the context's thread, or while no thread runs it; before the
  /// context is destroyed. Hooks it handed out do nothing from then on.
  ~input_reactor();
  input_reactor(const input_reactor&) = delete;
  input_reactor& operator=(const input_reactor&) = delete;

  /// Watches the input's descriptors (those >= 0): after its sources were
  /// added, and again whenever they are replaced.
  void watch();
  /// For a source whose producer calls a hook instead of writing its
  /// descriptor (a local:// doorbell): the hook makes source `index` (< 62)
  /// ready and runs a turn on the context's thread. Any thread; a hook
  /// called after this reactor is gone does nothing.
  ring_hook poker(unsigned index);
  /// The end of a turn: arranges the next one, at `deadline` at the latest.
  void next(time_point deadline);
  /// Called (on the context's thread) with the reason when a turn throws
  /// and the loop stops: nothing waits on a thread of its own to notice.
  void on_failure(std::function<void(const std::string&)> handler) { failure_handler_ = std::move(handler); }

 private:
  static constexpr unsigned timer_bit = 62, turn_bit = 63;  // the poster's bits past the sources'
  void rung(std::uint64_t bits);
  void run_turn();
  void release_waits();

  boost::asio::io_context& context_;
  input_wait& input_;
  std::function<void()> turn_;
  std::function<void(const std::string&)> failure_handler_;
  std::string name_;
  std::shared_ptr<ring_poster> poster_;  // every turn is one of its runs
  ring_hook schedule_;                   // a turn soon
  ring_hook timer_rang_;                 // the deadline passed
  std::vector<std::unique_ptr<edge_wait>> waits_;  // by source index; null: no descriptor
  std::vector<int> fds_;                           // the dups they wait on
  boost::asio::steady_timer timer_;
  time_point timer_at_{};
  bool timer_pending_ = false;
  bool failed_ = false;  // a turn threw
};

}  // namespace sidecast::core
