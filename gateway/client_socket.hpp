#pragma once
// What every client-facing socket does with the broker, whatever its face
// (Socket.IO namespace socket, /ws connection, HTTP API session): connect to
// the namespace's service, turn events into requests, and say goodbye.
// Subclasses render replies and events in their own wire format.
#include <chrono>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <boost/container/devector.hpp>

#include "gateway/gateway.hpp"
#include "gateway/io.hpp"
#include "gateway/sink.hpp"

namespace sidecast::gateway {

class client_socket : public client_sink, public std::enable_shared_from_this<client_socket> {
 public:
  /// `sid` empty: a fresh one (a recovered socket passes its old sid).
  client_socket(gateway& gw, boost::asio::any_io_executor ex, std::string nsp, std::string service, std::string auth,
                std::string sid = {})
      : gw_{gw},
        ex_{io_executor_of(ex)},
        nsp_{std::move(nsp)},
        service_{std::move(service)},
        auth_{std::move(auth)},
        sid_{sid.empty() ? gw.new_sid() : std::move(sid)} {}

  io_executor executor() const override { return ex_; }
  const std::string& sid() const { return sid_; }
  const std::string& nsp() const { return nsp_; }
  const std::string& service() const { return service_; }
  const std::string& auth() const { return auth_; }
  const std::string& user() const { return user_; }
  /// The `sub` of the JWT its connect carried (empty without --jwt-*): a
  /// recovery of this socket must carry a valid token of the same subject.
  const std::string& token_subject() const { return token_subject_; }
  bool connected() const { return state_ == state::connected; }
  bool closed() const { return state_ == state::closed; }

  /// Registers the sid with the bridge and asks the service to accept it;
  /// the answer arrives in on_connect_answer().
  void begin_connect();
  /// Sends an event as a request; tag != 0 wants a reply (on_reply(tag)).
  /// False when the bridge queue is full.
  bool send_event(std::string event, std::string args, std::vector<std::string> attachments, std::uint64_t tag);
  /// Ends the socket: the bridge forgets it, the service gets a DISCONNECT
  /// notice if it had accepted it.
  void end(const std::string& reason);

  void deliver_reply(std::uint64_t tag, reply_data reply) final;

  /// With --jwt-end-at-exp: the socket ends as by a worker's disconnect
  /// (deliver_disconnect, kick_reason() "token expired") once the token
  /// its connect carried expires (`exp` + --jwt-leeway). A recovered
  /// socket is armed with its new token's.
  void arm_expiry(std::int64_t exp);

 protected:
  virtual void on_connect_answer(reply_data reply) = 0;
  /// After end(): the socket is closed (it may add what it still held).
  virtual void on_end() {}
  virtual void on_reply(std::uint64_t tag, reply_data reply) = 0;
  void mark_connected() { state_ = state::connected; }
  /// This socket took over a sid its service had accepted (connection-state
  /// recovery): however it ends, even before it is marked connected, the
  /// service gets the DISCONNECT the old socket no longer sends.
  void took_over(const client_socket& old) {
    owes_disconnect_ = true;
    user_ = old.user_;  // who the service accepted (no new connect hook runs)
    token_subject_ = old.token_subject_;
  }
  /// Its token expired (arm_expiry): ends it as a worker's disconnect does.
  /// A socket parked for recovery overrides it (its expiry is not a
  /// worker's kick, which the socket recovering it would inherit).
  virtual void on_token_expired() { deliver_disconnect(); }
  /// Why a server-side disconnect ends it: a worker's, or its token's expiry.
  const char* kick_reason() const { return token_expired_ ? "token expired" : "server namespace disconnect"; }
  /// A Lifecycle DISCONNECT of this socket for its service.
  proto::Envelope disconnect_notice(const std::string& reason) const;
  /// A worker's disconnect is held (hold_kick) until the connect's answer.
  bool kick_held() const { return kick_pending_; }
  /// Answers a worker's emit that wanted an ack, and will not get the
  /// client's, with `code` now rather than at the worker's timeout.
  void refuse_ack(std::string ack_id, proto::Code code, std::string message);
  /// Ends the socket without a word to anyone: another object took it over.
  void hand_off() {
    state_ = state::closed;
    if (token_timer_) token_timer_->cancel();
    give_up_awaited();  // their answers would reach no one: the new socket has no place for them
  }
  /// An event this socket cannot take: counted (`undelivered`); its ack, if
  /// it wanted one, refused to its worker now with `why`. Returns `why`
  /// (what deliver() returns for it).
  const char* drop_event(std::string ack_id, const char* why);

  // Events a worker sends while the connect hook runs (it may greet the
  // socket, or send it a room's history) wait for the CONNECT answer: up to
  // half of what a connection may have queued (--outbound-messages), counted
  // in frames (one, and one per binary attachment), so that they and the
  // answer fit. Past that they are dropped (drop_event).
  /// nullptr when held; else why it was dropped.
  const char* hold_early(std::shared_ptr<const outbound_event> ev, std::string ack_id);
  /// Once the CONNECT answer is sent: the held events, in order, through
  /// deliver(); then a disconnect a worker asked for meanwhile (hold_kick).
  void release_early();
  /// A worker's disconnect while the connect hook runs waits for the
  /// connect's answer (release_early applies it), like the events it sent.
  void hold_kick() {
    if (!connected() && !closed()) kick_pending_ = true;
  }
  /// The connect was refused or the socket ended: each held event dropped.
  void drop_early(const char* why);

  gateway& gw_;

 private:
  enum class state { connecting, connected, closed };

  io_executor ex_;  // smaller than any_io_executor (gateway/io.hpp)
  std::string nsp_, service_, auth_, sid_;
  std::string user_;  // from the JWT's sub, or the connect hook's {"user"}
  std::string token_subject_;  // see token_subject()
  state state_ = state::connecting;
  bool owes_disconnect_ = false;  // see took_over()
  bool connect_pending_ = false;  // its CONNECT went to the service, unanswered yet
  bool kick_pending_ = false;     // see hold_kick()
  bool token_expired_ = false;    // see arm_expiry() (a bool: beside the others, it costs no byte)
  std::unique_ptr<timer> token_timer_;  // see arm_expiry(); only with --jwt-end-at-exp
  std::vector<std::pair<std::shared_ptr<const outbound_event>, std::string>> early_;  // event, ack id
  std::size_t early_frames_ = 0;  // frames of early_: its events and their attachments
  // The events sent that await their answer: (tag, the request's seq),
  // given up at the broker when the socket ends (end()). In the order sent,
  // so a reply usually finds its entry first.
  boost::container::devector<std::pair<std::uint64_t, std::uint64_t>> awaited_;
  // Cancels at the broker the events of awaited_ (end(), hand_off()).
  void give_up_awaited();
};

/// Why a client's event or connect is refused when the bridge's queue
/// (--bridge-queue) is full.
inline constexpr std::string_view kGatewayBusy = "gateway busy";

/// That refusal as an answer: BUSY, told apart from a service's BUSY (a
/// full service queue) by `by_gateway`, not by its message.
inline reply_data gateway_busy() {
  reply_data reply{proto::BUSY, std::string{kGatewayBusy}};
  reply.by_gateway = true;
  return reply;
}

/// What a client whose connect failed reads in its `connect_error`: a
/// refusal's own message, "gateway busy" for this gateway's, else
/// "service unavailable: TIMEOUT" (the code's name).
std::string connect_error_message(const reply_data& reply);

/// The ack arguments a client gets when its event failed in the backend:
/// [{"error":"timeout","message":"deadline passed"}].
std::string error_args(const reply_data& reply);

}  // namespace sidecast::gateway
