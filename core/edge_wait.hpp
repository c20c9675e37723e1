#pragma once
// Waiting for a descriptor to become readable through an io_context's own
// reactor, edge-triggered, with no system call to start each wait.
//
// Why: Asio re-arms a descriptor for every async_wait. In boost 1.81,
// epoll_reactor::start_op treats a wait as a non-speculative operation and
// re-arms it with an EPOLL_CTL_MOD, so that a descriptor already readable
// completes the wait. The gateway waits again after every batch of ready
// WebSocket connections (core/edge_set.hpp), and on a VM where a system
// call costs about a microsecond that MOD was 0.3 calls per echo ack, and
// 4% of the demo's CPU during `echo` ×100 (docs/performance-log.md).
//
// How: the reactor skips the re-arm for a read operation that may be tried
// speculatively. This wait is such an operation whose speculative try never
// completes it; the descriptor stays registered edge-triggered for input
// from its registration on (as Asio registers every descriptor), and the
// next edge completes the wait. The operation object is allocated once and
// reused by every wait.
//
// The price of no re-arm: an edge that came while no wait was pending is
// not seen again. So the owner must take everything the descriptor
// announced each time a wait completes (epoll_wait until it returns less
// than a full batch, read until EAGAIN), before or after it waits again,
// and must wait again before its handler returns to the io_context. An edge
// that comes after that look is then taken by the reactor on this same
// thread only after the wait is pending. One edge_wait belongs to one
// io_context run by one thread, and is used from that thread; it is
// destroyed before the io_context is (an owner that is an io_context
// service destroys it in shutdown(): before or after the reactor's own
// shutdown, both are safe, since the reactor is destroyed only after every
// service has shut down).
//
// This reaches into boost::asio::detail (the reactor and its operation
// type), which is not a public interface; the Boost version is pinned by
// the build (Debian 12's 1.81), and the static_assert below stops a build
// against another version of the reactor interface.
#include <boost/version.hpp>
#include <cstddef>
#include <functional>
#include <utility>

#include "core/asio_config.hpp"

#include <boost/asio/detail/reactor.hpp>
#include <boost/asio/detail/reactor_op.hpp>
#include <boost/asio/error.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/system/error_code.hpp>

namespace sidecast::core {

static_assert(BOOST_VERSION / 100 == 1081,
              "core/edge_wait.hpp uses boost::asio::detail's reactor interface of boost 1.81: check it for this version");

class edge_wait {
 public:
  using handler = std::function<void(boost::system::error_code)>;

  /// Registers `fd` (non-blocking; the caller keeps it open, and closes it
  /// only after this is destroyed) with the io_context's reactor. `on_ready`
  /// runs on the io_context's thread when a pending wait completes: with no
  /// error when the descriptor became readable (or failed: EPOLLERR and
  /// EPOLLHUP complete it too), with operation_aborted when cancelled or
  /// destroyed first. Throws boost::system::system_error when the reactor
  /// refuses the descriptor.
  edge_wait(boost::asio::io_context& context, int fd, handler on_ready)
      : reactor_{boost::asio::use_service<reactor>(context)}, fd_{fd}, op_{new op{std::move(on_ready)}} {
    // The scheduler polls the reactor only once some I/O object has asked
    // it to (Asio's own descriptor services do this when constructed).
    reactor_.init_task();
    if (int error = reactor_.register_descriptor(fd_, data_)) {
      delete op_;
      boost::asio::detail::throw_error(boost::system::error_code{error, boost::asio::error::get_system_category()},
                                       "edge_wait");
    }
  }
  edge_wait(const edge_wait&) = delete;
  edge_wait& operator=(const edge_wait&) = delete;

  ~edge_wait() {
    // A pending wait is completed with operation_aborted, through the
    // io_context: the operation then frees itself, its handler not called.
    reactor_.deregister_descriptor(fd_, data_, false);
    reactor_.cleanup_descriptor_data(data_);
    if (op_->queued) {
      op_->orphan = true;
    } else {
      delete op_;
    }
  }

  /// Starts a wait unless one is pending. No system call.
  void wait() {
    if (op_->queued) return;
    op_->ec_ = {};
    op_->queued = true;
    op_->starting = true;  // the reactor's speculative try must not complete it
    reactor_.start_op(reactor::read_op, fd_, data_, op_, false, true);
    op_->starting = false;
  }

  /// True from wait() until the handler is called.
  bool pending() const { return op_->queued; }

  /// A pending wait completes with operation_aborted.
  void cancel() { reactor_.cancel_ops(fd_, data_); }

 private:
  using reactor = boost::asio::detail::reactor;

  struct op : boost::asio::detail::reactor_op {
    explicit op(handler h) : reactor_op{boost::system::error_code{}, &op::perform, &op::complete}, on_ready{std::move(h)} {}

    static status perform(reactor_op* base) {
      // Tried at once by start_op (not done: wait for the edge), then when
      // the reactor sees the descriptor ready (done).
      return static_cast<op*>(base)->starting ? not_done : done;
    }

    // `owner` is null when the io_context destroys the operation unrun.
    static void complete(void* owner, boost::asio::detail::operation* base, const boost::system::error_code&,
                         std::size_t) {
      auto* self = static_cast<op*>(base);
      self->queued = false;
      if (self->orphan) {
        delete self;
        return;
      }
      if (owner) self->on_ready(self->ec_);  // may call wait() again
    }

    handler on_ready;
    bool queued = false;    // in the reactor, or completed and not yet run
    bool starting = false;  // inside start_op
    bool orphan = false;    // its edge_wait is gone: free it when it runs
  };

  reactor& reactor_;
  int fd_;
  reactor::per_descriptor_data data_ = nullptr;
  op* op_;
};

}  // namespace sidecast::core
