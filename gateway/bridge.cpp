#include "gateway/bridge.hpp"

#include <unistd.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <charconv>
#include <cerrno>
#include <cstring>

#include <boost/asio/post.hpp>
#include <boost/json.hpp>
#include <spdlog/spdlog.h>

#include "core/peer_link.hpp"
#include "gateway/codec/engineio.hpp"
#include "gateway/codec/socketio.hpp"
#include "gateway/codec/ws_json.hpp"

namespace sidecast::gateway {

namespace {

// Peer-supplied text for a log line: control bytes (a topic's NULs among
// them) shown as '.', at most 80 bytes.
std::string printable(std::string_view s) {
  std::string out{s.substr(0, 80)};
  for (auto& c : out)
    if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) c = '.';
  return out;
}

// How long after the SUB unsubscribed a filter a topic that comes under it
// again may still be brought events from before: far longer than the
// gateway takes to read what the broker's queue and the kernel hold for it,
// unless it is so far behind that it loses events anyway.
constexpr std::chrono::seconds resubscription_window{5};

}  // namespace

namespace asio = boost::asio;
using proto::Envelope;
using clock = std::chrono::steady_clock;

// ---- outbound_event ----

const std::string& outbound_event::socketio_frame(bool with_offset) const {
  auto encode = [this](bool offset) {
    socketio::packet p;
    p.type = attachments_.empty() ? socketio::packet_type::event : socketio::packet_type::binary_event;
    p.nsp = nsp_;
    p.data = socketio::join_event(event_, args_);
    if (offset) {
      // [name, ...args] -> [name, ...args, "<offset>"]
      p.data.pop_back();
      p.data += ",\"" + std::to_string(offset_) + "\"]";
    }
    p.attachments = attachments_.size();
    return "4" + socketio::encode(p);
  };
  if (with_offset) {
    std::call_once(sio_offset_once_, [&] { sio_offset_ = encode(true); });
    return sio_offset_;
  }
  std::call_once(sio_once_, [&] { sio_ = encode(false); });
  return sio_;
}

const std::string& outbound_event::ws_frame() const {
  std::call_once(ws_once_, [this] {
    // Its attachments (a Socket.IO client gets them as binary frames) in
    // the JSON itself, base64.
    std::string inlined = attachments_.empty() ? std::string{} : ws_json::inline_attachments(args_, attachments_);
    auto data = ws_json::data_from_args(attachments_.empty() ? std::string_view{args_} : std::string_view{inlined});
    ws_ = ws_json::encode_event(event_, data, nsp_);
  });
  return ws_;
}

// ---- bridge ----

bridge::bridge(const gateway_config& config, zmq::context_t& context, gateway_metrics& metrics,
               std::uint64_t first_id, std::string sid_prefix)
    : config_{config},
      context_{context},
      metrics_{metrics},
      id_{config.id},
      sid_prefix_{std::move(sid_prefix)},
      next_id_{first_id},
      backlog_{config.max_thread_backlog, metrics.thread_backlog},
      notices_{config.kept_notices, config.kept_notice_bytes},
      unsubscribed_{resubscription_window, config.max_recent_unsubscriptions} {}

bridge::~bridge() { stop(); }

void bridge::start(asio::io_context* shared) {
  if (!shared) {
    own_context_ = std::make_unique<asio::io_context>(1);
    shared = own_context_.get();
  }
  ex_.emplace(shared->get_executor());
  // The sockets are made on the thread that will use them.
  asio::post(*ex_, [this] { open(); });
  if (!own_context_) return;
  thread_ = std::thread([this] {
    auto work = asio::make_work_guard(*own_context_);
    run_logging_errors(*own_context_, "gateway bridge");
  });
}

void bridge::stop() {
  if (stopped_.exchange(true)) return;
  if (own_context_) {
    own_context_->stop();
    if (thread_.joinable()) thread_.join();
  }
  // No thread runs the executor any more: release its objects here. What
  // was held for a Welcome goes now (a broker back within the linger reads
  // it). The broker forgets this gateway at once (Goodbye): emits for its
  // sids get their delivery reports now, not once its heartbeats are missed.
  if (link_) {
    try {
      send_held();
      link_->goodbye(std::chrono::milliseconds(500));
    } catch (const std::exception& e) {
      spdlog::warn("gateway bridge: no goodbye to the broker: {}", e.what());
    }
  }
  if (poster_) poster_->close();
  link_watch_.fd.reset();
  sub_watch_.fd.reset();
  timer_.reset();
  sub_.reset();
  link_.reset();
  welcomed_ = false;
  // What still waits holds reply slots and sinks whose timers belong to the
  // gateway's io_contexts, which go before this bridge does.
  pending_.clear();
  forwards_.clear();
  deadlines_.clear();
}

std::string bridge::next_id() { return id_of(++next_id_); }

// The counter in base 36 keeps an id within std::string's 15 inline bytes
// (no heap block here, in the broker's job table or in the worker's reply)
// for 60 million requests with the default gateway id ("gw-" and six).
std::string bridge::id_of(std::uint64_t seq) const {
  std::array<char, 16> digits;
  auto end = std::to_chars(digits.data(), digits.data() + digits.size(), seq, 36).ptr;
  std::string id;
  id.reserve(id_.size() + 1 + (end - digits.data()));
  id.append(id_).push_back(':');
  id.append(digits.data(), end);
  return id;
}

bool bridge::take_turn(bool owed) {
  if ((queued_.fetch_add(1, std::memory_order_relaxed) >= config_.bridge_queue && !owed) || !ex_) {
    queued_.fetch_sub(1, std::memory_order_relaxed);
    metrics_.bridge_full.Increment();
    return false;
  }
  return true;
}

bool bridge::begin_command() {
  queued_.fetch_sub(1, std::memory_order_relaxed);
  return link_ != nullptr;  // not open (it failed): nothing to talk to
}

void bridge::end_command() {
  // One pump after a batch of commands: their sends may have eaten a ZMQ_FD edge.
  link_watch_.dirty = true;
  schedule_pump();
}

bool bridge::attach(std::string sid, std::string nsp, std::weak_ptr<client_sink> sink, std::function<void()> after) {
  return post([this, sid = std::move(sid), nsp = std::move(nsp), sink = std::move(sink), after = std::move(after)]() mutable {
    // A sid drawn under a prefix the broker has announced gone (the
    // gateway renewed it between the draw and this command, after its
    // sweep of the old prefix's sockets): the services have forgotten it,
    // so it ends as the rest of its prefix did.
    bool stale = !sid_prefix_.empty() && !sid.starts_with(sid_prefix_);
    auto stale_sink = stale ? sink.lock() : nullptr;
    if (auto it = members_.find(sid); it != members_.end()) {
      // A recovered socket takes the sid over, rooms and all (a disconnect
      // posted to the one it replaces did not reach it).
      it->second.sink = std::move(sink);
      it->second.disconnecting = false;
    } else {
      auto& entry = *members_.try_emplace(std::move(sid), member{std::move(sink), std::move(nsp), {}}).first;
      add_to_topic(proto::namespace_topic(entry.second.nsp), entry);
      members_count_.store(members_.size(), std::memory_order_relaxed);
    }
    if (after) after();
    if (stale_sink)
      to_sink(stale_sink->executor(), [stale_sink] { stale_sink->shut_down(); }, 1, thread_backlog::kind::owed);
  });
}

void bridge::detach(std::string sid) {
  post(
      [this, sid = std::move(sid)] {
        auto it = members_.find(sid);
        if (it == members_.end()) return;
        for (const auto* topic : it->second.topics) remove_from_topic(*topic, *it);
        remove_from_topic(proto::namespace_topic(it->second.nsp), *it);
        members_.erase(it);
        members_count_.store(members_.size(), std::memory_order_relaxed);
      },
      true);
}

void bridge::cancel(std::vector<std::uint64_t> seqs) {
  post(
      [this, seqs = std::move(seqs)] {
        for (auto seq : seqs) {
          auto it = pending_.find(seq);
          if (it == pending_.end() || it->second.if_gone) continue;  // answered (a CONNECT is never given up here)
          bool sent = !it->second.out.where.is_held();  // else it never went, and goes nowhere now
          if (!sent) unhold(it->second.out.message.size());
          pending_.erase(it);
          metrics_.cancelled.Increment();
          if (!sent) continue;
          Envelope cancel;
          cancel.mutable_cancel()->set_id(id_of(seq));
          cancel.mutable_cancel()->set_reason(proto::CANCELLED);
          send_now(cancel);
        }
      },
      true);
}

void bridge::shut_down_all(std::string prefix) {
  post(
      [this, prefix = std::move(prefix)] {
        for (auto& [sid, m] : members_)
          if (auto sink = m.sink.lock(); sink && sid.starts_with(prefix))
            to_sink(sink->executor(), [sink] { sink->shut_down(); }, 1, thread_backlog::kind::owed);
      },
      true);
}

bool bridge::request(const Envelope& env, std::weak_ptr<client_sink> sink, std::uint64_t tag,
                     std::chrono::milliseconds timeout, std::optional<Envelope> if_gone) {
  const auto& id = env.has_request() ? env.request().id() : env.lifecycle().id();
  return request(id, core::message_of(env), std::move(sink), tag, timeout,
                 if_gone ? std::make_unique<zmq::message_t>(core::message_of(*if_gone)) : nullptr);
}

bool bridge::request(std::string_view id, zmq::message_t message, std::weak_ptr<client_sink> sink,
                     std::uint64_t tag, std::chrono::milliseconds timeout, std::unique_ptr<zmq::message_t> if_gone) {
  auto seq = own_seq(id);
  if (!seq) {
    // A caller's bug, not a peer's input; answered like a full link, never thrown
    // on a session's thread.
    spdlog::error("gateway bridge: request id {} was not made by next_id(); not sent", id);
    return false;
  }
  // A CONNECT is awaited from here (a drain waits for it), until its
  // socket has taken the answer (reply_to).
  bool connect = if_gone != nullptr;
  if (connect) connects_awaited_.fetch_add(1, std::memory_order_relaxed);
  bool queued = post([this, seq = *seq, message = std::move(message), sink = std::move(sink), tag, timeout,
                      if_gone = std::move(if_gone)]() mutable {
    if (unread_full()) {
      if (if_gone) connects_awaited_.fetch_sub(1, std::memory_order_relaxed);  // never sent
      reply_to(pending{std::move(sink), tag, {}}, {proto::BUSY, "the broker is not reading what the gateway sends"});
      return;
    }
    sent_message out;
    if (!send_kept(std::move(message), out)) {
      // The broker is not taking what we send: say so now, as the broker
      // does when a service queue is full, rather than at the deadline.
      if (if_gone) connects_awaited_.fetch_sub(1, std::memory_order_relaxed);  // never sent
      reply_to(pending{std::move(sink), tag, {}}, {proto::BUSY, "the gateway's link to the broker is full"});
      return;
    }
    // Our own deadline is a little later than the broker's, which answers
    // first unless the broker itself is unreachable.
    auto deadline = clock::now() + timeout + std::chrono::seconds(1);
    pending_.insert_or_assign(seq, pending{std::move(sink), tag, deadline, std::move(if_gone), std::move(out)});
    add_deadline(deadline, seq);
  });
  if (!queued && connect) connects_awaited_.fetch_sub(1, std::memory_order_relaxed);
  return queued;
}

std::optional<std::uint64_t> bridge::own_seq(std::string_view id) const {
  if (id.size() <= id_.size() + 1 || !id.starts_with(id_) || id[id_.size()] != ':') return std::nullopt;
  std::uint64_t n = 0;
  auto digits = id.substr(id_.size() + 1);
  if (digits.size() > 1 && digits[0] == '0') return std::nullopt;  // not how id_of() writes it
  // from_chars in base 36 takes upper case too; id_of() writes lower case only.
  if (std::any_of(digits.begin(), digits.end(), [](char c) { return c >= 'A' && c <= 'Z'; })) return std::nullopt;
  auto [end, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), n, 36);
  if (ec != std::errc{} || end != digits.data() + digits.size()) return std::nullopt;
  return n;
}

namespace {

constexpr auto later = [](const auto& a, const auto& b) { return a.first > b.first; };
constexpr std::size_t shrink_above = 4096;  // deadline entries an idle bridge keeps room for

}  // namespace

void bridge::add_deadline(time_point at, std::uint64_t seq) {
  deadlines_.emplace_back(at, seq);
  std::push_heap(deadlines_.begin(), deadlines_.end(), later);
  compact_deadlines();
}

void bridge::compact_deadlines() {
  auto live = pending_.size() + forwards_.size();
  if (deadlines_.size() <= 2 * live + 1024) return;
  deadlines_.clear();
  for (const auto& [seq, p] : pending_) deadlines_.emplace_back(p.deadline, seq);
  for (const auto& [seq, f] : forwards_) deadlines_.emplace_back(f.deadline, seq);
  std::make_heap(deadlines_.begin(), deadlines_.end(), later);
}

bool bridge::send(const Envelope& env) { return send(core::message_of(env)); }

bool bridge::send(zmq::message_t message) {
  return post([this, message = std::move(message)]() mutable { send_notice(std::move(message)); });
}

void bridge::send_owed(const Envelope& env) {
  post([this, message = core::message_of(env)]() mutable { send_notice(std::move(message)); }, true);
}

bool bridge::send_notice(zmq::message_t&& message, bool may_hold) {
  // Held in notices_, where a notice held must not be forgotten: room is
  // made by forgetting the oldest sent ones. When only held ones are left
  // (--kept-notices of them, or --kept-notice-bytes), or with --kept-notices
  // 0, it goes at once, kept nowhere, ahead of those held.
  if (may_hold && holding() &&
      !notices_.make_room(message.size(), [](const sent_message& e) { return !e.where.is_held(); }))
    return link_->send_message(std::move(message)) || link_full();
  sent_message out;
  if (!send_kept(std::move(message), out, may_hold)) return false;
  notices_.push(std::move(out));  // keeps nothing when --kept-notices is 0
  metrics_.kept_notice_bytes.Set(static_cast<double>(notices_.bytes()));
  return true;
}

bool bridge::send_kept(zmq::message_t&& message, sent_message& out, bool may_hold) {
  return (may_hold && hold(message, out)) || link_->send_message(std::move(message), out) || link_full();
}

// A Welcome the link has read and resend_lost() has not acted on yet counts
// as waiting for one: what it names as lost goes first.
bool bridge::holding() const {
  return link_->holding() || held_ > 0 || link_->received_by_broker().count != broker_received_;
}

bool bridge::may_hold() const {
  return holding() && held_ < static_cast<std::uint64_t>(config_.hwm);  // past --hwm: at once
}

bool bridge::hold(zmq::message_t& message, sent_message& out) {
  if (!may_hold()) return false;
  out.message = std::move(message);
  hold_kept(out);
  return true;
}

// A held request or forward that expired: it no longer takes a place
// under --hwm, nor counts as held.
void bridge::unhold(std::size_t bytes) {
  if (held_ > 0) --held_;
  held_bytes_ -= std::min<std::uint64_t>(held_bytes_, bytes);
  metrics_.held.Set(static_cast<double>(held_));
}

// Everything held was held after what a standby gives back was sent: the
// link holds from the standby's first STANDBY on, and the standby gives back
// what it read in the order it read it. So a message given back goes ahead
// of all those held for another reason, behind those given back before it:
// they go (resend_lost(), send_held()) in the order the gateway first sent
// them.
void bridge::hold_kept(sent_message& out, bool given_back) {
  constexpr std::uint64_t after_given_back = std::uint64_t{1} << 62;
  ++held_;
  held_bytes_ += out.message.size();
  out.where = core::link_position::held(given_back ? ++given_back_ : after_given_back + ++held_seq_);
  metrics_.held.Set(static_cast<double>(held_));
}

// A broker that stalls (stopped, swapping, its host paused) reads nothing,
// and what the gateway sends it piles up in the link's queue, here: up to
// --hwm messages, each up to --max-payload and more; and when the link
// replaced its socket, what it holds for the new one's Welcome. Past
// --max-unread-bytes of the two, requests and forwards are refused at
// once; what nobody answers (acks, notices) still goes, under --hwm. What
// died in a replaced socket is kept besides, to go again: up to about
// twice the bound in all.
bool bridge::unread_full() {
  auto unread = link_->unread_bytes() + held_bytes_;
  metrics_.unread_bytes.Set(static_cast<double>(unread));
  if (unread <= config_.max_unread_bytes) return false;
  metrics_.broker_unread.Increment();
  if (log_limit_.allow())
    spdlog::warn("gateway bridge: the broker has not read {} bytes sent to it (--max-unread-bytes {}); "
                 "requests answered busy",
                 unread, config_.max_unread_bytes);
  return true;
}

bool bridge::link_full() {
  metrics_.broker_link_full.Increment();
  if (log_limit_.allow()) spdlog::warn("gateway bridge: the broker link is full (--hwm {}); message dropped", config_.hwm);
  return false;
}

namespace {

// A forwarded request that got no answer: an Engine.IO client sees what an
// Engine.IO server says to a request it cannot serve, an API client the
// API's error object.
http_answer forward_failed(unsigned status, bool api) {
  if (!api) return {status, "application/json", std::string{engineio::error_body(engineio::error_code::bad_request)}};
  const char* why = status == 503   ? "gateway busy"
                    : status == 504 ? "no answer from the session's gateway"
                                    : "the session's gateway gave an answer this one cannot pass on";
  return {status, "application/json", std::string{R"({"error":")"} + why + "\"}"};
}

// What a peer gateway's HttpAnswer may carry into this gateway's response:
// a final status, a content type of visible ASCII and spaces (no CR or LF
// to start a header of its own), as short as any the gateway sends, and an
// Allow of method names, commas and spaces.
bool writable_answer(std::uint32_t status, std::string_view content_type, std::string_view allow) {
  if (status < 200 || status > 599 || content_type.empty() || content_type.size() > 128 || allow.size() > 64)
    return false;
  auto printable = [](char c) { return c >= 0x20 && c < 0x7f; };
  return std::all_of(content_type.begin(), content_type.end(), printable) &&
         std::all_of(allow.begin(), allow.end(), [](char c) { return std::isupper(static_cast<unsigned char>(c)) || c == ',' || c == ' '; });
}

}  // namespace

bool bridge::forward(proto::HttpForward request, std::shared_ptr<reply_slot> slot, std::chrono::milliseconds timeout) {
  std::uint64_t seq = 0;
  if (request.id().empty()) {
    seq = ++next_id_;
    request.set_id(id_of(seq));
  } else if (auto own = own_seq(request.id())) {
    seq = *own;  // the caller's, from next_id()
  } else {
    spdlog::error("gateway bridge: forward id {} was not made by next_id(); not sent", request.id());
    return false;
  }
  bool api = !request.target().empty();
  Envelope env;
  *env.mutable_forward() = std::move(request);
  return post([this, seq, message = core::message_of(env), slot = std::move(slot), timeout, api]() mutable {
    sent_message out;
    if (unread_full() || !send_kept(std::move(message), out)) {
      slot->complete(forward_failed(503, api));
      return;
    }
    auto deadline = clock::now() + timeout;
    forwards_.insert_or_assign(seq, pending_forward{std::move(slot), deadline, api, std::move(out)});
    add_deadline(deadline, seq);
  });
}

void bridge::open() {
  try {
    core::peer_link_options lo;
    lo.endpoint = config_.broker;
    lo.backup_endpoint = config_.backup_broker;
    lo.id = id_;
    lo.sid_prefix = sid_prefix_;
    lo.role = proto::ROLE_GATEWAY;
    lo.heartbeat_interval = config_.heartbeat_interval;
    lo.sndhwm = lo.rcvhwm = config_.hwm;
    lo.curve = {config_.curve_secret, config_.curve_server_key};
    link_ = std::make_unique<core::peer_link>(context_, lo);
    // A local:// broker (the demo's) schedules a pump instead of writing
    // the link's eventfd: with --threads 1 it runs on this very thread.
    poster_ = core::ring_poster::make(ex_->context(), [this](std::uint64_t) {
      link_watch_.dirty = true;
      pump();
    });
    link_->hook(poster_->hook(0));
    sub_ = std::make_unique<zmq::socket_t>(context_, zmq::socket_type::sub);
    sub_->set(zmq::sockopt::linger, 0);
    sub_->set(zmq::sockopt::rcvhwm, config_.hwm);
    core::apply(*sub_, lo.curve);
    sub_->connect(config_.events);
    // Of a broker pair, only the active broker publishes (one that does not
    // serve forwards nothing): subscribed at both, the gateway hears
    // whichever it is from the moment it takes over.
    if (!config_.backup_events.empty()) sub_->connect(config_.backup_events);
    timer_.emplace(*ex_);
  } catch (const std::exception& e) {
    spdlog::critical("gateway bridge failed: {}", e.what());
    sub_.reset();
    link_.reset();
    if (failure_handler_) failure_handler_(e.what());
    return;
  }
  pump();
}

void bridge::schedule_pump() {
  if (pump_posted_) return;
  pump_posted_ = true;
  asio::post(*ex_, [this] {
    pump_posted_ = false;
    pump();
  });
}

// Only a socket that is dirty (its descriptor fired, or it was used since
// it was last drained) is read: reading an idle socket costs libzmq two
// system calls to find nothing (see core/input_wait.hpp). At most 1024
// messages a turn; true when that bound stopped it (it stays dirty).
template <typename ReadOne>
bool bridge::drain(watch& w, ReadOne read_one) {
  if (!w.dirty) return false;
  w.dirty = false;  // what the handlers send sets it again
  for (int i = 0; i < 1024; ++i)
    if (!read_one()) return false;
  w.dirty = true;
  return true;
}

// Everything the sockets hold (up to a bound, then the other handlers get a
// turn), heartbeats and deadlines; then wait for more.
void bridge::pump() {
  if (!link_ || stopped_) return;
  bool more = drain(link_watch_, [this] {
    // A Reply goes to take_reply() unparsed; anything else is parsed on an
    // arena over a reused block: the envelope itself costs no allocation,
    // and the strings that outlive it are moved out.
    google::protobuf::Arena arena{proto::arena_on(arena_block_)};
    auto& env = *google::protobuf::Arena::CreateMessage<Envelope>(&arena);
    if (!link_->receive_into(env, take_reply_)) return false;
    if (env.kind_case() != Envelope::KIND_NOT_SET) on_broker(env);  // else take_reply() had it
    return true;
  });
  if (link_->broker_restarts() != broker_restarts_) fail_lost_to_restart();
  if (link_->prefixes_gone() != prefixes_gone_) renew_sid_prefix();
  if (link_->received_by_broker().count != broker_received_ || (held_ > 0 && !link_->holding())) resend_lost();
  if (link_->read_by_broker() != broker_read_) forget_read();
  more = drain(sub_watch_, [this] {
    zmq::message_t topic, body, stamp, extra;
    if (!sub_->recv(topic, zmq::recv_flags::dontwait)) return false;
    // The topic, the envelope and its stamp (a broker before the stamps
    // sends none); a message is whole or not there at all.
    if (!topic.more() || !sub_->recv(body, zmq::recv_flags::dontwait)) return true;
    bool stamped = body.more() && sub_->recv(stamp, zmq::recv_flags::dontwait);
    bool extras = false;
    for (auto* last = stamped ? &stamp : &body; last->more() && sub_->recv(extra, zmq::recv_flags::dontwait);
         last = &extra)
      extras = true;
    if (extras) {
      metrics_.bad_event.Increment();
      if (log_limit_.allow()) spdlog::warn("bridge: event with extra frames dropped");
      return true;
    }
    std::optional<proto::event_stamp> number;
    if (stamped && !(number = proto::decode_stamp(stamp.to_string_view()))) {
      // Malformed, as an event of more frames: dropped (the next one heard
      // counts it lost, as it is).
      metrics_.bad_event.Increment();
      if (log_limit_.allow()) spdlog::warn("bridge: event with a malformed stamp ({} bytes) dropped", stamp.size());
      return true;
    }
    on_event(topic.to_string_view(), body.to_string_view(), number);
    return true;
  }) || more;
  auto now = clock::now();
  if (now >= link_->next_tick()) {
    link_->tick(now);  // heartbeats, or a new socket
    link_watch_.dirty = true;
  }
  welcomed_ = link_->welcomed();
  max_message_bytes_.store(link_->max_message_bytes(), std::memory_order_relaxed);
  metrics_.broker_connected.Set(welcomed_ ? 1 : 0);
  expire(now);
  if (more) return schedule_pump();
  arm();
}

void bridge::arm() {
  bool watched = arm(link_watch_, link_->stats().reconnects, [this] { return link_->fd(); });
  watched = arm(sub_watch_, 0, [this] { return sub_->get(zmq::sockopt::fd); }) && watched;
  auto wake_at = link_->next_tick();
  // Out of descriptors (dup failed): look again soon rather than never.
  if (!watched) wake_at = std::min(wake_at, clock::now() + std::chrono::milliseconds(10));
  if (!deadlines_.empty()) wake_at = std::min(wake_at, deadlines_.front().first);
  if (!timer_pending_ || wake_at < timer_at_) {
    timer_at_ = wake_at;
    timer_pending_ = true;
    timer_->expires_at(wake_at);  // cancels the wait set for a later time
    timer_->async_wait([this](boost::system::error_code ec) {
      if (ec) return;
      timer_pending_ = false;
      pump();
    });
  }
  // ZMQ_FD only signals a change, and a send or ZMQ_EVENTS may consume it:
  // a socket used since it was drained may hold a message its descriptor
  // will never announce. Asked here, or never.
  auto ask = [](watch& w, auto has_input) {
    if (!w.dirty) return false;
    w.dirty = has_input();
    return w.dirty;
  };
  bool link_has = ask(link_watch_, [this] { return link_->has_input(); });
  bool sub_has = ask(sub_watch_, [this] { return (sub_->get(zmq::sockopt::events) & ZMQ_POLLIN) != 0; });
  if (link_has || sub_has) schedule_pump();
}

template <typename FdOf>
bool bridge::arm(watch& w, std::uint64_t generation, FdOf fd_of) {
  // A new socket may sit at the old one's address, its descriptor at the
  // old number: the link's reconnect count tells them apart.
  if (w.generation != generation) {
    w.fd.reset();  // the peer link made a new socket (reconnect)
    w.waiting = false;
    w.dirty = true;
    w.generation.reset();
    int fd = ::dup(fd_of());  // asked only for a new socket
    if (fd < 0) {
      if (log_limit_.allow()) spdlog::error("bridge: dup(ZMQ_FD): {}", std::strerror(errno));
      return false;
    }
    try {
      w.fd.emplace(*ex_, fd);
    } catch (const std::exception& e) {  // the reactor refused it
      ::close(fd);
      if (log_limit_.allow()) spdlog::error("bridge: cannot watch ZMQ_FD: {}", e.what());
      return false;
    }
    w.generation = generation;
  }
  if (w.waiting) return true;
  w.waiting = true;
  w.fd->async_wait(asio::posix::descriptor_base::wait_read, [this, &w](boost::system::error_code ec) {
    if (ec == asio::error::operation_aborted) return;  // a replaced descriptor's wait: not ours to clear
    w.waiting = false;
    w.dirty = true;
    if (!ec) pump();
  });
  return true;
}

bool bridge::take_reply(std::string_view bytes) {
  auto body = proto::reply_body(bytes);
  if (!body || !parsed_reply_.ParseFromArray(body->data(), static_cast<int>(body->size()))) return false;
  on_reply(parsed_reply_);
  return true;
}

// The reply's strings are swapped out of `r`: parsed_reply_ then holds the
// spare buffers it gave, for the next parse (see spare_text()).
void bridge::on_reply(proto::Reply& r) {
  auto seq = own_seq(r.id());
  auto it = seq ? pending_.find(*seq) : pending_.end();
  if (it == pending_.end()) return;  // late: the sink already got a timeout
  auto p = std::move(it->second);
  pending_.erase(it);  // its deadline entry finds nothing when it comes
  reply_data reply{r.code(), {}, {}, {}, r.silent()};
  if (socketio::valid_args(r.args())) {
    reply.message.swap(*r.mutable_message());
    reply.args = spare_text();
    reply.args.swap(*r.mutable_args());
    reply.attachments.resize(r.attachments_size());
    for (int i = 0; i < r.attachments_size(); ++i) reply.attachments[i].swap(*r.mutable_attachments(i));
  } else {
    // The asker still gets an answer: an error naming the worker's fault.
    refuse_args("reply", r.id());
    if (reply.code == proto::OK) reply = {proto::INTERNAL, "the worker's answer is not valid JSON"};
    else reply.message.swap(*r.mutable_message());
  }
  reply_to(std::move(p), std::move(reply));
}

void bridge::on_broker(Envelope& env) {
  switch (env.kind_case()) {
    case Envelope::kReply: on_reply(*env.mutable_reply()); return;  // one take_reply() left to the parser
    case Envelope::kEmit: deliver_emit(*env.mutable_emit()); return;
    case Envelope::kForward:
      if (forward_handler_) forward_handler_(std::move(*env.mutable_forward()));
      return;
    case Envelope::kAnswer: {
      auto seq = own_seq(env.answer().id());
      auto it = seq ? forwards_.find(*seq) : forwards_.end();
      if (it == forwards_.end()) return;
      auto& a = *env.mutable_answer();
      if (writable_answer(a.status(), a.content_type(), a.allow())) {
        it->second.slot->complete({a.status(), std::move(*a.mutable_content_type()), std::move(*a.mutable_body()),
                                   std::move(*a.mutable_allow())});
      } else {
        // A peer gateway's answer this one will not write into its own
        // response (a header it could split, a status line it would botch).
        metrics_.bad_answer.Increment();
        if (log_limit_.allow())
          spdlog::warn("bridge: a peer gateway's answer to {} has status {}, content type \"{}\" or Allow \"{}\": 502 instead",
                       printable(a.id()), a.status(), printable(a.content_type()), printable(a.allow()));
        it->second.slot->complete(forward_failed(502, it->second.api));
      }
      forwards_.erase(it);  // its deadline entry finds nothing when it comes
      return;
    }
    case Envelope::kControl: on_control(env.control()); return;
    case Envelope::kError:
      // A new broker took this request before our Hello: it is not lost.
      // A forward it did not take, nor a one-way message (given back
      // whole): each is held, and goes after its Welcome, in order.
      if (env.error().code() == proto::NOT_REGISTERED) {
        if (auto seq = own_seq(env.error().id())) {
          if (auto it = pending_.find(*seq); it != pending_.end()) {
            it->second.out.where.epoch = link_->epoch();
            it->second.out.message.rebuild();  // nor is it sent again (resend_lost)
          } else if (forwards_.contains(*seq)) {
            refused_by_broker(*seq);
          }
        }
        if (!env.error().refused().empty()) given_back(env.error().refused(), false);
      }
      // The standby of a broker pair refused it: it did not run anywhere.
      // It is held, as what is sent while the link is on a standby is, and
      // goes to whichever broker welcomes the link next (within its
      // deadline); past --hwm held, the client hears at once that it did not
      // run, not at the deadline, nor as BROKER_LOST ("may have run") later.
      // A one-way message (a publish's Emit, a delivery report, a client's
      // ack, a DISCONNECT notice) comes back whole, and is held the same way.
      if (env.error().code() == proto::STANDBY) {
        auto seq = own_seq(env.error().id());
        if (seq && refused_by_broker(*seq)) return;
        if (!env.error().refused().empty()) given_back(env.error().refused(), seq.has_value());
      }
      return;
    case Envelope::kReport: return;
    default:
      if (log_limit_.allow()) spdlog::warn("bridge: unexpected {} from the broker", proto::kind_name(env));
  }
}

namespace {

// A DISCONNECT notice made before the connect hook ran names the token's
// user, if any; the hook may have named one since (client_socket::deliver_reply).
void name_user(zmq::message_t& notice, std::string_view connect_answer) {
  Envelope env;
  if (!env.ParseFromArray(notice.data(), static_cast<int>(notice.size())) || !env.has_lifecycle() ||
      !env.lifecycle().user().empty())
    return;
  auto user = user_named_by(connect_answer);
  if (user.empty()) return;
  env.mutable_lifecycle()->set_user(std::move(user));
  notice = core::message_of(env);
}

}  // namespace

void bridge::reply_to(pending p, reply_data reply) {
  auto sink = p.sink.lock();
  if (!sink) {
    if (p.if_gone) {
      if (reply.code == proto::OK) {
        name_user(*p.if_gone, reply.args);
        send_notice(std::move(*p.if_gone));
        link_watch_.dirty = true;
      }
      connects_awaited_.fetch_sub(1, std::memory_order_relaxed);
    }
    return;
  }
  // On the io_context's own executor: one operation, where any_io_executor
  // would wrap the handler in a second allocation.
  // Never refused: replies are bounded by the requests in flight.
  if (p.if_gone) {
    // A CONNECT's answer stays awaited until its socket has taken it, and
    // the DISCONNECT it may then owe (send_owed, a bridge command) is sent:
    // the count drops in the bridge command queued after that one.
    to_sink(
        sink->executor(),
        [this, sink, tag = p.tag, reply = std::move(reply)]() mutable {
          auto settled = [this] { post([this] { connects_awaited_.fetch_sub(1, std::memory_order_relaxed); }, true); };
          try {
            sink->deliver_reply(tag, std::move(reply));
          } catch (...) {
            settled();  // a drain must not wait for it
            throw;
          }
          settled();
        },
        1, thread_backlog::kind::owed);
    return;
  }
  to_sink(
      sink->executor(),
      [sink, tag = p.tag, reply = std::move(reply)]() mutable { sink->deliver_reply(tag, std::move(reply)); }, 1,
      thread_backlog::kind::owed);
}

void bridge::expire(clock::time_point now) {
  while (!deadlines_.empty() && deadlines_.front().first <= now) {
    std::pop_heap(deadlines_.begin(), deadlines_.end(), later);
    auto [at, seq] = deadlines_.back();
    deadlines_.pop_back();
    if (auto f = forwards_.find(seq); f != forwards_.end() && f->second.deadline == at) {
      if (f->second.out.where.is_held()) unhold(f->second.out.message.size());
      f->second.slot->complete(forward_failed(504, f->second.api));
      forwards_.erase(f);
      continue;
    }
    auto it = pending_.find(seq);
    if (it == pending_.end() || it->second.deadline != at) continue;  // answered
    auto p = std::move(it->second);
    pending_.erase(it);
    auto id = id_of(seq);
    bool sent = !p.out.where.is_held();  // else it never went, and goes nowhere now
    if (!sent) unhold(p.out.message.size());
    reply_to(std::move(p), {proto::TIMEOUT, "no answer from the broker"});
    if (!sent) continue;
    Envelope cancel;
    cancel.mutable_cancel()->set_id(id);
    cancel.mutable_cancel()->set_reason(proto::TIMEOUT);
    send_now(cancel);
  }
  // The entries of answered requests go now rather than at their time: the
  // timer is set for the first entry, and each would wake the bridge once
  // more for nothing. (Each entry is popped once either way.)
  while (!deadlines_.empty() && !live(deadlines_.front().first, deadlines_.front().second)) {
    std::pop_heap(deadlines_.begin(), deadlines_.end(), later);
    deadlines_.pop_back();
  }
  compact_deadlines();
  // A burst leaves large tables behind; an idle bridge gives them back.
  if (pending_.empty() && forwards_.empty() && deadlines_.capacity() > shrink_above) {
    pending_.rehash(0);
    forwards_.rehash(0);
    deadlines_.shrink_to_fit();
  }
}

// A request or forward a broker did not take (a pair's standby; a forward
// a restarted broker got before our Hello): held again, to go to the broker
// that welcomes the link next.
bool bridge::refused_by_broker(std::uint64_t seq) {
  auto hold_again = [&](sent_message& out) {
    if (!out.message.size() || !may_hold()) return false;
    hold_kept(out, true);
    return true;
  };
  if (auto it = pending_.find(seq); it != pending_.end()) {
    if (hold_again(it->second.out)) return true;
    auto p = std::move(it->second);
    pending_.erase(it);  // its deadline entry finds nothing when it comes
    reply_to(std::move(p), {proto::UNAVAILABLE, "the broker it reached is a standby; the request did not run"});
    return true;
  }
  if (auto f = forwards_.find(seq); f != forwards_.end()) {
    if (hold_again(f->second.out)) return true;
    f->second.slot->complete(forward_failed(503, f->second.api));
    forwards_.erase(f);
    return true;
  }
  return false;  // not awaiting an answer: a notice
}

// A pair's standby, or a restarted broker before our Hello, gave back a
// one-way message it did not act on. Held, it goes to the broker that
// welcomes the link next, ahead of what was held since the refusal
// (hold_kept()); never sent now, since the link is still on the broker that
// gave it back (it would come back again).
// One that names one of our ids and awaits no answer is a DISCONNECT notice
// or a CONNECT that has ended (timed out, or lost with a broker): only the
// notice goes again, since a CONNECT's client was told it failed.
void bridge::given_back(const std::string& refused, bool names_ours) {
  if (names_ours) {
    Envelope env;
    if (!env.ParseFromString(refused) || !env.has_lifecycle() || env.lifecycle().kind() != proto::Lifecycle::DISCONNECT)
      return;
  }
  auto held = [](const sent_message& e) { return !e.where.is_held(); };
  if (!may_hold() || !notices_.make_room(refused.size(), held)) {
    // Past --hwm held, or no room kept for notices: lost, as one sent to a
    // broker that died.
    metrics_.broker_link_full.Increment();
    if (log_limit_.allow()) spdlog::warn("gateway bridge: no room to hold a message the broker gave back; dropped");
    return;
  }
  sent_message out;
  out.message = zmq::message_t{refused.data(), refused.size()};
  hold_kept(out, true);
  notices_.push(std::move(out));
  metrics_.kept_notice_bytes.Set(static_cast<double>(notices_.bytes()));
}

// The broker that held a request is gone and its answer will never come (a
// worker's Reply to a job the new broker does not know is dropped there),
// so the client need not wait out the deadline. Whether the job ran is
// unknown: BROKER_LOST says so. A CONNECT's hook may have accepted, and no
// broker will tell its service the socket is not there (the old one would
// have, broker::owe_disconnect): the DISCONNECT notice goes to the new
// broker now, as a disconnect hook takes sids it never accepted. Forwards
// are left to their deadlines: an owner gateway may still answer one
// through the new broker.
void bridge::fail_lost_to_restart() {
  broker_restarts_ = link_->broker_restarts();
  metrics_.broker_restarts.Increment();
  auto below = link_->lost_below();
  std::vector<std::uint64_t> lost;
  for (const auto& [seq, p] : pending_)
    if (p.out.where.epoch < below) lost.push_back(seq);
  if (!lost.empty())
    spdlog::warn("gateway bridge: a new broker; {} requests the previous one held end BROKER_LOST", lost.size());
  for (auto seq : lost) {
    auto it = pending_.find(seq);
    auto p = std::move(it->second);
    pending_.erase(it);  // its deadline entry finds nothing when it comes
    metrics_.broker_lost.Increment();
    // p keeps its own if_gone: reply_to() settles the CONNECT by it.
    if (Envelope notice; p.if_gone && notice.ParseFromArray(p.if_gone->data(), static_cast<int>(p.if_gone->size())) &&
                         notice.has_lifecycle()) {
      notice.mutable_lifecycle()->set_reason("the broker restarted while the connect hook ran");
      send_notice(core::message_of(notice));
      link_watch_.dirty = true;
    }
    reply_to(std::move(p), {proto::BROKER_LOST, "the broker restarted before it answered; the request may have run"});
  }
}

// The broker told every worker that the sockets of our sid prefix are gone
// (we were silent past its --gateway-gone-after, and came back): their
// services have forgotten them. They end here too (their clients reconnect
// and start afresh), and sids from now on begin with a new prefix, which
// the link says at once, so the broker announces nothing of them.
void bridge::renew_sid_prefix() {
  prefixes_gone_ = link_->prefixes_gone();
  if (!prefix_gone_handler_) return;
  metrics_.prefixes_gone.Increment();
  sid_prefix_ = prefix_gone_handler_(sid_prefix_);
  link_->renew_sid_prefix(sid_prefix_);
  link_watch_.dirty = true;
}

// The broker (the same one) welcomed a new socket of the link and said how
// much of what the old one sent it read: a broker that stalled past the
// link's liveness, a network that did. The rest died in the old socket
// (libzmq drops what a pipe held when a new connection takes its peer's
// id): each request and forward still waiting for its answer among it, and
// each one-way message still kept, is sent again, in the order it was
// first sent, on the new socket. None reached the broker, so none can act
// twice. The kept one-way messages the broker read are forgotten. Then
// what was held while the link waited for that Welcome (hold()) goes, in
// the order it came: after all of those, as it was sent after them. (Any
// Welcome ends the wait: one from a new broker names nothing lost.)
void bridge::resend_lost() {
  const auto& received = link_->received_by_broker();
  broker_received_ = received.count;
  const bool release = !link_->holding();  // else the link replaced its socket again: the held ones wait on
  auto again = [&](const core::link_position& at) { return received.lost(at) || (release && at.is_held()); };
  if (release) {
    held_ = held_seq_ = given_back_ = held_bytes_ = 0;
    metrics_.held.Set(0);
  }
  enum class kind { request, forward, notice };
  struct lost_message {
    core::link_position at;
    kind what;
    std::uint64_t seq;        // a request's or forward's
    zmq::message_t message;   // a notice's
  };
  std::vector<lost_message> lost;
  for (const auto& [seq, p] : pending_)
    if (p.out.message.size() && again(p.out.where)) lost.push_back({p.out.where, kind::request, seq, {}});
  for (const auto& [seq, f] : forwards_)
    if (f.out.message.size() && again(f.out.where)) lost.push_back({f.out.where, kind::forward, seq, {}});
  core::take_lost(notices_, received, release, [&](sent_message&& n) {
    lost.push_back({n.where, kind::notice, 0, std::move(n.message)});
  });
  // What the Welcome settled goes (forget_read()) once those it names lost
  // have gone again: it lets go of the bytes of requests sent before its
  // Hello, and those among them are sent again from their bytes.
  if (lost.empty()) {
    forget_read();
    return;
  }
  std::sort(lost.begin(), lost.end(), [](const auto& a, const auto& b) { return a.at < b.at; });
  if (auto died = std::count_if(lost.begin(), lost.end(), [](const auto& l) { return !l.at.is_held(); }))
    spdlog::warn("gateway bridge: {} messages died in the socket to the broker it replaced; sending them again",
                 died);
  for (auto& l : lost) {
    const bool held = l.at.is_held();
    if (l.what == kind::notice) {
      if (send_notice(std::move(l.message), false) && !held) metrics_.notices_resent.Increment();
      continue;
    }
    auto& out = l.what == kind::forward ? forwards_.find(l.seq)->second.out : pending_.find(l.seq)->second.out;
    zmq::message_t message;
    if (held) message = std::move(out.message);  // the only copy: it went nowhere
    else message.copy(out.message);
    if (send_kept(std::move(message), out, false)) {
      if (!held) metrics_.resent.Increment();
      continue;
    }
    // Full: answered now, as when it was first sent.
    if (l.what == kind::forward) {
      auto it = forwards_.find(l.seq);
      it->second.slot->complete(forward_failed(503, it->second.api));
      forwards_.erase(it);
    } else {
      auto it = pending_.find(l.seq);
      auto p = std::move(it->second);
      pending_.erase(it);
      reply_to(std::move(p), {proto::BUSY, "the gateway's link to the broker is full"});
    }
  }
  forget_read();
  link_watch_.dirty = true;
}

void bridge::forget_read() {
  broker_read_ = link_->read_by_broker();
  auto settled_below = link_->welcomed_hello();
  core::forget_read(notices_, broker_read_, settled_below);
  metrics_.kept_notice_bytes.Set(static_cast<double>(notices_.bytes()));
  // A request or forward the broker read cannot die in a socket the link
  // replaces (a broker that restarts loses it whole: fail_lost_to_restart),
  // so its bytes, kept to send it again, go now rather than with its
  // answer: a slow service held each event's bytes here for as long as it
  // ran (300 events of 900 KB waiting on a worker: 270 MB).
  std::size_t kept = 0;
  auto release = [&](sent_message& out) {
    if (out.message.size() && core::read_or_settled(out.where, broker_read_, settled_below)) out.message.rebuild();
    kept += out.message.size();
  };
  for (auto& [seq, p] : pending_) release(p.out);
  for (auto& [seq, f] : forwards_) release(f.out);
  metrics_.kept_request_bytes.Set(static_cast<double>(kept));
  metrics_.unread_bytes.Set(static_cast<double>(link_->unread_bytes() + held_bytes_));
}

void bridge::send_held() {
  if (held_ == 0) return;
  std::vector<std::pair<core::link_position, zmq::message_t>> held;
  for (auto& [seq, p] : pending_)
    if (p.out.where.is_held()) held.emplace_back(p.out.where, std::move(p.out.message));
  for (auto& [seq, f] : forwards_)
    if (f.out.where.is_held()) held.emplace_back(f.out.where, std::move(f.out.message));
  core::take_lost(notices_, {}, true, [&](sent_message&& n) { held.emplace_back(n.where, std::move(n.message)); });
  std::sort(held.begin(), held.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  for (auto& [at, message] : held) link_->send_message(std::move(message));
  held_ = held_seq_ = given_back_ = held_bytes_ = 0;
}

bool bridge::live(time_point at, std::uint64_t seq) const {
  if (auto f = forwards_.find(seq); f != forwards_.end() && f->second.deadline == at) return true;
  auto p = pending_.find(seq);
  return p != pending_.end() && p->second.deadline == at;
}

void bridge::refuse_args(std::string_view what, std::string_view about) {
  metrics_.bad_args.Increment();
  if (log_limit_.allow()) spdlog::warn("bridge: {} {} dropped: its args are not valid JSON", what, printable(about));
}

std::string_view bridge::event_fault(const proto::Emit& emit, std::string_view emit_nsp, std::string_view nsp,
                                     std::string_view about) {
  std::string_view why;
  if (!socketio::valid_args(emit.args())) {
    refuse_args("event for", about);
    return "args are not valid JSON";
  }
  if (socketio::is_reserved_event(emit.event()))
    why = "reserved event name";  // "connect" would fire the client's own connect handlers
  else if (emit_nsp != nsp)
    why = "not the namespace of the socket or topic";  // framed for a namespace the socket is not in
  else
    return {};
  metrics_.bad_event.Increment();
  if (log_limit_.allow())
    spdlog::warn("bridge: event \"{}\" for {} dropped: {}", printable(emit.event()), printable(about), why);
  return why;
}

void bridge::deliver_emit(proto::Emit& emit) {
  if (emit.to_case() != proto::Emit::kSid) return;
  auto it = members_.find(emit.sid());
  auto sink = it == members_.end() ? nullptr : it->second.sink.lock();
  if (!sink) {
    metrics_.client_gone.Increment();
    // A worker awaiting the client's ack hears at once, as from a socket
    // that drops the event (the report goes only to those that asked).
    if (!emit.ack_id().empty()) send_now(ack_refusal(emit.ack_id(), proto::UNAVAILABLE, "the client is gone"));
    report(emit.origin(), proto::DeliveryReport::CLIENT_GONE, emit.sid(), emit.ref());
    return;
  }
  // A sid emit that names no namespace is for the socket's own (the
  // publish API's {"sid": ...} without "nsp").
  const auto& nsp = emit.nsp().empty() ? it->second.nsp : emit.nsp();
  if (auto why = event_fault(emit, nsp, it->second.nsp, emit.sid()); !why.empty()) {
    if (!emit.ack_id().empty()) send_now(ack_refusal(emit.ack_id(), proto::BAD_REQUEST, std::string{why}));
    report(emit.origin(), proto::DeliveryReport::REJECTED, emit.sid(), emit.ref(), why);
    return;
  }
  auto ex = sink->executor();
  if (!ex.running_in_this_thread() && backlog_.refuses(ex)) {
    if (!emit.ack_id().empty()) send_now(ack_refusal(emit.ack_id(), proto::BUSY, std::string{kThreadBehind}));
    report(emit.origin(), proto::DeliveryReport::REJECTED, emit.sid(), emit.ref(), kThreadBehind);
    return;
  }
  // From here the emit's strings are moved, not copied (it is not used again).
  std::vector<std::string> attachments;
  attachments.reserve(emit.attachments_size());
  for (auto& a : *emit.mutable_attachments()) attachments.push_back(std::move(a));
  auto ev = std::make_shared<const outbound_event>(std::string{nsp}, std::move(*emit.mutable_event()),
                                                   std::move(*emit.mutable_args()), std::move(attachments), ++offset_);
  // Reported from the socket's thread, once it took the event or dropped it
  // (failures always, DELIVERED when asked).
  struct receipt {
    std::string to, sid, ref;
    bool delivered;  // report a success too
  };
  std::optional<receipt> r;
  if (!emit.origin().empty())
    r.emplace(std::move(*emit.mutable_origin()), std::move(*emit.mutable_sid()), std::move(*emit.mutable_ref()),
              emit.report_delivery());
  // Checked above: the backlog has room (only this thread adds to it).
  to_sink(ex, [this, sink, ev = std::move(ev), ack = std::move(*emit.mutable_ack_id()), r = std::move(r)]() mutable {
    const char* why = sink->deliver(std::move(ev), std::move(ack));
    if (!r || (!why && !r->delivered)) return;
    report_from(why ? proto::DeliveryReport::REJECTED : proto::DeliveryReport::DELIVERED, std::move(r->to),
                std::move(r->sid), std::move(r->ref), why ? why : "");
  });
}

std::pair<proto::DeliveryReport::Status, std::string_view> report_of(control_outcome outcome) {
  using status = proto::DeliveryReport;
  switch (outcome) {
    case control_outcome::applied: return {status::DELIVERED, {}};
    case control_outcome::unknown_sid: return {status::CLIENT_GONE, {}};
    case control_outcome::other_namespace: return {status::REJECTED, "not the namespace of the socket"};
    case control_outcome::room_limit: return {status::REJECTED, "the socket is in --max-rooms rooms"};
    case control_outcome::long_room: return {status::REJECTED, "the room's name is longer than --max-room-bytes"};
    case control_outcome::thread_behind: return {status::REJECTED, kThreadBehind};
    case control_outcome::no_such_action: return {status::REJECTED, "no such action"};
  }
  return {status::REJECTED, "no such action"};
}

void bridge::on_control(const proto::Control& control) {
  auto [status, detail] = report_of(apply_control(control));
  // A CHECK asks for the report whatever it says.
  if (status != proto::DeliveryReport::DELIVERED || control.action() == proto::Control::CHECK)
    report(control.origin(), status, control.sid(), control.ref(), detail);
}

bool bridge::control(proto::Control control, std::function<void(control_outcome)> done) {
  return post([this, control = std::move(control), done = std::move(done)] { done(apply_control(control)); });
}

bool bridge::describe(std::string sid, std::function<void(std::optional<socket_info>)> done) {
  return post([this, sid = std::move(sid), done = std::move(done)] {
    auto it = members_.find(sid);
    if (it == members_.end() || it->second.sink.expired()) return done(std::nullopt);
    const auto& m = it->second;
    socket_info info{m.nsp, {}};
    for (const auto* topic : m.topics) info.rooms.emplace_back(proto::room_of_topic(*topic, m.nsp));
    done(std::move(info));
  });
}

control_outcome bridge::apply_control(const proto::Control& control, bool owed) {
  auto it = members_.find(control.sid());
  if (it == members_.end()) return control_outcome::unknown_sid;
  auto& m = it->second;
  // A worker's control names the namespace it means (an empty one: the
  // socket's own), as its emits do: a socket of another is not its to move.
  if (!control.nsp().empty() && control.nsp() != m.nsp) {
    metrics_.bad_event.Increment();
    return control_outcome::other_namespace;
  }
  switch (control.action()) {
    case proto::Control::JOIN: {
      if (control.room().size() > config_.max_room_bytes) {
        metrics_.long_room.Increment();
        return control_outcome::long_room;
      }
      auto topic = proto::room_topic(m.nsp, control.room());
      if (auto t = topics_.find(topic); t != topics_.end() && t->second.members.contains(&*it))
        return control_outcome::applied;  // in it already
      if (m.topics.size() >= config_.max_rooms) {
        metrics_.room_limit.Increment();
        return control_outcome::room_limit;
      }
      m.topics.push_back(add_to_topic(std::move(topic), *it));
      return control_outcome::applied;
    }
    case proto::Control::LEAVE: {
      auto t = topics_.find(proto::room_topic(m.nsp, control.room()));
      if (t != topics_.end() && t->second.members.contains(&*it)) {
        std::erase(m.topics, &t->first);
        remove_from_topic(t->first, *it);
      }
      return control_outcome::applied;
    }
    case proto::Control::DISCONNECT: {
      auto sink = m.sink.lock();
      if (!sink) {
        metrics_.client_gone.Increment();
        return control_outcome::unknown_sid;
      }
      if (m.disconnecting) return control_outcome::applied;
      auto kind = owed ? thread_backlog::kind::owed : thread_backlog::kind::sheddable;
      if (!to_sink(sink->executor(), [sink] { sink->deliver_disconnect(); }, 1, kind))
        return control_outcome::thread_behind;
      m.disconnecting = true;
      return control_outcome::applied;
    }
    case proto::Control::CHECK:
      // Is the socket here? Applied when it is (DELIVERED), whether or not
      // its disconnect is under way: its DISCONNECT then reaches the service.
      if (m.sink.expired()) {
        metrics_.client_gone.Increment();
        return control_outcome::unknown_sid;
      }
      return control_outcome::applied;
    default: return control_outcome::no_such_action;
  }
}

void bridge::on_event(std::string_view topic, std::string_view body, std::optional<proto::event_stamp> stamp) {
  auto local = topics_.find(topic);
  if (local == topics_.end()) {
    // A room with no local member, heard through a namespace-wide
    // subscription (or one on its way out).
    metrics_.unheard.Increment();
    return;
  }
  metrics_.events_heard.Increment();
  if (stamp) {
    if (auto missed = local->second.heard.missed_before(*stamp); missed > 0) {
      auto& forgive = local->second.forgive_until;
      // A topic subscribed again soon after an unsubscription may still
      // bring events from before it, then a gap: those published while it
      // was not subscribed, not lost. Its first gap then is not counted.
      if (forgive == time_point{} || clock::now() >= forgive) {
        metrics_.events_lost.Increment(static_cast<double>(missed));
        if (log_limit_.allow())
          spdlog::warn("bridge: {} events on topic {} lost on the way from the broker (its XPUB queue for us "
                       "past --hwm, or a reconnect)", missed, printable(topic));
      }
      forgive = {};
    }
  }
  const auto& members = local->second.members;
  auto env = proto::decode(body);
  if (env && env->has_control()) return on_room_control(topic, members, env->control());
  if (!env || !env->has_emit()) {
    if (log_limit_.allow()) spdlog::warn("bridge: malformed room event dropped");
    return;
  }
  const auto& emit = env->emit();
  // The topic names the namespace (and room) the event is framed for.
  if (topic != proto::topic_for(emit)) {
    metrics_.bad_event.Increment();
    if (log_limit_.allow()) spdlog::warn("bridge: event on topic {} is not for that topic: dropped", printable(topic));
    return;
  }
  if (!event_fault(emit, emit.nsp(), emit.nsp(), topic).empty()) return;  // (its namespace: the topic's, checked above)
  std::unordered_set<std::string_view> except(emit.except_sids().begin(), emit.except_sids().end());
  auto ev = std::make_shared<const outbound_event>(
      emit.nsp(), emit.event(), emit.args(),
      std::vector<std::string>(emit.attachments().begin(), emit.attachments().end()), ++offset_);
  // One post per executor (I/O thread), not per member.
  std::vector<std::pair<io_executor, std::vector<std::shared_ptr<client_sink>>>> groups;
  for (const auto* who : members) {
    if (!except.empty() && except.contains(who->first)) continue;
    auto sink = who->second.sink.lock();
    if (!sink) continue;
    auto ex = sink->executor();
    auto g = std::find_if(groups.begin(), groups.end(), [&](const auto& grp) { return grp.first == ex; });
    if (g == groups.end()) {
      groups.emplace_back(ex, std::vector<std::shared_ptr<client_sink>>{});
      g = std::prev(groups.end());
    }
    g->second.push_back(std::move(sink));
  }
  for (auto& [ex, sinks] : groups) {
    if (ex.running_in_this_thread()) {
      for (const auto& s : sinks) to_sink(ex, [&s, &ev] { (void)s->deliver(ev, {}); });  // one failing sink skips no other
      continue;
    }
    auto n = sinks.size();
    backlog_.post(ex, [sinks = std::move(sinks), ev] {
      for (const auto& s : sinks) (void)s->deliver(ev, {});  // a drop is counted there
    }, n);  // refused: counted (thread_backlog), as a slow consumer's frames are
  }
}

void bridge::on_room_control(std::string_view topic, const members_of_topic& members,
                             const proto::Control& control) {
  if (topic != proto::topic_for(control)) {
    metrics_.bad_event.Increment();
    if (log_limit_.allow())
      spdlog::warn("bridge: room-wide control on topic {} is not for that topic: dropped", printable(topic));
    return;
  }
  metrics_.room_controls.Increment();
  // Each member as if a worker had named it: the same rules, limits and
  // counters (a join past --max-rooms is not applied, and counted), but a
  // disconnect is owed to every member, not shed at --max-thread-backlog
  // half way through the room. A copy of the members: a leave of this very
  // room changes the set.
  proto::Control one;
  one.set_action(control.action());
  one.set_nsp(control.nsp());
  one.set_room(control.room());
  std::vector<std::string> sids;
  sids.reserve(members.size());
  for (const auto* who : members) sids.push_back(who->first);
  for (auto& sid : sids) {
    one.set_sid(std::move(sid));
    (void)apply_control(one, true);
  }
}

const std::string* bridge::add_to_topic(std::string topic, member_entry& who) {
  auto [it, added] = topics_.try_emplace(std::move(topic));
  auto& [name, local] = *it;
  if (added && !unsubscribed_.empty()) {
    // The filter that lets the topic's events in: with namespace-wide
    // subscriptions a room's is its namespace's rooms prefix ("r<nsp>\0").
    std::string_view filter = name;
    if (name.front() == 'r' && config_.subscriptions == room_subscriptions::whole_namespace)
      filter = filter.substr(0, filter.find('\0') + 1);
    auto now = clock::now();
    if (unsubscribed_.seen(filter, now)) local.forgive_until = now + resubscription_window;
  }
  if (local.members.empty()) subscribe(name, true);
  local.members.insert(&who);
  return &name;
}

void bridge::remove_from_topic(const std::string& topic, member_entry& who) {
  auto it = topics_.find(topic);
  if (it == topics_.end()) return;
  it->second.members.erase(&who);
  if (it->second.members.empty()) {
    subscribe(topic, false);
    topics_.erase(it);  // `topic` may be its key: not used after this
  }
}

void bridge::subscribe(const std::string& topic, bool on) {
  auto set = [this, on](const std::string& t) {
    if (on) {
      sub_->set(zmq::sockopt::subscribe, t);
      return;
    }
    sub_->set(zmq::sockopt::unsubscribe, t);
    if (!unsubscribed_.remember(t, clock::now())) metrics_.unsubscriptions_forgotten.Increment();
    metrics_.recent_unsubscriptions.Set(static_cast<double>(unsubscribed_.size()));
  };
  bool room = topic.front() == 'r';
  if (room) {
    if (on) metrics_.rooms.Increment();
    else metrics_.rooms.Decrement();
  }
  if (!room || config_.subscriptions == room_subscriptions::each_room) set(topic);
  // A namespace's first local socket: every room of it from now on, so that
  // no join has a subscription still to make (--room-subscriptions).
  if (!room && config_.subscriptions == room_subscriptions::whole_namespace)
    set(proto::rooms_prefix(std::string_view{topic}.substr(1, topic.size() - 2)));
  sub_watch_.dirty = true;
}

Envelope ack_refusal(std::string ack_id, proto::Code code, std::string message) {
  Envelope env;
  auto* r = env.mutable_reply();
  r->set_id(std::move(ack_id));
  r->set_code(code);
  r->set_message(std::move(message));
  return env;
}

namespace {

Envelope delivery_report(proto::DeliveryReport::Status status, std::string to, std::string sid, std::string ref,
                         std::string_view detail) {
  Envelope env;
  auto* r = env.mutable_report();
  r->set_status(status);
  r->set_sid(std::move(sid));
  r->set_ref(std::move(ref));
  if (!detail.empty()) r->set_detail(std::string{detail});
  r->set_to(std::move(to));
  return env;
}

}  // namespace

void bridge::send_now(const Envelope& env) {
  send_notice(core::message_of(env));
  link_watch_.dirty = true;
}

void bridge::report_from(proto::DeliveryReport::Status status, std::string to, std::string sid, std::string ref,
                         std::string_view detail) {
  auto env = delivery_report(status, std::move(to), std::move(sid), std::move(ref), detail);
  if (ex_ && ex_->running_in_this_thread()) return send_now(env);
  send(env);  // through the command queue (--bridge-queue: past it the report is dropped, counted)
}

void bridge::report(const std::string& to, proto::DeliveryReport::Status status, const std::string& sid,
                    const std::string& ref, std::string_view detail) {
  if (!to.empty()) send_now(delivery_report(status, to, sid, ref, detail));
}

}  // namespace sidecast::gateway
