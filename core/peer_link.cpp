#include "core/peer_link.hpp"

#include <algorithm>
#include <cerrno>
#include <random>

#include <spdlog/spdlog.h>

namespace sidecast::core {

peer_link::peer_link(zmq::context_t& context, peer_link_options options)
    : context_{context},
      options_{std::move(options)},
      is_local_{is_local_endpoint(options_.endpoint)},
      own_incarnation_{draw_incarnation()},
      interval_{options_.heartbeat_interval},
      liveness_{options_.heartbeat_liveness} {
  if (!options_.backup_endpoint.empty() && (is_local_ || is_local_endpoint(options_.backup_endpoint)))
    throw std::invalid_argument("a broker pair is not local://: " + options_.endpoint + ", " +
                                options_.backup_endpoint);
  connect();
}

void peer_link::connect() {
  // The new socket first: out of descriptors, it throws before anything
  // of this link has changed (tick() then keeps the old socket as it was).
  zmq::socket_t fresh;
  if (!is_local_) {
    fresh = zmq::socket_t{context_, zmq::socket_type::dealer};
    fresh.set(zmq::sockopt::routing_id, options_.id);
    fresh.set(zmq::sockopt::linger, 0);
    fresh.set(zmq::sockopt::sndhwm, options_.sndhwm);
    fresh.set(zmq::sockopt::rcvhwm, options_.rcvhwm);
    apply(fresh, options_.curve);
    fresh.connect(endpoint());
  }
  // What the socket replaced held died with it: the line of what a new
  // broker's Welcome may fail moves up to the new socket's Hello.
  unwelcomed_from_ = 0;
  if (incarnation_ != 0) replaced_since_welcome_ = true;  // what it reads from now on is the tail
  // A mark promised on the socket replaced now would end what that socket
  // was sent again, not what this one will be: the tail waits for the next
  // Welcome, which decides.
  awaiting_resent_ = false;
  if (is_local_) {
    local_.reset();  // a new connection under the same id replaces the old one at the broker
    local_ = local_dealer::connect(options_.endpoint, options_.id, options_.sndhwm, options_.rcvhwm);
    if (local_ && hook_) local_->hook(hook_);
    if (!local_ && log_limit_.allow()) spdlog::warn("peer link: nothing is bound at {}", options_.endpoint);
    start();
    return;
  }
  socket_ = std::move(fresh);
  start();
}

void peer_link::hook(ring_hook h) {
  hook_ = std::move(h);
  if (local_) local_->hook(hook_);
}

void peer_link::start() {
  welcomed_ = false;
  standby_ = false;
  auto now = clock::now();
  broker_expiry_ = now + interval_ * liveness_;
  next_heartbeat_ = now + interval_;
  send_hello();
}

void peer_link::send_hello() {
  proto::Envelope env;
  auto* hello = env.mutable_hello();
  hello->set_role(options_.role);
  hello->set_id(options_.id);
  hello->set_sid_prefix(options_.sid_prefix);
  hello->set_protocol_version(proto::protocol_version);
  for (const auto& [name, capacity] : options_.services) {
    auto* s = hello->add_services();
    s->set_name(name);
    s->set_capacity(capacity);
  }
  hello->set_draining(draining_);
  hello->set_incarnation(own_incarnation_);
  hello->set_connection(stats_.reconnects);
  ++stats_.hellos;
  hello->set_hello(stats_.hellos);
  if (unwelcomed_from_ == 0) unwelcomed_from_ = stats_.hellos;
  send(env);
  sent_since_hello_ = 0;  // the broker counts what comes after it
  sent_bytes_ = read_bytes_ = 0;
  reads_reported_ = false;
  checkpoints_.clear();
}

void peer_link::renew_sid_prefix(std::string prefix) {
  options_.sid_prefix = std::move(prefix);
  send_hello();
  renewed_at_hello_ = stats_.hellos;
}

void peer_link::drain() {
  if (draining_) return;
  draining_ = true;
  proto::Envelope env;
  env.mutable_drain();
  send(env);
}

void peer_link::goodbye(std::chrono::milliseconds linger) {
  proto::Envelope env;
  env.mutable_goodbye();
  send(env);
  if (!is_local_) socket_.set(zmq::sockopt::linger, static_cast<int>(linger.count()));
}

void peer_link::heard_from_broker(clock::time_point now) {
  broker_expiry_ = standby_ ? standby_expiry_ : now + interval_ * liveness_;
}

std::optional<proto::Envelope> peer_link::receive() {
  proto::Envelope env;
  if (!receive_into(env)) return std::nullopt;
  return env;
}

int peer_link::fd() const {
  if (is_local_) return local_ ? local_->fd() : -1;
  return socket_.get(zmq::sockopt::fd);
}

bool peer_link::has_input() {
  if (!released_.empty()) return true;
  if (is_local_) return local_ && local_->has_input();
  return (socket_.get(zmq::sockopt::events) & ZMQ_POLLIN) != 0;
}

bool peer_link::receive_into(proto::Envelope& env) { return receive_into(env, {}); }

bool peer_link::receive_into(proto::Envelope& env, const std::function<bool(std::string_view)>& take) {
  for (;;) {
    zmq::message_t msg;
    bool extra = false;
    auto now = clock::now();
    if (!released_.empty()) {
      // The tail, once what was sent again came (hold_tail()).
      msg = std::move(released_.front());
      released_.pop_front();
    } else {
      bool got = is_local_ ? local_ && local_->receive(msg) : socket_.recv(msg, zmq::recv_flags::dontwait).has_value();
      if (!got) return false;
      // Extra frames are not part of protocol v1: drain and drop them.
      while (!is_local_ && msg.more()) {  // a local:// message is always one frame
        extra = true;
        if (!socket_.recv(msg, zmq::recv_flags::dontwait)) break;
      }
      heard_from_broker(now);
      auto kind = proto::kind_of(msg.to_string_view());
      if (kind != proto::Envelope::kWelcome) {
        if (replaced_since_welcome_) ++read_tail_;
        else ++read_to_;
      }
      if (!extra && hold_tail(kind)) {
        tail_.push_back(std::move(msg));
        continue;
      }
    }
    if (!extra && take && take(msg.to_string_view())) {
      // What `env` may hold from a heartbeat read before is not this message.
      if (env.kind_case() != proto::Envelope::KIND_NOT_SET) env.Clear();
      return true;
    }
    if (extra || !proto::decode_into(msg.to_string_view(), env)) {
      ++stats_.malformed;
      if (log_limit_.allow()) spdlog::warn("peer link: dropped a malformed message from the broker");
      continue;
    }
    switch (env.kind_case()) {
      case proto::Envelope::kHeartbeat: {
        // The broker stalled and asks which connection we are on: this one.
        if (env.heartbeat().probe() != 0) send(env);
        if (env.heartbeat().resent() && awaiting_resent_) release_tail();  // what died came again
        const auto& read = env.heartbeat().broker_read();
        read_by_broker_ = std::max(read_by_broker_, link_position{read.hello(), read.count()});
        if (read.hello() == epoch()) reads_reported_ = true;
        if (read_by_broker_.epoch == epoch())
          for (; !checkpoints_.empty() && checkpoints_.front().first <= read_by_broker_.sent; checkpoints_.pop_front())
            read_bytes_ = checkpoints_.front().second;
        continue;
      }
      case proto::Envelope::kWelcome: {
        const auto& w = env.welcome();
        bool awaiting_resent = false;
        if (w.heartbeat_interval_ms() > 0) interval_ = std::chrono::milliseconds(w.heartbeat_interval_ms());
        if (w.heartbeat_liveness() > 0) liveness_ = w.heartbeat_liveness();
        standby_ = false;  // it serves after all (the pair decided)
        refused_since_welcome_ = false;
        // The broker's interval wins; a heartbeat planned with a longer local
        // one would come too late for the broker's liveness check.
        next_heartbeat_ = std::min(next_heartbeat_, now + interval_);
        heard_from_broker(now);
        if (!welcomed_) spdlog::info("connected to broker {} at {}", w.broker_id(), endpoint());
        welcomed_ = true;
        if (w.previous_hello() == 0) ++fresh_welcomes_;
        // A broker that is not the one before: what we sent that one before
        // our first Hello to this one is gone with it. (A broker of a build
        // before incarnations sends 0: nothing is known.)
        if (w.incarnation() != 0 && w.incarnation() != incarnation_) {
          if (incarnation_ != 0) {
            ++broker_restarts_;
            lost_below_ = unwelcomed_from_;
          }
          incarnation_ = w.incarnation();
        } else if (w.previous_hello() != 0) {
          // The same broker, which knew this link: what it did not read
          // died in a replaced socket (a Welcome on the socket of the
          // Hello before says nothing is missing).
          received_by_broker_ = {received_by_broker_.count + 1, w.previous_hello(), w.received(), w.hello()};
          if (replaced_since_welcome_) {
            // And what we did not read of what it sent: it waits for this
            // before it sends us anything more, to send that again first.
            proto::Envelope report;
            auto* read = report.mutable_heartbeat()->mutable_read();
            read->set_read_to(read_to_);
            read->set_tail(read_tail_);
            send(report);
            awaiting_resent = w.marks_resent();
          }
        }
        // The tail waits for what is sent again, or goes now if nothing is.
        if (awaiting_resent) {
          awaiting_resent_ = true;
          // Then it goes anyway (tick()): the broker's mark comes within about
          // a liveness, and a broker silent that long is replaced first.
          resent_due_ = now + 2 * interval_ * liveness_;
        } else {
          release_tail();
        }
        read_to_ = w.sent();
        read_tail_ = 0;
        welcome_hello_ = w.hello();
        max_message_bytes_ = w.max_message_bytes();
        // A Welcome to a Hello sent before the last renewal (Hellos that
        // crossed) speaks of a prefix already renewed.
        if (w.prefix_gone() && w.hello() >= renewed_at_hello_) ++prefixes_gone_;
        replaced_since_welcome_ = false;
        unwelcomed_from_ = 0;
        continue;
      }
      case proto::Envelope::kDrain:
        // The broker's confirmation: every job it sent before is here.
        if (draining_) drain_confirmed_ = true;
        continue;
      case proto::Envelope::kError:
        // A broker of a build before Drain refuses it (BAD_REQUEST), in
        // order on the pipe, as a later broker confirms it.
        if (draining_ && !drain_confirmed_ && env.error().code() == proto::BAD_REQUEST) drain_confirmed_ = true;
        if (env.error().code() == proto::STANDBY) {
          // The standby of a pair (or one that stepped down): the other
          // serves (it says takeover_ms 0: go there after an interval), or
          // is dead and this one has not seen it yet (it says when it may
          // take over: the link stays until then, heartbeating, a liveness
          // at most, and the standby takes over at one of those heartbeats
          // and says NOT_REGISTERED). Never at once: two brokers that both
          // refuse while the pair decides are not alternated in a loop.
          auto takeover = std::chrono::milliseconds(env.error().takeover_ms());
          auto wait = takeover.count() == 0 ? interval_
                                            : std::min<clock::duration>(interval_ * liveness_, takeover + interval_);
          refused_since_welcome_ = true;  // holding(): what is sent now waits for a Welcome
          if (!standby_) {
            standby_ = true;
            standby_expiry_ = now + wait;
            welcomed_ = false;
            if (log_limit_.allow()) spdlog::info("broker at {}: {}", endpoint(), env.error().message());
          } else {
            standby_expiry_ = std::min(standby_expiry_, now + wait);
          }
          broker_expiry_ = standby_expiry_;
          if (env.error().id().empty() && env.error().refused().empty()) continue;
          return true;  // a job or a one-way message it refused (neither acted): the application sends it again
        }
        if (env.error().code() == proto::NOT_REGISTERED) {
          if (standby_) {  // a standby that took over
            standby_ = false;
            heard_from_broker(now);
          }
          // The broker restarted and the connection came back by itself.
          // What is sent until the Welcome waits (holding()), to go after
          // what the new broker gives back (Error.refused, or a forward's
          // id): it refused all that, sent before this Hello.
          welcomed_ = false;
          refused_since_welcome_ = true;
          send_hello();
          if (env.error().id().empty() && env.error().refused().empty()) continue;
          return true;  // a job it took (the application keeps it), or one it gave back (sent again)
        }
        if (log_limit_.allow())
          spdlog::warn("broker error {}: {}", proto::Code_Name(env.error().code()), env.error().message());
        return true;
      default:
        return true;
    }
  }
}

// What the link reads on a new socket before its Welcome (the tail) is the
// newest the broker sent; older messages that died in the replaced socket
// may be sent again after the Welcome. So the tail's application messages
// wait (up to rcvhwm of them; link messages are handled at once, but for
// a Drain confirmation, which must not overtake the jobs before it), across
// further replacements, until the broker marks the end of what it sent
// again, or a Welcome says nothing will be.
bool peer_link::hold_tail(proto::Envelope::KindCase kind) const {
  if (!replaced_since_welcome_ || tail_.size() >= static_cast<std::size_t>(options_.rcvhwm)) return false;
  switch (kind) {
    case proto::Envelope::kWelcome:
    case proto::Envelope::kHeartbeat:
    case proto::Envelope::kError:
    case proto::Envelope::KIND_NOT_SET: return false;  // the link's own, or malformed: handled now
    default: return true;
  }
}

void peer_link::release_tail() {
  awaiting_resent_ = false;
  if (tail_.empty()) return;
  // Ahead of anything read after it; after what was released before.
  for (auto& m : tail_) released_.push_back(std::move(m));
  tail_.clear();
}

std::uint64_t draw_incarnation() {
  std::random_device device;
  // The clock mixed in, should the device be a poor one.
  std::uint64_t n = (std::uint64_t{device()} << 32) ^ device() ^
                    static_cast<std::uint64_t>(clock::now().time_since_epoch().count());
  return n == 0 ? 1 : n;
}

zmq::message_t message_of(const proto::Envelope& env) {
  zmq::message_t message{env.ByteSizeLong()};
  env.SerializeWithCachedSizesToArray(static_cast<std::uint8_t*>(message.data()));
  return message;
}

bool peer_link::send(const proto::Envelope& env) { return send_message(message_of(env)); }

bool peer_link::send_bytes(std::string_view bytes) { return send_message(zmq::message_t{bytes.data(), bytes.size()}); }

bool peer_link::send_message(zmq::message_t&& message) {
  auto size = message.size();
  bool sent = is_local_ ? local_ && local_->send(message)
                        : socket_.send(message, zmq::send_flags::dontwait).has_value();
  if (!sent) {
    ++stats_.send_dropped;
    return false;
  }
  ++sent_since_hello_;
  sent_bytes_ += size;
  if (sent_bytes_ - (checkpoints_.empty() ? read_bytes_ : checkpoints_.back().second) >= unread_grain &&
      checkpoints_.size() < max_checkpoints)
    checkpoints_.emplace_back(sent_since_hello_, sent_bytes_);
  return true;
}

bool peer_link::send_message(zmq::message_t&& message, kept_sends::entry& kept) {
  kept.message.copy(message);
  if (!send_message(std::move(message))) return false;
  kept.where = last_sent();
  return true;
}

void peer_link::tick(clock::time_point now) {
  if (auto late = now - next_tick(); late > interval_) {
    // Our own thread did not run for a while (the process was stopped, or
    // starved): what the broker sent meanwhile waits unread, and the time
    // away is not its silence. At least an interval to read it, at most a
    // whole liveness (a thread starved on every tick still finds a broker
    // that is really silent dead, only later).
    broker_expiry_ = std::clamp(broker_expiry_ + late, now + interval_, now + interval_ * liveness_);
  }
  if (now >= broker_expiry_) {
    const auto& from = endpoint();
    bool moves = !options_.backup_endpoint.empty();
    bool was_standby = standby_, was_welcomed = welcomed_;  // start() clears them
    if (moves) on_backup_ = !on_backup_;
    ++stats_.reconnects;  // the new socket's number, in its Hello
    try {
      connect();
    } catch (const zmq::error_t& e) {
      // Out of descriptors or memory for the new socket (EMFILE while a
      // gateway's clients hold them all): not this link's end. It keeps
      // its socket and state as they were (connect() changed nothing) and
      // tries again an interval on; thrown, it left the caller's loop
      // unarmed and came back at each of its turns (two a client event,
      // each logged).
      if (e.num() != EMFILE && e.num() != ENFILE && e.num() != ENOMEM && e.num() != ENOBUFS) throw;
      if (moves) on_backup_ = !on_backup_;
      --stats_.reconnects;
      if (log_limit_.allow())
        spdlog::error("peer link: no new socket to the broker ({}): trying again in {} ms", e.what(),
                      std::chrono::duration_cast<std::chrono::milliseconds>(interval_).count());
      broker_expiry_ = now + interval_;
      return;
    }
    if (was_standby)
      spdlog::info("broker at {} is a standby; trying {}", from, endpoint());
    else if (was_welcomed || moves)
      spdlog::warn("broker at {} went silent; {} {}", from, moves ? "trying" : "reconnecting to", endpoint());
    return;
  }
  if (awaiting_resent_ && now >= resent_due_) release_tail();  // the mark never came: the tail goes now
  if (now >= next_heartbeat_) {
    // Every interval, whatever else is sent: on the socket the broker
    // welcomed, it says what we read, and the broker forgets what it kept
    // of that (a replaced socket's reads are told by the read report).
    proto::Envelope env;
    auto& beat = *env.mutable_heartbeat();
    if (welcomed_ && !replaced_since_welcome_ && welcome_hello_ != 0) {
      beat.mutable_peer_read()->set_hello(welcome_hello_);
      beat.mutable_peer_read()->set_read_to(read_to_);
    }
    send(env);
    next_heartbeat_ = now + interval_;
  }
}

clock::time_point peer_link::next_tick() const {
  auto at = std::min(broker_expiry_, next_heartbeat_);
  return awaiting_resent_ ? std::min(at, resent_due_) : at;
}

}  // namespace sidecast::core
