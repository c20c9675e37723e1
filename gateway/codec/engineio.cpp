#include "gateway/codec/engineio.hpp"

#include <array>
#include <cstdint>

#include <boost/json/array.hpp>
#include <boost/json/object.hpp>
#include <boost/json/serialize.hpp>

namespace sidecast::gateway::engineio {
namespace {

constexpr std::string_view base64_alphabet =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

constexpr std::uint8_t invalid_sextet = 0xff;

constexpr std::array<std::uint8_t, 256> make_base64_table() {
  std::array<std::uint8_t, 256> table{};
  table.fill(invalid_sextet);
  for (std::size_t i = 0; i < base64_alphabet.size(); ++i) {
    table[static_cast<unsigned char>(base64_alphabet[i])] = static_cast<std::uint8_t>(i);
  }
  return table;
}

constexpr std::array<std::uint8_t, 256> base64_table = make_base64_table();

bool is_packet_type(char c) noexcept { return c >= '0' && c <= '6'; }

}  // namespace

std::string base64_encode(std::string_view bytes) {
  std::string out;
  out.reserve((bytes.size() + 2) / 3 * 4);
  std::size_t i = 0;
  for (; i + 3 <= bytes.size(); i += 3) {
    const std::uint32_t n = static_cast<std::uint32_t>(static_cast<unsigned char>(bytes[i])) << 16 |
                            static_cast<std::uint32_t>(static_cast<unsigned char>(bytes[i + 1])) << 8 |
                            static_cast<unsigned char>(bytes[i + 2]);
    out += base64_alphabet[(n >> 18) & 0x3f];
    out += base64_alphabet[(n >> 12) & 0x3f];
    out += base64_alphabet[(n >> 6) & 0x3f];
    out += base64_alphabet[n & 0x3f];
  }
  const std::size_t rest = bytes.size() - i;
  if (rest == 1) {
    const std::uint32_t n = static_cast<std::uint32_t>(static_cast<unsigned char>(bytes[i])) << 16;
    out += base64_alphabet[(n >> 18) & 0x3f];
    out += base64_alphabet[(n >> 12) & 0x3f];
    out += "==";
  } else if (rest == 2) {
    const std::uint32_t n = static_cast<std::uint32_t>(static_cast<unsigned char>(bytes[i])) << 16 |
                            static_cast<std::uint32_t>(static_cast<unsigned char>(bytes[i + 1])) << 8;
    out += base64_alphabet[(n >> 18) & 0x3f];
    out += base64_alphabet[(n >> 12) & 0x3f];
    out += base64_alphabet[(n >> 6) & 0x3f];
    out += '=';
  }
  return out;
}

std::optional<std::string> base64_decode(std::string_view text) {
  if (text.size() % 4 != 0) {
    return std::nullopt;
  }
  std::size_t padding = 0;
  if (!text.empty() && text.back() == '=') {
    padding = text[text.size() - 2] == '=' ? 2 : 1;
  }
  std::string out;
  out.reserve(text.size() / 4 * 3);
  for (std::size_t i = 0; i < text.size(); i += 4) {
    const bool last = i + 4 == text.size();
    const std::size_t digits = last ? 4 - padding : 4;
    std::uint32_t n = 0;
    for (std::size_t j = 0; j < 4; ++j) {
      std::uint8_t sextet = 0;
      if (j < digits) {
        sextet = base64_table[static_cast<unsigned char>(text[i + j])];
        if (sextet == invalid_sextet) {
          return std::nullopt;  // also catches '=' before the final quantum
        }
      }
      n = n << 6 | sextet;
    }
    out += static_cast<char>((n >> 16) & 0xff);
    if (digits == 2) {
      // Bits the padding hides must be zero, otherwise two different texts
      // would decode to the same bytes.
      if ((n & 0xffff) != 0) {
        return std::nullopt;
      }
      continue;
    }
    out += static_cast<char>((n >> 8) & 0xff);
    if (digits == 3) {
      if ((n & 0xff) != 0) {
        return std::nullopt;
      }
      continue;
    }
    out += static_cast<char>(n & 0xff);
  }
  return out;
}

std::optional<packet> decode_text_owned(std::string&& text) {
  if (text.empty()) {
    return std::nullopt;
  }
  if (text.front() == 'b') {
    auto bytes = base64_decode(std::string_view{text}.substr(1));
    if (!bytes) {
      return std::nullopt;
    }
    return packet{packet_type::message, std::move(*bytes), true};
  }
  if (!is_packet_type(text.front())) {
    return std::nullopt;
  }
  auto type = static_cast<packet_type>(text.front());
  text.erase(0, 1);  // the data keeps the frame's buffer
  return packet{type, std::move(text), false};
}

std::optional<packet> decode_text(std::string_view text) { return decode_text_owned(std::string{text}); }

packet decode_binary(std::string_view frame) {
  return packet{packet_type::message, std::string(frame), true};
}

std::string encode_text(const packet& p) {
  if (p.binary) {
    std::string out = base64_encode(p.data);
    out.insert(out.begin(), 'b');
    return out;
  }
  std::string out;
  out.reserve(1 + p.data.size());
  out += static_cast<char>(p.type);
  out += p.data;
  return out;
}

std::optional<std::vector<packet>> decode_payload(std::string_view body) {
  std::vector<packet> packets;
  for (;;) {
    const auto end = body.find(payload_separator);
    auto p = decode_text(body.substr(0, end));
    if (!p) {
      return std::nullopt;
    }
    packets.push_back(std::move(*p));
    if (end == std::string_view::npos) {
      return packets;
    }
    body.remove_prefix(end + 1);
  }
}

std::string encode_payload(std::span<const packet> packets) {
  std::string out;
  for (std::size_t i = 0; i < packets.size(); ++i) {
    if (i != 0) {
      out += payload_separator;
    }
    out += encode_text(packets[i]);
  }
  return out;
}

std::string open_payload(std::string_view sid, bool can_upgrade, unsigned ping_interval_ms,
                         unsigned ping_timeout_ms, std::size_t max_payload) {
  boost::json::array upgrades;
  if (can_upgrade) {
    upgrades.emplace_back("websocket");
  }
  boost::json::object open;
  open.reserve(5);
  open.emplace("sid", boost::json::string_view(sid.data(), sid.size()));
  open.emplace("upgrades", std::move(upgrades));
  open.emplace("pingInterval", ping_interval_ms);
  open.emplace("pingTimeout", ping_timeout_ms);
  open.emplace("maxPayload", static_cast<std::uint64_t>(max_payload));
  return boost::json::serialize(open);
}

std::string_view error_body(error_code code) noexcept {
  switch (code) {
    case error_code::transport_unknown:
      return R"({"code":0,"message":"Transport unknown"})";
    case error_code::session_id_unknown:
      return R"({"code":1,"message":"Session ID unknown"})";
    case error_code::bad_handshake_method:
      return R"({"code":2,"message":"Bad handshake method"})";
    case error_code::bad_request:
      break;
    case error_code::forbidden:
      return R"({"code":4,"message":"Forbidden"})";
    case error_code::unsupported_protocol_version:
      return R"({"code":5,"message":"Unsupported protocol version"})";
  }
  return R"({"code":3,"message":"Bad request"})";
}

}  // namespace sidecast::gateway::engineio
