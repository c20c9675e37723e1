#include "gateway/client_socket.hpp"

#include <algorithm>
#include <array>

#include <boost/json.hpp>

#include "core/thread_spares.hpp"
#include "gateway/codec/socketio.hpp"

namespace sidecast::gateway {

namespace {

std::uint32_t millis(std::chrono::milliseconds d) { return static_cast<std::uint32_t>(d.count()); }

}  // namespace

namespace {

reply_data refusal(std::string message) { return {proto::REFUSED, std::move(message)}; }

// The DISCONNECT a service gets for a socket it accepted after the client left.
constexpr const char* kLeftWhileConnecting = "the client left before its connect was answered";

}  // namespace

void client_socket::begin_connect() {
  if (gw_.tokens().enabled()) {
    // The gateway checks the token itself; the service only sees verified users.
    auto claims = gw_.tokens().verify_auth(auth_, std::chrono::system_clock::now());
    if (!claims) {
      gw_.metrics().bad_token.Increment();
      deliver_reply(0, refusal(claims.error()));
      return;
    }
    user_ = claims->subject;
    token_subject_ = std::move(claims->subject);
    if (claims->exp) arm_expiry(*claims->exp);
  }
  // Not sent for a sid the bridge could not take: the service would
  // accept a socket no emit or broadcast reaches.
  if (!gw_.link().attach(sid_, nsp_, weak_from_this())) return deliver_reply(0, gateway_busy());
  proto::Envelope env;
  auto* l = env.mutable_lifecycle();
  l->set_kind(proto::Lifecycle::CONNECT);
  l->set_id(gw_.link().next_id());
  l->set_service(service_);
  l->set_sid(sid_);
  l->set_nsp(nsp_);
  l->set_auth(auth_);
  l->set_user(user_);
  l->set_timeout_ms(millis(gw_.config().request_timeout));
  l->set_attempt(1);
  // Sent by the bridge if the service accepts the socket after it is gone.
  auto orphaned = disconnect_notice(kLeftWhileConnecting);
  if (!gw_.link().request(env, weak_from_this(), 0, gw_.config().request_timeout, std::move(orphaned))) {
    deliver_reply(0, gateway_busy());
    return;
  }
  connect_pending_ = true;
}

bool client_socket::send_event(std::string event, std::string args, std::vector<std::string> attachments,
                               std::uint64_t tag) {
  // Written straight into the message that is sent (proto::encode_request):
  // no string is copied on the way.
  auto seq = gw_.link().next_seq();
  auto id = gw_.link().id_of(seq);
  const proto::request_fields r{.id = id,
                                .service = service_,
                                .sid = sid_,
                                .nsp = nsp_,
                                .event = event,
                                .args = args,
                                .attachments = attachments,
                                .wants_reply = tag != 0,
                                .timeout_ms = millis(gw_.config().request_timeout),
                                .attempt = 1,
                                .user = user_,
                                .auth = auth_};
  auto size = proto::encoded_size(r);
  if (auto limit = gw_.link().max_message_bytes(); limit != 0 && size > limit) {
    // Larger than the broker takes (its --max-message-bytes): sent, it would
    // cost the gateway's link its connection and all in flight on it.
    // Answered at once; an event that wants no answer is dropped, counted.
    gw_.metrics().too_large.Increment();
    if (tag != 0)
      on_reply(tag, reply_data{.code = proto::BAD_REQUEST,
                               .message = "the event is " + std::to_string(size) +
                                          " bytes with its socket's auth, more than the broker takes (" +
                                          std::to_string(limit) + ")"});
    return true;
  }
  zmq::message_t message{size};
  proto::encode_request(r, static_cast<char*>(message.data()));
  core::string_spares::give(std::move(args));  // usually the client's frame, from ws_conn
  if (tag == 0) return gw_.link().send(std::move(message));
  if (!gw_.link().request(id, std::move(message), weak_from_this(), tag, gw_.config().request_timeout)) return false;
  awaited_.emplace_back(tag, seq);
  return true;
}

void client_socket::arm_expiry(std::int64_t exp) {
  if (!gw_.config().jwt_end_at_exp) return;
  // In whole seconds: exp may be up to 2^40 s away (the verifier's bound),
  // past what a time_point in nanoseconds holds. A token that lasts past
  // the horizon is not timed (the process will not run that long).
  constexpr std::int64_t horizon = std::int64_t{10} * 366 * 24 * 3600;
  auto now = std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch());
  auto left = exp + gw_.tokens().leeway().count() - now.count();
  if (left > horizon) return;
  if (!token_timer_) token_timer_ = std::make_unique<timer>(ex_);
  // exp is a whole second: past it, not at it (a second's rounding).
  token_timer_->expires_after(std::chrono::seconds(std::max<std::int64_t>(left, 0)) + std::chrono::milliseconds(1));
  token_timer_->async_wait(exact([weak = weak_from_this()](boost::system::error_code ec) {
    auto self = weak.lock();
    if (ec || !self || self->closed()) return;
    self->gw_.metrics().tokens_expired.Increment();
    self->token_expired_ = true;
    self->on_token_expired();
  }));
}

void client_socket::end(const std::string& reason) {
  if (state_ == state::closed) return;
  bool was_connected = state_ == state::connected || owes_disconnect_;
  state_ = state::closed;
  if (token_timer_) token_timer_->cancel();
  gw_.link().detach(sid_);
  // Its events still awaiting their answers are given up at the broker:
  // their client will not hear them, and one still queued behind a busy
  // service would run for no one (a client that sent thousands and left
  // held the service's queue for every other client until their deadlines).
  // An event without an ack was never awaited: it runs, as a message sent
  // before a close is delivered.
  give_up_awaited();
  on_end();
  // Ended while its connect hook ran: if the service accepts it, it is
  // told then (deliver_reply, or the bridge once this socket is gone).
  if (was_connected) gw_.link().send_owed(disconnect_notice(reason));
}

void client_socket::give_up_awaited() {
  if (awaited_.empty()) return;
  std::vector<std::uint64_t> seqs;
  seqs.reserve(awaited_.size());
  for (const auto& [tag, seq] : awaited_) seqs.push_back(seq);
  awaited_ = {};
  gw_.link().cancel(std::move(seqs));
}

proto::Envelope client_socket::disconnect_notice(const std::string& reason) const {
  proto::Envelope env;
  auto* l = env.mutable_lifecycle();
  l->set_kind(proto::Lifecycle::DISCONNECT);
  l->set_id(gw_.link().next_id());
  l->set_service(service_);
  l->set_sid(sid_);
  l->set_nsp(nsp_);
  l->set_reason(reason);
  l->set_user(user_);
  l->set_timeout_ms(millis(gw_.config().request_timeout));
  l->set_attempt(1);
  return env;
}

void client_socket::refuse_ack(std::string ack_id, proto::Code code, std::string message) {
  gw_.link().send_owed(ack_refusal(std::move(ack_id), code, std::move(message)));
}

const char* client_socket::drop_event(std::string ack_id, const char* why) {
  gw_.metrics().undelivered.Increment();
  if (!ack_id.empty()) refuse_ack(std::move(ack_id), proto::BUSY, why);
  return why;
}

const char* client_socket::hold_early(std::shared_ptr<const outbound_event> ev, std::string ack_id) {
  auto frames = 1 + ev->attachments().size();
  if (early_frames_ + frames > std::max<std::size_t>(1, gw_.config().outbound_messages / 2))
    return drop_event(std::move(ack_id), "too many events before the client's connect was answered");
  early_frames_ += frames;
  early_.emplace_back(std::move(ev), std::move(ack_id));
  return nullptr;
}

void client_socket::release_early() {
  early_frames_ = 0;
  // Each was reported taken when it was held; a drop now is counted only.
  for (auto& [ev, ack] : std::exchange(early_, {})) (void)deliver(std::move(ev), std::move(ack));
  if (std::exchange(kick_pending_, false)) deliver_disconnect();
}

void client_socket::drop_early(const char* why) {
  early_frames_ = 0;
  for (auto& [ev, ack] : std::exchange(early_, {})) drop_event(std::move(ack), why);
}

void client_socket::deliver_reply(std::uint64_t tag, reply_data reply) {
  if (tag != 0) {
    // Answers come mostly in the order asked: the front, taken in O(1).
    if (!awaited_.empty() && awaited_.front().first == tag) {
      awaited_.pop_front();
    } else if (auto it = std::find_if(awaited_.begin(), awaited_.end(), [tag](const auto& a) { return a.first == tag; });
               it != awaited_.end()) {
      awaited_.erase(it);
    }
    if (state_ != state::closed) on_reply(tag, std::move(reply));
    return;
  }
  bool awaited = std::exchange(connect_pending_, false);
  if (state_ == state::closed) {
    // It ended while its connect hook ran, and the service accepted it:
    // told so as any DISCONNECT, with the user the hook named.
    if (awaited && reply.code == proto::OK) {
      if (user_.empty()) user_ = user_named_by(reply.args);
      gw_.link().send_owed(disconnect_notice(kLeftWhileConnecting));
    }
    return;
  }
  if (state_ != state::connecting) return;
  if (reply.code != proto::OK) {
    state_ = state::closed;
    gw_.link().detach(sid_);
  } else if (user_.empty()) {
    user_ = user_named_by(reply.args);
  }
  on_connect_answer(std::move(reply));
}

std::string user_named_by(std::string_view connect_answer) {
  boost::system::error_code ec;
  auto data = socketio::parse_json(connect_answer, ec);
  if (ec || !data.is_object()) return {};
  auto* u = data.as_object().if_contains("user");
  return u && u->is_string() ? std::string{u->as_string()} : std::string{};
}

std::string connect_error_message(const reply_data& reply) {
  if (reply.code == proto::REFUSED || reply.by_gateway) return reply.message;
  return "service unavailable: " + proto::Code_Name(reply.code);
}

std::string error_args(const reply_data& reply) {
  auto code = proto::Code_Name(reply.code);
  std::transform(code.begin(), code.end(), code.begin(), [](unsigned char c) { return std::tolower(c); });
  return boost::json::serialize(
      boost::json::array{boost::json::object{{"error", code}, {"message", reply.message}}});
}

}  // namespace sidecast::gateway
