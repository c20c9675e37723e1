// Internal to the codecs: locating values inside JSON text that Boost.JSON has
// already validated, so the codecs can hand on the original bytes instead of
// reserialising them (Boost.JSON would rewrite 1.0 as 1E0 and round integers
// beyond 64 bits). Every function stays in bounds on any input; on input that
// is not valid JSON the positions are meaningless but safe.
#pragma once

#include <cstddef>
#include <string_view>

namespace sidecast::gateway::codec_detail {

inline constexpr std::size_t npos = std::string_view::npos;

constexpr bool is_json_space(char c) noexcept {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

constexpr std::size_t skip_space(std::string_view s, std::size_t pos) noexcept {
  while (pos < s.size() && is_json_space(s[pos])) {
    ++pos;
  }
  return pos;
}

// `pos` is at an opening quote; returns the position just past the closing
// quote, or npos.
constexpr std::size_t string_end(std::string_view s, std::size_t pos) noexcept {
  for (std::size_t i = pos + 1; i < s.size(); ++i) {
    if (s[i] == '\\') {
      ++i;
    } else if (s[i] == '"') {
      return i + 1;
    }
  }
  return npos;
}

// `pos` is at the first character of a value; returns the position just past
// it, or npos.
constexpr std::size_t value_end(std::string_view s, std::size_t pos) noexcept {
  if (pos >= s.size()) {
    return npos;
  }
  const char first = s[pos];
  if (first == '"') {
    return string_end(s, pos);
  }
  if (first == '{' || first == '[') {
    std::size_t depth = 0;
    for (std::size_t i = pos; i < s.size(); ++i) {
      const char c = s[i];
      if (c == '"') {
        i = string_end(s, i);
        if (i == npos) {
          return npos;
        }
        --i;  // the loop's ++i lands just past the string
      } else if (c == '{' || c == '[') {
        ++depth;
      } else if (c == '}' || c == ']') {
        if (--depth == 0) {
          return i + 1;
        }
      }
    }
    return npos;
  }
  std::size_t i = pos;
  while (i < s.size() && s[i] != ',' && s[i] != '}' && s[i] != ']' && !is_json_space(s[i])) {
    ++i;
  }
  return i;
}

}  // namespace sidecast::gateway::codec_detail
