#include "core/curve.hpp"

#include <algorithm>
#include <array>
#include <stdexcept>

#include <spdlog/spdlog.h>

namespace sidecast::core {
namespace {

std::string decode_key(const std::string& z85, const char* what) {
  if (z85.size() != 40) throw std::invalid_argument(std::string{what} + ": a CURVE key is 40 Z85 characters");
  std::array<std::uint8_t, 32> bin{};
  if (!zmq_z85_decode(bin.data(), z85.c_str())) throw std::invalid_argument(std::string{what} + ": not Z85");
  return {reinterpret_cast<const char*>(bin.data()), bin.size()};
}

}  // namespace

std::pair<std::string, std::string> curve_keypair() {
  char pub[41] = {}, sec[41] = {};
  if (zmq_curve_keypair(pub, sec) != 0) throw std::runtime_error("this libzmq has no CURVE support");
  return {pub, sec};
}

std::string curve_public_of(const std::string& secret_key) {
  decode_key(secret_key, "secret key");
  char pub[41] = {};
  if (zmq_curve_public(pub, secret_key.c_str()) != 0) throw std::invalid_argument("secret key: not a CURVE key");
  return pub;
}

void apply(zmq::socket_t& socket, const curve_client& keys) {
  if (!keys.enabled()) return;
  decode_key(keys.server_key, "broker public key");
  socket.set(zmq::sockopt::curve_serverkey, keys.server_key);
  socket.set(zmq::sockopt::curve_publickey, curve_public_of(keys.secret_key));
  socket.set(zmq::sockopt::curve_secretkey, keys.secret_key);
}

void apply_server(zmq::socket_t& socket, const std::string& secret_key) {
  decode_key(secret_key, "broker secret key");
  socket.set(zmq::sockopt::curve_server, true);
  socket.set(zmq::sockopt::curve_secretkey, secret_key);
}

zap_handler::zap_handler(zmq::context_t& context, const std::vector<std::string>& allowed_z85)
    : socket_{context, zmq::socket_type::rep} {
  for (const auto& k : allowed_z85) allowed_.push_back(decode_key(k, "allowed public key"));
  socket_.set(zmq::sockopt::linger, 0);
  socket_.bind("inproc://zeromq.zap.01");
}

bool zap_handler::handle() {
  // Request: version, request id, domain, address, identity, mechanism, credentials...
  std::vector<zmq::message_t> frames;
  for (;;) {
    zmq::message_t frame;
    if (!socket_.recv(frame, zmq::recv_flags::dontwait)) return true;
    bool more = frame.more();
    frames.push_back(std::move(frame));
    if (!more) break;
  }
  bool ok = frames.size() >= 7 && frames[0].to_string_view() == "1.0" && frames[5].to_string_view() == "CURVE" &&
            std::find(allowed_.begin(), allowed_.end(), frames[6].to_string()) != allowed_.end();
  std::string request_id = frames.size() > 1 ? frames[1].to_string() : std::string{};
  socket_.send(zmq::str_buffer("1.0"), zmq::send_flags::sndmore);
  socket_.send(zmq::buffer(request_id), zmq::send_flags::sndmore);
  socket_.send(ok ? zmq::str_buffer("200") : zmq::str_buffer("400"), zmq::send_flags::sndmore);
  socket_.send(ok ? zmq::str_buffer("OK") : zmq::str_buffer("key not allowed"), zmq::send_flags::sndmore);
  socket_.send(zmq::str_buffer(""), zmq::send_flags::sndmore);  // user id
  socket_.send(zmq::str_buffer(""), zmq::send_flags::none);     // metadata
  if (!ok) {
    ++refused_;
    spdlog::warn("refused a CURVE peer at {}: public key not allowed",
                 frames.size() > 3 ? frames[3].to_string() : std::string{"?"});
  }
  return ok;
}

}  // namespace sidecast::core
