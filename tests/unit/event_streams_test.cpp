// The broker's per-topic event counters (broker/event_streams.hpp): each
// topic numbered 1, 2, 3, ... in a stream of its own; a topic that takes a
// slot from another starts a new stream, as does the other coming back.
#include <cstdint>
#include <set>
#include <string>

#include <gtest/gtest.h>

#include "broker/event_streams.hpp"

namespace sidecast::broker {
namespace {

TEST(EventStreams, EachTopicIsNumberedInAStreamOfItsOwn) {
  event_streams streams{1024, 100};
  auto a1 = streams.next("ra");
  auto b1 = streams.next("rb");
  auto a2 = streams.next("ra");
  auto a3 = streams.next("ra");
  auto b2 = streams.next("rb");
  EXPECT_EQ(a1.seq, 1u);
  EXPECT_EQ(a2.seq, 2u);
  EXPECT_EQ(a3.seq, 3u);
  EXPECT_EQ(b1.seq, 1u);
  EXPECT_EQ(b2.seq, 2u);
  EXPECT_EQ(a1.stream, a3.stream);
  EXPECT_EQ(b1.stream, b2.stream);
  EXPECT_NE(a1.stream, b1.stream);
  EXPECT_EQ(streams.taken_over(), 0u);
}

TEST(EventStreams, ATopicThatTakesASlotStartsANewStreamAndSoDoesTheOneItTookItFrom) {
  event_streams streams{1, 100};  // one slot: every topic shares it
  auto a1 = streams.next("ra");
  auto a2 = streams.next("ra");
  auto b1 = streams.next("rb");
  auto a3 = streams.next("ra");
  EXPECT_EQ(a2.seq, 2u);
  EXPECT_EQ(b1.seq, 1u);
  EXPECT_NE(b1.stream, a1.stream);
  EXPECT_EQ(a3.seq, 1u) << "a's count starts over";
  EXPECT_NE(a3.stream, a1.stream) << "in a stream its subscribers have not heard: they count no gap";
  EXPECT_NE(a3.stream, b1.stream);
  EXPECT_EQ(streams.taken_over(), 2u);
}

TEST(EventStreams, TheSlotsAreAPowerOfTwo) {
  EXPECT_EQ(event_streams(0, 1).slots(), 1u);
  EXPECT_EQ(event_streams(1, 1).slots(), 1u);
  EXPECT_EQ(event_streams(1000, 1).slots(), 1024u);
  EXPECT_EQ(event_streams(65536, 1).slots(), 65536u);
}

TEST(EventStreams, NoStreamIsZero) {
  // Stream 0 means none on the wire (proto::decode_stamp).
  event_streams streams{4, ~std::uint64_t{0}};
  std::set<std::uint64_t> seen;
  for (int i = 0; i < 8; ++i) {
    auto s = streams.next("r" + std::to_string(i));
    EXPECT_NE(s.stream, 0u);
    seen.insert(s.stream);
  }
  EXPECT_EQ(seen.size(), 8u) << "every new stream is a new id, across the wrap";
}

}  // namespace
}  // namespace sidecast::broker
