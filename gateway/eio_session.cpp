#include "gateway/eio_session.hpp"

#include <array>
#include <charconv>

#include <boost/json.hpp>
#include <spdlog/spdlog.h>

#include "gateway/client_socket.hpp"
#include "gateway/gateway.hpp"

namespace sidecast::gateway {

namespace json = boost::json;
using clock = std::chrono::steady_clock;

namespace {

// A polling GET answered with a noop packet: its client polls again.
http_answer noop_answer() { return {200, "text/plain; charset=UTF-8", "6"}; }

// Reply args must be a JSON array for an ACK; anything else is wrapped.
std::string as_array(std::string&& args) {
  auto first = args.find_first_not_of(" \t\r\n");
  if (first != std::string::npos && args[first] == '[') return std::move(args);
  if (first == std::string::npos) return "[]";
  return "[" + args + "]";
}

// An event kept for connection-state recovery, with the number of the
// session send that carried it (eio_session::sent()).
struct replay_entry {
  std::uint64_t seq;
  std::shared_ptr<const outbound_event> ev;
};

// One socket's replay events, counted in the gateway's gauge.
class replay_buffer {
 public:
  replay_buffer(prometheus::Gauge& held, prometheus::Counter& overflow) : held_{held}, overflow_{overflow} {}
  ~replay_buffer() { held_.Decrement(static_cast<double>(events_.size())); }
  replay_buffer(const replay_buffer&) = delete;
  replay_buffer& operator=(const replay_buffer&) = delete;

  void drop_through(std::uint64_t confirmed) {
    while (!events_.empty() && events_.front().seq <= confirmed) pop();
    if (events_.empty()) events_ = {};  // an idle socket keeps no block
  }
  /// At most `limit` events and `limit_bytes` of them (an event another
  /// socket keeps too counts in each). `away`: the client's transport is
  /// gone, so what gives way is lost to it unless it comes back (counted);
  /// on a live socket it was most likely received, and only a recovery
  /// from before it would not be whole.
  void push(replay_entry e, std::size_t limit, std::size_t limit_bytes, bool away) {
    bytes_ += size_of(*e.ev);
    events_.push_back(std::move(e));
    held_.Increment();
    while (!events_.empty() && (events_.size() > limit || bytes_ > limit_bytes)) {
      // The client may not have seen it: a recovery from before it is no
      // longer whole (see lost()).
      if (away) overflow_.Increment();
      lost_ = std::max(lost_, events_.front().ev->offset());
      pop();
    }
  }
  boost::container::devector<replay_entry> take() {
    held_.Decrement(static_cast<double>(events_.size()));
    bytes_ = 0;
    return std::exchange(events_, {});
  }
  /// The offset of the newest event given up unconfirmed (0: none): a client
  /// that saw less has a gap no replay can fill.
  std::uint64_t lost() const { return lost_; }

 private:
  static std::size_t size_of(const outbound_event& ev) {
    std::size_t n = ev.event().size() + ev.args().size();
    for (const auto& a : ev.attachments()) n += a.size();
    return n;
  }
  void pop() {
    bytes_ -= size_of(*events_.front().ev);
    events_.pop_front();
    held_.Decrement();
  }
  prometheus::Gauge& held_;
  prometheus::Counter& overflow_;
  boost::container::devector<replay_entry> events_;
  std::size_t bytes_ = 0;  // size_of() each of events_
  std::uint64_t lost_ = 0;
};

// What a parked socket hands to the one that recovers it.
struct replay_handover {
  boost::container::devector<replay_entry> events;
  std::uint64_t lost = 0;  // replay_buffer::lost()
  bool gap = false;        // it dropped an event it could not keep (one wanting an ack)
  std::map<std::uint64_t, std::string> acks;  // emits awaiting the client's ack: its ack id -> the worker's
  std::uint64_t next_ack = 0;
  bool kicked = false;  // a worker disconnected it while it was being taken over
};

}  // namespace

// One Socket.IO namespace socket on an Engine.IO session.
class sio_socket : public client_socket {
 public:
  /// `sid` and `pid` are given when the socket recovers an earlier one.
  sio_socket(std::shared_ptr<eio_session> eio, std::string nsp, std::string service, std::string auth,
             std::string sid = {}, std::string pid = {})
      : client_socket{eio->gw(), eio->executor(), std::move(nsp), std::move(service), std::move(auth), std::move(sid)},
        eio_{eio},
        recoverable_{gw_.recovery_for(this->nsp())},
        pid_{recoverable_ && pid.empty() ? gw_.new_sid() : std::move(pid)},
        expiry_{io_executor_of(eio->executor())} {}

  // ---- connection-state recovery ----

  /// Connected in a namespace with recovery: worth keeping when the transport drops.
  bool recoverable() const { return recoverable_ && connected() && !detached_; }
  /// Connected, or taking over a socket that was (connection-state recovery).
  bool joined() const { return connected() || recovering_; }
  const std::string& pid() const { return pid_; }

  /// The transport is gone: keep the sid, its rooms and what it is sent
  /// (up to --recovery-buffer events) for --recovery-window, then give up.
  /// It keeps the places its session held under the connection limits
  /// (per address too) until then, so dropping transports on purpose
  /// cannot pile up parked sockets past them.
  void detach(std::array<std::shared_ptr<void>, 2> places) {
    detached_ = true;
    places_ = std::move(places);
    release_held();
    eio_.reset();
    gw_.park(pid_, std::static_pointer_cast<client_socket>(shared_from_this()));
    expire_at(clock::now() + gw_.config().recovery_window);
  }

  /// A recovery that took this socket out of the table failed before the
  /// take-over (the bridge was full): it goes back, with the time it had
  /// left. From another thread: its expiry may have fired meanwhile, found
  /// it gone from the table and stood down, so it is set again here.
  void repark() {
    gw_.park(pid_, std::static_pointer_cast<client_socket>(shared_from_this()));
    boost::asio::post(executor(), [self = std::static_pointer_cast<sio_socket>(shared_from_this())] {
      if (self->closed()) return;
      if (self->kicked_) return self->end_parked(self->kick_reason());
      // The gateway began to stop meanwhile: it keeps nothing for recovery.
      if (self->gw_.draining()) return self->end_parked("server shutting down");
      if (!self->expiry_set_) self->expire_at(self->parked_until_);
    });
  }

  /// The client answered a ping: it has seen the session's first
  /// `through` sends (the pong came back on the same ordered stream).
  void confirmed(std::uint64_t through) { replay_.drop_through(through); }


  /// This (new) socket takes over `old`, parked on its own thread: the
  /// bridge moves the sid here, then `old` hands its events over.
  void recover(std::shared_ptr<sio_socket> old, std::uint64_t offset) {
    recovering_ = true;
    took_over(*old);  // its user was set when old connected, never changed since
    std::weak_ptr<sio_socket> self = std::static_pointer_cast<sio_socket>(shared_from_this());
    bool queued = gw_.link().attach(sid(), nsp(), self, [old, self, offset] {
      // On the bridge thread, after the swap: every delivery to `old` was
      // posted before this.
      boost::asio::post(old->executor(), [old, self, offset] {
        auto handed = old->hand_over();
        if (auto fresh = self.lock())
          boost::asio::post(fresh->executor(), [fresh, handed = std::move(handed), offset]() mutable {
            fresh->resume(std::move(handed), offset);
          });
      });
    });
    if (!queued) {
      old->repark();
      on_connect_answer(gateway_busy());
    }
  }

  void on_event(socketio::packet p, std::vector<std::string> attachments) {
    auto split = socketio::split_event_owned(std::move(p.data));
    if (!split) return;
    gw_.metrics().sio_in.Increment();
    std::uint64_t tag = 0;
    if (p.id) {
      tag = ++next_tag_;
      acks_.push_back(ack_entry{tag, *p.id, std::nullopt, clock::now()});
      if (acks_.size() > gw_.config().max_pending_acks) {
        gw_.metrics().ack_limit.Increment();
        acks_.back().reply = failure(proto::BUSY, "too many events waiting for their ack");
        flush_acks();
        return;
      }
    }
    if (!send_event(std::move(split->first), std::move(split->second), std::move(attachments), tag) && tag)
      on_reply(tag, gateway_busy());
  }

  /// Whether another event wanting an ack may wait in line (answered or
  /// refused, each in its place): fewer than twice --max-pending-acks do.
  bool ack_room() const { return acks_.size() < 2 * gw_.config().max_pending_acks; }

  // An event dropped here (rate limit): its ack, if it wants one, is an
  // error, in its place among the others.
  void refuse_event(const socketio::packet& p, std::string message) {
    if (!p.id) return;
    acks_.push_back(ack_entry{++next_tag_, *p.id, failure(proto::BUSY, std::move(message)), clock::now()});
    flush_acks();
  }

  // The socket is over: what waits for it will not reach the client. Each
  // early event is counted (and its ack refused), and each emit awaiting
  // the client's ack is answered to its worker now, not at its timeout.
  void give_up(const char* why) {
    drop_early(why);
    for (auto& [id, ack] : std::exchange(server_acks_, {})) refuse_ack(std::move(ack), proto::UNAVAILABLE, why);
  }

  void on_end() override {
    places_ = {};
    release_held();
    give_up("the client is gone");
    // Ended while it took a parked socket over: what came meanwhile never
    // reaches the client.
    gw_.metrics().undelivered.Increment(static_cast<double>(pending_.size()));
    pending_ = {};
  }

  void on_ack(socketio::packet p, std::vector<std::string> attachments) {
    auto it = server_acks_.find(*p.id);
    if (it == server_acks_.end()) return;  // unknown or expired: ignored, as Socket.IO does
    proto::Envelope env;
    auto* r = env.mutable_reply();
    r->set_id(std::move(it->second));
    r->set_args(std::move(p.data));
    for (auto& a : attachments) r->add_attachments(std::move(a));
    server_acks_.erase(it);
    gw_.link().send(env);
  }

  // ---- client_sink ----

  const char* deliver(std::shared_ptr<const outbound_event> ev, std::string ack_id) override {
    if (closed()) return drop_event(std::move(ack_id), "the client is gone");
    if (recovering_) {
      // Arrived for the sid after the take-over, before the old socket's
      // events: sent after them (as many as --recovery-buffer). An ack
      // cannot wait across the replay.
      // Either drop is a gap: the client is then told it did not recover.
      if (!ack_id.empty()) {
        gap_ = true;
        return drop_event(std::move(ack_id), "the client is recovering its connection");
      }
      if (pending_.size() >= gw_.config().recovery_buffer) {
        gap_ = true;
        return drop_event({}, "the replay buffer is full");
      }
      pending_.push_back(std::move(ev));
      return nullptr;
    }
    if (!connected()) return hold_early(std::move(ev), std::move(ack_id));  // the connect hook runs
    auto eio = eio_.lock();
    bool kept = false;  // for replay: the client gets it when it comes back, if not now
    if (ack_id.empty() && recoverable_) {
      remember(ev, eio.get());
      kept = true;
      if (detached_) return nullptr;
    }
    if (!eio) {
      if (kept) return nullptr;  // remembered for the client's return
      if (detached_) gap_ = true;  // wanted an ack: not kept, so its return is not whole
      return drop_event(std::move(ack_id), "the client's connection is gone");
    }
    gw_.metrics().sio_out.Increment();
    if (ack_id.empty()) {
      if (send_shared(*eio, ev) || kept) return nullptr;
      return drop_event({}, "the client's connection is gone or too far behind");
    }
    socketio::packet p;
    p.type = ev->attachments().empty() ? socketio::packet_type::event : socketio::packet_type::binary_event;
    p.nsp = nsp();
    p.id = ++next_server_ack_;
    p.data = socketio::join_event(ev->event(), ev->args());
    p.attachments = ev->attachments().size();
    if (!eio->send_socketio(p, ev->attachments()))
      return drop_event(std::move(ack_id), "the client's connection is gone or too far behind");
    if (server_acks_.size() >= gw_.config().max_awaited_acks) {
      // The oldest (ids grow) gives way: its worker hears so at once.
      auto oldest = server_acks_.begin();
      gw_.metrics().undelivered.Increment();
      refuse_ack(std::move(oldest->second), proto::TIMEOUT, "the client has too many acks outstanding");
      server_acks_.erase(oldest);
    }
    server_acks_.emplace(*p.id, std::move(ack_id));
    return nullptr;
  }

  void shut_down() override {
    if (detached_) end_parked("server shutting down");  // no client can come back to it now
  }

  void on_token_expired() override {
    // Parked: it ends (no recovery into it); taken out of the table by a
    // recovery on another thread, the socket recovering it has a token of
    // its own and its own timer: nothing is handed on.
    if (detached_) return end_parked(kick_reason());
    client_socket::on_token_expired();
  }

  void deliver_disconnect() override {
    if (detached_) {
      // Parked: the worker's kick ends it now (no recovery into it). Out
      // of the table, it is being recovered on another thread: the socket
      // that takes over (or this one, put back) is kicked instead.
      kicked_ = true;
      end_parked(kick_reason());
      return;
    }
    if (!connected()) {
      hold_kick();
      return;
    }
    if (auto eio = eio_.lock()) {
      socketio::packet p;
      p.type = socketio::packet_type::disconnect;
      p.nsp = nsp();
      eio->send_socketio(p);
      end(kick_reason());
      eio->forget(nsp());
    }
  }

 protected:
  void on_connect_answer(reply_data reply) override {
    auto eio = eio_.lock();
    if (!eio) return give_up("the client's connection is gone");
    socketio::packet p;
    p.nsp = nsp();
    if (reply.code != proto::OK) {
      p.type = socketio::packet_type::connect_error;
      p.data = json::serialize(json::object{{"message", connect_error_message(reply)}});
      eio->send_socketio(p);
      eio->forget(nsp());
      return give_up("the client's connect was refused");
    }
    mark_connected();
    eio->joined_namespace();
    p.type = socketio::packet_type::connect;
    json::object answer{{"sid", sid()}};
    if (recoverable_) answer["pid"] = pid_;
    p.data = json::serialize(answer);
    eio->send_socketio(p);
    release_early();
  }

  void on_reply(std::uint64_t tag, reply_data reply) override {
    if (acks_.empty() || tag < acks_.front().tag) return;
    auto index = tag - acks_.front().tag;
    if (index >= acks_.size()) return;
    auto& entry = acks_[index];
    entry.reply = std::move(reply);
    if (index > 0) {
      // Behind an event still unanswered: kept, and counted, until it goes.
      entry.held = entry.reply->args.size() + entry.reply->message.size();
      for (const auto& a : entry.reply->attachments) entry.held += a.size();
      held_bytes_ += entry.held;
      if (auto eio = eio_.lock(); eio && !eio->hold_replies(entry.held)) return;  // closed: a slow consumer
    }
    flush_acks();
  }

 private:
  struct ack_entry {
    std::uint64_t tag;
    std::uint64_t client_id;
    std::optional<reply_data> reply;
    clock::time_point sent;
    std::size_t held = 0;  // its reply's bytes counted in held_bytes_ (eio_session::hold_replies)
  };

  // The replies kept in line no longer count against the session's bound.
  void release_held() {
    if (auto eio = eio_.lock()) eio->release_replies(held_bytes_);
    held_bytes_ = 0;
    for (auto& entry : acks_) entry.held = 0;
  }

  static reply_data failure(proto::Code code, std::string message) { return {code, std::move(message)}; }

  // Acks leave in the order their events arrived.
  void flush_acks() {
    auto eio = eio_.lock();
    while (!acks_.empty() && acks_.front().reply) {
      auto entry = std::move(acks_.front());
      acks_.pop_front();
      if (entry.held) {
        held_bytes_ -= entry.held;
        if (eio) eio->release_replies(entry.held);
      }
      if (!eio) continue;
      auto& reply = *entry.reply;
      gw_.metrics().ack_latency.Observe(std::chrono::duration<double>(clock::now() - entry.sent).count());
      if (reply.code == proto::OK && reply.silent) continue;
      socketio::packet p;
      p.nsp = nsp();
      p.id = entry.client_id;
      std::vector<std::string> attachments;
      if (reply.code == proto::OK) {
        p.data = as_array(std::move(reply.args));
        attachments = std::move(reply.attachments);
      } else {
        p.data = error_args(reply);
      }
      p.type = attachments.empty() ? socketio::packet_type::ack : socketio::packet_type::binary_ack;
      p.attachments = attachments.size();
      eio->send_socketio(p, attachments);
      give_back(std::move(p.data));  // for the bridge's next reply (see spare_text())
    }
    if (acks_.empty()) acks_ = {};  // an idle socket keeps no block
  }

  // The event frame shared by every receiver of a broadcast, encoded once
  // (with the offset in namespaces with recovery).
  bool send_shared(eio_session& eio, const std::shared_ptr<const outbound_event>& ev) {
    frames message{frame{shared_bytes{ev, ev->socketio_frame(recoverable_)}, false}};
    for (const auto& a : ev->attachments()) message.push_back(frame{shared_bytes{ev, a}, true});
    return eio.send(std::move(message));
  }

  // Keeps an event for replay until the client has surely seen it (see
  // confirmed()), so a live socket keeps about one ping period of events,
  // not the whole bound.
  void remember(const std::shared_ptr<const outbound_event>& ev, const eio_session* eio) {
    // The frame about to be sent gets number sent() + 1; on a closed
    // session sent() stops, so nothing recorded after it is ever confirmed.
    const auto& c = gw_.config();
    replay_.push(replay_entry{eio ? eio->sent() + 1 : std::uint64_t(-1), ev}, c.recovery_buffer, c.recovery_buffer_bytes,
                 !eio);
  }

  // Parked until `until`: then, if it is still in the table, it ends.
  void expire_at(clock::time_point until) {
    parked_until_ = until;
    expiry_set_ = true;
    expiry_.expires_at(until);
    expiry_.async_wait([self = std::static_pointer_cast<sio_socket>(shared_from_this())](boost::system::error_code ec) {
      if (ec) return;
      self->expiry_set_ = false;
      if (self->gw_.unpark(self->pid_) != self) return;  // recovered meanwhile, or being recovered
      self->end("transport close");
    });
  }

  // A parked socket a worker disconnected, or the gateway shutting down:
  // ends, if it is in the table.
  void end_parked(const char* reason) {
    if (gw_.unpark(pid_).get() != this) return;
    expiry_.cancel();
    end(reason);
  }

  /// On the old socket's thread: it ends here, silently; its events go on.
  replay_handover hand_over() {
    hand_off();
    places_ = {};
    expiry_.cancel();
    return {replay_.take(), replay_.lost(), gap_, std::exchange(server_acks_, {}), next_server_ack_, kicked_};
  }

  /// On the new socket's thread: the client learns it recovered, then gets
  /// what it missed (offset past the one it saw), then what came meanwhile.
  /// When events it missed were given up (more than --recovery-buffer came
  /// while it was away), it learns that it did not recover: a CONNECT with
  /// a new pid (socket.recovered false), so the app fetches its state again.
  /// The sid and its rooms stay; only what came since is sent.
  void resume(replay_handover handed, std::uint64_t offset) {
    recovering_ = false;
    auto eio = eio_.lock();
    if (closed() || !eio) {
      // Ended meanwhile (its DISCONNECT sent, see took_over()): the emits
      // awaiting the client's ack will not get it, nor the client what it
      // missed.
      for (auto& [id, ack] : handed.acks) refuse_ack(std::move(ack), proto::UNAVAILABLE, "the client is gone");
      count_unseen(handed.events, offset);
      return;
    }
    mark_connected();
    // The client may still ack what it was sent before the drop.
    server_acks_ = std::move(handed.acks);
    next_server_ack_ = handed.next_ack;
    bool whole = handed.lost <= offset && !handed.gap && !gap_ && !handed.kicked;
    if (whole) gw_.metrics().recovered.Increment();
    else pid_ = gw_.new_sid();
    socketio::packet p;
    p.type = socketio::packet_type::connect;
    p.nsp = nsp();
    p.data = json::serialize(json::object{{"sid", sid()}, {"pid", pid_}});
    eio->send_socketio(p);
    if (!whole) {
      count_unseen(handed.events, offset);  // it starts afresh: what it missed is not sent
    } else {
      for (const auto& e : handed.events) {
        if (e.ev->offset() <= offset) continue;  // the client has it
        remember(e.ev, eio.get());
        send_shared(*eio, e.ev);
      }
    }
    if (handed.kicked || kick_held()) {
      // A worker disconnected the sid while this socket took it over (or
      // this socket's own token expired meanwhile: held, as it was not
      // connected): the client is disconnected as a live socket would be.
      gw_.metrics().undelivered.Increment(static_cast<double>(pending_.size()));
      pending_ = {};
      return deliver_disconnect();
    }
    for (auto& ev : std::exchange(pending_, {})) {
      remember(ev, eio.get());
      send_shared(*eio, ev);
    }
  }

  // Kept events past `offset` (the client has the rest) that it will not get.
  void count_unseen(const boost::container::devector<replay_entry>& events, std::uint64_t offset) {
    auto n = std::count_if(events.begin(), events.end(), [offset](const auto& e) { return e.ev->offset() > offset; });
    gw_.metrics().undelivered.Increment(static_cast<double>(n));
  }

  std::weak_ptr<eio_session> eio_;
  std::size_t held_bytes_ = 0;  // of the replies in acks_ kept behind an unanswered event
  bool recoverable_;
  std::string pid_;
  timer expiry_;
  clock::time_point parked_until_{};
  bool expiry_set_ = false;  // expiry_ waits (this socket's thread only)
  bool kicked_ = false;      // parked, a worker disconnected it
  bool detached_ = false;
  bool recovering_ = false;
  bool gap_ = false;  // parked or recovering, it dropped an event: a recovery is not whole
  std::array<std::shared_ptr<void>, 2> places_;  // while parked: see detach()
  // Events the client may not have seen.
  replay_buffer replay_{gw_.metrics().replay_events, gw_.metrics().replay_overflow};
  std::vector<std::shared_ptr<const outbound_event>> pending_;  // while recovering
  boost::container::devector<ack_entry> acks_;
  std::uint64_t next_tag_ = 0;
  std::map<std::uint64_t, std::string> server_acks_;  // our ack id -> the worker's, oldest first
  std::uint64_t next_server_ack_ = 0;
};

// ---- eio_session ----

eio_session::eio_session(gateway& gw, boost::asio::any_io_executor ex, std::string sid, bool echo)
    : gw_{gw},
      ex_{io_executor_of(ex)},
      sid_{std::move(sid)},
      ping_timer_{ex_},
      events_{gw.config().events_per_second, gw.config().events_burst},
      echo_{echo},
      grace_timer_{ex_},
      upgrade_timer_{ex_},
      connect_timer_{ex_} {}

void eio_session::expect_connect() {
  if (echo_) return;  // a bare Engine.IO session has no namespaces
  connect_timer_.expires_after(gw_.config().connect_timeout);
  // A namespace must be joined by then, not only asked for: a session whose
  // every connect was refused (a bad token, a hook's no) would otherwise
  // stay as long as it answers pings, holding its places under the limits.
  // A connect still waiting for its answer (a slow hook, a worker that is
  // being replaced) is given the time again.
  connect_timer_.async_wait([self = shared_from_this()](boost::system::error_code ec) {
    if (ec || self->closed_) return;
    bool waiting = false;
    for (const auto& [nsp, socket] : self->sockets_) {
      if (socket->joined()) return;
      waiting = true;
    }
    if (waiting) return self->expect_connect();
    self->close("connect timeout");
  });
}

eio_session::~eio_session() = default;

void eio_session::open_polling(std::shared_ptr<reply_slot> handshake) {
  gw_.metrics().polling.Increment();
  const auto& c = gw_.config();
  handshake->complete({200, "text/plain; charset=UTF-8",
                       "0" + engineio::open_payload(sid_, true, static_cast<unsigned>(c.ping_interval.count()),
                                                    static_cast<unsigned>(c.ping_timeout.count()), c.max_payload)});
  schedule_ping();
  expect_connect();
}

void eio_session::open_websocket(std::shared_ptr<ws_conn> ws) {
  transport_ = transport::websocket;
  ws_ = std::move(ws);
  gw_.metrics().websocket.Increment();
  const auto& c = gw_.config();
  send_text("0" + engineio::open_payload(sid_, false, static_cast<unsigned>(c.ping_interval.count()),
                                         static_cast<unsigned>(c.ping_timeout.count()), c.max_payload));
  schedule_ping();
  expect_connect();
}

void eio_session::poll(std::shared_ptr<reply_slot> get) {
  if (closed_) {
    get->complete({400, "application/json", std::string{engineio::error_body(engineio::error_code::session_id_unknown)}});
    return;
  }
  if (transport_ == transport::websocket) {
    get->complete({400, "application/json", std::string{engineio::error_body(engineio::error_code::bad_request)}});
    return;
  }
  if (pending_get_) {
    // Two GETs at once: the protocol's answer is to end the session.
    get->complete({400, "text/plain; charset=UTF-8", ""});
    close("multiple polls");
    return;
  }
  if (client_closing_) {
    // The client closed on another connection that overtook this GET.
    get->complete(noop_answer());
    close("client close");
    return;
  }
  if (probed_) {
    // Upgrading: polling is paused with a noop, after a moment: a GET that the
    // client sent after its "5" (which may still be on its way on the other
    // thread) gets 400 instead, as it would from a single-threaded server.
    hold_get(std::move(get));
    return;
  }
  pending_get_ = std::move(get);
  if (!buffer_.empty()) flush_poll();
}

void eio_session::poll_abandoned() {
  if (closed_ || transport_ != transport::polling || upgrade_started_) return;
  close("poll connection closed prematurely");
}

void eio_session::release_poll() {
  if (closed_ || !pending_get_) return;
  std::exchange(pending_get_, nullptr)->complete(noop_answer());
}

void eio_session::hold_get(std::shared_ptr<reply_slot> get) {
  if (held_get_) std::exchange(held_get_, nullptr)->complete(noop_answer());
  held_get_ = std::move(get);
  grace_timer_.expires_after(std::chrono::milliseconds(50));
  grace_timer_.async_wait([self = shared_from_this()](boost::system::error_code ec) {
    if (!ec && self->held_get_) std::exchange(self->held_get_, nullptr)->complete(noop_answer());
  });
}

void eio_session::post(std::string body, std::shared_ptr<reply_slot> answer) {
  if (closed_) {
    answer->complete({400, "application/json", std::string{engineio::error_body(engineio::error_code::session_id_unknown)}});
    return;
  }
  if (transport_ == transport::websocket) {
    answer->complete({400, "application/json", std::string{engineio::error_body(engineio::error_code::bad_request)}});
    return;
  }
  gw_.metrics().bytes_in.Increment(static_cast<double>(body.size()));
  auto packets = engineio::decode_payload(body);
  if (!packets) {
    gw_.metrics().bad_packet.Increment();
    answer->complete({400, "application/json", std::string{engineio::error_body(engineio::error_code::bad_request)}});
    close("parse error");
    return;
  }
  answer->complete({200, "text/html", "ok"});
  for (auto& p : *packets) {
    if (closed_) break;
    on_packet(std::move(p));
  }
}

void eio_session::upgrade(std::shared_ptr<ws_conn> ws) {
  if (closed_ || probe_ || transport_ == transport::websocket) {
    ws->close();
    return;
  }
  probe_ = std::move(ws);
  // A probe whose "3probe" never reaches its client (a proxy that buffers)
  // would hold polling's deliveries for good: dropped after the timeout.
  upgrade_timer_.expires_after(gw_.config().upgrade_timeout);
  upgrade_timer_.async_wait([self = shared_from_this(), probe = probe_.get()](boost::system::error_code ec) {
    if (ec || self->closed_ || self->probe_.get() != probe) return;
    probe->close();
    self->drop_probe();
  });
}

// The upgrade failed (the probe closed, timed out or sent something other
// than the upgrade's packets): polling carries on, and delivers what waited.
void eio_session::drop_probe() {
  upgrade_timer_.cancel();
  probe_.reset();
  probed_ = false;
  upgrade_started_ = false;
  if (!buffer_.empty() && pending_get_) flush_poll();
}

void eio_session::on_ws_message(const ws_conn* from, std::string data, bool binary) {
  if (closed_) return;
  if (probe_ && from == probe_.get()) {
    if (!binary && data == "2probe") {
      probe_->send(frame{shared_bytes::copy_of("3probe"), false});
      probed_ = true;
      // The pending GET is released with a noop, held briefly like any GET
      // during the upgrade (see poll()).
      if (pending_get_) hold_get(std::exchange(pending_get_, nullptr));
      return;
    }
    if (!binary && data == "5" && probed_) {
      // The upgrade is complete: what waited for polling goes on the socket.
      upgrade_timer_.cancel();
      ws_ = std::move(probe_);
      transport_ = transport::websocket;
      gw_.metrics().polling.Decrement();
      gw_.metrics().websocket.Increment();
      if (pending_get_) std::exchange(pending_get_, nullptr)->complete(noop_answer());
      if (held_get_) {
        grace_timer_.cancel();
        std::exchange(held_get_, nullptr)
            ->complete({400, "application/json", std::string{engineio::error_body(engineio::error_code::bad_request)}});
      }
      frames pending(std::make_move_iterator(buffer_.begin()), std::make_move_iterator(buffer_.end()));
      buffer_ = {};
      buffered_bytes_ = 0;
      if (!pending.empty()) ws_->send(std::move(pending));
      return;
    }
    // Only the probe fails, as in the reference server: the session polls on.
    gw_.metrics().bad_packet.Increment();
    auto probe = probe_;
    drop_probe();
    probe->close();
    return;
  }
  if (!ws_ || from != ws_.get()) return;
  gw_.metrics().bytes_in.Increment(static_cast<double>(data.size()));
  if (binary) {
    on_packet(engineio::decode_binary(data));
    return;
  }
  auto p = engineio::decode_text_owned(std::move(data));
  if (!p) {
    gw_.metrics().bad_packet.Increment();
    close("parse error");
    return;
  }
  on_packet(std::move(*p));
}

void eio_session::on_ws_closed(const ws_conn* from) {
  if (probe_ && from == probe_.get()) {
    drop_probe();  // a failed upgrade: polling carries on
    return;
  }
  if (ws_ && from == ws_.get()) close("transport close");
}

void eio_session::on_packet(engineio::packet p) {
  switch (p.type) {
    case engineio::packet_type::message:
      if (echo_) {
        send({frame{shared_bytes::copy_of(p.binary ? p.data : "4" + p.data), p.binary}});
        return;
      }
      if (p.binary) {
        if (!assembler_ || !assembler_->waiting()) {
          gw_.metrics().bad_packet.Increment();
          close("parse error");
          return;
        }
        auto done = assembler_->add(std::move(p.data));
        if (!done) {
          gw_.metrics().bad_packet.Increment();
          close("parse error");
          return;
        }
        if (*done) {
          auto msg = assembler_->take();
          on_socketio_packet(std::move(msg->header), std::move(msg->attachments));
        }
        return;
      }
      on_socketio(std::move(p.data));
      return;
    case engineio::packet_type::pong:
      if (awaiting_pong_) {
        awaiting_pong_ = false;
        for (auto& [nsp, socket] : sockets_) socket->confirmed(ping_mark_);
        schedule_ping();
      }
      return;
    case engineio::packet_type::ping:
      send_text("3" + p.data);
      return;
    case engineio::packet_type::close:
      if (pending_get_ || transport_ == transport::websocket) {
        if (pending_get_) std::exchange(pending_get_, nullptr)->complete(noop_answer());
        close("client close");
        return;
      }
      // No GET to release yet: one may be on its way on another connection
      // (sent before the close). Give it a moment, then close anyway. The
      // sockets go now: parked for recovery, a client that reconnects
      // within the moment finds them (it got a new sid, and the old socket
      // stayed parked for the whole --recovery-window, still a member of
      // its rooms, its service never told it left).
      release_sockets("client close");
      client_closing_ = true;
      grace_timer_.expires_after(std::chrono::milliseconds(200));
      grace_timer_.async_wait([self = shared_from_this()](boost::system::error_code ec) {
        if (!ec) self->close("client close");
      });
      return;
    case engineio::packet_type::noop:
      return;
    default:
      gw_.metrics().bad_packet.Increment();
      close("parse error");
      return;
  }
}

void eio_session::on_socketio(std::string&& text) {
  if (assembler_ && assembler_->waiting()) {
    gw_.metrics().bad_packet.Increment();
    close("parse error");
    return;
  }
  auto p = socketio::decode_owned(std::move(text), gw_.config().max_attachments);
  if (!p) {
    gw_.metrics().bad_packet.Increment();
    close("parse error");
    return;
  }
  if (p->type == socketio::packet_type::binary_event || p->type == socketio::packet_type::binary_ack) {
    // Only in a namespace the client has joined, as any event (see
    // on_socketio_packet): without one, a client held up to
    // --max-attachments x --max-payload here without any connect.
    if (auto it = sockets_.find(p->nsp); it == sockets_.end() || !it->second->connected()) {
      gw_.metrics().bad_packet.Increment();
      close("parse error");
      return;
    }
    partial_at_ping_ = false;
    if (!assembler_) {
      // Each attachment is a message of its own, bounded by --max-payload
      // (a WebSocket frame, or the POST that carries it), as the reference
      // server bounds each (maxHttpBufferSize): two 600 KB buffers in one
      // emit are taken there. Bounding their sum by it closed the connection.
      const auto& c = gw_.config();
      assembler_ = std::make_unique<socketio::binary_assembler>(c.max_attachments, c.max_attachments * c.max_payload);
    }
    auto started = assembler_->start(std::move(*p));
    if (!started) {
      gw_.metrics().bad_packet.Increment();
      close("parse error");
      return;
    }
    if (*started) {
      auto msg = assembler_->take();
      on_socketio_packet(std::move(msg->header), std::move(msg->attachments));
    }
    return;
  }
  on_socketio_packet(std::move(*p), {});
}

void eio_session::on_socketio_packet(socketio::packet p, std::vector<std::string> attachments) {
  if (p.type == socketio::packet_type::connect) return on_connect(std::move(p));
  auto it = sockets_.find(p.nsp);
  if (it == sockets_.end() || (!it->second->connected() && p.type != socketio::packet_type::disconnect)) {
    // A packet for a namespace the client has not joined ends the connection.
    gw_.metrics().bad_packet.Increment();
    close("parse error");
    return;
  }
  switch (p.type) {
    case socketio::packet_type::event:
    case socketio::packet_type::binary_event:
      if (p.id && !it->second->ack_room()) {
        // Refused events keep their place among the acks, so behind one
        // unanswered event they pile up: a client that has twice
        // --max-pending-acks waiting is flooding, and is cut off.
        gw_.metrics().ack_limit.Increment();
        close("too many events waiting for their ack");
        return;
      }
      if (!events_.take()) {
        gw_.metrics().rate_limited.Increment();
        it->second->refuse_event(p, "rate limited: too many events");
        return;
      }
      it->second->on_event(std::move(p), std::move(attachments));
      return;
    case socketio::packet_type::ack:
    case socketio::packet_type::binary_ack: it->second->on_ack(std::move(p), std::move(attachments)); return;
    case socketio::packet_type::disconnect: {
      auto socket = it->second;
      sockets_.erase(it);
      socket->end("client namespace disconnect");
      return;
    }
    default:
      gw_.metrics().bad_packet.Increment();
      close("parse error");
      return;
  }
}

void eio_session::on_connect(socketio::packet p) {
  socketio::packet refusal;
  refusal.type = socketio::packet_type::connect_error;
  refusal.nsp = p.nsp;
  if (sockets_.contains(p.nsp)) return;  // already connected (or connecting) there: ignored, as ever
  // A CONNECT costs what an event does (a token's check, a hook's request,
  // a refusal written): it takes from the same bucket.
  if (!events_.take()) {
    gw_.metrics().rate_limited.Increment();
    refusal.data = R"({"message":"rate limited: too many connects"})";
    send_socketio(refusal);
    return;
  }
  const auto* service = gw_.service_for(p.nsp);
  if (!service) {
    refusal.data = R"({"message":"Invalid namespace"})";
    send_socketio(refusal);
    return;
  }
  if (sockets_.size() >= gw_.config().max_namespaces) {
    gw_.metrics().namespace_limit.Increment();
    refusal.data = R"({"message":"Too many namespaces"})";
    send_socketio(refusal);
    return;
  }
  // Kept for the socket's life and sent with each of its events: bounded
  // well below --max-payload (a 900 KB auth made each 20-byte event cost
  // 900 KB at the gateway, the broker and the worker).
  if (p.data.size() > gw_.config().max_auth_bytes) {
    gw_.metrics().long_auth.Increment();
    refusal.data = R"j({"message":"auth too large (--max-auth-bytes)"})j";
    send_socketio(refusal);
    return;
  }
  if (gw_.recovery_for(p.nsp) && !p.data.empty()) {
    // A client coming back with {pid, offset} (connection-state recovery).
    boost::system::error_code ec;
    auto auth = socketio::parse_json(p.data, ec);
    const json::object* o = !ec && auth.is_object() ? &auth.as_object() : nullptr;
    auto* pid = o ? o->if_contains("pid") : nullptr;
    auto* offset = o ? o->if_contains("offset") : nullptr;
    // With --jwt-*, a recovery is a connect like any other: a valid token
    // of the kept socket's subject, or a fresh connect (refused with the
    // token's reason). A pid alone would be a bearer credential that
    // outlives the token it was issued under.
    std::optional<std::string> subject;
    std::optional<std::int64_t> token_exp;
    if (gw_.tokens().enabled())
      if (auto claims = gw_.tokens().verify_auth(p.data, std::chrono::system_clock::now())) {
        subject = std::move(claims->subject);
        token_exp = claims->exp;
      }
    if (pid && pid->is_string() && offset && offset->is_string() && (subject || !gw_.tokens().enabled())) {
      std::uint64_t seen = 0;
      auto text = std::string_view{offset->as_string()};
      auto [end, err] = std::from_chars(text.data(), text.data() + text.size(), seen);
      auto old = err == std::errc{} && end == text.data() + text.size()
                     ? std::static_pointer_cast<sio_socket>(
                           gw_.unpark(std::string{pid->as_string()}, p.nsp, subject ? &*subject : nullptr))
                     : nullptr;
      if (old) {
        auto fresh = std::make_shared<sio_socket>(shared_from_this(), p.nsp, old->service(), old->auth(), old->sid(),
                                                  old->pid());
        sockets_.emplace(p.nsp, fresh);
        joined_namespace();  // a recovering socket counts as joined
        fresh->recover(std::move(old), seen);
        if (token_exp) fresh->arm_expiry(*token_exp);  // the new token's: the old one's ended with it
        return;
      }
    }
  }
  auto socket = std::make_shared<sio_socket>(shared_from_this(), p.nsp, *service, p.data.empty() ? "{}" : p.data);
  sockets_.emplace(p.nsp, socket);
  socket->begin_connect();
}

void eio_session::forget(const std::string& nsp) { sockets_.erase(nsp); }

void eio_session::joined_namespace() { connect_timer_.cancel(); }

bool eio_session::send_socketio(const socketio::packet& p, const std::vector<std::string>& attachments) {
  // Encoded into a buffer the thread keeps, then copied into the frame's
  // own block: one allocation for the frame, none for its text.
  thread_local std::string text;
  text.assign(1, '4');
  socketio::encode_to(text, p);
  frames message{frame{shared_bytes::copy_of(text), false}};
  if (text.capacity() > 64 * 1024) text = {};  // a large packet leaves no large buffer behind
  for (const auto& a : attachments) message.push_back(frame{shared_bytes::copy_of(a), true});
  return send(std::move(message));
}

void eio_session::send_text(std::string_view text) { send({frame{shared_bytes::copy_of(text), false}}); }

bool eio_session::send(frames message) {
  if (closed_) return false;
  ++sent_;
  if (transport_ == transport::websocket) return ws_->send(std::move(message));
  for (auto& f : message) {
    buffered_bytes_ += f.data.size();
    buffer_.push_back(std::move(f));
  }
  const auto& c = gw_.config();
  if (buffer_.size() > c.outbound_messages || buffered_bytes_ > c.outbound_bytes) {
    // A poller this far behind is gone or too slow: cap its buffer by closing.
    gw_.metrics().slow_consumer.Increment();
    close("slow consumer");
    return false;
  }
  if (pending_get_ && !probed_) flush_poll();
  return true;
}

bool eio_session::hold_replies(std::size_t bytes) {
  if (closed_) return false;
  held_replies_ += bytes;
  if (held_replies_ + buffered_bytes_ <= gw_.config().outbound_bytes) return true;
  gw_.metrics().slow_consumer.Increment();
  close("slow consumer");
  return false;
}

void eio_session::flush_poll() {
  std::string body;
  std::size_t limit = gw_.config().max_payload;
  while (!buffer_.empty()) {
    auto& f = buffer_.front();
    std::string encoded;
    std::string_view segment = f.data.view();
    if (f.binary) segment = encoded = "b" + engineio::base64_encode(segment);
    if (!body.empty() && body.size() + 1 + segment.size() > limit) break;
    if (!body.empty()) body += engineio::payload_separator;
    body += segment;
    buffered_bytes_ -= f.data.size();
    buffer_.pop_front();
  }
  if (buffer_.empty()) buffer_ = {};
  gw_.metrics().bytes_out.Increment(static_cast<double>(body.size()));
  // Not taken: the GET's client left as it was answered (http_session.cpp).
  // What it carried is lost, so the session ends, even while it upgrades
  // (sockets of a recovery namespace are kept, their events with them).
  auto lost = [self = shared_from_this()](bool taken) {
    if (!taken) boost::asio::post(self->ex_, [self] { self->close("poll connection closed prematurely"); });
  };
  std::exchange(pending_get_, nullptr)->complete({200, "text/plain; charset=UTF-8", std::move(body)}, std::move(lost));
}

void eio_session::schedule_ping() {
  ping_timer_.expires_after(gw_.config().ping_interval);
  ping_timer_.async_wait(exact([self = shared_from_this()](boost::system::error_code ec) {
    if (ec || self->closed_) return;
    self->after_ping();
  }));
}

void eio_session::after_ping() {
  // A binary packet still short of attachments a whole ping interval after
  // the last ping found it so: its client holds what came of it (up to
  // --max-attachments x --max-payload) while it answers pings. A client
  // sends the attachments right after their packet.
  if (assembler_ && assembler_->waiting()) {
    if (partial_at_ping_) {
      gw_.metrics().bad_packet.Increment();
      close("parse error");
      return;
    }
    partial_at_ping_ = true;
  }
  ping_mark_ = sent_;
  send_text("2");
  awaiting_pong_ = true;
  ping_timer_.expires_after(gw_.config().ping_timeout);
  ping_timer_.async_wait(exact([self = shared_from_this()](boost::system::error_code ec) {
    if (ec || self->closed_ || !self->awaiting_pong_) return;
    self->gw_.metrics().ping_timeouts.Increment();
    self->close("ping timeout");
  }));
}

// Each namespace socket parked for recovery if it may be, else ended.
void eio_session::release_sockets(const char* reason) {
  for (auto& [nsp, socket] : std::exchange(sockets_, {})) {
    if (socket->recoverable() && !gw_.draining())  // a stopping gateway keeps nothing for recovery
      socket->detach({slot_, ws_ ? ws_->place() : nullptr});
    else socket->end(reason);
  }
}

void eio_session::close(const char* reason) {
  if (closed_) return;
  closed_ = true;
  ping_timer_.cancel();
  grace_timer_.cancel();
  upgrade_timer_.cancel();
  connect_timer_.cancel();
  if (held_get_) std::exchange(held_get_, nullptr)->complete({200, "text/plain; charset=UTF-8", "1"});
  release_sockets(reason);
  gw_.remove_session(sid_);
  if (transport_ == transport::websocket) {
    gw_.metrics().websocket.Decrement();
    if (ws_) ws_->close();
  } else {
    gw_.metrics().polling.Decrement();
    if (pending_get_) std::exchange(pending_get_, nullptr)->complete({200, "text/plain; charset=UTF-8", "1"});
  }
  if (probe_) probe_->close();
  buffer_.clear();
}

}  // namespace sidecast::gateway
