#pragma once
// An epoll set of descriptors that have left Asio's reactor, waited on
// through Asio: each descriptor is registered once, edge-triggered for
// reading and writing, and Asio waits on the set's own descriptor. A batch of
// ready descriptors then costs one epoll_wait; waiting again costs no system
// call (core/edge_wait.hpp).
//
// Why not Asio's own waits: Asio re-arms a descriptor with an epoll_ctl for
// every async_wait, and after every successful async_read_some it tries the
// next read at once (boost 1.81 gives up speculating only at end of stream),
// which is a recv answered EAGAIN per message when messages come one at a
// time. The gateway's WebSocket connections (gateway/ws_conn.cpp) and the
// load generator's (bench/loadgen) read through this set instead.
//
// Header-only, on Asio alone, so the load generator can use it without the
// rest of core. One set belongs to one io_context and is used from its thread.
#include <sys/epoll.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "core/edge_wait.hpp"

#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>

namespace sidecast::core {

/// What an edge_set calls when a descriptor it watches is ready.
class edge_watcher {
 public:
  virtual ~edge_watcher() = default;
  /// `events`: the epoll bits that came (EPOLLIN, EPOLLOUT, EPOLLRDHUP,
  /// EPOLLERR, EPOLLHUP). Edge-triggered: read and write until EAGAIN, or a
  /// short read, or the next edge will not come.
  virtual void on_edge(std::uint32_t events) = 0;
  /// on_edge threw. The watcher's state is unknown: it should end itself
  /// (and unwatch). The set goes on with the other descriptors; what this
  /// throws in turn is reported through the set's on_error.
  virtual void on_edge_threw(const std::exception& e) = 0;

 private:
  friend class edge_set;
  static constexpr std::uint32_t no_slot = ~std::uint32_t{0};
  std::uint32_t slot_ = no_slot;
  int fd_ = -1;
};

class edge_set {
 public:
  /// `on_error`: what to do with a failure of the set itself (its wait or
  /// epoll_wait), described in words; the caller logs it. `on_batch_end`, if
  /// given, runs after the watchers of each batch of ready descriptors (a
  /// watcher may leave work for it, to do for the whole batch at once); what
  /// it throws goes to on_error.
  edge_set(boost::asio::io_context& context, std::function<void(const std::string&)> on_error,
           std::function<void()> on_batch_end = {})
      : context_{context}, on_error_{std::move(on_error)}, on_batch_end_{std::move(on_batch_end)} {}
  edge_set(const edge_set&) = delete;
  edge_set& operator=(const edge_set&) = delete;
  ~edge_set() { close(); }

  /// Adds `fd` (non-blocking, owned by the watcher) to the set, which holds
  /// the watcher alive until unwatch(). False, with errno set, when it cannot.
  bool watch(int fd, std::shared_ptr<edge_watcher> watcher) {
    if (!open()) return false;
    std::uint32_t index;
    if (free_.empty()) {
      index = static_cast<std::uint32_t>(slots_.size());
      slots_.emplace_back();
    } else {
      index = free_.back();
      free_.pop_back();
    }
    auto& entry = slots_[index];
    epoll_event ev{};
    ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET;
    ev.data.u64 = (std::uint64_t{entry.generation} << 32) | index;
    if (::epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, fd, &ev) != 0) {
      free_.push_back(index);
      return false;
    }
    watcher->slot_ = index;
    watcher->fd_ = fd;
    entry.watcher = std::move(watcher);
    arm();
    return true;
  }

  /// Takes the watcher's descriptor out of the set (before the watcher closes
  /// it) and returns the reference the set held, for the caller to drop when
  /// it is done with the watcher. Null when it was not watched.
  std::shared_ptr<edge_watcher> unwatch(edge_watcher& watcher) {
    if (watcher.slot_ == edge_watcher::no_slot) return nullptr;
    auto& entry = slots_[watcher.slot_];
    if (epoll_fd_ >= 0) ::epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, watcher.fd_, nullptr);
    ++entry.generation;  // events already fetched for it are stale
    free_.push_back(watcher.slot_);
    watcher.slot_ = edge_watcher::no_slot;
    return std::move(entry.watcher);
  }

  /// Closes the set and drops every watcher it holds (io_context shutdown).
  void close() {
    wait_.reset();  // first: it leaves the reactor before its descriptor closes
    if (epoll_fd_ >= 0) ::close(epoll_fd_);
    epoll_fd_ = -1;
    for (auto& entry : slots_)
      if (entry.watcher) entry.watcher->slot_ = edge_watcher::no_slot;
    slots_.clear();
    free_.clear();
  }

 private:
  static constexpr int max_events = 256;

  struct watched {
    std::shared_ptr<edge_watcher> watcher;
    std::uint32_t generation = 0;
  };

  bool open() {
    if (epoll_fd_ >= 0) return true;
    int fd = ::epoll_create1(EPOLL_CLOEXEC);
    if (fd < 0) return false;
    try {
      wait_.emplace(context_, fd, [this](boost::system::error_code ec) {
        if (ec == boost::asio::error::operation_aborted) return;
        if (ec) return on_error_("waiting on the epoll set failed: " + ec.message());
        on_ready();
      });
    } catch (const boost::system::system_error& e) {
      ::close(fd);
      errno = e.code().value();
      return false;
    }
    epoll_fd_ = fd;
    return true;
  }

  // No system call: the set's descriptor stays registered edge-triggered,
  // and on_ready() takes everything ready each time before it waits again
  // (core/edge_wait.hpp).
  void arm() {
    if (wait_) wait_->wait();
  }

  void on_ready() {
    epoll_event events[max_events];
    int n = ::epoll_wait(epoll_fd_, events, max_events, 0);
    int err = errno;
    if (n < 0 && err != EINTR) on_error_(std::string("epoll_wait: ") + std::strerror(err));
    // Wait again before any watcher runs, so that none can leave the set
    // unwaited. A full batch may have left more ready: take them after the
    // handlers queued meanwhile, not before.
    if (n == max_events || (n < 0 && err == EINTR))
      boost::asio::post(context_, [this] { on_ready(); });
    else
      arm();
    for (int i = 0; i < n; ++i) {
      auto index = static_cast<std::uint32_t>(events[i].data.u64);
      auto generation = static_cast<std::uint32_t>(events[i].data.u64 >> 32);
      if (index >= slots_.size() || slots_[index].generation != generation || !slots_[index].watcher) continue;
      auto watcher = slots_[index].watcher;  // on_edge may unwatch it
      try {
        watcher->on_edge(events[i].events);
      } catch (const std::exception& e) {
        end(*watcher, e);
      } catch (...) {
        end(*watcher, std::runtime_error{"a non-standard exception"});
      }
    }
    if (!on_batch_end_ || n <= 0) return;
    try {
      on_batch_end_();
    } catch (const std::exception& e) {
      on_error_(std::string("after a batch: ") + e.what());
    } catch (...) {
      on_error_("after a batch: a non-standard exception");
    }
  }

  // Tells a watcher whose on_edge threw; if that throws too, says so and goes
  // on: nothing a watcher throws leaves the set's handler.
  void end(edge_watcher& watcher, const std::exception& e) {
    try {
      watcher.on_edge_threw(e);
    } catch (const std::exception& again) {
      on_error_(std::string("a watcher failed to end itself: ") + again.what());
    } catch (...) {
      on_error_("a watcher failed to end itself");
    }
  }

  boost::asio::io_context& context_;
  std::function<void(const std::string&)> on_error_;
  std::function<void()> on_batch_end_;
  int epoll_fd_ = -1;
  std::optional<edge_wait> wait_;  // on epoll_fd_
  std::vector<watched> slots_;
  std::vector<std::uint32_t> free_;
};

}  // namespace sidecast::core
