#pragma once
// The header of one WebSocket frame from a client (RFC 6455 §5.2), read in
// place: what ws_conn must know before it looks at the payload. Pure, like
// the other codecs; the message-level rules (a continuation needs a message
// in progress, a new data frame needs none, the size limit) stay with the
// connection, which holds that state.
#include <cstddef>
#include <cstdint>

namespace sidecast::gateway::ws_frame {

enum opcode : std::uint8_t { continuation = 0, text = 1, binary = 2, close = 8, ping = 9, pong = 10 };

struct header {
  bool fin = false;
  std::uint8_t op = 0;
  std::uint64_t length = 0;            // payload bytes
  std::size_t size = 0;                // header bytes, the masking key included (6, 8 or 14)
  const unsigned char* mask = nullptr;  // the 4-byte masking key, inside the input
};

enum class status {
  ok,
  need_more,       // the header is not all there yet
  protocol_error,  // what a server must refuse from a client (see read_header)
};

/// Reads the header at the start of [data, data + available). Refused, as
/// soon as the bytes that show it are there: a reserved bit (no extension is
/// negotiated), an unmasked frame, an unknown opcode, a control frame that
/// is fragmented or longer than 125 bytes, a length not in its shortest form
/// or with its top bit set.
inline status read_header(const unsigned char* data, std::size_t available, header& out) noexcept {
  if (available < 2) return status::need_more;
  const unsigned b0 = data[0], b1 = data[1];
  const std::uint8_t op = b0 & 0x0f;
  const bool fin = (b0 & 0x80) != 0;
  const std::uint64_t len7 = b1 & 0x7f;
  if ((b0 & 0x70) || !(b1 & 0x80)) return status::protocol_error;
  if (op >= 8) {
    if ((op != close && op != ping && op != pong) || !fin || len7 > 125) return status::protocol_error;
  } else if (op > binary) {
    return status::protocol_error;
  }
  const std::size_t size = 2 + (len7 == 126 ? 2 : len7 == 127 ? 8 : 0) + 4;
  if (available < size) return status::need_more;
  std::uint64_t length = len7;
  if (len7 == 126) {
    length = (std::uint64_t{data[2]} << 8) | data[3];
    if (length < 126) return status::protocol_error;
  } else if (len7 == 127) {
    length = 0;
    for (int i = 0; i < 8; ++i) length = (length << 8) | data[2 + i];
    if (length <= 0xffff || (length >> 63)) return status::protocol_error;
  }
  out = {fin, op, length, size, data + size - 4};
  return status::ok;
}

}  // namespace sidecast::gateway::ws_frame
