#pragma once
// The gateway's sockets and timers all live on io_contexts (one per I/O
// thread). Typed on the io_context's own executor rather than
// any_io_executor, each is about half the size, and so are the operations
// waiting on them: with 10,000 idle connections that is most of what a
// connection costs.
#include <chrono>
#include <stdexcept>

#include "core/asio_config.hpp"

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/bind_allocator.hpp>
#include <boost/asio/basic_stream_socket.hpp>
#include <boost/asio/basic_waitable_timer.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>

namespace sidecast::gateway {

using io_executor = boost::asio::io_context::executor_type;
using timer = boost::asio::basic_waitable_timer<std::chrono::steady_clock,
                                                boost::asio::wait_traits<std::chrono::steady_clock>, io_executor>;
using tcp_socket = boost::asio::basic_stream_socket<boost::asio::ip::tcp, io_executor>;

/// Runs `context` on the calling thread until it stops. Handlers should
/// never throw; if one does, it is logged (as `what`) and the loop goes on.
void run_logging_errors(boost::asio::io_context& context, const char* what);

/// The io_context executor inside `ex`; every executor the gateway hands
/// out is one.
inline io_executor io_executor_of(const boost::asio::any_io_executor& ex) {
  if (const auto* io = ex.target<io_executor>()) return *io;
  throw std::logic_error("gateway: an executor that is not an io_context's");
}

/// Plain operator new, sized exactly. Asio's default handler memory is a
/// per-thread cache that hands any block big enough to the next operation:
/// a wait that stays pending for a connection's whole life (its read, its
/// ping timer) would keep a block sized for some large composed operation.
/// Long-lived waits use this instead, through exact().
template <typename T>
struct exact_allocator {
  using value_type = T;
  exact_allocator() = default;
  template <typename U>
  exact_allocator(const exact_allocator<U>&) noexcept {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T))); }
  void deallocate(T* p, std::size_t n) noexcept { ::operator delete(p, n * sizeof(T)); }
  template <typename U>
  bool operator==(const exact_allocator<U>&) const noexcept { return true; }
};

template <typename Handler>
auto exact(Handler&& handler) {
  return boost::asio::bind_allocator(exact_allocator<void>{}, std::forward<Handler>(handler));
}

}  // namespace sidecast::gateway
