#include "gateway/ws_session.hpp"

#include <utility>

#include <boost/json.hpp>

#include "gateway/codec/ws_json.hpp"

namespace sidecast::gateway {

namespace json = boost::json;

ws_session::ws_session(gateway& gw, std::shared_ptr<ws_conn> ws, std::string nsp, std::string service,
                       std::string auth)
    : client_socket{gw, ws->executor(), std::move(nsp), std::move(service), std::move(auth)},
      ws_{std::move(ws)},
      keepalive_{ws_->executor()},
      events_{gw.config().events_per_second, gw.config().events_burst} {}

void ws_session::start() {
  started_ = true;
  gw_.metrics().plain_ws.Increment();
  begin_connect();
  // Not for a connect refused at once (a bad token, a full bridge): the
  // timer would keep the closed session, and its connection, a whole interval.
  if (!closed()) keep_alive(std::chrono::steady_clock::now() + gw_.config().ping_interval);
}

// A ping at `ping_at`; its pong (or any frame) awaited --ping-timeout; the
// next ping an interval after this one, whatever the pong's time.
void ws_session::keep_alive(std::chrono::steady_clock::time_point ping_at) {
  keepalive_.expires_at(ping_at);
  keepalive_.async_wait([self = std::static_pointer_cast<ws_session>(shared_from_this())](boost::system::error_code ec) {
    if (ec || self->closed()) return;
    // A fragmented message still unfinished a whole interval after the last
    // ping found it so: every frame keeps the connection alive (pings
    // too), and its fragments (up to --max-payload) would be held for good.
    // A client sends a message's fragments one after the other.
    auto partial = self->ws_->assembling();
    if (partial && partial == self->partial_at_ping_) {
      self->gw_.metrics().bad_frame.Increment();
      self->end("message left unfinished");
      self->ws_->close();
      return;
    }
    self->partial_at_ping_ = partial;
    auto before = self->ws_->frames_in();
    auto sent = std::chrono::steady_clock::now();
    if (self->ws_->send_ping()) self->await_pong(before, sent);
  });
}

void ws_session::await_pong(std::uint64_t frames_before, std::chrono::steady_clock::time_point sent) {
  keepalive_.expires_at(sent + gw_.config().ping_timeout);
  keepalive_.async_wait([self = std::static_pointer_cast<ws_session>(shared_from_this()), frames_before,
                         sent](boost::system::error_code ec) {
    if (ec || self->closed()) return;
    if (self->ws_->frames_in() != frames_before) return self->keep_alive(sent + self->gw_.config().ping_interval);
    self->gw_.metrics().ping_timeouts.Increment();
    self->end("ping timeout");
    self->ws_->close();
  });
}

void ws_session::send_text(std::string text) {
  gw_.metrics().ws_out.Increment();
  ws_->send(frame{shared_bytes::copy_of(text), false});
}

void ws_session::send_error(std::string_view id_json, std::string message) {
  send_text(ws_json::encode_reply(id_json, {}, message));
}

void ws_session::on_message(std::string data, bool binary) {
  if (closed()) return;
  gw_.metrics().ws_in.Increment();
  // Every frame takes from --events-per-second, a refused one too: an
  // error is answered only while the bucket lasts, so a client that sends
  // garbage cannot make the gateway write a frame for each of its own.
  bool allowed = events_.take();
  if (!allowed) gw_.metrics().rate_limited.Increment();
  if (binary) {
    if (allowed) send_error({}, "binary frames are not supported on /ws");
    return;
  }
  auto f = ws_json::decode(data);
  if (!f) {
    gw_.metrics().bad_packet.Increment();
    if (allowed) send_error({}, "bad frame: " + f.error().message());
    return;
  }
  if (!allowed) {
    // Answered only when it asked for a reply: one without an id has no
    // answer to wait for, and writing one for each would let garbage-like
    // traffic have the gateway write a frame per frame.
    if (f->id) send_error(*f->id, "rate limited: too many events");
    return;
  }
  if (!connected()) {
    // The connect hook runs: a client that sends as soon as its socket
    // opens is not refused for it. Its frames wait, in order, up to a bound
    // in frames and one in bytes (one frame's worth, --max-payload: the
    // token bucket does not bound what a slow hook lets pile up).
    auto bytes = f->event.size() + f->data.size() + f->id.value_or("").size();
    if (early_in_.size() < gw_.config().max_early_frames &&
        bytes <= gw_.config().max_payload - std::min(early_in_bytes_, gw_.config().max_payload)) {
      early_in_bytes_ += bytes;
      early_in_.push_back(std::move(*f));
      return;
    }
    gw_.metrics().early_frames.Increment();
    send_error(f->id.value_or(""), "not connected yet: too many frames before the connect was answered");
    return;
  }
  handle(std::move(*f));
}

void ws_session::handle(ws_json::client_frame f) {
  if (f.nsp && *f.nsp != nsp()) {
    send_error(f.id.value_or(""), "this connection serves namespace " + nsp());
    return;
  }
  std::string args = f.data.empty() ? "[]" : "[" + f.data + "]";
  std::uint64_t tag = 0;
  if (f.id) {
    if (ids_.size() >= gw_.config().max_pending_acks) {
      gw_.metrics().ack_limit.Increment();
      send_error(*f.id, "too many requests waiting for a reply");
      return;
    }
    tag = ++next_tag_;
    ids_.emplace(tag, *f.id);
  }
  if (!send_event(std::move(f.event), std::move(args), {}, tag) && tag) {
    send_error(ids_[tag], std::string{kGatewayBusy});
    ids_.erase(tag);
  }
}

void ws_session::on_closed() {
  keepalive_.cancel();  // also when the session had ended already (a refused connect): it holds the session
  // ws_conn reports its end exactly once, whoever closed it (also a
  // handshake Beast refused: then the session never started).
  if (started_) gw_.metrics().plain_ws.Decrement();
  end("transport close");
}

const char* ws_session::deliver(std::shared_ptr<const outbound_event> event, std::string ack_id) {
  // /ws has no way to ask its client for an ack: a worker's emit that wants
  // one is answered at once (the event itself is still delivered).
  if (!ack_id.empty()) refuse_ack(std::exchange(ack_id, {}), proto::BAD_REQUEST, "a /ws session cannot ack");
  if (closed()) return drop_event({}, "the client is gone");
  if (!connected()) return hold_early(std::move(event), {});  // the connect hook runs
  gw_.metrics().ws_out.Increment();
  if (ws_->send(frame{shared_bytes{event, event->ws_frame()}, false})) return nullptr;
  return drop_event({}, "the client's connection is gone or too far behind");
}

void ws_session::deliver_disconnect() {
  if (!connected()) return hold_kick();
  send_text(ws_json::encode_event("disconnect", json::serialize(json::string{kick_reason()}), nsp()));
  end(kick_reason());
  ws_->close();
}

void ws_session::shut_down() {
  if (closed()) return;
  end("server shutting down");
  ws_->close();  // a close, not a "disconnect" event: the client may reconnect elsewhere
}

void ws_session::on_connect_answer(reply_data reply) {
  if (reply.code != proto::OK) {
    keepalive_.cancel();
    send_text(ws_json::encode_event("connect_error",
                                    json::serialize(json::object{{"message", connect_error_message(reply)}}), nsp()));
    drop_early("the client's connect was refused");
    early_in_.clear();  // the connection closes: no answer would reach it
    early_in_bytes_ = 0;
    ws_->close();
    return;
  }
  mark_connected();
  send_text(ws_json::encode_event("connect", json::serialize(json::object{{"sid", sid()}}), nsp()));
  release_early();
  // The client's own frames after what the worker sent meanwhile: their
  // events reach the service after its connect hook, as they were sent.
  auto held = std::exchange(early_in_, {});
  early_in_bytes_ = 0;
  for (auto& f : held) {
    if (closed()) break;  // a kick the hook sent, applied with the answer
    handle(std::move(f));
  }
}

void ws_session::on_end() {
  keepalive_.cancel();  // it holds the session
  early_in_.clear();
  early_in_bytes_ = 0;
  drop_early("the client is gone");
}

void ws_session::on_reply(std::uint64_t tag, reply_data reply) {
  auto it = ids_.find(tag);
  if (it == ids_.end()) return;
  auto id = std::move(it->second);
  ids_.erase(it);
  if (reply.code != proto::OK) {
    send_text(ws_json::encode_reply(id, {}, proto::Code_Name(reply.code) + ": " + reply.message));
    return;
  }
  // A handler that gave no answer: the client asked for a reply, and /ws
  // has no ack timeout of its own, so it gets one without data.
  if (reply.silent) return send_text(ws_json::encode_reply(id, {}));
  send_text(ws_json::encode_reply(id, ws_json::data_from_args(ws_json::with_attachments(std::move(reply.args), reply.attachments))));
}

}  // namespace sidecast::gateway
