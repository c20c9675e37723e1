#include "gateway/api.hpp"

#include <charconv>
#include <deque>
#include <optional>
#include <unordered_set>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/beast/core/string.hpp>
#include <boost/beast/http/field.hpp>
#include <boost/json.hpp>
#include <boost/url/parse.hpp>

#include "gateway/client_socket.hpp"
#include "gateway/codec/json_scan.hpp"
#include "gateway/codec/socketio.hpp"
#include "gateway/codec/ws_json.hpp"
#include "gateway/gateway.hpp"
#include "gateway/limits.hpp"
#include "proto/codec.hpp"

namespace sidecast::gateway {

namespace asio = boost::asio;
namespace http = boost::beast::http;
namespace json = boost::json;
using clock = std::chrono::steady_clock;

namespace {

http_answer json_answer(unsigned status, const json::value& body) {
  return {status, "application/json", json::serialize(body)};
}

http_answer error(unsigned status, std::string_view message) {
  return json_answer(status, json::object{{"error", message}});
}

// A 405: `allow` names the method the resource takes (the Allow header).
http_answer not_allowed(std::string_view allow, std::string_view message) {
  auto a = error(405, message);
  a.allow = allow;
  return a;
}

// The answer to a method an action on a session does not take: 405 with the
// method it does ("": the session itself, which a DELETE ends), or 404 for
// an action there is not.
http_answer wrong_method(std::string_view action) {
  std::string_view allow = action.empty() ? "DELETE" : action == "emit" ? "POST" : action == "events" ? "GET" : "";
  return allow.empty() ? error(404, "no such action") : not_allowed(allow, "no such action for this method");
}

unsigned status_for(proto::Code code) {
  switch (code) {
    case proto::REFUSED: return 403;
    case proto::BUSY: return 429;
    case proto::TIMEOUT: return 504;
    case proto::UNAVAILABLE:
    case proto::WORKER_LOST:
    case proto::BROKER_LOST: return 503;
    case proto::BAD_REQUEST: return 400;
    default: return 502;
  }
}

http_answer failure(const reply_data& reply) {
  auto code = proto::Code_Name(reply.code);
  std::transform(code.begin(), code.end(), code.begin(), [](unsigned char c) { return std::tolower(c); });
  return json_answer(status_for(reply.code), json::object{{"error", code}, {"message", reply.message}});
}

// Compares without an early exit, so the time taken does not reveal how
// much of a key matched.
bool same_key(std::string_view given, std::string_view key) {
  if (key.empty() || given.size() != key.size()) return false;
  unsigned char diff = 0;
  for (std::size_t i = 0; i < key.size(); ++i) diff |= static_cast<unsigned char>(given[i] ^ key[i]);
  return diff == 0;
}

// A key of `body` other than `known`: 400, as /ws answers one (a misspelt
// key would otherwise be ignored without a word).
std::optional<http_answer> unknown_key(const json::object& body, std::initializer_list<std::string_view> known) {
  for (const auto& kv : body)
    if (std::find(known.begin(), known.end(), std::string_view{kv.key()}) == known.end())
      return error(400, "unknown key: " + std::string{kv.key()});
  return std::nullopt;
}

// How long a relayed API session request may wait for the owner's answer:
// a long-poll up to its 60 s, an emit for its ack up to --request-timeout.
// (A sockets request waits --request-timeout: the owner answers at once.)
std::chrono::milliseconds relay_timeout(const gateway_config& c) {
  return std::max<std::chrono::milliseconds>(std::chrono::seconds(60), c.request_timeout) + std::chrono::seconds(5);
}

constexpr std::string_view kSockets = "/api/v1/sockets/";
constexpr std::string_view kRooms = "/api/v1/rooms/";
constexpr std::string_view kUnknownSession = "unknown session";
constexpr std::string_view kApiOff = "the publish, sockets and rooms APIs are disabled: no --api-key configured";

// Whom a publish or a rooms request is for: exactly one of "sid" (a
// publish only), "room" and "broadcast" (every socket of the namespace).
struct publish_target {
  enum { none, sid, room, broadcast } kind = none;
  std::string name;  // the sid or the room
  std::optional<http_answer> refused;
};

publish_target target_of(const json::object& body, bool sid_allowed) {
  publish_target t;
  auto* sid = sid_allowed ? body.if_contains("sid") : nullptr;
  auto* room = body.if_contains("room");
  auto* all = body.if_contains("broadcast");
  if ((sid != nullptr) + (room != nullptr) + (all != nullptr) != 1) {
    t.refused = error(400, sid_allowed ? "give exactly one of sid, room, broadcast" : "give exactly one of room, broadcast");
  } else if (sid && sid->is_string() && !sid->as_string().empty()) {
    t.kind = publish_target::sid;
    t.name = sid->as_string();
  } else if (room && room->is_string() && !room->as_string().empty()) {
    // (The sockets API joins no room named "", so none has a member from it.)
    t.kind = publish_target::room;
    t.name = room->as_string();
  } else if (all && all->is_bool() && all->as_bool()) {
    t.kind = publish_target::broadcast;
  } else {
    t.refused = error(400, sid_allowed ? "sid and room are non-empty strings, broadcast is true"
                                       : "room is a non-empty string, broadcast is true");
  }
  return t;
}

// The namespace a publish or a rooms request names ("nsp"), `fallback` when
// it names none; nothing when it is not one.
std::optional<std::string> namespace_of(const json::object& body, std::string fallback) {
  auto* n = body.if_contains("nsp");
  if (!n) return fallback;
  if (!n->is_string() || !socketio::valid_namespace(n->as_string())) return std::nullopt;
  return std::string{n->as_string()};
}

// The socket itself is read (GET), an action on it is taken (POST).
std::string_view socket_method(std::string_view action) { return action.empty() ? "GET" : "POST"; }

std::optional<proto::Control::Action> socket_action(std::string_view action) {
  if (action == "join") return proto::Control::JOIN;
  if (action == "leave") return proto::Control::LEAVE;
  if (action == "disconnect") return proto::Control::DISCONNECT;
  return std::nullopt;
}

// A poll's answer that takes nothing (replaced, or its client gone).
http_answer no_events() { return json_answer(200, json::object{{"events", json::array{}}}); }

// The body as a JSON object, or the 400 that says why it is not one.
boost::system::result<json::object, http_answer> parse_object(std::string_view body) {
  auto refuse = [](std::string why) { return boost::system::result<json::object, http_answer>{
                                          boost::system::in_place_error, error(400, why)}; };
  if (body.empty()) return json::object{};
  boost::system::error_code ec;
  // As deep as Socket.IO's and /ws's arguments may be: the body's object
  // takes the place of their array.
  auto v = socketio::parse_json(body, ec);
  if (ec) return refuse("body is not JSON (" + ec.message() + "; UTF-8, at most 64 levels deep)");
  if (!v.is_object()) return refuse("body must be a JSON object");
  // A key given twice: which was meant? (/ws refuses it too.)
  std::unordered_set<std::string> keys;
  std::string twice;
  codec_detail::for_each_member(body, [&](std::string_view key, std::size_t, std::size_t) {
    if (keys.emplace(key).second) return true;
    twice = key;
    return false;
  });
  if (!twice.empty()) return refuse("duplicate key: " + json::serialize(json::string{twice}));
  return std::move(v.as_object());
}

}  // namespace

// A client session held by HTTP requests instead of a connection.
class api_session : public client_socket {
 public:
  api_session(gateway& gw, asio::any_io_executor ex, std::string nsp, std::string service, std::string auth)
      : client_socket{gw, ex, std::move(nsp), std::move(service), std::move(auth)},
        key_{gw.new_sid()},
        poll_timer_{ex},
        ttl_timer_{ex},
        rate_{gw.config().events_per_second, gw.config().events_burst} {}

  /// What its client names it by in the paths (/api/v1/sessions/{key}):
  /// a secret of the client's, drawn as a sid is (the gateway's id, then 132
  /// random bits), and not its socket's sid, which workers see and hand on
  /// (the demo's `said` carries it to a whole room): a sid in the path made
  /// any client that learnt it able to emit as the session, take its events
  /// and close it.
  const std::string& key() const { return key_; }

  void start(std::shared_ptr<reply_slot> created) {
    created_ = std::move(created);
    gw_.metrics().api_sessions.Increment();
    touch();
    begin_connect();
  }

  void emit(std::string event, std::string data, bool ack, std::shared_ptr<reply_slot> answer) {
    touch();
    if (!connected()) {
      answer->complete(ended_.empty() ? error(404, kUnknownSession) : closed_answer());
      return;
    }
    gw_.metrics().api_in.Increment();
    // The limits a Socket.IO connection has: --events-per-second (and
    // --events-burst), --max-pending-acks.
    if (!rate_.take()) {
      gw_.metrics().rate_limited.Increment();
      answer->complete(error(429, "rate limited: too many events"));
      return;
    }
    if (ack && acks_.size() >= gw_.config().max_pending_acks) {
      gw_.metrics().ack_limit.Increment();
      answer->complete(error(429, "too many events waiting for their ack"));
      return;
    }
    std::string args = data.empty() ? "[]" : "[" + data + "]";
    if (!ack) {
      answer->complete(send_event(std::move(event), std::move(args), {}, 0) ? json_answer(202, json::object{{"ok", true}})
                                                                           : error(503, kGatewayBusy));
      return;
    }
    auto tag = ++next_tag_;
    acks_.emplace(tag, answer);
    if (!send_event(std::move(event), std::move(args), {}, tag)) {
      acks_.erase(tag);
      answer->complete(error(503, kGatewayBusy));
    }
  }

  /// `relay`: the id of the peer gateway's forward this poll came in (empty: ours).
  void poll(std::chrono::milliseconds timeout, std::shared_ptr<reply_slot> answer, std::string relay = {}) {
    touch();
    if (!relay.empty()) {
      // Its client left before the poll got here (the GONE took fewer hops):
      // no one reads its answer.
      if (auto it = std::find(gone_relays_.begin(), gone_relays_.end(), relay); it != gone_relays_.end()) {
        gone_relays_.erase(it);
        return answer->complete(no_events());
      }
    }
    poll_relay_ = std::move(relay);
    if (!ended_.empty()) {  // its last answer: what it had not polled, with a 410
      if (poll_) std::exchange(poll_, nullptr)->complete(closed_answer());
      poll_ = std::move(answer);
      return flush();
    }
    if (!connected()) {
      answer->complete(error(404, kUnknownSession));
      return;
    }
    if (poll_) std::exchange(poll_, nullptr)->complete(no_events());
    poll_ = std::move(answer);
    if (!events_.empty()) return flush();
    poll_timer_.expires_after(timeout);
    // Its own poll only: a wait that had already ended when a newer poll
    // took this one's place (cancel() cannot stop it then) leaves that one be.
    poll_timer_.async_wait([self = std::static_pointer_cast<api_session>(shared_from_this()),
                            mine = std::weak_ptr<reply_slot>{poll_}](boost::system::error_code ec) {
      if (!ec && self->poll_ && self->poll_ == mine.lock()) self->flush();
    });
  }

  /// The client of the poll a peer gateway relayed in forward `relay` left
  /// there (empty, from an earlier build: of the waiting poll). Still
  /// waiting, that poll is answered empty (no one reads it); answered
  /// already, too late to be written there, what it took comes back, in
  /// front. A newer poll is left be.
  void poll_gone(const std::string& relay) {
    if (relay.empty() || relay == poll_relay_) {
      if (!poll_) return;
      poll_timer_.cancel();
      std::exchange(poll_, nullptr)->complete(no_events());
      return;
    }
    if (relay != lent_relay_) {
      // Not here yet: the poll may still come (poll()). A few are kept: a
      // client polls one at a time.
      if (gone_relays_.size() >= 8) gone_relays_.pop_front();
      gone_relays_.push_back(relay);
      return;
    }
    lent_relay_.clear();
    gw_.metrics().api_given_back.Increment(static_cast<double>(lent_.size()));
    after_poll(std::exchange(lent_, {}), false, false);
  }

  /// Its place under the session limits, given back when it closes.
  void hold(std::shared_ptr<void> place) { place_ = std::move(place); }

  /// Ends the session. Closed by the server (`keep_unpolled`: its worker
  /// disconnected it, the gateway drains), it keeps what its client had not
  /// polled for that client's next poll, which gets it with a 410 (its
  /// waiting poll gets it now); then, or after --api-session-ttl, it is
  /// forgotten. Closed by its client or its TTL, it is forgotten at once.
  void close(const std::string& reason, bool keep_unpolled = false) {
    if (closed()) return;
    // Owed before end() lets the socket go: a drain that saw it gone and
    // nothing owed in between would stop the gateway with these events.
    if (keep_unpolled && !created_) owe_events();
    end(reason);
    ttl_timer_.cancel();
    for (auto& [tag, slot] : std::exchange(acks_, {})) slot->complete(error(410, "session closed"));
    // Closed before the POST that opens it was answered (its connect hook
    // disconnected it): that POST gets its answer now.
    if (created_) {
      release();
      return fail_open("the session was closed before it opened", error(410, "session closed: " + reason));
    }
    if (!keep_unpolled) {
      release();
      poll_timer_.cancel();
      if (poll_) std::exchange(poll_, nullptr)->complete(error(410, "session closed"));
      return drop_buffered("the session is closed");  // never polled
    }
    // Still in the api's table, and under the session limits, until its
    // client has had its last answer; a drain waits for that answer while
    // it carries events.
    ended_ = reason;
    gw_.metrics().api_sessions.Decrement();
    ttl_timer_.expires_after(gw_.config().api_session_ttl);
    ttl_timer_.async_wait([self = std::static_pointer_cast<api_session>(shared_from_this())](boost::system::error_code ec) {
      if (ec) return;
      self->drop_buffered("the session was closed and not polled again");
      self->forget();
    });
    if (poll_) flush();
  }

  /// DELETE: the client ends it, or lets go of what a closed one kept.
  void remove() {
    if (ended_.empty()) return close("client namespace disconnect");
    ttl_timer_.cancel();
    drop_buffered("the client let go of its closed session");
    forget();
  }

  const char* deliver(std::shared_ptr<const outbound_event> event, std::string ack_id) override {
    // An HTTP API client has no way to ack: an emit that wants one is
    // refused to its worker at once (the event itself is still delivered).
    if (!ack_id.empty()) refuse_ack(std::move(ack_id), proto::BAD_REQUEST, "an API session cannot ack");
    if (closed()) return drop_event({}, "the session is closed");
    // Events from the connect hook wait in the same buffer: the client
    // polls once it has its 201, and finds them first.
    events_.push_back(std::shared_ptr<const std::string>(event, &event->ws_frame()));
    buffered_bytes_ += events_.back()->size();
    trim();
    if (poll_) flush();
    return nullptr;
  }

  void deliver_disconnect() override {
    if (!connected()) return hold_kick();  // from the connect hook: applied with its answer
    close(kick_reason(), true);
  }

  // Its waiting poll (or its next) gets 410 and what it had not polled:
  // the client opens a new session, elsewhere.
  void shut_down() override { close("server shutting down", true); }

 protected:
  void on_connect_answer(reply_data reply) override {
    if (reply.code != proto::OK) {
      release();
      // Refused by the gateway itself (its bridge queue full): 503, as for an event.
      fail_open("the session's connect was refused", reply.by_gateway ? error(503, kGatewayBusy) : failure(reply));
      return;
    }
    mark_connected();
    // Its connect hook disconnected it: connected, so its service gets the
    // DISCONNECT; the POST gets 410 (fail_open), its events are dropped.
    if (kick_held()) return close(kick_reason());
    std::exchange(created_, nullptr)->complete(json_answer(201, json::object{{"session", key_}, {"sid", sid()}, {"nsp", nsp()}}));
    schedule_expiry();
  }

  void on_reply(std::uint64_t tag, reply_data reply) override {
    auto it = acks_.find(tag);
    if (it == acks_.end()) return;
    auto slot = std::move(it->second);
    acks_.erase(it);
    if (reply.code != proto::OK) return slot->complete(failure(reply));
    auto data = ws_json::data_from_args(ws_json::with_attachments(std::move(reply.args), reply.attachments));
    slot->complete({200, "application/json", data.empty() ? "{}" : "{\"data\":" + data + "}"});
  }

 private:
  void touch() { last_seen_ = clock::now(); }

  // What an ending session gives back: its place under the session
  // limits, its count in the gauge, its entry in the api's table.
  void release() {
    gw_.metrics().api_sessions.Decrement();
    forget();
  }

  // Closed by the server with events its client has not had: a drain waits
  // for its next poll (api::owing()).
  void owe_events() {
    if (owes_ || events_.empty()) return;
    owes_ = true;
    gw_.api().owe(true);
  }

  void forget() {
    place_.reset();
    if (std::exchange(owes_, false)) gw_.api().owe(false);
    gw_.api().remove(key_);
  }

  // A closed session's answer: 410, why, and to a poll the events it had
  // not polled (`events`: a JSON array's elements).
  http_answer closed_answer(std::optional<std::string_view> events = std::nullopt) const {
    auto body = R"({"error":"session closed","reason":)" + json::serialize(json::string(ended_));
    if (events) body += R"(,"events":[)" + std::string{*events} + "]";
    return {410, "application/json", body + "}"};
  }

  // It ends before it opened: the events its connect hook sent are dropped
  // (counted), and the POST that opens it gets `answer`.
  void fail_open(const char* why, http_answer answer) {
    drop_buffered(why);
    std::exchange(created_, nullptr)->complete(std::move(answer));
  }

  // Events no poll will take: each counted (undelivered).
  void drop_buffered(const char* why) {
    for (; !events_.empty(); pop_event()) drop_event({}, why);
  }

  void pop_event() {
    buffered_bytes_ -= events_.front()->size();
    events_.pop_front();
  }

  // At most --api-buffer events and --outbound-bytes bytes wait (as much as
  // a Socket.IO connection may have queued): a client that stopped polling
  // loses the oldest, counted.
  void trim() {
    const auto& c = gw_.config();
    for (; !events_.empty() && (events_.size() > c.api_buffer || buffered_bytes_ > c.outbound_bytes); pop_event())
      gw_.metrics().api_overflow.Increment();
  }

  // The waiting poll takes the buffered events, as many as fit in
  // --max-payload (at least one; the rest wait for the next poll, which is
  // answered at once): counted as sent once its answer is taken; given back
  // (in front, in order) when the poll was abandoned, its client gone
  // (http_session.cpp). A closed session's last answer takes them all.
  void flush() {
    touch();  // --api-session-ttl counts from the end of the last poll
    bool last = !ended_.empty();  // the closed session's last answer
    std::size_t n = 0, size = 0;
    for (; n < events_.size(); ++n) {
      auto more = events_[n]->size() + (n ? 1 : 0);
      if (n && !last && size + more > gw_.config().max_payload) break;
      size += more;
    }
    std::string events;
    events.reserve(size);
    std::deque<std::shared_ptr<const std::string>> sent;
    for (std::size_t i = 0; i < n; ++i) {
      if (i) events += ',';
      events += *events_.front();
      sent.push_back(events_.front());
      pop_event();
    }
    poll_timer_.cancel();
    // Relayed, the answer may still find its client gone at the peer: the
    // last such answer is kept, lent, from now (a GONE naming it can come
    // before its taking is told here), until the next one or the session's
    // end: at most one poll's answer, --max-payload (poll_gone()).
    if (auto relay = std::exchange(poll_relay_, {}); !relay.empty() && !sent.empty() && !last) {
      lent_relay_ = std::move(relay);
      lent_ = sent;
    }
    std::function<void(bool)> taken;
    if (!sent.empty() || last)
      taken = [self = std::static_pointer_cast<api_session>(shared_from_this()), sent = std::move(sent), last](bool ok) mutable {
        asio::post(self->executor(), [self, sent = std::move(sent), ok, last]() mutable { self->after_poll(std::move(sent), ok, last); });
      };
    auto answer = ended_.empty() ? http_answer{200, "application/json", "{\"events\":[" + events + "]}"} : closed_answer(events);
    std::exchange(poll_, nullptr)->complete(std::move(answer), std::move(taken));
  }

  void after_poll(std::deque<std::shared_ptr<const std::string>> sent, bool taken, bool last) {
    if (taken) {
      gw_.metrics().api_out.Increment(static_cast<double>(sent.size()));
      if (last) {  // its client has had its last answer
        ttl_timer_.cancel();
        forget();
      }
      return;
    }
    for (const auto& e : sent) buffered_bytes_ += e->size();
    events_.insert(events_.begin(), std::make_move_iterator(sent.begin()), std::make_move_iterator(sent.end()));
    if (closed() && ended_.empty()) return drop_buffered("the session is closed");
    if (!ended_.empty()) owe_events();  // back from an answer its client never got
    trim();
    if (poll_) flush();
  }

  // Due a ttl after the client was last seen (it checked every ttl/2: up to
  // 1.5 ttl); while a poll waits, a ttl from now (the poll's end is seen).
  void schedule_expiry() {
    auto ttl = gw_.config().api_session_ttl;
    ttl_timer_.expires_at(poll_ ? clock::now() + ttl : last_seen_ + ttl);
    ttl_timer_.async_wait([self = std::static_pointer_cast<api_session>(shared_from_this()), ttl](boost::system::error_code ec) {
      if (ec || self->closed()) return;
      if (!self->poll_ && clock::now() - self->last_seen_ >= ttl) return self->close("api session expired");
      self->schedule_expiry();
    });
  }

  const std::string key_;
  asio::steady_timer poll_timer_, ttl_timer_;
  token_bucket rate_;  // --events-per-second, --events-burst
  std::shared_ptr<reply_slot> created_, poll_;
  std::deque<std::shared_ptr<const std::string>> events_;
  std::size_t buffered_bytes_ = 0;  // of events_ (trim())
  std::string poll_relay_;          // the waiting poll's forward, if a peer gateway relayed it
  std::string lent_relay_;          // the last answer a relayed poll took (flush())
  std::deque<std::shared_ptr<const std::string>> lent_;
  std::deque<std::string> gone_relays_;  // GONEs of relayed polls that had not come yet (poll_gone())
  std::unordered_map<std::uint64_t, std::shared_ptr<reply_slot>> acks_;
  std::uint64_t next_tag_ = 0;
  clock::time_point last_seen_{};
  std::shared_ptr<void> place_;
  std::string ended_;  // why the server closed it, while its client has not had its last answer
  bool owes_ = false;  // closed with events its client has not had: counted in api::owing()
};

void api::end_relayed_polls() {
  std::vector<std::pair<std::string, relayed_poll>> waiting;
  {
    std::lock_guard lock{mutex_};
    for (auto& [id, poll] : relayed_polls_) waiting.emplace_back(id, poll);
  }
  for (auto& [id, poll] : waiting) {
    auto slot = poll.slot.lock();
    if (!slot) continue;
    // The owner hears that this poll's client left, as when it does: it
    // answers the poll empty if it still waits, or takes back what it
    // answered; the client gets an empty answer now, and polls again
    // through the balancer, elsewhere.
    gw_.report_gone(poll.sid, poll.target, id);
    slot->complete(no_events());
  }
}

void api::remove(const std::string& sid) {
  std::lock_guard lock{mutex_};
  sessions_.erase(sid);
}

std::shared_ptr<api_session> api::find(const std::string& sid) {
  std::lock_guard lock{mutex_};
  auto it = sessions_.find(sid);
  return it == sessions_.end() ? nullptr : it->second.lock();
}

// GCC 12 takes this coroutine's frame, which Asio allocates and frees with
// its own operator new and delete, for a mismatched pair whenever its
// inlining changes (-Wmismatched-new-delete, a false positive: the frame's
// class-level operators are used both ways).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
asio::awaitable<http_answer> api::handle(http::request<http::string_body>& req, std::string_view path,
                                         const boost::urls::params_view& params, const std::string& peer) {
  auto ex = co_await asio::this_coro::executor;
  constexpr std::string_view prefix = "/api/v1/sessions";
  if (path == "/api/v1/publish") {
    if (req.method() != http::verb::post) co_return not_allowed("POST", "use POST");
    co_return publish(req);
  }
  if (path.starts_with(kRooms)) co_return rooms(req, path.substr(kRooms.size()));
  if (path.starts_with(kSockets)) {
    if (auto refused = refuse_key(req)) co_return *refused;
    auto [sid, action] = session_path(path.substr(kSockets.size() - 1));
    if (!action.empty() && !socket_action(action)) co_return error(404, "no such action");
    if (auto method = socket_method(action); req.method_string() != method)
      co_return not_allowed(method, "use " + std::string{method});
    // Another gateway's socket: its owner serves it, through the broker.
    if (!gw_.owner_elsewhere(sid).empty())
      co_return co_await relay(req, std::string{sid}, action, gw_.config().request_timeout);
    auto slot = std::make_shared<reply_slot>(ex);
    serve_socket(sid, action, req.body(), [slot](http_answer a) { slot->complete(std::move(a)); });
    co_return co_await slot->wait();
  }
  if (!path.starts_with(prefix)) co_return error(404, "no such endpoint");
  auto rest = path.substr(prefix.size());
  if (rest.empty() || rest == "/") {
    if (req.method() != http::verb::post) co_return not_allowed("POST", "use POST");
    auto body = parse_object(req.body());
    if (!body) co_return body.error();
    if (auto refused = unknown_key(*body, {"nsp", "auth"})) co_return *refused;
    std::string nsp = "/";
    if (auto* n = body->if_contains("nsp")) {
      if (!n->is_string() || !socketio::valid_namespace(n->as_string())) co_return error(400, "bad nsp");
      nsp = std::string{n->as_string()};
    }
    std::string auth = "{}";
    if (auto* a = body->if_contains("auth")) {
      if (!a->is_object()) co_return error(400, "auth must be an object");
      auth = codec_detail::member_text(req.body(), "auth");  // as sent, not rewritten
      if (auth.size() > gw_.config().max_auth_bytes) {
        gw_.metrics().long_auth.Increment();
        co_return error(400, "auth too large (--max-auth-bytes)");
      }
    }
    const auto* service = gw_.service_for(nsp);
    if (!service) co_return error(404, "Invalid namespace");
    if (gw_.draining()) co_return error(503, "server shutting down");  // the client opens it elsewhere
    // A session outlives the request that opened it, as a polling one does:
    // both take a place under --max-polling-sessions(-per-ip).
    auto place = gw_.polling_sessions().admit(peer);
    if (!place) {
      gw_.metrics().session_limit.Increment();
      co_return error(503, "too many sessions");
    }
    auto session = std::make_shared<api_session>(gw_, ex, nsp, *service, std::move(auth));
    session->hold(std::move(place));
    {
      std::lock_guard lock{mutex_};
      sessions_[session->key()] = session;
    }
    auto slot = std::make_shared<reply_slot>(ex);
    session->start(slot);
    co_return co_await slot->wait();
  }
  // /{sid}[/emit|/events]
  if (rest.front() != '/') co_return error(404, "no such endpoint");
  auto [sid, action] = session_path(rest);
  // Another gateway's session (a balancer that does not route by the
  // path): ask the owner through the broker and relay its answer.
  if (!gw_.owner_elsewhere(sid).empty())
    co_return co_await relay(req, std::string{sid}, action, relay_timeout(gw_.config()));
  co_return co_await on_session(req, sid, action, params);
}

#pragma GCC diagnostic pop

std::pair<std::string_view, std::string_view> api::session_path(std::string_view rest) {
  rest.remove_prefix(1);
  auto slash = rest.find('/');
  auto sid = rest.substr(0, slash);
  auto action = slash == std::string_view::npos ? std::string_view{} : rest.substr(slash + 1);
  return {sid, action};
}

asio::awaitable<http_answer> api::relay(http::request<http::string_body>& req, std::string sid,
                                        std::string_view action, std::chrono::milliseconds timeout) {
  const char* method = req.method() == http::verb::get      ? "GET"
                       : req.method() == http::verb::post   ? "POST"
                       : req.method() == http::verb::delete_ ? "DELETE"
                                                             : nullptr;
  if (!method) co_return wrong_method(action);  // answered here: the owner takes none of the others either
  proto::HttpForward f;
  f.set_id(gw_.link().next_id());
  f.set_sid(sid);
  f.set_method(method);
  f.set_target(std::string{req.target()});
  f.set_body(std::move(req.body()));
  auto id = f.id();
  auto slot = std::make_shared<reply_slot>(co_await asio::this_coro::executor);
  // A relayed poll is known to the drain (end_relayed_polls()) while it waits.
  struct registration {
    api* self;
    std::string id;
    ~registration() {
      if (!self) return;
      std::lock_guard lock{self->mutex_};
      self->relayed_polls_.erase(id);
    }
  } registered{nullptr, id};
  if (action == "events") {
    std::lock_guard lock{mutex_};
    relayed_polls_.emplace(id, relayed_poll{sid, std::string{req.target()}, slot});
    registered.self = this;
  }
  if (!gw_.link().forward(std::move(f), slot, timeout)) co_return error(503, kGatewayBusy);
  gw_.metrics().forwarded.Increment();
  auto answer = co_await slot->wait();
  auto state = co_await asio::this_coro::cancellation_state;
  if (state.cancelled() != asio::cancellation_type::none && action == "events") {
    // Its client left (http_session.cpp): the owner is told which poll, so
    // that it ends that one if it still waits, and takes back what it
    // answered if that answer came too late to be written. (An API
    // session of ours keeps its events by itself.)
    gw_.report_gone(sid, std::string{req.target()}, std::move(id));
  }
  co_return answer;
}

void api::serve_forwarded(proto::HttpForward f, std::function<void(http_answer)> answer) {
  auto target = boost::urls::parse_origin_form(f.target());
  constexpr std::string_view prefix = "/api/v1/sessions/";
  std::string path = target ? target->path() : std::string{};
  if (path.starts_with(kSockets)) {  // the relaying gateway checked the key and the method
    // (One with no key has the API off: it takes no sockets request, relayed or not.)
    if (gw_.config().api_keys.empty()) return answer(error(403, kApiOff));
    auto [sid, action] = session_path(std::string_view{path}.substr(kSockets.size() - 1));
    if (sid != f.sid() || f.method() != socket_method(action))
      return answer(error(400, "a relayed request for no socket"));
    return serve_socket(sid, action, f.body(), std::move(answer));
  }
  if (!path.starts_with(prefix)) return answer(error(400, "a relayed request for no API session"));
  auto [sid, action] = session_path(std::string_view{path}.substr(prefix.size() - 1));
  if (sid != f.sid()) return answer(error(400, "a relayed request for no API session"));
  const auto& m = f.method();
  if (m != "GET" && m != "POST" && m != "DELETE" && m != "GONE") return answer(wrong_method(action));  // relay() sends none of these
  auto session = find(f.sid());
  if (!session) return answer(error(404, kUnknownSession));
  auto ex = session->executor();
  auto served = gw_.link().hand_to(io_executor_of(ex), [this, ex, session, f = std::move(f), answer]() mutable {
    if (f.method() == "GONE") {  // the relaying gateway's client left its poll
      session->poll_gone(f.gone());
      return answer({200, "text/plain; charset=UTF-8", "ok"});
    }
    asio::co_spawn(ex, serve_relayed(std::move(f), answer), [answer](std::exception_ptr e) {
      if (e) answer(error(500, "the relayed request failed"));
    });
  });
  // Its thread is behind (--max-thread-backlog).
  if (!served) answer(error(503, kGatewayBusy));
}

asio::awaitable<void> api::serve_relayed(proto::HttpForward f, std::function<void(http_answer)> answer) {
  // serve_forwarded checked the target: an API session's path.
  http::request<http::string_body> req{http::string_to_verb(f.method()), f.target(), 11};
  req.body() = std::move(*f.mutable_body());
  auto target = boost::urls::parse_origin_form(f.target());
  const std::string path = target->path();
  auto [sid, action] = session_path(std::string_view{path}.substr(std::string_view{"/api/v1/sessions"}.size()));
  auto params = target->params();
  answer(co_await on_session(req, sid, action, params, f.id()));
}

asio::awaitable<http_answer> api::on_session(http::request<http::string_body>& req, std::string_view sid_text,
                                             std::string_view action, const boost::urls::params_view& params,
                                             std::string relay) {
  auto ex = co_await asio::this_coro::executor;
  auto session = find(std::string{sid_text});
  if (!session) co_return error(404, kUnknownSession);
  auto slot = std::make_shared<reply_slot>(ex);
  if (action.empty() && req.method() == http::verb::delete_) {
    asio::post(session->executor(), [session, slot] {
      session->remove();
      slot->complete({204, "application/json", ""});
    });
  } else if (action == "emit" && req.method() == http::verb::post) {
    auto body = parse_object(req.body());
    if (!body) co_return body.error();
    if (auto refused = unknown_key(*body, {"event", "data", "ack"})) co_return *refused;
    auto* event = body->if_contains("event");
    if (!event || !event->is_string() || socketio::is_reserved_event(event->as_string()))
      co_return error(400, "event must be a non-reserved string");
    std::string data;
    if (body->contains("data")) data = codec_detail::member_text(req.body(), "data");  // byte for byte
    bool ack = false;
    if (auto* a = body->if_contains("ack")) {
      if (!a->is_bool()) co_return error(400, "ack must be true or false");
      ack = a->as_bool();
    }
    asio::post(session->executor(), [session, slot, name = std::string{event->as_string()}, data = std::move(data), ack]() mutable {
      session->emit(std::move(name), std::move(data), ack, slot);
    });
  } else if (action == "events" && req.method() == http::verb::get) {
    std::chrono::milliseconds timeout{25000};
    if (auto it = params.find("timeout"); it != params.end()) {
      // All of it a number ("10abc" is no more 10 ms than it is 10 s).
      std::string text = (*it).value;
      long ms = 0;
      auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), ms);
      if (text.empty() || ec != std::errc{} || end != text.data() + text.size())
        co_return error(400, "timeout must be milliseconds");
      timeout = std::chrono::milliseconds(std::clamp(ms, 0L, 60000L));
    }
    asio::post(session->executor(), [session, slot, timeout, relay = std::move(relay)]() mutable {
      session->poll(timeout, slot, std::move(relay));
    });
  } else {
    co_return wrong_method(action);
  }
  co_return co_await slot->wait();
}

std::optional<http_answer> api::refuse_key(const request& req) const {
  const auto& keys = gw_.config().api_keys;
  if (keys.empty()) return error(403, kApiOff);
  // The scheme is case-insensitive (RFC 9110, 11.1), spaces after it are not part of the key.
  std::string_view given = req[http::field::authorization];
  if (given.size() > 6 && boost::beast::iequals(given.substr(0, 6), "Bearer") && (given[6] == ' ' || given[6] == '\t'))
    given.remove_prefix(std::min(given.size(), given.find_first_not_of(" \t", 6)));
  else
    given = req["X-API-Key"];
  bool ok = false;
  for (const auto& k : keys) ok |= same_key(given, k);
  if (!ok) return error(401, "missing or wrong API key");
  return std::nullopt;
}

http_answer api::publish(const http::request<http::string_body>& req) {
  if (auto refused = refuse_key(req)) return *refused;
  auto body = parse_object(req.body());
  if (!body) return body.error();
  // A misspelt key ("room" as "rooms", "except" as "exclude") would be
  // ignored: the event would go where it was not meant to.
  if (auto refused = unknown_key(*body, {"event", "data", "args", "sid", "room", "broadcast", "nsp", "except"}))
    return *refused;
  if (body->contains("data") && body->contains("args")) return error(400, "give data or args, not both");
  auto* event = body->if_contains("event");
  // A reserved name (connect, disconnect, ...) would be dropped by every
  // gateway as bad_event after a 202: say so now.
  if (!event || !event->is_string() || socketio::is_reserved_event(event->as_string()))
    return error(400, "event must be a non-reserved string");
  proto::Envelope env;
  auto* e = env.mutable_emit();
  // A sid's own namespace when none is given (its gateway knows it), "/"
  // for a room or a broadcast.
  auto nsp = namespace_of(*body, body->contains("sid") ? "" : "/");
  if (!nsp) return error(400, "bad nsp");
  e->set_nsp(std::move(*nsp));
  e->set_event(std::string{event->as_string()});
  if (auto* args = body->if_contains("args")) {
    if (!args->is_array()) return error(400, "args must be an array");
    e->set_args(std::string{codec_detail::member_text(req.body(), "args")});  // byte for byte
  } else if (body->contains("data")) {
    e->set_args("[" + std::string{codec_detail::member_text(req.body(), "data")} + "]");
  } else {
    e->set_args("[]");
  }
  auto to = target_of(*body, true);
  if (to.refused) return std::move(*to.refused);
  if (to.kind == publish_target::sid) e->set_sid(std::move(to.name));
  else if (to.kind == publish_target::room) e->set_room(std::move(to.name));
  else e->set_broadcast(true);
  if (auto* except = body->if_contains("except")) {
    if (!except->is_array()) return error(400, "except must be an array of sids");
    for (const auto& s : except->as_array()) {
      if (!s.is_string()) return error(400, "except must be an array of sids");
      e->add_except_sids(std::string{s.as_string()});
    }
  }
  e->set_origin(gw_.link().id());
  if (!gw_.link().send(env)) return error(503, kGatewayBusy);
  gw_.metrics().api_in.Increment();
  return json_answer(202, json::object{{"ok", true}});
}

// A room-wide Control (every socket of the namespace in a room, or all of
// them, joins or leaves a room, or is disconnected), published as a room
// publish is: each gateway applies it to the members it has when it
// arrives, after the events published before it. 202: on its way.
http_answer api::rooms(const request& req, std::string_view action) {
  if (auto refused = refuse_key(req)) return *refused;
  auto what = socket_action(action);
  if (!what) return error(404, "no such action");
  if (req.method() != http::verb::post) return not_allowed("POST", "use POST");
  auto body = parse_object(req.body());
  if (!body) return body.error();
  std::string_view named = *what == proto::Control::JOIN ? "join" : *what == proto::Control::LEAVE ? "leave" : "";
  auto unknown = named.empty() ? unknown_key(*body, {"nsp", "room", "broadcast"})
                               : unknown_key(*body, {"nsp", "room", "broadcast", named});
  if (unknown) return std::move(*unknown);
  auto nsp = namespace_of(*body, "/");
  if (!nsp) return error(400, "bad nsp");
  auto to = target_of(*body, false);
  if (to.refused) return std::move(*to.refused);
  bool in_room = to.kind == publish_target::room;
  proto::Envelope env;
  auto* c = env.mutable_control();
  c->set_action(*what);
  c->set_nsp(std::move(*nsp));
  if (!named.empty()) {
    // A leave that names no room: the room itself (everyone leaves it).
    auto* room = body->if_contains(named);
    if (!room && *what == proto::Control::LEAVE && in_room) c->set_room(to.name);
    else if (room && room->is_string() && !room->as_string().empty()) c->set_room(std::string{room->as_string()});
    else return error(400, std::string{named} + " must be a non-empty string");
    // Refused by every gateway, member by member: say so now.
    if (*what == proto::Control::JOIN && c->room().size() > gw_.config().max_room_bytes)
      return error(400, report_of(control_outcome::long_room).second);
  }
  if (in_room) c->set_in_room(std::move(to.name));
  else c->set_in_namespace(true);
  c->set_origin(gw_.link().id());
  if (!gw_.link().send(env)) return error(503, kGatewayBusy);
  gw_.metrics().api_in.Increment();
  return json_answer(202, json::object{{"ok", true}});
}

// No action: the socket's namespace and rooms. Else a worker's Control,
// from HTTP: the socket joins or leaves a room, or is disconnected, and the
// answer says it is done (a publish to the room after it reaches the
// socket) or why not.
void api::serve_socket(std::string_view sid, std::string_view action, std::string_view body_text,
                       std::function<void(http_answer)> answer) {
  if (action.empty()) {
    auto described = gw_.link().describe(std::string{sid}, [answer, sid = std::string{sid}](auto info) {
      if (!info) return answer(error(404, "unknown sid"));
      json::array rooms;
      for (auto& room : info->rooms) rooms.emplace_back(std::move(room));
      answer(json_answer(200, json::object{{"sid", sid}, {"nsp", info->nsp}, {"rooms", std::move(rooms)}}));
    });
    if (!described) answer(error(503, kGatewayBusy));
    return;
  }
  auto what = socket_action(action);
  if (!what) return answer(error(404, "no such action"));
  auto body = parse_object(body_text);
  if (!body) return answer(body.error());
  proto::Control c;
  c.set_action(*what);
  c.set_sid(std::string{sid});
  if (*what == proto::Control::DISCONNECT) {
    if (auto refused = unknown_key(*body, {})) return answer(std::move(*refused));
  } else {
    if (auto refused = unknown_key(*body, {"room"})) return answer(std::move(*refused));
    auto* room = body->if_contains("room");
    if (!room || !room->is_string() || room->as_string().empty())
      return answer(error(400, "room must be a non-empty string"));
    c.set_room(std::string{room->as_string()});
  }
  auto done = [answer](control_outcome outcome) {
    switch (outcome) {
      case control_outcome::applied: return answer(json_answer(200, json::object{{"ok", true}}));
      case control_outcome::unknown_sid: return answer(error(404, "unknown sid"));
      case control_outcome::room_limit: return answer(error(409, report_of(outcome).second));
      case control_outcome::long_room: return answer(error(400, report_of(outcome).second));
      case control_outcome::thread_behind: return answer(error(503, report_of(outcome).second));
      // Not from here: the API's Control names no namespace, and its action
      // was checked above.
      case control_outcome::other_namespace:
      case control_outcome::no_such_action: break;
    }
    answer(error(500, report_of(outcome).second));
  };
  if (!gw_.link().control(std::move(c), std::move(done))) return answer(error(503, kGatewayBusy));
  gw_.metrics().api_in.Increment();
}

}  // namespace sidecast::gateway
