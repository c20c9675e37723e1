#include <gtest/gtest.h>

#include "gateway/limits.hpp"

namespace sidecast::gateway {
namespace {

using namespace std::chrono_literals;

TEST(TokenBucket, BurstThenRate) {
  token_bucket b{10, 3};
  auto t = std::chrono::steady_clock::now();
  EXPECT_TRUE(b.take(t));
  EXPECT_TRUE(b.take(t));
  EXPECT_TRUE(b.take(t));
  EXPECT_FALSE(b.take(t)) << "burst spent";
  EXPECT_FALSE(b.take(t + 50ms)) << "half a token back";
  EXPECT_TRUE(b.take(t + 150ms)) << "a token per 100 ms";
  EXPECT_TRUE(b.take(t + 10s));
  EXPECT_TRUE(b.take(t + 10s));
  EXPECT_TRUE(b.take(t + 10s));
  EXPECT_FALSE(b.take(t + 10s)) << "refill stops at the burst";
}

TEST(TokenBucket, ZeroRateMeansNoLimit) {
  token_bucket b{0, 1};
  for (int i = 0; i < 1000; ++i) EXPECT_TRUE(b.take());
}

TEST(ConnectionLimits, TotalAndPerAddress) {
  connection_limits l{3, 2};
  auto a1 = l.admit("10.0.0.1");
  auto a2 = l.admit("10.0.0.1");
  ASSERT_TRUE(a1 && a2);
  EXPECT_FALSE(l.admit("10.0.0.1")) << "per address";
  auto b1 = l.admit("10.0.0.2");
  ASSERT_TRUE(b1);
  EXPECT_FALSE(l.admit("10.0.0.3")) << "in all";
  EXPECT_EQ(l.open(), 3u);
  a1.reset();
  EXPECT_EQ(l.open(), 2u);
  auto copy = b1;  // a slot handed on (HTTP session -> WebSocket) counts once
  b1.reset();
  EXPECT_EQ(l.open(), 2u);
  EXPECT_TRUE(l.admit("10.0.0.3"));  // released at once: the temporary dies
  EXPECT_TRUE(l.admit("10.0.0.1"));
}

}  // namespace
}  // namespace sidecast::gateway
