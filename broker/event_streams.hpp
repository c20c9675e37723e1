#pragma once
// Numbers the events the broker publishes, per topic (proto::event_stamp),
// so that a gateway can count the ones its XPUB queue dropped: libzmq drops
// them at a high-water mark without a word.
//
// A fixed table of counters (--event-streams), not one per topic ever
// seen: a topic hashes to a set of four slots and keeps its counter in one
// of them while it is among the set's four most recently published topics.
// A fifth takes the least recently used slot and starts a new stream, and
// so does the topic it took it from when it comes back: its subscribers
// start counting again from that event and count nothing lost across the
// change (taken_over() counts these). The memory is the table's, 32 bytes
// a slot, whatever the number of rooms.
#include <cstddef>
#include <cstdint>
#include <string_view>
#include <vector>

#include "proto/codec.hpp"

namespace sidecast::broker {

class event_streams {
 public:
  static constexpr std::size_t ways = 4;

  /// `slots` is rounded up to a power of two, at least `ways`. Stream ids
  /// are handed out from `first_stream` up (skipping 0): a random one, so
  /// that a restarted broker, or the other broker of a pair, starts streams
  /// its gateways have not heard. `seed` (random) picks which topics share
  /// a set: room names cannot be chosen to crowd one topic's set.
  event_streams(std::size_t slots, std::uint64_t first_stream, std::uint64_t seed);

  struct numbered {
    proto::event_stamp stamp;
    bool took_over;  // `topic` took the slot of another topic's counter
  };
  /// The stamp of `topic`'s next event.
  numbered next(std::string_view topic);
  /// Forgets every topic (in place: no allocation); new streams from
  /// `first_stream`, sets by `seed`.
  void reset(std::uint64_t first_stream, std::uint64_t seed);

  std::size_t slots() const { return slots_.size(); }
  /// Times a topic took a slot that held another topic's counter.
  std::uint64_t taken_over() const { return taken_over_; }

 private:
  struct slot {
    std::uint64_t fingerprint = 0;  // the topic's hash
    std::uint64_t stream = 0;       // 0: never used
    std::uint64_t seq = 0;
    std::uint64_t used = 0;         // the table's clock at its last event
  };
  std::uint64_t new_stream();

  std::vector<slot> slots_;
  std::uint64_t multiplier_;  // odd: a topic's set is the top bits of its hash times this
  int set_bits_;              // log2 of the number of sets
  std::uint64_t next_stream_;
  std::uint64_t clock_ = 0;
  std::uint64_t taken_over_ = 0;
};

}  // namespace sidecast::broker
