#pragma once
// CurveZMQ between the broker and its peers: encryption, and an allowlist of
// peer public keys enforced by a ZAP handler in the broker. Keys are Z85 text
// (40 characters); `sidecast keygen` prints a pair.
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include <zmq.hpp>

namespace sidecast::core {

/// A peer's keys: its own secret key and the broker's public key. Empty:
/// plain connections.
struct curve_client {
  std::string secret_key;
  std::string server_key;
  bool enabled() const { return !secret_key.empty(); }
};

/// A new key pair, {public, secret}, in Z85.
std::pair<std::string, std::string> curve_keypair();
/// The public key of a Z85 secret key; throws std::invalid_argument if it is not one.
std::string curve_public_of(const std::string& secret_key);

/// Makes `socket` a CURVE client of the broker (before connect()).
void apply(zmq::socket_t& socket, const curve_client& keys);
/// Makes `socket` a CURVE server with `secret_key` (before bind()).
void apply_server(zmq::socket_t& socket, const std::string& secret_key);

/// The ZAP handler (RFC 27) that admits only listed client public keys. It
/// must exist (bound) before any CURVE server socket binds; its owner polls
/// socket() and calls handle() when readable.
class zap_handler {
 public:
  zap_handler(zmq::context_t& context, const std::vector<std::string>& allowed_z85);
  zmq::socket_t& socket() { return socket_; }
  /// Answers one request; returns false if it refused the peer.
  bool handle();
  std::uint64_t refused() const { return refused_; }

 private:
  zmq::socket_t socket_;
  std::vector<std::string> allowed_;  // 32-byte binary keys
  std::uint64_t refused_ = 0;
};

}  // namespace sidecast::core
