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

/// Allows up to `lines` lines per window; counts what it suppressed.
/// Not thread-safe: one per thread or per component loop.
class log_limiter {
 public:
  /// At most `lines` lines per `window` (10 a second by default).
  explicit log_limiter(unsigned lines = 10, std::chrono::steady_clock::duration window = std::chrono::seconds(1))
      : lines_{lines}, window_length_{window} {}

  /// True when a line may be written now.
  bool allow();
  /// Lines suppressed since the last call.
  std::uint64_t take_suppressed();

 private:
  unsigned lines_;
  std::chrono::steady_clock::duration window_length_;
  unsigned used_ = 0;
  std::uint64_t suppressed_ = 0;
  std::chrono::steady_clock::time_point window_{};
};

}  // namespace sidecast::core
