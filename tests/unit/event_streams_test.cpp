// The broker's per-topic event counters (broker/event_streams.hpp): each
// topic numbered 1, 2, 3, ... in a stream of its own; a topic that takes a
// slot from another (the least recently used of its set of four) starts a
// new stream, as does the other coming back.
#include <cstdint>
#include <set>
#include <string>

#include <gtest/gtest.h>

#include "broker/event_streams.hpp"

namespace sidecast::broker {
namespace {

TEST(EventStreams, EachTopicIsNumberedInAStreamOfItsOwn) {
  event_streams streams{1024, 100, 7};
  auto a1 = streams.next("ra").stamp;
  auto b1 = streams.next("rb").stamp;
  auto a2 = streams.next("ra").stamp;
  auto a3 = streams.next("ra").stamp;
  auto b2 = streams.next("rb").stamp;
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

// The smallest table is one set of four: every topic shares it.
TEST(EventStreams, FourTopicsShareASetAndKeepTheirCounts) {
  event_streams streams{1, 100, 7};
  ASSERT_EQ(streams.slots(), event_streams::ways);
  for (int round = 1; round <= 3; ++round)
    for (const auto* topic : {"ra", "rb", "rc", "rd"})
      EXPECT_EQ(streams.next(topic).stamp.seq, std::uint64_t(round)) << topic;
  EXPECT_EQ(streams.taken_over(), 0u);
}

TEST(EventStreams, AFifthTopicTakesTheLeastRecentlyUsedSlotAndBothStartNewStreams) {
  event_streams streams{1, 100, 7};
  auto a1 = streams.next("ra").stamp;
  for (const auto* topic : {"rb", "rc", "rd"}) (void)streams.next(topic);
  (void)streams.next("ra");  // a is used again: b is now the least recent
  auto e = streams.next("re");
  EXPECT_TRUE(e.took_over);
  auto e1 = e.stamp;
  EXPECT_EQ(e1.seq, 1u);
  EXPECT_EQ(streams.taken_over(), 1u);
  EXPECT_EQ(streams.next("ra").stamp.seq, 3u) << "a kept its slot";
  EXPECT_EQ(streams.next("rc").stamp.seq, 2u);
  auto b = streams.next("rb").stamp;  // takes d's, the least recent now
  EXPECT_EQ(b.seq, 1u) << "b's count starts over";
  EXPECT_NE(b.stream, a1.stream);
  EXPECT_NE(b.stream, e1.stream);
  EXPECT_EQ(streams.taken_over(), 2u);
  EXPECT_EQ(streams.next("rd").stamp.seq, 1u) << "d lost its slot to b";
}

TEST(EventStreams, AResetForgetsEveryTopicAndStartsStreamsAnew) {
  event_streams streams{64, 100, 7};
  auto before = streams.next("ra").stamp;
  (void)streams.next("ra");
  streams.reset(5000, 11);
  auto after = streams.next("ra").stamp;
  EXPECT_EQ(after.seq, 1u);
  EXPECT_EQ(after.stream, 5000u);
  EXPECT_NE(after.stream, before.stream);
  EXPECT_EQ(streams.slots(), 64u);
}

TEST(EventStreams, TheSlotsAreAPowerOfTwoOfAtLeastOneSet) {
  EXPECT_EQ(event_streams(0, 1, 7).slots(), 4u);
  EXPECT_EQ(event_streams(1, 1, 7).slots(), 4u);
  EXPECT_EQ(event_streams(1000, 1, 7).slots(), 1024u);
  EXPECT_EQ(event_streams(65536, 1, 7).slots(), 65536u);
}

TEST(EventStreams, NoStreamIsZero) {
  // Stream 0 means none on the wire (proto::decode_stamp).
  event_streams streams{4, ~std::uint64_t{0}, 7};
  std::set<std::uint64_t> seen;
  for (int i = 0; i < 8; ++i) {
    auto s = streams.next("r" + std::to_string(i)).stamp;
    EXPECT_NE(s.stream, 0u);
    seen.insert(s.stream);
  }
  EXPECT_EQ(seen.size(), 8u) << "every new stream is a new id, across the wrap";
}

// Many topics in a table a few times larger: each keeps its own count.
TEST(EventStreams, TopicsFewerThanTheSlotsKeepTheirCounts) {
  event_streams streams{4096, 1, 7};
  for (int round = 1; round <= 3; ++round)
    for (int t = 0; t < 200; ++t) ASSERT_EQ(streams.next("r" + std::to_string(t)).stamp.seq, std::uint64_t(round)) << t;
}

}  // namespace
}  // namespace sidecast::broker
