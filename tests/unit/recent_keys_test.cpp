// core::recent_keys: what is remembered, for how long, and what the count
// bound forgets.
#include "core/recent_keys.hpp"

#include <string>
#include <vector>

#include <gtest/gtest.h>

namespace {

using namespace std::chrono_literals;
using sidecast::core::recent_keys;
const recent_keys::time_point t0{};

TEST(RecentKeys, AKeyIsSeenWithinTheWindowOnly) {
  recent_keys recent{5s, 10};
  EXPECT_TRUE(recent.remember("a", t0));
  EXPECT_EQ(recent.seen("a", t0 + 4s), t0);
  EXPECT_FALSE(recent.seen("a", t0 + 5s));
  EXPECT_FALSE(recent.seen("b", t0));
  recent.expire(t0 + 5s);
  EXPECT_TRUE(recent.empty());
}

TEST(RecentKeys, ASecondSightingMovesTheKeysTime) {
  recent_keys recent{5s, 10};
  recent.remember("a", t0);
  recent.remember("a", t0 + 3s);
  // The first sighting's turn to expire does not take the key with it.
  recent.expire(t0 + 6s);
  EXPECT_EQ(recent.seen("a", t0 + 6s), t0 + 3s);
  recent.expire(t0 + 8s);
  EXPECT_TRUE(recent.empty());
}

TEST(RecentKeys, TwoSightingsInOneTickAreTwo) {
  recent_keys recent{5s, 3};
  recent.remember("a", t0);
  recent.remember("a", t0);
  recent.remember("b", t0);
  // Full: the first "a" makes room, and "a" is still remembered.
  EXPECT_TRUE(recent.remember("c", t0));
  EXPECT_EQ(recent.seen("a", t0), t0);
  EXPECT_EQ(recent.size(), 3u);
}

TEST(RecentKeys, PastTheCountTheOldestIsForgottenAndThatIsSaid) {
  recent_keys recent{5s, 2};
  EXPECT_TRUE(recent.remember("a", t0));
  EXPECT_TRUE(recent.remember("b", t0 + 1s));
  EXPECT_FALSE(recent.remember("c", t0 + 2s));
  EXPECT_FALSE(recent.seen("a", t0 + 2s));
  EXPECT_TRUE(recent.seen("b", t0 + 2s));
  EXPECT_TRUE(recent.seen("c", t0 + 2s));
  EXPECT_EQ(recent.size(), 2u);
  // What expired makes room without forgetting anything.
  EXPECT_TRUE(recent.remember("d", t0 + 6s));
  EXPECT_EQ(recent.size(), 2u);
}

TEST(RecentKeys, ACountOfZeroKeepsNothing) {
  recent_keys recent{5s, 0};
  EXPECT_FALSE(recent.remember("a", t0));
  EXPECT_TRUE(recent.empty());
}

// What was seen since a time, each key once (at its last sighting), oldest
// first: the broker sends a worker that registers the last minutes'
// announcements this way.
TEST(RecentKeys, TheKeysSeenSinceATimeComeOnceEachOldestFirst) {
  recent_keys keys{10s, 100};
  keys.remember("a", t0);
  keys.remember("b", t0 + 1s);
  keys.remember("c", t0 + 2s);
  keys.remember("a", t0 + 3s);  // seen again: now the newest
  std::vector<std::string> seen;
  keys.for_each_since(t0 + 1s, [&](const std::string& k) { seen.push_back(k); });
  EXPECT_EQ(seen, (std::vector<std::string>{"b", "c", "a"}));
  seen.clear();
  keys.for_each_since(t0 + 2500ms, [&](const std::string& k) { seen.push_back(k); });
  EXPECT_EQ(seen, (std::vector<std::string>{"a"}));
}

}  // namespace
