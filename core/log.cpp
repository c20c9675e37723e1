#include "core/log.hpp"

#include <algorithm>

#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

namespace sidecast::core {

bool init_logging(const std::string& level, const std::string& component) {
  auto lvl = spdlog::level::from_str(level);
  if (lvl == spdlog::level::off && level != "off") return false;
  auto logger = spdlog::stderr_color_mt(component);
  logger->set_pattern("%Y-%m-%dT%H:%M:%S.%e %^%l%$ [%n] %v");
  logger->set_level(lvl);
  spdlog::set_default_logger(logger);
  return true;
}

std::string printable(std::string_view text, std::size_t max) {
  static constexpr char hex[] = "0123456789abcdef";
  std::string out;
  out.reserve(std::min(text.size(), max) + 3);
  for (std::size_t i = 0; i < text.size() && i < max; ++i) {
    auto c = static_cast<unsigned char>(text[i]);
    if (c >= 0x20 && c < 0x7f && c != '\\') {
      out.push_back(static_cast<char>(c));
      continue;
    }
    out += "\\x";
    out.push_back(hex[c >> 4]);
    out.push_back(hex[c & 15]);
  }
  if (text.size() > max) out += "...";
  return out;
}

bool log_limiter::allow() {
  auto now = std::chrono::steady_clock::now();
  if (now - window_ >= window_length_) {
    window_ = now;
    used_ = 0;
  }
  if (used_ < lines_) {
    ++used_;
    return true;
  }
  ++suppressed_;
  return false;
}

std::uint64_t log_limiter::take_suppressed() {
  auto n = suppressed_;
  suppressed_ = 0;
  return n;
}

}  // namespace sidecast::core
