#pragma once
// One Engine.IO connection (its sid) and the Socket.IO namespace sockets
// multiplexed on it. It lives on one io_context; HTTP requests and WebSocket
// frames that reach other threads are posted to it. Transports: polling,
// WebSocket, and the upgrade from the first to the second with nothing lost.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <deque>
#include <map>
#include <memory>
#include <string>

#include <boost/container/devector.hpp>

#include "gateway/codec/engineio.hpp"
#include "gateway/io.hpp"
#include "gateway/codec/socketio.hpp"
#include "gateway/limits.hpp"
#include "gateway/reply_slot.hpp"
#include "gateway/ws_conn.hpp"

namespace sidecast::gateway {

class gateway;
class sio_socket;

class eio_session : public std::enable_shared_from_this<eio_session> {
 public:
  /// `echo`: a bare Engine.IO session that sends every message back (no
  /// Socket.IO): the /engine.io/ conformance endpoint.
  eio_session(gateway& gw, boost::asio::any_io_executor ex, std::string sid, bool echo = false);
  ~eio_session();

  const std::string& sid() const { return sid_; }
  boost::asio::any_io_executor executor() const { return ex_; }
  /// Thread-safe: claims the one WebSocket this session may have; false
  /// when one already took over or is taking over.
  bool claim_websocket() { return !upgrade_started_.exchange(true); }

  /// Keeps `slot` (its place under --max-polling-sessions) as long as the
  /// session lives.
  void hold(std::shared_ptr<void> slot) { slot_ = std::move(slot); }

  // Entry points. Each runs on executor(); callers post.
  void open_polling(std::shared_ptr<reply_slot> handshake);
  void open_websocket(std::shared_ptr<ws_conn> ws);
  void poll(std::shared_ptr<reply_slot> get);
  /// A polling GET's client left while it waited (http_session.cpp): the
  /// session ends, as the reference server's does. Not while it upgrades:
  /// its WebSocket carries on.
  void poll_abandoned();
  /// The gateway relaying this session's GET drains (an HttpForward
  /// RELEASE): the GET waiting here is answered now, a noop, so its
  /// client polls again elsewhere; the session goes on.
  void release_poll();
  void post(std::string body, std::shared_ptr<reply_slot> answer);
  void upgrade(std::shared_ptr<ws_conn> ws);
  void on_ws_message(const ws_conn* from, std::string data, bool binary);
  void on_ws_closed(const ws_conn* from);

  // For the sockets (same executor). False when the message was not queued
  // for the client: the session is closed, or just closed as a slow consumer.
  bool send(frames message);
  bool send_socketio(const socketio::packet& p, const std::vector<std::string>& attachments = {});
  void forget(const std::string& nsp);
  /// Bytes of replies a socket keeps until the acks before them have gone
  /// (acks leave in the order their events came): bounded with what waits
  /// for the client, by --outbound-bytes. False, the session closed as a
  /// slow consumer, past it: a client that leaves one event unanswered (its
  /// own callback unacked) and streams more would have them all kept.
  bool hold_replies(std::size_t bytes);
  void release_replies(std::size_t bytes) { held_replies_ -= std::min(bytes, held_replies_); }
  /// A namespace was joined (its connect accepted, or a socket recovered):
  /// the connect timeout is over. Its timer cancelled, not left pending:
  /// a wait kept per idle connection cost ~0.5 KB of each (2.6 -> 3.1 KB).
  void joined_namespace();
  void close(const char* reason);
  gateway& gw() { return gw_; }
  /// Sends so far (each send() counts one); on a pong the sockets learn
  /// how many of the first of them the client has surely received.
  std::uint64_t sent() const { return sent_; }

 private:
  void release_sockets(const char* reason);
  enum class transport { polling, websocket };

  void on_packet(engineio::packet p);
  void on_socketio(std::string&& text);
  void on_socketio_packet(socketio::packet p, std::vector<std::string> attachments);
  void on_connect(socketio::packet p);
  void send_text(std::string_view text);
  void flush_poll();
  void hold_get(std::shared_ptr<reply_slot> get);
  void drop_probe();
  void schedule_ping();
  void expect_connect();
  void after_ping();

  gateway& gw_;
  io_executor ex_;
  std::string sid_;
  transport transport_ = transport::polling;
  std::atomic<bool> upgrade_started_{false};
  std::shared_ptr<void> slot_;      // see hold()
  std::shared_ptr<ws_conn> ws_;     // the active WebSocket
  std::shared_ptr<ws_conn> probe_;  // a WebSocket being upgraded to
  bool probed_ = false;
  std::shared_ptr<reply_slot> pending_get_;
  boost::container::devector<frame> buffer_;        // polling, or while upgrading
  std::size_t buffered_bytes_ = 0;
  std::size_t held_replies_ = 0;  // hold_replies()
  timer ping_timer_;
  bool awaiting_pong_ = false;
  bool partial_at_ping_ = false;  // the binary packet being assembled was waiting at a ping already
  std::uint64_t sent_ = 0;
  std::uint64_t ping_mark_ = 0;  // sent_ when the last ping went out
  // Made for the first binary packet: most connections never send one.
  std::unique_ptr<socketio::binary_assembler> assembler_;
  token_bucket events_;  // client events, all namespaces of the connection
  std::map<std::string, std::shared_ptr<sio_socket>> sockets_;  // by namespace
  bool closed_ = false;
  bool echo_ = false;
  // Requests on other connections can overtake each other between threads;
  // these keep the order a single-threaded server would see.
  bool client_closing_ = false;           // a close packet came with no GET to answer
  std::shared_ptr<reply_slot> held_get_;  // a GET that came during an upgrade
  timer grace_timer_;
  timer upgrade_timer_;  // --upgrade-timeout for probe_
  timer connect_timer_;  // no namespace joined in time: close
};

}  // namespace sidecast::gateway
