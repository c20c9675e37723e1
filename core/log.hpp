#pragma once
// Logging setup and a limiter for lines a peer can cause: a misbehaving peer
// must not be able to flood the log.
#include <chrono>
#include <cstdint>
#include <string>
#include <string_view>

namespace sidecast::core {

/// Configures the default spdlog logger ("trace".."off"); the pattern names
/// the component. Returns false for an unknown level.
bool init_logging(const std::string& level, const std::string& component);

/// `text` from a peer (a routing id, a sid), fit for a log line: bytes
/// outside printable ASCII as \xNN (a peer cannot write control sequences
/// into an operator's terminal), at most `max` bytes of it, then "...".
std::string printable(std::string_view text, std::size_t max = 128);

/// Allows up to `per_second` lines per second; counts what it suppressed.
/// Not thread-safe: one per thread or per component loop.
class log_limiter {
 public:
  explicit log_limiter(unsigned per_second = 10) : per_second_{per_second} {}

  /// True when a line may be written now.
  bool allow();
  /// Lines suppressed since the last call.
  std::uint64_t take_suppressed();

 private:
  unsigned per_second_;
  unsigned used_ = 0;
  std::uint64_t suppressed_ = 0;
  std::chrono::steady_clock::time_point window_{};
};

}  // namespace sidecast::core
