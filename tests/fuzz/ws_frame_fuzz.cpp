// libFuzzer target for WebSocket frame headers from clients: no input may
// crash read_header; what it accepts re-encodes, with the same mask, to the
// bytes it read (one spelling per header); and it decides once: a prefix is
// `need_more` until the header's bytes are there, and every longer one gets
// the same answer (the same header, or the same refusal).
#include <cstddef>
#include <cstdint>
#include <vector>

#include "gateway/codec/ws_frame.hpp"

namespace ws = sidecast::gateway::ws_frame;

namespace {

std::vector<unsigned char> encode(const ws::header& h) {
  std::vector<unsigned char> out;
  out.push_back(static_cast<unsigned char>((h.fin ? 0x80 : 0) | h.op));
  if (h.length < 126) {
    out.push_back(static_cast<unsigned char>(0x80 | h.length));
  } else if (h.length <= 0xffff) {
    out.push_back(0x80 | 126);
    out.push_back(static_cast<unsigned char>(h.length >> 8));
    out.push_back(static_cast<unsigned char>(h.length));
  } else {
    out.push_back(0x80 | 127);
    for (int i = 7; i >= 0; --i) out.push_back(static_cast<unsigned char>(h.length >> (8 * i)));
  }
  out.insert(out.end(), h.mask, h.mask + 4);
  return out;
}

bool same(const ws::header& a, const ws::header& b) {
  return a.fin == b.fin && a.op == b.op && a.length == b.length && a.size == b.size && a.mask == b.mask;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  ws::header first;
  auto decided = ws::status::need_more;
  std::size_t decided_at = 0;
  for (std::size_t n = 0; n <= size && n <= 16; ++n) {
    ws::header h;
    const auto s = ws::read_header(data, n, h);
    if (decided == ws::status::need_more) {
      decided = s;
      decided_at = n;
      first = h;
      continue;
    }
    if (s != decided || (s == ws::status::ok && !same(h, first))) __builtin_trap();
  }
  if (decided != ws::status::ok) return 0;

  if (first.size != decided_at || (first.size != 6 && first.size != 8 && first.size != 14)) __builtin_trap();
  if (first.mask != data + first.size - 4) __builtin_trap();
  if (first.op >= 8 && (!first.fin || first.length > 125)) __builtin_trap();
  if (first.op > 10 || (first.op > 2 && first.op < 8)) __builtin_trap();
  const auto again = encode(first);
  if (again.size() != first.size) __builtin_trap();
  for (std::size_t i = 0; i < again.size(); ++i)
    if (again[i] != data[i]) __builtin_trap();
  return 0;
}
