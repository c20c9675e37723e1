#include "proto/codec.hpp"

#include <limits>

using namespace std::literals;

namespace sidecast::proto {

bool decode_into(std::string_view bytes, Envelope& env) {
  return bytes.size() <= static_cast<std::size_t>(std::numeric_limits<int>::max()) &&
         env.ParseFromArray(bytes.data(), static_cast<int>(bytes.size())) &&
         env.kind_case() != Envelope::KIND_NOT_SET;
}

std::optional<Envelope> decode(std::string_view bytes) {
  Envelope env;
  if (!decode_into(bytes, env)) return std::nullopt;
  return env;
}

std::string encode(const Envelope& env) { return env.SerializeAsString(); }

std::string_view kind_name(const Envelope& env) {
  switch (env.kind_case()) {
    case Envelope::kHello: return "hello";
    case Envelope::kWelcome: return "welcome";
    case Envelope::kHeartbeat: return "heartbeat";
    case Envelope::kRequest: return "request";
    case Envelope::kReply: return "reply";
    case Envelope::kEmit: return "emit";
    case Envelope::kControl: return "control";
    case Envelope::kLifecycle: return "lifecycle";
    case Envelope::kCancel: return "cancel";
    case Envelope::kReport: return "report";
    case Envelope::kError: return "error";
    case Envelope::kForward: return "forward";
    case Envelope::kAnswer: return "answer";
    case Envelope::KIND_NOT_SET: break;
  }
  return "none";
}

std::string room_topic(std::string_view nsp, std::string_view room) {
  std::string t;
  t.reserve(nsp.size() + room.size() + 3);
  t += 'r';
  t += nsp;
  t += '\0';
  t += room;
  t += '\0';
  return t;
}

std::string namespace_topic(std::string_view nsp) {
  std::string t;
  t.reserve(nsp.size() + 2);
  t += 'n';
  t += nsp;
  t += '\0';
  return t;
}

std::string topic_for(const Emit& emit) {
  switch (emit.to_case()) {
    case Emit::kRoom: return room_topic(emit.nsp(), emit.room());
    case Emit::kBroadcast: return namespace_topic(emit.nsp());
    default: return {};
  }
}

bool valid_peer_id(std::string_view id) {
  return !id.empty() && id.size() <= 64 && id.find_first_of(".:\0"sv) == std::string_view::npos;
}

std::string_view sid_owner(std::string_view sid) {
  auto dot = sid.find('.');
  return dot == std::string_view::npos ? std::string_view{} : sid.substr(0, dot);
}

std::string_view id_owner(std::string_view id) {
  auto colon = id.find(':');
  return colon == std::string_view::npos ? std::string_view{} : id.substr(0, colon);
}

}  // namespace sidecast::proto
