#pragma once
// The last messages a peer sent, kept so that it can send again those that
// die in a socket it replaces (docs/protocol.md, "Jobs sent again" and
// "What a replaced socket held"). Each is a copy sharing the sent bytes
// (zmq_msg_copy: a reference count, no allocation), with a `Where` of the
// caller's (where it went). Oldest first; at most `max_count` of them and
// `max_bytes` of their bytes: the oldest go first, and one larger than
// `max_bytes` is not kept. The slots grow to `max_count` once, then nothing
// is allocated. Not thread-safe.
//
// Below it: where a message went on a link (link_position), what a broker's
// Welcome says it read (broker_received), take_lost(), which picks out the
// kept messages that died, and forget_read(), which lets go of those a
// broker's heartbeat says it read.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <utility>
#include <variant>
#include <vector>

#include <zmq.hpp>

namespace sidecast::core {

template <typename Where = std::monostate>
class kept_ring {
 public:
  struct entry {
    zmq::message_t message;
    [[no_unique_address]] Where where{};
  };

  kept_ring() = default;  // keeps nothing
  kept_ring(std::size_t max_count, std::size_t max_bytes) : max_count_{max_count}, max_bytes_{max_bytes} {}

  void push(entry&& e) {
    if (max_count_ == 0 || e.message.size() > max_bytes_) return;
    if (size_ == slots_.size() && slots_.size() < max_count_)
      grow(std::min(max_count_, std::max<std::size_t>(64, slots_.size() * 2)));
    if (size_ == slots_.size()) pop();
    bytes_ += e.message.size();
    slots_[(head_ + size_) % slots_.size()] = std::move(e);
    ++size_;
    while (bytes_ > max_bytes_) pop();
  }

  /// Hands `f` each entry, oldest first.
  template <typename F>
  void for_each(F&& f) {
    for (std::size_t i = 0; i < size_; ++i) f(slots_[(head_ + i) % slots_.size()]);
  }

  /// Hands `f` each entry (to move from), oldest first, and forgets them all.
  template <typename F>
  void take_all(F&& f) {
    for (std::size_t i = 0; i < size_; ++i) f(std::move(slots_[(head_ + i) % slots_.size()]));
    for (auto& slot : slots_) slot.message.rebuild();
    head_ = size_ = bytes_ = 0;
  }

  /// Forgets the oldest entries while `old` says so of the oldest.
  template <typename F>
  void forget_while(F&& old) {
    while (size_ > 0 && old(slots_[head_])) pop();
  }

  std::size_t bytes() const { return bytes_; }
  std::size_t size() const { return size_; }
  /// Room for this many entries: it grows to max_count once a burst needs
  /// it, and stays so until release().
  std::size_t capacity() const { return slots_.size(); }
  /// An empty ring gives its slots back (it grows again when it keeps).
  void release() {
    if (size_ == 0 && !slots_.empty()) {
      slots_ = std::vector<entry>{};
      head_ = 0;
    }
  }
  /// A message of `bytes` would be kept without forgetting another.
  bool has_room(std::size_t bytes) const { return size_ < max_count_ && bytes_ + bytes <= max_bytes_; }
  /// Forgets the oldest entries, while `may_forget` says so of the oldest,
  /// until a message of `bytes` has room; true when it has.
  template <typename F>
  bool make_room(std::size_t bytes, F&& may_forget) {
    if (max_count_ == 0 || bytes > max_bytes_) return false;
    while (!has_room(bytes) && size_ > 0 && may_forget(slots_[head_])) pop();
    return has_room(bytes);
  }

 private:
  void pop() {
    auto& oldest = slots_[head_];
    bytes_ -= oldest.message.size();
    oldest.message.rebuild();
    head_ = (head_ + 1) % slots_.size();
    --size_;
  }
  void grow(std::size_t n) {
    std::vector<entry> bigger(n);
    for (std::size_t i = 0; i < size_; ++i) bigger[i] = std::move(slots_[(head_ + i) % slots_.size()]);
    slots_ = std::move(bigger);
    head_ = 0;
  }

  std::size_t max_count_ = 0, max_bytes_ = 0;
  std::vector<entry> slots_;
  std::size_t head_ = 0, size_ = 0, bytes_ = 0;
};

/// Where a message went on a link (core::peer_link): after Hello number
/// `epoch`, as the `sent`th message after it. Or, held(n): the `n`th of
/// those an application held back instead of sending (see
/// peer_link::holding()); those order after every message sent.
struct link_position {
  std::uint64_t epoch = 0;
  std::uint64_t sent = 0;
  static constexpr link_position held(std::uint64_t n) { return {held_epoch, n}; }
  constexpr bool is_held() const { return epoch == held_epoch; }
  auto operator<=>(const link_position&) const = default;

 private:
  static constexpr std::uint64_t held_epoch = UINT64_MAX;
};

/// What the broker said it read of what a link sent before the Hello it
/// last welcomed (Welcome.previous_hello, .received): a message sent after
/// Hello `previous` beyond the first `received`, or after a Hello between
/// `previous` and `current`, died in a socket the link replaced and may be
/// sent again. `count` goes up with each such Welcome.
struct broker_received {
  std::uint64_t count = 0;
  std::uint64_t previous = 0;
  std::uint64_t received = 0;
  std::uint64_t current = 0;
  bool lost(const link_position& p) const {
    return (p.epoch == previous && p.sent > received) || (p.epoch > previous && p.epoch < current);
  }
};

/// Messages sent on a link, each kept with where it went, so that those
/// that die in a socket the link replaces can go again.
using kept_sends = kept_ring<link_position>;

/// After a Welcome said what the broker read: hands `lost` each message of
/// `kept` that died in a replaced socket, oldest first, with (`held_too`)
/// each held one (never sent), and forgets those the broker read. Those
/// sent since that Welcome's Hello, and held ones not handed, stay kept: a
/// later Welcome tells about them.
template <typename F>
void take_lost(kept_sends& kept, const broker_received& received, bool held_too, F&& lost) {
  std::vector<kept_sends::entry> unknown;
  kept.take_all([&](kept_sends::entry&& e) {
    if (received.lost(e.where) || (held_too && e.where.is_held())) lost(std::move(e));
    else if (e.where.epoch >= received.current) unknown.push_back(std::move(e));
  });
  for (auto& e : unknown) kept.push(std::move(e));
}

/// After a heartbeat said what the broker read (peer_link::read_by_broker()):
/// forgets the oldest kept messages among those, which can no longer die in
/// a socket the link replaces, and those sent before Hello `settled_below`
/// (peer_link::welcomed_hello(): the one the last Welcome answered, which
/// the application has acted on), which no Welcome can name lost any more:
/// take_lost() sent them again or let them go, or that Welcome came from a
/// broker that never knew them (a new one, or one that had dropped the
/// link). A message sent after the last Welcome's Hello but before the
/// heartbeat's may still be named lost by a Welcome not acted on yet: it
/// stays, and so does everything behind it.
inline bool read_or_settled(const link_position& where, const link_position& read, std::uint64_t settled_below) {
  return (where.epoch < settled_below && !where.is_held()) || (where.epoch == read.epoch && where.sent <= read.sent);
}

inline void forget_read(kept_sends& kept, const link_position& read, std::uint64_t settled_below) {
  kept.forget_while([&](const kept_sends::entry& e) { return read_or_settled(e.where, read, settled_below); });
}

}  // namespace sidecast::core
