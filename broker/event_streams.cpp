#include "broker/event_streams.hpp"

#include <algorithm>
#include <bit>
#include <functional>

namespace sidecast::broker {

event_streams::event_streams(std::size_t slots, std::uint64_t first_stream, std::uint64_t seed)
    : slots_(std::bit_ceil(std::max(slots, ways))),
      multiplier_{seed | 1},
      set_bits_{std::countr_zero(slots_.size() / ways)},
      next_stream_{first_stream} {}

void event_streams::reset(std::uint64_t first_stream, std::uint64_t seed) {
  std::fill(slots_.begin(), slots_.end(), slot{});
  multiplier_ = seed | 1;
  next_stream_ = first_stream;
  clock_ = 0;
}

std::uint64_t event_streams::new_stream() {
  if (next_stream_ == 0) ++next_stream_;
  return next_stream_++;
}

event_streams::numbered event_streams::next(std::string_view topic) {
  const std::uint64_t fingerprint = std::hash<std::string_view>{}(topic);
  // The set: `ways` neighbouring slots (one or two cache lines), chosen by
  // the top bits of the hash times a random odd number (multiplicative
  // hashing): which topics share a set is not known outside this process.
  const std::size_t index = set_bits_ == 0 ? 0 : (fingerprint * multiplier_) >> (64 - set_bits_);
  auto* set = &slots_[index * ways];
  slot* s = nullptr;
  slot* oldest = set;
  for (std::size_t i = 0; i < ways; ++i) {
    auto& candidate = set[i];
    if (candidate.stream != 0 && candidate.fingerprint == fingerprint) {
      s = &candidate;
      break;
    }
    if (candidate.used < oldest->used) oldest = &candidate;  // an unused slot's is 0: taken first
  }
  bool took_over = false;
  if (!s) {
    s = oldest;
    took_over = s->stream != 0;
    taken_over_ += took_over;
    *s = slot{fingerprint, new_stream(), 0, 0};
  }
  s->used = ++clock_;
  return {{s->stream, ++s->seq}, took_over};
}

}  // namespace sidecast::broker
