#include "broker/event_streams.hpp"

#include <bit>
#include <functional>

namespace sidecast::broker {

event_streams::event_streams(std::size_t slots, std::uint64_t first_stream)
    : slots_(std::bit_ceil(slots < 1 ? std::size_t{1} : slots)), next_stream_{first_stream} {}

std::uint64_t event_streams::new_stream() {
  if (next_stream_ == 0) ++next_stream_;
  return next_stream_++;
}

proto::event_stamp event_streams::next(std::string_view topic) {
  const std::uint64_t fingerprint = std::hash<std::string_view>{}(topic);
  auto& s = slots_[fingerprint & (slots_.size() - 1)];
  if (s.stream == 0 || s.fingerprint != fingerprint) {
    if (s.stream != 0) ++taken_over_;
    s = slot{fingerprint, new_stream(), 0};
  }
  return {s.stream, ++s.seq};
}

}  // namespace sidecast::broker
