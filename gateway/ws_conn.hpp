#pragma once
// One WebSocket connection (RFC 6455, server side). Beast completes the
// upgrade; after that the connection does its own framing on the bare TCP
// socket, because that is where a fan-out server spends its time:
//
//  - The descriptor sits in its thread's epoll set, edge-triggered, added
//    once. Reads go into one buffer shared by every connection of the
//    thread; only a partial frame is kept per connection, so an idle
//    connection holds no read buffer.
//  - Frames to send are shared buffers (a broadcast is encoded once for all
//    its receivers) queued with their own few header bytes. Sends made while
//    the thread is busy are coalesced: the connection asks its thread's
//    flusher for a turn, and when the flusher runs, after the handlers
//    already queued, everything queued goes out in one sendmsg (writev).
//  - When several connections are ready to read, or to flush, at once, the
//    thread makes their recv or sendmsg calls in one io_uring_enter
//    (gateway/io_batch.hpp); without io_uring, one by one as before.
//  - The queue is bounded in frames and bytes: a consumer that falls behind
//    is disconnected, never buffered without end. Messages are bounded by
//    `max_message`; text must be UTF-8; anything else RFC 6455 forbids from
//    a client (unmasked frames, reserved bits, bad control frames) closes
//    the connection with the matching close code.
//
// Its owner (an Engine.IO session or a /ws session) gets messages and the
// close through callbacks, on the connection's executor; sending is
// thread-safe.
#include <sys/uio.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <boost/beast/core/tcp_stream.hpp>
#include <boost/container/small_vector.hpp>
#include <boost/beast/http/message.hpp>
#include <boost/beast/http/string_body.hpp>

#include "core/edge_set.hpp"
#include "gateway/codec/ws_frame.hpp"
#include "gateway/io.hpp"
#include "gateway/metrics.hpp"

namespace sidecast::gateway {

/// The immutable payload of frames: either bytes that something else holds
/// (a broadcast's frame, encoded once, kept alive by its event), or a copy
/// of its own made by copy_of(), its bytes and their count in one heap block.
class shared_bytes {
 public:
  shared_bytes() = default;
  /// `bytes`, which `owner` keeps alive.
  template <typename Owner>
  shared_bytes(const std::shared_ptr<Owner>& owner, std::string_view bytes)
      : keep_{owner, bytes.data()}, size_{bytes.size()} {}
  /// A copy of `bytes`: one allocation (none when empty).
  static shared_bytes copy_of(std::string_view bytes);

  std::string_view view() const { return {keep_.get(), size_}; }
  const char* data() const { return keep_.get(); }
  std::size_t size() const { return size_; }

 private:
  std::shared_ptr<const char> keep_;
  std::size_t size_ = 0;
};

struct frame {
  shared_bytes data;
  bool binary = false;
};
/// The frames of one message (a packet and its binary attachments): nearly
/// always one, kept inline so a delivery allocates no vector.
using frames = boost::container::small_vector<frame, 1>;

struct ws_limits {
  std::size_t max_message = 1000000;
  std::size_t queue_messages = 4096;
  std::size_t queue_bytes = 8 << 20;
};

class ws_loop;

/// Sets how the WebSocket connections of `context` make their socket calls:
/// batched through io_uring when `io_uring` is true and the kernel allows
/// it, else one system call each; `metrics` counts the batches. Call before
/// the context's first connection.
void configure_ws_loop(boost::asio::io_context& context, bool io_uring, gateway_metrics& metrics);

class ws_conn : public core::edge_watcher, public std::enable_shared_from_this<ws_conn> {
 public:
  using message_handler = std::function<void(std::string data, bool binary)>;
  using close_handler = std::function<void()>;

  /// `hold` lives as long as the connection (its connection-limit slot),
  /// and as long as anyone keeps a copy of place().
  ws_conn(boost::beast::tcp_stream stream, ws_limits limits, gateway_metrics& metrics, std::shared_ptr<void> hold = {});
  /// The same, on `home`'s io_context instead of the stream's: the
  /// descriptor moves there (an upgrade that arrived on another thread than
  /// its session's). Call accept() on `home`'s thread.
  ws_conn(boost::beast::tcp_stream stream, const boost::asio::any_io_executor& home, ws_limits limits,
          gateway_metrics& metrics, std::shared_ptr<void> hold = {});
  /// The connection's place under the connection limits.
  const std::shared_ptr<void>& place() const { return hold_; }
  ~ws_conn();

  /// Completes the upgrade `request`, then reads until the peer goes away.
  /// Handlers run on this connection's executor: `on_open` once the
  /// handshake succeeded (not when Beast refused it), before any message.
  void accept(boost::beast::http::request<boost::beast::http::string_body> request, message_handler on_message,
              close_handler on_close, close_handler on_open = {});

  /// Thread-safe. Queues frames in order; drops the connection if the queue
  /// would pass its bounds. On the connection's own thread, false when the
  /// frames were not queued (the connection is closing, or was just dropped
  /// as a slow consumer); from another thread they are posted: true.
  bool send(frame f);
  bool send(frames message);
  /// Thread-safe. Sends what is queued, then a close frame, then closes.
  void close();
  /// On the connection's thread: queues a ping frame (RFC 6455 §5.5.2),
  /// which a live client answers with a pong. False if it could not be
  /// queued (closing, or dropped as a slow consumer).
  bool send_ping();
  /// On the connection's thread: frames read so far, control frames (a
  /// pong) included. An owner that pinged sees it move when the peer lives.
  std::uint64_t frames_in() const { return frames_in_; }
  /// While a fragmented message is being assembled: the number of the
  /// fragmented messages begun so far (this one's), else nothing.
  std::optional<std::uint32_t> assembling() const {
    return message_op_ ? std::optional<std::uint32_t>{fragmented_} : std::nullopt;
  }

  boost::asio::any_io_executor executor() { return ex_; }

 private:
  friend class ws_loop;

  // Opcodes (RFC 6455 §5.2, codec/ws_frame.hpp) and the close codes we send (§7.4.1).
  enum opcode : std::uint8_t {
    continuation = ws_frame::continuation,
    text = ws_frame::text,
    binary = ws_frame::binary,
    close_op = ws_frame::close,  // `close` is the member function
    ping = ws_frame::ping,
    pong = ws_frame::pong,
  };
  enum close_code : std::uint16_t {
    no_status = 1005,  // an empty close frame
    protocol_error = 1002,
    bad_payload = 1007,
    too_big = 1009,
  };

  struct out_frame {
    shared_bytes data;
    std::uint8_t header[10];
    std::uint8_t header_size;
  };

  void push(shared_bytes data, std::uint8_t op);
  void on_accepted(boost::beast::error_code ec);
  // The loop's edge_set: the descriptor may be writable and/or readable (or
  // closed); spurious calls are harmless.
  void on_edge(std::uint32_t events) override;
  void on_edge_threw(const std::exception& e) override;
  void on_readable();
  // What one recv into `data` (room for `room` bytes) returned: `n` bytes or
  // -errno. True when the socket may hold more: the read filled the room,
  // or the peer's FIN (or an error) came, which only a read on finds.
  bool took(char* data, long n, std::size_t room);
  void on_writable();
  void drained();  // a read found the socket empty
  void peer_ended();  // a read found the end (the client's FIN)
  void start_linger();  // bounds how long a closing connection may take
  // Parses whole frames from [data, data + size) (writable: payloads are
  // unmasked in place); returns the bytes consumed, or nullopt once the
  // connection is failing or closing.
  std::optional<std::size_t> parse(char* data, std::size_t size);
  bool on_frame(std::uint8_t op, bool fin, char* payload, std::size_t size);
  void deliver(std::string message, bool binary);

  /// Queues a frame; false when the connection is over (or just dropped as a slow consumer).
  bool enqueue(shared_bytes data, std::uint8_t op);
  bool enqueue_all(frames& message);  // false when not all were queued (closing, or dropped as too slow)
  void schedule_flush();
  void flush();
  // A flush in halves, so the loop can batch the sendmsg between them.
  bool may_write() const { return accepted_ && !finished_ && !write_waiting_; }
  // Points up to `max` iovecs at what is queued; 0 when nothing is.
  int gather(iovec* iov, int max) const;
  // What the sendmsg of gather()'s iovecs returned: bytes or -errno. True
  // when more is queued that may go now.
  bool wrote(long result);
  void wrote_all();  // the queue is empty
  void after_flush();
  void start_close(shared_bytes payload);
  void fail(close_code code);
  void finish();

  io_executor ex_;
  tcp_socket socket_;  // the upgrade's; then the descriptor moves to fd_
  int fd_ = -1;
  ws_loop& loop_;
  ws_limits limits_;
  gateway_metrics& metrics_;
  message_handler on_message_;
  close_handler on_close_;
  close_handler on_open_;  // until the handshake is done
  std::shared_ptr<void> hold_;

  std::string partial_;                // an incomplete frame, kept between reads
  std::string message_;                // fragments of a message being assembled
  std::optional<std::uint8_t> message_op_;  // its opcode while assembling
  std::uint32_t fragmented_ = 0;            // fragmented messages begun (see assembling())

  std::vector<out_frame> queue_;  // [head_, end) not yet (fully) written
  std::size_t head_ = 0;
  std::size_t head_written_ = 0;  // bytes of queue_[head_] already written
  std::size_t queued_bytes_ = 0;
  std::uint64_t frames_in_ = 0;
  std::unique_ptr<timer> linger_;  // bounds the close handshake (made when it starts)

  bool accepted_ = false;      // the upgrade handshake is done: frames may go
  bool flush_asked_ = false;   // waiting for the flusher's turn
  bool read_asked_ = false;    // readable: waiting for the loop's batch of reads
  bool hung_up_ = false;       // an edge said FIN, hang-up or error: read on to the end
  bool write_waiting_ = false; // the socket was full: waiting for it to drain
  bool closing_ = false;       // a close frame is queued (or ending_): nothing more goes out
  bool ending_ = false;        // the client's FIN came: close TCP once the queue is out
  bool close_sent_ = false;    // ... and written
  bool peer_closed_ = false;   // the client's close frame came
  bool finished_ = false;
  bool delivering_ = false;    // on_message_ is running
};

}  // namespace sidecast::gateway
