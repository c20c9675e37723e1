#pragma once
// The DEALER side of the broker protocol, shared by gateways and workers:
// announces the peer (Hello), keeps heartbeats both ways, notices a dead or
// restarted broker and re-announces. It owns no thread: the owning loop
// polls socket(), calls receive() while it returns messages, and calls
// tick() at next_tick().
#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <zmq.hpp>

#include "core/curve.hpp"
#include "core/log.hpp"
#include "proto/codec.hpp"

namespace sidecast::core {

using clock = std::chrono::steady_clock;

struct peer_link_options {
  std::string endpoint;  // the broker's ROUTER endpoint
  std::string id;        // routing id, sid prefix for gateways; valid_peer_id()
  proto::Role role = proto::ROLE_WORKER;
  std::vector<std::pair<std::string, unsigned>> services;  // workers: name, capacity
  std::chrono::milliseconds heartbeat_interval{1000};      // until the broker's Welcome
  unsigned heartbeat_liveness = 3;
  int sndhwm = 100000;
  int rcvhwm = 100000;
  curve_client curve;  // empty: no encryption
};

struct peer_link_stats {
  std::uint64_t reconnects = 0;     // sockets replaced after broker silence
  std::uint64_t hellos = 0;         // Hello messages sent
  std::uint64_t send_dropped = 0;   // sends refused (HWM reached)
  std::uint64_t malformed = 0;      // undecodable messages from the broker
};

/// An envelope serialized straight into a message ZeroMQ can send (no
/// string in between).
zmq::message_t message_of(const proto::Envelope& env);

class peer_link {
 public:
  peer_link(zmq::context_t& context, peer_link_options options);

  zmq::socket_t& socket() { return socket_; }

  /// Next message for the application, or nullopt when none is waiting.
  /// Welcome, Heartbeat and registration errors are handled here.
  std::optional<proto::Envelope> receive();
  /// The same, parsed into `env` (which may live on an arena); false when
  /// none is waiting.
  bool receive_into(proto::Envelope& env);

  /// Sends without blocking; false (and counted) when the queue is full.
  bool send(const proto::Envelope& env);
  bool send_bytes(std::string_view bytes);
  bool send_message(zmq::message_t&& message);

  /// Heartbeats and broker liveness; call at or after next_tick().
  void tick(clock::time_point now);
  clock::time_point next_tick() const;

  /// True once the broker welcomed this connection.
  bool welcomed() const { return welcomed_; }
  const peer_link_stats& stats() const { return stats_; }
  const peer_link_options& options() const { return options_; }

 private:
  void connect();
  void send_hello();
  void heard_from_broker(clock::time_point now);

  zmq::context_t& context_;
  peer_link_options options_;
  zmq::socket_t socket_;
  bool welcomed_ = false;
  std::chrono::milliseconds interval_;
  unsigned liveness_;
  clock::time_point broker_expiry_;
  clock::time_point next_heartbeat_;
  peer_link_stats stats_;
  log_limiter log_limit_;
};

}  // namespace sidecast::core
