// Internal to the codecs and the HTTP API: locating values inside JSON text that Boost.JSON has
// already validated, so the codecs can hand on the original bytes instead of
// reserialising them (Boost.JSON would rewrite 1.0 as 1E0 and round integers
// beyond 64 bits). Every function stays in bounds on any input; on input that
// is not valid JSON the positions are meaningless but safe.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

#include <boost/json/parse.hpp>

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

constexpr bool is_hex(char c) noexcept {
  return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
}

// The text Boost.JSON is given to validate: `text` itself, or, when it has
// a lone surrogate escape (\uD800-\uDFFF not in a high-low pair), a copy in
// `scratch` with each such escape written \uFFFD. Boost.JSON 1.81 refuses
// one, which JSON.stringify writes for a string cut inside an emoji and
// Node's JSON.parse takes: the connection closed on it. The copy has the
// same length, so positions found in it hold in `text`, which is what is
// handed on.
inline std::string_view surrogates_tolerated(std::string_view text, std::string& scratch) {
  // A \uDXXX escape at `at`, high (D800-DBFF) or low (DC00-DFFF).
  auto surrogate_at = [&text](std::size_t at, bool high) {
    if (at + 6 > text.size() || text[at] != '\\' || text[at + 1] != 'u' || (text[at + 2] != 'd' && text[at + 2] != 'D') ||
        !is_hex(text[at + 4]) || !is_hex(text[at + 5]))
      return false;
    char n = text[at + 3];
    if (n >= 'a' && n <= 'f') n = static_cast<char>(n - 'a' + 'A');
    return high ? (n == '8' || n == '9' || n == 'A' || n == 'B') : (n >= 'C' && n <= 'F');
  };
  bool copied = false;
  for (std::size_t at = text.find("\\u"); at != npos; at = text.find("\\u", at + 1)) {
    // An escape only after an even run of backslashes (\\u is a backslash, then u).
    std::size_t run = 0;
    while (run < at && text[at - 1 - run] == '\\') ++run;
    if (run % 2 != 0) continue;
    if (surrogate_at(at, true) && surrogate_at(at + 6, false)) {
      at += 6;  // a pair: as it is
      continue;
    }
    if (!surrogate_at(at, true) && !surrogate_at(at, false)) continue;
    if (!copied) {
      scratch.assign(text);
      text = scratch;
      copied = true;
    }
    scratch.replace(at + 2, 4, "FFFD");
  }
  return text;
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

// Walks the members of the top-level object of `text` (JSON that Boost.JSON
// has validated), calling `f(key, begin, end)` with each key (unescaped, when
// written with escapes: "d\u0061ta" is "data") and where its value's text
// lies; `f` returns false to stop the walk.
enum class walk { done, stopped, not_object, malformed };
template <typename F>
walk for_each_member(std::string_view text, F&& f) {
  std::size_t i = skip_space(text, 0);
  if (i >= text.size() || text[i] != '{') return walk::not_object;
  i = skip_space(text, i + 1);
  if (i < text.size() && text[i] == '}') return walk::done;
  for (;;) {
    if (i >= text.size() || text[i] != '"') return walk::malformed;
    const std::size_t key_end = string_end(text, i);
    if (key_end == npos) return walk::malformed;
    std::string_view key = text.substr(i + 1, key_end - i - 2);
    std::string unescaped;
    if (key.find('\\') != std::string_view::npos) {
      boost::system::error_code ec;
      const auto k = boost::json::parse(boost::json::string_view(text.data() + i, key_end - i), ec);
      if (ec || !k.is_string()) return walk::malformed;
      unescaped.assign(k.get_string().data(), k.get_string().size());
      key = unescaped;
    }
    i = skip_space(text, key_end);
    if (i >= text.size() || text[i] != ':') return walk::malformed;
    i = skip_space(text, i + 1);
    const std::size_t stop = value_end(text, i);
    if (stop == npos || stop == i) return walk::malformed;
    if (!f(key, i, stop)) return walk::stopped;
    i = skip_space(text, stop);
    if (i >= text.size()) return walk::malformed;
    if (text[i] == '}') return walk::done;
    if (text[i] != ',') return walk::malformed;
    i = skip_space(text, i + 1);
  }
}

// The text of the value of the top-level member `key` of `object_text` (a
// validated object): the last one when the key is given twice, as Boost.JSON
// keeps the last; empty when it is absent.
inline std::string_view member_text(std::string_view object_text, std::string_view key) {
  std::string_view found;
  for_each_member(object_text, [&](std::string_view name, std::size_t begin, std::size_t end) {
    if (name == key) found = object_text.substr(begin, end - begin);
    return true;
  });
  return found;
}

}  // namespace sidecast::gateway::codec_detail
