#pragma once
// The plain `/ws` face: one WebSocket, one namespace (`?nsp=`, default "/"),
// JSON frames as in gateway/codec/README.md. For clients without a Socket.IO
// library. Binary attachments are not carried (JSON only).
#include <chrono>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include <boost/asio/steady_timer.hpp>

#include "gateway/client_socket.hpp"
#include "gateway/codec/ws_json.hpp"
#include "gateway/limits.hpp"
#include "gateway/ws_conn.hpp"

namespace sidecast::gateway {

class ws_session : public client_socket {
 public:
  ws_session(gateway& gw, std::shared_ptr<ws_conn> ws, std::string nsp, std::string service, std::string auth);

  /// On the connection's executor, after accept: connects to the service.
  void start();
  void on_message(std::string data, bool binary);
  void on_closed();

  const char* deliver(std::shared_ptr<const outbound_event> event, std::string ack_id) override;
  void deliver_disconnect() override;
  void shut_down() override;

 protected:
  void on_connect_answer(reply_data reply) override;
  void on_end() override;
  void on_reply(std::uint64_t tag, reply_data reply) override;

 private:
  void send_text(std::string text);
  void send_error(std::string_view id_json, std::string message);
  // A frame of the connected session, past its rate limit.
  void handle(ws_json::client_frame f);
  // Every --ping-interval a ping; a client that sends nothing (no pong, no
  // frame) within --ping-timeout after it is gone (a NAT that forgot it, a
  // network that went away without a FIN) and its connection is closed.
  void keep_alive(std::chrono::steady_clock::time_point ping_at);
  void await_pong(std::uint64_t frames_before, std::chrono::steady_clock::time_point sent);

  std::shared_ptr<ws_conn> ws_;
  boost::asio::steady_timer keepalive_;
  token_bucket events_;
  std::uint64_t next_tag_ = 0;
  std::unordered_map<std::uint64_t, std::string> ids_;  // tag -> the client's id (JSON text)
  // Frames sent before the connect was answered (--max-early-frames):
  // handled in order once it is accepted.
  std::vector<ws_json::client_frame> early_in_;
  std::size_t early_in_bytes_ = 0;  // their event names and data (at most --max-payload)
  bool started_ = false;  // the handshake succeeded and the connect was asked
  std::optional<std::uint32_t> partial_at_ping_;  // ws_conn::assembling() at the last ping
};

}  // namespace sidecast::gateway
