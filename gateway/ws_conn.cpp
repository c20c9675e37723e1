#include "gateway/ws_conn.hpp"

#include <exception>

#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstring>
#include <memory>
#include <span>

#include <boost/asio/dispatch.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/asio/post.hpp>
#include <boost/beast/websocket.hpp>
#include <spdlog/spdlog.h>

#include "core/log.hpp"
#include "core/thread_spares.hpp"
#include "core/utf8.hpp"
#include "gateway/io_batch.hpp"

namespace sidecast::gateway {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace websocket = beast::websocket;

constexpr int max_iov = 256;  // per sendmsg; frames are two buffers each: header, payload

// What the WebSocket connections of one io_context (one thread) share:
//
//  - Readiness. Once upgraded, a connection's descriptor leaves Asio's
//    reactor for this loop's edge_set (core/edge_set.hpp says why): a batch
//    of ready connections costs one wait and one epoll_wait.
//  - The reads of such a batch: connections that became readable are read
//    together once the batch's edges are all in, in one io_uring_enter
//    (io_batch), each into its own slice of one buffer.
//  - The buffer every other read lands in.
//  - The connections waiting to flush. The flusher is posted once for all
//    of them, so it runs after the handlers already queued (the rest of a
//    broadcast, other replies) and each connection writes everything they
//    queued in one call; those calls, too, go in one io_uring_enter.
class ws_loop : public asio::execution_context::service {
 public:
  using key_type = ws_loop;
  static asio::execution_context::id id;

  explicit ws_loop(asio::execution_context& context)
      : service{context},
        context_{static_cast<asio::io_context&>(context)},
        edges_{context_,
               [this](const std::string& what) {
                 if (log_limit_.allow()) spdlog::error("gateway: WebSocket connections: {}", what);
               },
               [this] { read_batch(); }} {}

  static ws_loop& of(const io_executor& ex) { return asio::use_service<ws_loop>(ex.context()); }

  void configure(bool io_uring, gateway_metrics& metrics) {
    calls_.emplace(io_uring);
    metrics_ = &metrics;
  }

  /// This thread's limit on log lines caused by connections.
  core::log_limiter& log_limit() { return log_limit_; }

  std::span<char> read_buffer() {
    if (!read_buffer_) read_buffer_ = std::make_unique<char[]>(read_size);
    return {read_buffer_.get(), read_size};
  }

  void ask(std::shared_ptr<ws_conn> conn) {
    dirty_.push_back(std::move(conn));
    if (scheduled_) return;
    scheduled_ = true;
    asio::post(context_, [this] { run(); });
  }

  /// The connection is readable (an edge came): read it with the rest of
  /// the batch, or now when reads are not batched.
  void ask_read(ws_conn& conn) {
    if (!batching()) return conn.on_readable();
    if (conn.read_asked_) return;
    conn.read_asked_ = true;
    readers_.push_back(conn.shared_from_this());
  }

  /// Adds the connection's descriptor to the set, which keeps the connection
  /// alive until unwatch(). False (errno set) when the descriptor cannot be added.
  bool watch(const std::shared_ptr<ws_conn>& conn) { return edges_.watch(conn->fd_, conn); }

  /// Takes the descriptor out of the set; returns the reference the set
  /// held, for the caller to drop when it is done with the connection.
  std::shared_ptr<core::edge_watcher> unwatch(ws_conn& conn) { return edges_.unwatch(conn); }

 private:
  static constexpr std::size_t read_size = 64 * 1024;
  // Batched reads share one buffer, a slice each: at least min_slice (an
  // echo or a ping is far smaller; a read that fills its slice is followed
  // by ordinary reads into the 64 KB buffer).
  static constexpr std::size_t slices_size = 256 * 1024;
  static constexpr std::size_t min_slice = 2048;
  // Batched flushes share one array of iovecs (a frame is two).
  static constexpr std::size_t iovecs = 16384;

  io_batch& calls() {
    if (!calls_) calls_.emplace(true);  // a loop nobody configured (unit tests): as the default
    return *calls_;
  }

  bool batching() { return calls().may_use_ring(); }

  // Runs fn for a connection of a batch; what it throws ends that connection
  // alone, as the edge_set does for a watcher.
  template <typename Fn>
  void guarded(ws_conn& conn, Fn&& fn) {
    try {
      fn();
    } catch (const std::exception& e) {
      end(conn, e);
    } catch (...) {
      end(conn, std::runtime_error{"a non-standard exception"});
    }
  }

  void end(ws_conn& conn, const std::exception& e) {
    try {
      conn.on_edge_threw(e);
    } catch (...) {
      if (log_limit_.allow()) spdlog::error("gateway: a WebSocket connection failed to end itself");
    }
  }

  // After a run of the batch: counts it, and says once why io_uring is not
  // used when it was wanted.
  void account(std::size_t n, std::uint64_t ring_batches_before) {
    auto& calls = *calls_;
    if (metrics_ && calls.ring_batches() != ring_batches_before) {
      metrics_->io_uring_batches.Increment();
      metrics_->io_uring_calls.Increment(static_cast<double>(n));
    }
    if (!calls.ring_error().empty() && !ring_error_logged_) {
      ring_error_logged_ = true;
      spdlog::warn("gateway: io_uring is not available ({}); WebSocket connections make one system call per read and write",
                   calls.ring_error());
    }
  }

  void read_batch() {
    if (readers_.empty()) return;
    batch_guard guard{*this, reading_, true};
    reading_.swap(readers_);
    if (reading_.size() == 1) {
      auto& conn = *reading_.front();
      conn.read_asked_ = false;
      guarded(conn, [&] { conn.on_readable(); });
      reading_.clear();
      return;
    }
    if (!slices_) slices_ = std::make_unique<char[]>(slices_size);
    auto& calls = this->calls();
    const std::size_t slice = std::clamp(slices_size / reading_.size(), min_slice, read_size);
    const std::size_t per_run = std::min(slices_size / slice, io_batch::capacity);
    for (std::size_t from = 0; from < reading_.size(); from += per_run) {
      const std::size_t to = std::min(reading_.size(), from + per_run);
      for (std::size_t i = from; i < to; ++i) {
        auto& conn = *reading_[i];
        conn.read_asked_ = false;
        // One that ended (or got its close frame) since its edge is not read.
        if (conn.finished_ || conn.peer_closed_) continue;
        calls.recv(conn.fd_, slices_.get() + (i - from) * slice, slice);
        runs_.push_back(i);
      }
      const auto before = calls.ring_batches();
      auto results = calls.run();
      account(results.size(), before);
      for (std::size_t k = 0; k < results.size(); ++k) {
        auto& conn = *reading_[runs_[k]];
        char* data = slices_.get() + (runs_[k] - from) * slice;
        guarded(conn, [&] {
          if (conn.took(data, results[k], slice)) conn.on_readable();
        });
      }
      runs_.clear();
    }
    reading_.clear();
  }

  void run() {
    scheduled_ = false;
    batch_guard guard{*this, flushing_, false};
    flushing_.swap(dirty_);
    if (flushing_.size() == 1 || !batching()) {
      for (auto& conn : flushing_) {
        conn->flush_asked_ = false;
        guarded(*conn, [&] { conn->flush(); });
      }
      flushing_.clear();
      return;
    }
    if (!iov_) iov_ = std::make_unique<iovec[]>(iovecs);
    auto& calls = this->calls();
    std::size_t next = 0;
    while (next < flushing_.size()) {
      std::size_t used = 0;
      while (next < flushing_.size() && calls.size() < io_batch::capacity && iovecs - used >= std::size_t{max_iov}) {
        auto& conn = *flushing_[next];
        conn.flush_asked_ = false;
        if (conn.may_write()) {
          int n = conn.gather(iov_.get() + used, max_iov);
          if (n == 0) {
            // Nothing queued: its after-flush step (which may end it, and
            // run handlers that queue frames elsewhere) waits until the
            // batch's calls are made, while iovecs point into queues.
            emptied_.push_back(next);
          } else {
            auto& msg = messages_[calls.size()];
            msg = {};
            msg.msg_iov = iov_.get() + used;
            msg.msg_iovlen = static_cast<std::size_t>(n);
            calls.sendmsg(conn.fd_, &msg, MSG_NOSIGNAL);
            runs_.push_back(next);
            used += static_cast<std::size_t>(n);
          }
        }
        ++next;
      }
      const auto before = calls.ring_batches();
      auto results = calls.run();
      account(results.size(), before);
      for (std::size_t k = 0; k < results.size(); ++k) {
        auto& conn = *flushing_[runs_[k]];
        guarded(conn, [&] {
          if (conn.wrote(results[k])) conn.flush();
        });
      }
      for (auto i : emptied_) {
        auto& conn = *flushing_[i];
        guarded(conn, [&] {
          if (conn.may_write()) conn.flush();  // empty: just its after-flush step
        });
      }
      runs_.clear();
      emptied_.clear();
    }
    flushing_.clear();
  }

  // A batch that throws part way (an allocation: what the connections'
  // handlers throw stays inside guarded()) leaves nothing behind for the
  // next one, which would pair its results with the wrong connections:
  // the calls not made are dropped, the index lists emptied, and every
  // connection of the batch is asked again (a read or flush too many finds
  // nothing to do; one too few would stall it, no new edge coming).
  struct batch_guard {
    ws_loop& loop;
    std::vector<std::shared_ptr<ws_conn>>& batch;
    bool reads;
    int exceptions = std::uncaught_exceptions();
    ~batch_guard() {
      loop.runs_.clear();
      loop.emptied_.clear();
      if (loop.calls_) loop.calls_->discard();
      if (std::uncaught_exceptions() > exceptions) {
        for (auto& conn : batch) {
          try {
            if (reads) {
              conn->read_asked_ = false;
              asio::post(conn->ex_, [conn] { conn->on_readable(); });
            } else {
              conn->flush_asked_ = false;
              conn->schedule_flush();
            }
          } catch (...) {
            // No memory even for that: this connection waits for its next edge or send.
          }
        }
      }
      batch.clear();
    }
  };

  void shutdown() override {
    dirty_.clear();
    flushing_.clear();
    readers_.clear();
    reading_.clear();
    edges_.close();
  }

  asio::io_context& context_;
  core::log_limiter log_limit_;
  core::edge_set edges_;
  std::optional<io_batch> calls_;
  gateway_metrics* metrics_ = nullptr;
  bool ring_error_logged_ = false;
  std::unique_ptr<char[]> read_buffer_;
  std::unique_ptr<char[]> slices_;
  std::unique_ptr<iovec[]> iov_;
  msghdr messages_[io_batch::capacity];
  std::vector<std::size_t> runs_;  // the batch's calls: index of their connection
  std::vector<std::size_t> emptied_;  // connections of the batch with nothing queued
  std::vector<std::shared_ptr<ws_conn>> dirty_, flushing_, readers_, reading_;
  bool scheduled_ = false;
};

asio::execution_context::id ws_loop::id;

void configure_ws_loop(asio::io_context& context, bool io_uring, gateway_metrics& metrics) {
  asio::use_service<ws_loop>(context).configure(io_uring, metrics);
}

namespace {

constexpr auto close_linger = std::chrono::seconds(2);
constexpr int read_rounds = 4;  // reads per readiness, then others get a turn

// A server frame's header: FIN, the opcode and the payload length (RFC 6455
// §5.2; servers do not mask).
std::uint8_t make_header(std::uint8_t* h, std::uint8_t op, std::size_t n) {
  h[0] = 0x80 | op;
  if (n < 126) {
    h[1] = static_cast<std::uint8_t>(n);
    return 2;
  }
  if (n <= 0xffff) {
    h[1] = 126;
    h[2] = static_cast<std::uint8_t>(n >> 8);
    h[3] = static_cast<std::uint8_t>(n);
    return 4;
  }
  h[1] = 127;
  for (int i = 0; i < 8; ++i) h[2 + i] = static_cast<std::uint8_t>(std::uint64_t{n} >> (56 - 8 * i));
  return 10;
}

void unmask(char* p, std::size_t n, const unsigned char* key) {
  std::uint32_t k;
  std::memcpy(&k, key, 4);
  const std::uint64_t k8 = (std::uint64_t{k} << 32) | k;
  std::size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    std::uint64_t v;
    std::memcpy(&v, p + i, 8);
    v ^= k8;
    std::memcpy(p + i, &v, 8);
  }
  for (; i < n; ++i) p[i] = static_cast<char>(p[i] ^ key[i & 3]);
}

// Close codes a peer may send (RFC 6455 §7.4).
bool valid_close_code(unsigned code) {
  return (code >= 1000 && code <= 1003) || (code >= 1007 && code <= 1011) || (code >= 3000 && code <= 4999);
}

shared_bytes close_payload(unsigned code) {
  if (code == 1005) return {};  // "no status": an empty close frame
  const char bytes[2] = {static_cast<char>(code >> 8), static_cast<char>(code & 0xff)};
  return shared_bytes::copy_of({bytes, 2});
}

// Small copies (shared_bytes::copy_of: a shared_ptr's control block and
// the bytes, in one block) take blocks the thread has spare: the frames for
// one connection (an ack, an event for one socket, a pong) are made and
// freed on its thread. Copies round up to 64, 128, 256 or 512 bytes, so the
// blocks come in four sizes.
struct frame_copies;
constexpr std::size_t largest_spared_copy = 512;  // bytes; above it, the heap
std::size_t spared_copy_size(std::size_t n) { return std::bit_ceil(std::max<std::size_t>(n, 64)); }

}  // namespace

shared_bytes shared_bytes::copy_of(std::string_view bytes) {
  if (bytes.empty()) return {};
  std::shared_ptr<char[]> block =
      bytes.size() <= largest_spared_copy
          ? std::allocate_shared_for_overwrite<char[]>(core::spare_block_allocator<char, frame_copies>{},
                                                       spared_copy_size(bytes.size()))
          : std::make_shared_for_overwrite<char[]>(bytes.size());
  std::memcpy(block.get(), bytes.data(), bytes.size());
  return {block, {block.get(), bytes.size()}};
}

ws_conn::ws_conn(beast::tcp_stream stream, ws_limits limits, gateway_metrics& metrics, std::shared_ptr<void> hold)
    : ws_conn{std::move(stream), asio::any_io_executor{}, limits, metrics, std::move(hold)} {}

// `home` empty: the stream's own io_context.
ws_conn::ws_conn(beast::tcp_stream stream, const asio::any_io_executor& home, ws_limits limits,
                 gateway_metrics& metrics, std::shared_ptr<void> hold)
    : ex_{io_executor_of(home ? home : stream.get_executor())},
      socket_{ex_},
      loop_{ws_loop::of(ex_)},
      limits_{limits},
      metrics_{metrics},
      hold_{std::move(hold)} {
  metrics_.websockets_open.fetch_add(1, std::memory_order_relaxed);
  // The same descriptor, on a socket typed for the io_context (gateway/io.hpp).
  auto socket = stream.release_socket();
  beast::error_code ec;
  // On failure socket_ stays closed: the handshake fails and ends the connection.
  auto protocol = socket.local_endpoint(ec).protocol();
  if (ec) {
    socket.close(ec);
    return;
  }
  auto fd = socket.release(ec);
  if (ec) {
    socket.close(ec);
    return;
  }
  socket_.assign(protocol, fd, ec);
  if (ec) ::close(fd);
}

ws_conn::~ws_conn() {
  if (fd_ >= 0) ::close(fd_);
  if (!finished_) metrics_.websockets_open.fetch_sub(1, std::memory_order_relaxed);
}

void ws_conn::accept(beast::http::request<beast::http::string_body> request, message_handler on_message,
                     close_handler on_close, close_handler on_open) {
  on_message_ = std::move(on_message);
  on_close_ = std::move(on_close);
  on_open_ = std::move(on_open);
  // Beast checks the upgrade request and writes the 101 (or the 400); the
  // stream is thrown away once it has.
  auto handshake = std::make_shared<websocket::stream<tcp_socket&>>(socket_);
  auto timeouts = websocket::stream_base::timeout::suggested(beast::role_type::server);
  timeouts.idle_timeout = websocket::stream_base::none();
  timeouts.keep_alive_pings = false;
  handshake->set_option(timeouts);
  handshake->set_option(websocket::stream_base::decorator(
      [](websocket::response_type& res) { res.set(beast::http::field::server, "sidecast"); }));
  handshake->async_accept(request, [self = shared_from_this(), handshake](beast::error_code ec) {
    self->on_accepted(ec);
  });
}

void ws_conn::on_accepted(beast::error_code ec) {
  if (finished_) return;
  if (ec) return finish();
  // From here on the descriptor is ours, in the thread's epoll set (ws_loop).
  fd_ = socket_.release(ec);
  if (ec) return finish();
  if (!loop_.watch(shared_from_this())) {
    int err = errno;
    if (loop_.log_limit().allow()) spdlog::warn("gateway: cannot watch a WebSocket connection: {}", std::strerror(err));
    return finish();
  }
  accepted_ = true;
  if (auto opened = std::exchange(on_open_, {})) opened();
  if (head_ < queue_.size() && !finished_) schedule_flush();
}

void ws_conn::on_edge(std::uint32_t events) {
  // No edge comes after the FIN: a short read that took the data before it
  // must not pass for an empty socket.
  if (events & (EPOLLRDHUP | EPOLLERR | EPOLLHUP)) hung_up_ = true;
  if (events & (EPOLLOUT | EPOLLERR | EPOLLHUP)) on_writable();
  if (events & (EPOLLIN | EPOLLRDHUP | EPOLLERR | EPOLLHUP)) loop_.ask_read(*this);
}

void ws_conn::on_edge_threw(const std::exception& e) {
  // The connection's state is unknown: drop it. The loop goes on with the
  // others, whose edge-triggered events would not come again.
  if (loop_.log_limit().allow()) spdlog::error("gateway: a WebSocket handler threw: {}", e.what());
  finish();
}

// ---- reading ----

void ws_conn::on_readable() {
  if (finished_ || peer_closed_) return;
  auto buffer = loop_.read_buffer();
  for (int round = 0; round < read_rounds; ++round) {
    auto n = ::recv(fd_, buffer.data(), buffer.size(), MSG_DONTWAIT);
    if (!took(buffer.data(), n < 0 ? -errno : n, buffer.size())) return;
  }
  // Still data after a few full buffers. No new edge comes for it, so read
  // on later, after the other connections have had their turn.
  asio::post(ex_, [self = shared_from_this()] { self->on_readable(); });
}

bool ws_conn::took(char* data, long n, std::size_t room) {
  if (finished_ || peer_closed_) return false;
  if (n < 0) {
    if (n == -EINTR) return true;
    if (n == -EAGAIN || n == -EWOULDBLOCK) {
      drained();
    } else {
      finish();
    }
    return false;
  }
  if (n == 0) {
    peer_ended();
    return false;
  }
  metrics_.bytes_in.Increment(static_cast<double>(n));
  auto size = static_cast<std::size_t>(n);
  if (partial_.empty()) {
    auto used = parse(data, size);
    if (!used) return false;
    partial_.assign(data + *used, size - *used);
  } else {
    partial_.append(data, size);
    auto used = parse(partial_.data(), partial_.size());
    if (!used) return false;
    partial_.erase(0, *used);
  }
  if (peer_closed_) return false;
  // A short read emptied the socket: what arrives later is a new edge.
  // After a FIN the next read finds the end (0) instead.
  if (size < room && !hung_up_) {
    drained();
    return false;
  }
  return true;
}

void ws_conn::drained() {
  if (partial_.empty() && partial_.capacity() > 4096) partial_ = std::string{};  // an idle connection keeps none
}

std::optional<std::size_t> ws_conn::parse(char* data, std::size_t size) {
  std::size_t pos = 0;
  while (!peer_closed_ && !finished_) {
    const std::size_t avail = size - pos;
    ws_frame::header h;
    const auto status = ws_frame::read_header(reinterpret_cast<const unsigned char*>(data + pos), avail, h);
    if (status == ws_frame::status::need_more) break;
    // A continuation continues a message; a new message waits for the last to end.
    if (status == ws_frame::status::protocol_error ||
        (h.op == continuation ? !message_op_ : (h.op < 8 && message_op_))) {
      fail(protocol_error);
      return std::nullopt;
    }
    if (h.op < 8 && message_.size() + h.length > limits_.max_message) {
      metrics_.oversize.Increment();
      fail(too_big);
      return std::nullopt;
    }
    if (avail - h.size < h.length) break;  // the rest of the frame is still on its way
    char* payload = data + pos + h.size;
    unmask(payload, h.length, h.mask);
    ++frames_in_;
    if (!on_frame(h.op, h.fin, payload, h.length)) return std::nullopt;
    pos += h.size + h.length;
  }
  return pos;
}

bool ws_conn::on_frame(std::uint8_t op, bool fin, char* payload, std::size_t size) {
  switch (op) {
    case text:
    case binary: {
      if (!fin) {
        message_op_ = op;
        ++fragmented_;
        message_.assign(payload, size);
        return true;
      }
      if (op == text && !core::valid_utf8({payload, size})) break;
      // A buffer the thread had spare: the code done with the text, on this
      // thread, gives it back (an event's: client_socket::send_event).
      auto message = core::string_spares::take();
      message.assign(payload, size);
      deliver(std::move(message), op == binary);
      return !finished_;
    }
    case continuation: {
      message_.append(payload, size);
      if (!fin) return true;
      auto message = std::move(message_);
      message_ = std::string{};
      bool is_binary = *message_op_ == binary;
      message_op_.reset();
      if (!is_binary && !core::valid_utf8(message)) break;
      deliver(std::move(message), is_binary);
      return !finished_;
    }
    case ping:
      // Bounded like any frame: a client that pings and never reads is a slow consumer.
      if (!closing_ && !enqueue(shared_bytes::copy_of({payload, size}), pong)) return false;
      return true;
    case pong: return true;
    case close_op: {
      if (size == 1) {
        fail(protocol_error);
        return false;
      }
      unsigned code = no_status;
      if (size >= 2) {
        code = (static_cast<unsigned char>(payload[0]) << 8) | static_cast<unsigned char>(payload[1]);
        if (!valid_close_code(code)) {
          fail(protocol_error);
          return false;
        }
        if (!core::valid_utf8({payload + 2, size - 2})) break;
      }
      peer_closed_ = true;
      if (closing_) {
        // The answer to our close: done once ours (and what preceded it) is out.
        if (close_sent_) finish();
      } else {
        start_close(close_payload(code));  // echo its code, then close TCP
      }
      return false;
    }
    default: break;
  }
  fail(bad_payload);
  return false;
}

void ws_conn::deliver(std::string message, bool is_binary) {
  if (!on_message_) return;
  // The handler may end the connection (finish()); it must not be destroyed
  // while it runs, since it may hold the last reference to its session.
  delivering_ = true;
  on_message_(std::move(message), is_binary);
  delivering_ = false;
  if (finished_) on_message_ = nullptr;
}

// ---- writing ----

bool ws_conn::send(frame f) {
  frames one;
  one.push_back(std::move(f));
  return send(std::move(one));
}

bool ws_conn::send(frames message) {
  if (ex_.running_in_this_thread()) return enqueue_all(message);
  asio::post(ex_, [self = shared_from_this(), message = std::move(message)]() mutable { self->enqueue_all(message); });
  return true;
}

bool ws_conn::send_ping() { return enqueue(shared_bytes{}, ws_frame::ping) && !closing_; }

bool ws_conn::enqueue_all(frames& message) {
  if (finished_ || closing_) return false;
  for (auto& f : message)
    if (!enqueue(std::move(f.data), f.binary ? binary : text)) return false;
  return true;
}

void ws_conn::push(shared_bytes data, std::uint8_t op) {
  out_frame f;
  f.header_size = make_header(f.header, op, data.size());
  queued_bytes_ += data.size();
  f.data = std::move(data);
  queue_.push_back(std::move(f));
}

bool ws_conn::enqueue(shared_bytes data, std::uint8_t op) {
  if (finished_ || closing_) return !finished_;
  push(std::move(data), op);
  if (queue_.size() - head_ > limits_.queue_messages || queued_bytes_ > limits_.queue_bytes) {
    // A consumer this far behind would only grow our memory: drop it.
    metrics_.slow_consumer.Increment();
    finish();
    return false;
  }
  schedule_flush();
  return true;
}

void ws_conn::schedule_flush() {
  if (flush_asked_ || write_waiting_ || !accepted_ || finished_) return;
  flush_asked_ = true;
  loop_.ask(shared_from_this());
}

void ws_conn::flush() {
  iovec iov[max_iov];
  while (may_write()) {
    int n = gather(iov, max_iov);
    if (n == 0) return wrote_all();
    msghdr msg{};
    msg.msg_iov = iov;
    msg.msg_iovlen = static_cast<std::size_t>(n);
    auto written = ::sendmsg(fd_, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (!wrote(written < 0 ? -errno : written)) return;
  }
}

int ws_conn::gather(iovec* iov, int max) const {
  int n = 0;
  for (std::size_t i = head_; i < queue_.size() && n + 2 <= max; ++i) {
    auto& f = queue_[i];
    std::size_t skip = i == head_ ? head_written_ : 0;
    if (skip < f.header_size) {
      iov[n++] = {const_cast<std::uint8_t*>(f.header) + skip, f.header_size - skip};
      skip = 0;
    } else {
      skip -= f.header_size;
    }
    if (f.data.size() > skip) iov[n++] = {const_cast<char*>(f.data.data()) + skip, f.data.size() - skip};
  }
  return n;
}

bool ws_conn::wrote(long result) {
  if (finished_) return false;
  if (result < 0) {
    if (result == -EINTR) return true;
    if (result == -EAGAIN || result == -EWOULDBLOCK) {
      // The kernel's buffer is full: wait until the client reads. Written
      // entries go first, so a consumer that never quite catches up does
      // not keep one per frame ever sent.
      if (head_ > queue_.size() / 2) {
        queue_.erase(queue_.begin(), queue_.begin() + static_cast<std::ptrdiff_t>(head_));
        head_ = 0;
      }
      write_waiting_ = true;  // until the loop reports the socket writable
    } else {
      finish();
    }
    return false;
  }
  metrics_.bytes_out.Increment(static_cast<double>(result));
  auto left = static_cast<std::size_t>(result);
  while (left > 0) {
    auto& f = queue_[head_];
    std::size_t rest = f.header_size + f.data.size() - head_written_;
    if (left < rest) {
      head_written_ += left;
      break;
    }
    left -= rest;
    queued_bytes_ -= f.data.size();
    f.data = {};
    ++head_;
    head_written_ = 0;
  }
  if (head_ < queue_.size()) return true;
  wrote_all();
  return false;
}

void ws_conn::wrote_all() {
  queue_.clear();
  head_ = 0;
  if (queue_.capacity() > 64) queue_.shrink_to_fit();
  after_flush();
}

void ws_conn::on_writable() {
  if (!write_waiting_) return;
  write_waiting_ = false;
  flush();
}

void ws_conn::after_flush() {
  if (!closing_ || close_sent_) return;
  if (ending_) return finish();  // what was queued before the client's FIN is out
  close_sent_ = true;  // the close frame was the last thing queued
  if (peer_closed_) return finish();
  // Wait (a bounded time) for the client's close frame or its FIN.
  ::shutdown(fd_, SHUT_WR);
}

// ---- closing ----

void ws_conn::close() {
  asio::dispatch(ex_, [self = shared_from_this()] {
    if (self->closing_ || self->finished_) return;
    // As Node's ws server does for socket.close(): no status code.
    self->start_close({});
  });
}

void ws_conn::start_close(shared_bytes payload) {
  push(std::move(payload), close_op);
  closing_ = true;
  start_linger();
  schedule_flush();
}

void ws_conn::start_linger() {
  linger_ = std::make_unique<timer>(ex_);
  linger_->expires_after(close_linger);
  linger_->async_wait([self = shared_from_this()](beast::error_code ec) {
    if (!ec) self->finish();
  });
}

void ws_conn::peer_ended() {
  // The client's FIN: nothing more comes. As from Node's ws, what is queued
  // for it still goes out (it may only have shut its sending side), then TCP
  // closes, with no close frame; nothing is queued meanwhile, so a reply
  // that comes later is dropped. The linger bounds the wait for a reader.
  if (!accepted_ || head_ >= queue_.size()) return finish();
  peer_closed_ = true;
  if (closing_) return;  // our close frame is queued: after_flush finishes once it is out
  closing_ = ending_ = true;
  start_linger();
  schedule_flush();
}

void ws_conn::fail(close_code code) {
  if (finished_) return;
  if (code == protocol_error || code == bad_payload) metrics_.bad_frame.Increment();  // too_big: counted as oversize
  if (closing_) return finish();
  // What was queued is dropped (but a frame half written is finished, or the
  // stream would be garbage); the close frame says why, and no answer is awaited.
  queue_.erase(queue_.begin() + static_cast<std::ptrdiff_t>(head_ + (head_written_ > 0 ? 1 : 0)), queue_.end());
  queued_bytes_ = 0;
  for (std::size_t i = head_; i < queue_.size(); ++i) queued_bytes_ += queue_[i].data.size();
  peer_closed_ = true;
  start_close(close_payload(code));
}

void ws_conn::finish() {
  if (finished_) return;
  finished_ = true;
  metrics_.websockets_open.fetch_sub(1, std::memory_order_relaxed);
  auto watched = loop_.unwatch(*this);  // dropped when this returns
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
  beast::error_code ignored;
  socket_.close(ignored);  // open only while the handshake runs
  if (linger_) linger_->cancel();
  queue_.clear();
  head_ = head_written_ = queued_bytes_ = 0;
  on_open_ = nullptr;  // a handshake Beast refused: the session it would have started goes
  if (auto cb = std::move(on_close_)) cb();
  if (!delivering_) on_message_ = nullptr;  // else deliver() drops it when the handler returns
  hold_.reset();
}

}  // namespace sidecast::gateway
