#pragma once
// Keys seen in the last `window`, when each was seen last, and at most
// `max_count` sightings of them: past it the oldest is forgotten before its
// time (remember() says so, for the caller's metric). Kept in the order
// seen, so that expiring and forgetting cost one pop each, never a scan.
// A key seen again is one entry in the map and one more in the order (the
// older sighting is skipped when its turn comes), so the bound counts
// sightings: memory stays within `max_count` keys however they repeat.
// Not thread-safe.
#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

#include <boost/unordered/unordered_flat_map.hpp>

#include "core/string_hash.hpp"

namespace sidecast::core {

class recent_keys {
 public:
  using time_point = std::chrono::steady_clock::time_point;

  recent_keys(std::chrono::steady_clock::duration window, std::size_t max_count)
      : window_{window}, max_count_{max_count} {}

  /// Remembers `key` as seen at `now`. False when a key still within the
  /// window had to be forgotten to make room (or max_count is 0).
  bool remember(std::string key, time_point now) {
    expire(now);
    if (max_count_ == 0) return false;
    bool room = true;
    while (order_.size() >= max_count_) room = !pop_oldest() && room;
    at_.insert_or_assign(key, sighting{now, ++seq_});
    order_.push_back({now, seq_, std::move(key)});
    return room;
  }

  /// When `key` was last seen, if that is within the window of `now`.
  [[nodiscard]] std::optional<time_point> seen(std::string_view key, time_point now) const {
    auto it = at_.find(key);
    if (it == at_.end() || now - it->second.when >= window_) return std::nullopt;
    return it->second.when;
  }

  /// Calls `f(key)` for each key last seen at `since` or later (and still
  /// within the window), oldest first.
  template <typename F>
  void for_each_since(time_point since, F&& f) const {
    // The sightings are in time order: the first at `since` is found by halves.
    auto from = std::partition_point(order_.begin(), order_.end(), [&](const in_order& o) { return o.when < since; });
    for (auto o = from; o != order_.end(); ++o)
      if (auto it = at_.find(o->key); it != at_.end() && it->second.seq == o->seq) f(o->key);
  }

  /// Forgets what is past the window.
  void expire(time_point now) {
    while (!order_.empty() && now - order_.front().when >= window_) pop_oldest();
  }

  [[nodiscard]] std::size_t size() const { return at_.size(); }
  [[nodiscard]] bool empty() const { return at_.empty(); }

 private:
  // True when the popped sighting was a key's last (the key is forgotten).
  bool pop_oldest() {
    const auto& oldest = order_.front();
    bool last = false;
    if (auto it = at_.find(oldest.key); it != at_.end() && it->second.seq == oldest.seq) {
      at_.erase(it);
      last = true;
    }
    order_.pop_front();
    return last;
  }

  struct sighting {
    time_point when;
    std::uint64_t seq;  // which sighting: a key seen twice in one clock tick has two
  };
  struct in_order {
    time_point when;
    std::uint64_t seq;
    std::string key;
  };

  std::chrono::steady_clock::duration window_;
  std::size_t max_count_;
  std::uint64_t seq_ = 0;
  boost::unordered_flat_map<std::string, sighting, string_hash, std::equal_to<>> at_;  // each key's last sighting
  std::deque<in_order> order_;  // every sighting still kept, oldest first
};

}  // namespace sidecast::core
