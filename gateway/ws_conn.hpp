#pragma once
// One WebSocket connection: the read loop and a bounded write queue, on the
// connection's own io_context. Its owner (an Engine.IO session or a /ws
// session) gets messages and the close through callbacks; sending is
// thread-safe. Frames are shared buffers, so a broadcast is never copied per
// receiver. The queue is bounded in frames and bytes: a consumer that falls
// behind is disconnected, never buffered without end.
#include <deque>
#include <functional>
#include <memory>
#include <string>

#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/core/tcp_stream.hpp>
#include <boost/beast/http/message.hpp>
#include <boost/beast/http/string_body.hpp>
#include <boost/beast/websocket/stream.hpp>

#include "gateway/metrics.hpp"

namespace sidecast::gateway {

struct frame {
  std::shared_ptr<const std::string> data;
  bool binary = false;
};

struct ws_limits {
  std::size_t max_message = 1000000;
  std::size_t queue_messages = 4096;
  std::size_t queue_bytes = 8 << 20;
};

class ws_conn : public std::enable_shared_from_this<ws_conn> {
 public:
  using message_handler = std::function<void(std::string data, bool binary)>;
  using close_handler = std::function<void()>;

  /// `hold` lives as long as the connection (its connection-limit slot).
  ws_conn(boost::beast::tcp_stream stream, ws_limits limits, gateway_metrics& metrics, std::shared_ptr<void> hold = {});

  /// Completes the upgrade `request`, then reads until the peer goes away.
  /// Handlers run on this connection's executor.
  void accept(boost::beast::http::request<boost::beast::http::string_body> request, message_handler on_message,
              close_handler on_close);

  /// Thread-safe. Queues frames in order; drops the connection if the queue
  /// would pass its bounds.
  void send(frame f);
  void send(std::vector<frame> frames);
  /// Thread-safe. Sends what is queued, then closes.
  void close();

  boost::asio::any_io_executor executor() { return ws_.get_executor(); }

 private:
  void on_accept(boost::beast::error_code ec);
  void do_read();
  void on_read(boost::beast::error_code ec, std::size_t bytes);
  void enqueue(frame f);
  void do_write();
  void on_write(boost::beast::error_code ec, std::size_t bytes);
  void finish();

  boost::beast::websocket::stream<boost::beast::tcp_stream> ws_;
  boost::beast::flat_buffer buffer_;
  ws_limits limits_;
  gateway_metrics& metrics_;
  message_handler on_message_;
  close_handler on_close_;
  std::deque<frame> queue_;
  std::size_t queued_bytes_ = 0;
  bool accepted_ = false;  // the upgrade handshake is done: frames may go
  bool writing_ = false;
  bool closing_ = false;
  bool finished_ = false;
  std::shared_ptr<void> hold_;
};

}  // namespace sidecast::gateway
