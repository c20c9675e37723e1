// libFuzzer target for the Engine.IO codec: no input may crash it, and what
// it accepts must re-encode to the same bytes (the format has one spelling per
// packet once base64 is strict).
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "gateway/codec/engineio.hpp"

namespace eio = sidecast::gateway::engineio;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view in(reinterpret_cast<const char*>(data), size);

  const auto p = eio::decode_text(in);
  if (p && eio::encode_text(*p) != in) {
    __builtin_trap();
  }
  // The gateway decodes in the frame's own buffer: the same packet, or none.
  if (eio::decode_text_owned(std::string{in}) != p) {
    __builtin_trap();
  }

  if (const auto packets = eio::decode_payload(in)) {
    if (packets->empty() || eio::encode_payload(*packets) != in) {
      __builtin_trap();
    }
  }

  const auto frame = eio::decode_binary(in);
  if (!frame.binary || frame.data != in) {
    __builtin_trap();
  }
  // Any bytes survive the polling transport's base64.
  if (eio::decode_text(eio::encode_text(frame)) != frame) {
    __builtin_trap();
  }
  if (const auto bytes = eio::base64_decode(in); bytes && eio::base64_encode(*bytes) != in) {
    __builtin_trap();
  }
  return 0;
}
