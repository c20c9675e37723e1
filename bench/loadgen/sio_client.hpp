// A minimal Socket.IO v5 / Engine.IO v4 client for load generation, on one
// namespace ("/"), over a WebSocket (direct, no polling first) or HTTP
// long-polling. It answers pings, does the CONNECT handshake and hands the
// scenario every EVENT and ACK as text; everything else it needs to know it
// keeps in counters. One client lives on one io_context (one thread); its
// callbacks run there.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/address_v4.hpp>
#include <boost/asio/ip/tcp.hpp>

namespace sidecast::bench {

namespace asio = boost::asio;

struct client_handlers {
  std::function<void()> on_ready;  // the namespace CONNECT was accepted
  // A Socket.IO EVENT, from the packet's JSON array on: `["said",{...}]`.
  std::function<void(std::string_view args)> on_event;
  // A Socket.IO ACK: its id and its JSON array of arguments.
  std::function<void(std::uint64_t id, std::string_view args)> on_ack;
  // The connection is gone (before or after ready); `why` says what happened.
  std::function<void(std::string_view why)> on_close;
};

struct client_options {
  asio::ip::tcp::endpoint server;
  asio::ip::address_v4 source;  // unspecified: let the kernel choose
  std::string host_header = "127.0.0.1";
  // WebSocket through beast::websocket::stream instead of the generator's
  // own framing (slower per message; a cross-check).
  bool beast_websocket = false;
};

class sio_client {
 public:
  virtual ~sio_client() = default;
  virtual void start() = 0;
  // Sends one Socket.IO packet (its text, e.g. `2["echo","x"]`) as an
  // Engine.IO message. Queued while a write is in progress.
  void send(std::string_view sio_packet) {
    std::string eio;
    eio.reserve(sio_packet.size() + 1);
    eio += '4';
    eio += sio_packet;
    send_eio(std::move(eio));
  }
  virtual void close() = 0;

  bool ready() const noexcept { return ready_; }
  bool closed() const noexcept { return closed_; }
  std::uint64_t pings() const noexcept { return pings_; }
  unsigned ping_interval_ms() const noexcept { return ping_interval_ms_; }
  // When the bytes of the packet being handled reached this client's socket,
  // in steady_clock nanoseconds: the kernel's receive timestamp where the
  // transport has one (the WebSocket client with its own framing), else the
  // time the read completed. Valid inside on_event and on_ack. Deliveries
  // queued behind others in the generator's own thread are then timed by the
  // server's work, not by how long the generator took to get to them.
  std::int64_t arrived_ns() const noexcept { return arrived_ns_; }

 protected:
  explicit sio_client(client_handlers h) : handlers_(std::move(h)) {}
  // Sends one Engine.IO packet given as text (`3`, `42[...]`).
  virtual void send_eio(std::string packet) = 0;
  // One Engine.IO packet as text: answers pings, handles OPEN and CONNECT,
  // passes events and acks on.
  void on_eio_packet(std::string_view pkt);
  // Marks the client closed and tells the scenario once.
  void fail(std::string_view why);

  client_handlers handlers_;
  bool ready_ = false;
  bool closed_ = false;
  std::uint64_t pings_ = 0;
  unsigned ping_interval_ms_ = 0;
  std::int64_t arrived_ns_ = 0;
};

// steady_clock's now in nanoseconds (the clock of every generator timestamp).
inline std::int64_t steady_now_ns() noexcept {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

std::shared_ptr<sio_client> make_ws_client(asio::io_context& ioc, client_options options, client_handlers handlers);
std::shared_ptr<sio_client> make_polling_client(asio::io_context& ioc, client_options options,
                                                client_handlers handlers);

}  // namespace sidecast::bench
