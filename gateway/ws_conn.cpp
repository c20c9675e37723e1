#include "gateway/ws_conn.hpp"

#include <boost/asio/dispatch.hpp>
#include <boost/beast/core/buffers_to_string.hpp>
#include <boost/beast/websocket.hpp>

namespace sidecast::gateway {

namespace beast = boost::beast;
namespace websocket = beast::websocket;

ws_conn::ws_conn(beast::tcp_stream stream, ws_limits limits, gateway_metrics& metrics, std::shared_ptr<void> hold)
    : ws_{std::move(stream)}, limits_{limits}, metrics_{metrics}, hold_{std::move(hold)} {}

void ws_conn::accept(beast::http::request<beast::http::string_body> request, message_handler on_message,
                     close_handler on_close) {
  on_message_ = std::move(on_message);
  on_close_ = std::move(on_close);
  beast::get_lowest_layer(ws_).expires_never();
  // Engine.IO pings keep the connection honest; Beast's own pings are off.
  auto timeouts = websocket::stream_base::timeout::suggested(beast::role_type::server);
  timeouts.idle_timeout = websocket::stream_base::none();
  timeouts.keep_alive_pings = false;
  ws_.set_option(timeouts);
  ws_.read_message_max(limits_.max_message);
  ws_.auto_fragment(false);
  ws_.async_accept(request, [self = shared_from_this()](beast::error_code ec) { self->on_accept(ec); });
}

void ws_conn::on_accept(beast::error_code ec) {
  if (ec) return finish();
  accepted_ = true;
  do_read();
  if (!queue_.empty() || closing_) do_write();
}

void ws_conn::do_read() {
  ws_.async_read(buffer_, [self = shared_from_this()](beast::error_code ec, std::size_t n) { self->on_read(ec, n); });
}

void ws_conn::on_read(beast::error_code ec, std::size_t bytes) {
  if (ec) {
    if (ec == websocket::error::message_too_big) metrics_.oversize.Increment();
    return finish();
  }
  metrics_.bytes_in.Increment(static_cast<double>(bytes));
  bool binary = ws_.got_binary();
  auto data = beast::buffers_to_string(buffer_.data());
  buffer_.consume(buffer_.size());
  if (on_message_) on_message_(std::move(data), binary);
  if (!finished_) do_read();
}

void ws_conn::send(frame f) {
  boost::asio::dispatch(ws_.get_executor(), [self = shared_from_this(), f = std::move(f)]() mutable {
    self->enqueue(std::move(f));
    if (!self->writing_ && !self->finished_ && self->accepted_) self->do_write();
  });
}

void ws_conn::send(std::vector<frame> frames) {
  boost::asio::dispatch(ws_.get_executor(), [self = shared_from_this(), frames = std::move(frames)]() mutable {
    for (auto& f : frames) self->enqueue(std::move(f));
    if (!self->writing_ && !self->finished_ && self->accepted_) self->do_write();
  });
}

void ws_conn::enqueue(frame f) {
  if (finished_ || closing_) return;
  queued_bytes_ += f.data->size();
  queue_.push_back(std::move(f));
  if (queue_.size() > limits_.queue_messages || queued_bytes_ > limits_.queue_bytes) {
    // A consumer this far behind would only grow our memory: drop it.
    metrics_.slow_consumer.Increment();
    queue_.clear();
    queued_bytes_ = 0;
    beast::get_lowest_layer(ws_).socket().close();
    finish();
  }
}

void ws_conn::do_write() {
  if (queue_.empty()) {
    if (closing_ && !finished_) {
      ws_.async_close(websocket::close_code::normal,
                      [self = shared_from_this()](beast::error_code) { self->finish(); });
    }
    return;
  }
  writing_ = true;
  const auto& f = queue_.front();
  ws_.binary(f.binary);
  ws_.async_write(boost::asio::buffer(*f.data),
                  [self = shared_from_this()](beast::error_code ec, std::size_t n) { self->on_write(ec, n); });
}

void ws_conn::on_write(beast::error_code ec, std::size_t bytes) {
  writing_ = false;
  if (ec) return finish();
  metrics_.bytes_out.Increment(static_cast<double>(bytes));
  queued_bytes_ -= queue_.front().data->size();
  queue_.pop_front();
  do_write();
}

void ws_conn::close() {
  boost::asio::dispatch(ws_.get_executor(), [self = shared_from_this()] {
    if (self->closing_ || self->finished_) return;
    self->closing_ = true;
    // Before the handshake is done, on_accept() closes.
    if (!self->writing_ && self->accepted_) self->do_write();
  });
}

void ws_conn::finish() {
  if (finished_) return;
  finished_ = true;
  beast::error_code ignored;
  beast::get_lowest_layer(ws_).socket().close(ignored);
  if (auto cb = std::move(on_close_)) cb();
  on_message_ = nullptr;
  hold_.reset();
}

}  // namespace sidecast::gateway
