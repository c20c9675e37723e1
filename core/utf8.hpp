#pragma once
// Strict UTF-8 validation (RFC 3629): no overlong forms, no surrogates,
// nothing past U+10FFFF. What protobuf requires of proto3 strings, RFC 6455
// of text frames and Socket.IO of namespace names. Header-only, so the
// envelope codec and the gateway's codecs share it without linking more.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string_view>

namespace sidecast::core {

inline bool valid_utf8(std::string_view s) noexcept {
  auto* p = reinterpret_cast<const unsigned char*>(s.data());
  auto* end = p + s.size();
  while (p < end) {
    if (end - p >= 8) {  // eight ASCII bytes at a time
      std::uint64_t chunk;
      std::memcpy(&chunk, p, 8);
      if (!(chunk & 0x8080808080808080ull)) {
        p += 8;
        continue;
      }
    }
    if (*p < 0x80) {
      ++p;
      continue;
    }
    int n;
    std::uint32_t cp;
    if ((*p & 0xe0) == 0xc0) {
      n = 1, cp = *p & 0x1f;
    } else if ((*p & 0xf0) == 0xe0) {
      n = 2, cp = *p & 0x0f;
    } else if ((*p & 0xf8) == 0xf0) {
      n = 3, cp = *p & 0x07;
    } else {
      return false;
    }
    if (end - p <= n) return false;
    for (int i = 1; i <= n; ++i) {
      if ((p[i] & 0xc0) != 0x80) return false;
      cp = (cp << 6) | (p[i] & 0x3f);
    }
    static constexpr std::uint32_t min_for[] = {0, 0x80, 0x800, 0x10000};
    if (cp < min_for[n] || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return false;
    p += n + 1;
  }
  return true;
}

// Code points of valid UTF-8 text: the bytes that start one (every byte
// but the 10xxxxxx continuations). What a limit told in characters counts.
inline std::size_t code_points(std::string_view s) noexcept {
  std::size_t n = 0;
  for (char c : s) n += (static_cast<unsigned char>(c) & 0xC0) != 0x80;
  return n;
}

}  // namespace sidecast::core
