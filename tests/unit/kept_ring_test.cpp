// core/kept_ring.hpp: what a link keeps of what it sent, and which of it
// goes again after a Welcome (take_lost).
#include "core/kept_ring.hpp"

#include <string>
#include <vector>

#include <gtest/gtest.h>

namespace sidecast::core {
namespace {

kept_sends::entry sent(std::string_view text, link_position where) {
  return {zmq::message_t{text.data(), text.size()}, where};
}

std::vector<std::string> texts(kept_sends& kept) {
  std::vector<std::string> out;
  kept.for_each([&](kept_sends::entry& e) { out.push_back(e.message.to_string()); });
  return out;
}

TEST(KeptRing, ForgetsTheOldestPastEitherBound) {
  kept_sends kept{3, 10};
  kept.push(sent("aaaa", {1, 1}));
  kept.push(sent("bbbb", {1, 2}));
  EXPECT_EQ(kept.bytes(), 8u);
  kept.push(sent("cccc", {1, 3}));  // 12 bytes: the oldest goes
  EXPECT_EQ(texts(kept), (std::vector<std::string>{"bbbb", "cccc"}));
  kept.push(sent("d", {1, 4}));
  kept.push(sent("e", {1, 5}));  // 4 messages: the oldest goes
  EXPECT_EQ(texts(kept), (std::vector<std::string>{"cccc", "d", "e"}));
  kept.push(sent("this is too long", {1, 6}));  // larger than max_bytes: not kept, nothing forgotten
  EXPECT_EQ(texts(kept), (std::vector<std::string>{"cccc", "d", "e"}));
}

TEST(KeptRing, GrowsOnceAndGivesItsSlotsBackOnlyWhenEmpty) {
  kept_sends kept{1000, 1 << 20};
  EXPECT_EQ(kept.capacity(), 0u);
  for (std::uint64_t i = 1; i <= 100; ++i) kept.push(sent("x", {1, i}));
  EXPECT_EQ(kept.capacity(), 128u);  // 64, then doubled
  kept.release();
  EXPECT_EQ(kept.capacity(), 128u) << "it keeps something";
  kept.forget_while([](const kept_sends::entry& e) { return e.where.sent <= 100; });
  EXPECT_EQ(kept.size(), 0u);
  kept.release();
  EXPECT_EQ(kept.capacity(), 0u);
  kept.push(sent("y", {1, 101}));
  EXPECT_EQ(texts(kept), (std::vector<std::string>{"y"}));
}

TEST(KeptRing, HasRoomOnlyWhereNothingWouldBeForgotten) {
  kept_sends kept{2, 8};
  EXPECT_TRUE(kept.has_room(8));
  EXPECT_FALSE(kept.has_room(9));
  kept.push(sent("aaaa", {1, 1}));
  EXPECT_TRUE(kept.has_room(4));
  EXPECT_FALSE(kept.has_room(5));
  kept.push(sent("b", {1, 2}));
  EXPECT_FALSE(kept.has_room(0));  // the count is reached
  EXPECT_FALSE(kept_sends{}.has_room(0));  // keeps nothing
}

TEST(KeptRing, MakeRoomForgetsOnlyWhatItMay) {
  kept_sends kept{3, 100};
  kept.push(sent("a", {1, 1}));
  kept.push(sent("b", link_position::held(1)));
  kept.push(sent("c", {1, 2}));
  auto not_held = [](const kept_sends::entry& e) { return !e.where.is_held(); };
  EXPECT_TRUE(kept.make_room(1, not_held));  // "a" goes
  EXPECT_EQ(texts(kept), (std::vector<std::string>{"b", "c"}));
  kept.push(sent("d", link_position::held(2)));
  EXPECT_FALSE(kept.make_room(1, not_held)) << "the oldest is held: nothing may go";
  EXPECT_EQ(texts(kept), (std::vector<std::string>{"b", "c", "d"}));
  EXPECT_FALSE(kept.make_room(101, not_held)) << "larger than the bytes kept at most";
}

TEST(KeptRing, HeldPositionsOrderAfterEverySentOne) {
  EXPECT_LT((link_position{7, 1000}), link_position::held(1));
  EXPECT_LT(link_position::held(1), link_position::held(2));
  EXPECT_TRUE(link_position::held(1).is_held());
  EXPECT_FALSE((link_position{7, 1}).is_held());
  // No Welcome names a held message as lost: it went nowhere.
  broker_received received{1, 3, 2, 5};
  EXPECT_FALSE(received.lost(link_position::held(1)));
}

TEST(KeptRing, BrokerReceivedNamesWhatDiedInReplacedSockets) {
  // The broker read 2 of what was sent after Hello 3; Hellos 4 then 5 followed.
  broker_received received{1, 3, 2, 5};
  EXPECT_FALSE(received.lost({2, 9}));  // before the Hello it knew of: read, or older than it answers for
  EXPECT_FALSE(received.lost({3, 2}));
  EXPECT_TRUE(received.lost({3, 3}));
  EXPECT_TRUE(received.lost({4, 1}));   // into a socket replaced before its Welcome
  EXPECT_FALSE(received.lost({5, 1}));  // after the Hello this Welcome answers: not known yet
}

TEST(KeptRing, TakeLostHandsTheLostThenTheHeldAndKeepsWhatIsNotKnownYet) {
  kept_sends kept{16, 1024};
  kept.push(sent("read", {3, 1}));
  kept.push(sent("lost-1", {3, 3}));
  kept.push(sent("lost-2", {4, 1}));
  kept.push(sent("new", {5, 1}));
  kept.push(sent("held", link_position::held(1)));
  broker_received received{1, 3, 2, 5};

  std::vector<std::string> handed;
  auto take = [&](kept_sends::entry&& e) { handed.push_back(e.message.to_string()); };
  take_lost(kept, received, false, take);
  EXPECT_EQ(handed, (std::vector<std::string>{"lost-1", "lost-2"}));
  EXPECT_EQ(texts(kept), (std::vector<std::string>{"new", "held"}));  // "read" is forgotten

  handed.clear();
  take_lost(kept, received, true, take);  // the same Welcome again: only the held one now
  EXPECT_EQ(handed, (std::vector<std::string>{"held"}));
  EXPECT_EQ(texts(kept), (std::vector<std::string>{"new"}));
  EXPECT_EQ(kept.bytes(), 3u);
}

// A heartbeat says the broker read 2 messages after Hello 5. Until the
// Welcome to Hello 5 is acted on (take_lost), what was sent before Hello 5
// stays, and so does everything behind it: that Welcome may name it lost.
TEST(KeptRing, ForgetReadLetsGoOfWhatTheBrokerReadAfterItsHelloOnly) {
  kept_sends kept{16, 1024};
  kept.push(sent("before", {4, 7}));
  kept.push(sent("read-1", {5, 1}));
  kept.push(sent("read-2", {5, 2}));
  kept.push(sent("unread", {5, 3}));
  kept.push(sent("held", link_position::held(1)));
  forget_read(kept, {5, 2}, 4);  // the Welcome to Hello 5 not acted on yet
  EXPECT_EQ(texts(kept), (std::vector<std::string>{"before", "read-1", "read-2", "unread", "held"}));

  take_lost(kept, broker_received{1, 4, 7, 5}, false, [](kept_sends::entry&&) { ADD_FAILURE() << "none died"; });
  forget_read(kept, {5, 2}, 5);
  EXPECT_EQ(texts(kept), (std::vector<std::string>{"unread", "held"}));
  forget_read(kept, {5, 9}, 5);  // read past what was sent: a held message is never read
  EXPECT_EQ(texts(kept), (std::vector<std::string>{"held"}));
  forget_read(kept, {6, 1}, 6);  // about a later Hello: nothing sent after it is kept
  EXPECT_EQ(texts(kept), (std::vector<std::string>{"held"}));
}

// A new broker (or one that had dropped the link) welcomed Hello 6: what
// was sent before it, and never confirmed, no Welcome can name lost. Once
// the application acted on that Welcome it goes with the first heartbeat.
TEST(KeptRing, ForgetReadLetsGoOfWhatNoWelcomeCanNameLost) {
  kept_sends kept{16, 1024};
  kept.push(sent("to-the-old-broker", {4, 7}));
  kept.push(sent("before-its-hello", {5, 1}));
  kept.push(sent("held", link_position::held(1)));
  kept.push(sent("unread", {6, 3}));
  forget_read(kept, {6, 2}, 6);
  EXPECT_EQ(texts(kept), (std::vector<std::string>{"held", "unread"}));
}

}  // namespace
}  // namespace sidecast::core
