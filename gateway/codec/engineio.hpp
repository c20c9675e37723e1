// Engine.IO v4 packet codec (https://github.com/socketio/engine.io-protocol).
//
// Pure functions: no I/O, clocks, logging or global state. Malformed input is
// reported as an empty optional, never as an exception.
#pragma once

#include <cstddef>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace sidecast::gateway::engineio {

enum class packet_type : char {
  open = '0',
  close = '1',
  ping = '2',
  pong = '3',
  message = '4',
  upgrade = '5',
  noop = '6',
};

struct packet {
  packet_type type = packet_type::message;
  std::string data;
  // true: `data` holds raw bytes (only meaningful for `message`); they travel
  // as `b<base64>` on polling and as a WebSocket binary frame.
  bool binary = false;

  friend bool operator==(const packet&, const packet&) = default;
};

// Record separator between packets of one polling payload.
inline constexpr char payload_separator = '\x1e';

// One WebSocket text frame or one polling segment: `<type>[<data>]`, or
// `b<base64>` for a binary message. Empty input, an unknown type or invalid
// base64 yield nullopt.
std::optional<packet> decode_text(std::string_view text);
// The same, the packet's data taking over the buffer of `text`.
std::optional<packet> decode_text_owned(std::string&& text);

// A WebSocket binary frame: a `message` packet whose data are the frame's
// bytes as they are (Engine.IO v4 adds no type prefix to binary frames).
packet decode_binary(std::string_view frame);

// `<type><data>` for text packets, `b<base64(data)>` for binary ones (the type
// of a binary packet is implied: only messages carry binary data).
std::string encode_text(const packet& p);

// A polling body: segments separated by '\x1e'. Any empty or invalid segment
// rejects the whole body, so a POST is applied entirely or not at all.
std::optional<std::vector<packet>> decode_payload(std::string_view body);

// Joins encode_text() of each packet with '\x1e'. Text data must not contain
// '\x1e' (the protocol has no escape for it); Socket.IO packets never do,
// because JSON escapes control characters and socketio::valid_namespace()
// forbids them.
std::string encode_payload(std::span<const packet> packets);

// Standard base64 (RFC 4648 section 4) with padding. Decoding is strict: the
// length must be a multiple of 4, '=' may only end the text, characters
// outside the alphabet and non-zero trailing bits are rejected.
std::string base64_encode(std::string_view bytes);
std::optional<std::string> base64_decode(std::string_view text);

// The JSON payload of the `open` packet, keys in the order the reference
// server sends them:
// {"sid":"...","upgrades":["websocket"],"pingInterval":N,"pingTimeout":N,"maxPayload":N}
// `upgrades` is ["websocket"] when the session started on polling and []
// when it started directly on a WebSocket.
std::string open_payload(std::string_view sid, bool can_upgrade, unsigned ping_interval_ms,
                         unsigned ping_timeout_ms, std::size_t max_payload);

// Handshake/request refusals, answered with HTTP 400 and a JSON body.
enum class error_code : int {
  transport_unknown = 0,
  session_id_unknown = 1,
  bad_handshake_method = 2,
  bad_request = 3,
  forbidden = 4,
  unsupported_protocol_version = 5,
};

// The exact body the reference server sends, e.g.
// {"code":0,"message":"Transport unknown"}. A value outside the enum gets the
// `bad_request` body.
std::string_view error_body(error_code code) noexcept;

}  // namespace sidecast::gateway::engineio
