#include <gtest/gtest.h>

#include <prometheus/registry.h>

#include "gateway/config.hpp"
#include "gateway/limits.hpp"
#include "gateway/thread_backlog.hpp"

namespace sidecast::gateway {
namespace {

using namespace std::chrono_literals;

// A route list given as one value (SIDECAST_ROUTE without brackets) is
// refused at start, not read as a service named "demo,/chat=chat".
TEST(Routes, AServiceNameWithACommaOrEqualsIsRefused) {
  EXPECT_EQ(parse_routes({"/=demo", "/chat=chat"}).size(), 2u);
  EXPECT_THROW(parse_routes({"/=demo,/chat=chat"}), std::invalid_argument);
  EXPECT_THROW(parse_routes({"/=a b"}), std::invalid_argument);
  EXPECT_THROW(parse_routes({"chat"}), std::invalid_argument);
}

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

// An IPv6 client is counted by its /64: one host (or site) has the whole
// /64, and counted address by address it would have 2^64 budgets.
TEST(ConnectionLimits, IPv6AddressesCountByTheirSlash64) {
  connection_limits l{100, 2};
  auto a = l.admit("2001:db8:1:2::1");
  auto b = l.admit("2001:db8:1:2:ffff:ffff:ffff:fffe");
  ASSERT_TRUE(a && b);
  EXPECT_FALSE(l.admit("2001:db8:1:2:abcd::9")) << "a third address of the same /64";
  EXPECT_TRUE(l.admit("2001:db8:1:3::1")) << "the next /64 has its own budget";
  EXPECT_EQ(address_key("2001:db8:1:2:abcd::9"), "2001:db8:1:2::/64");
  // IPv4, mapped or not, is one address; what does not parse is its text.
  EXPECT_EQ(address_key("::ffff:192.0.2.7"), "192.0.2.7");
  EXPECT_EQ(address_key("192.0.2.7"), "192.0.2.7");
  EXPECT_EQ(address_key("unix"), "unix");
  auto v4 = l.admit("192.0.2.7");
  auto mapped = l.admit("::ffff:192.0.2.7");
  ASSERT_TRUE(v4 && mapped);
  EXPECT_FALSE(l.admit("192.0.2.7")) << "a mapped address counts as its IPv4 one";
}

// Where many clients share a /64 as a matter of course, each address counts
// alone: a NAT64 translator's clients (by the IPv4 one each carries), a
// local network's (unique-local, link-local), and any with
// --per-ip-ipv6-prefix 128.
TEST(ConnectionLimits, SharedIPv6NetworksCountEachAddress) {
  EXPECT_EQ(address_key("64:ff9b::c000:207"), "192.0.2.7");
  EXPECT_EQ(address_key("64:ff9b::c000:208"), "192.0.2.8");
  EXPECT_EQ(address_key("fd00:1:2:3::5"), "fd00:1:2:3::5");
  EXPECT_EQ(address_key("fe80::1"), "fe80::1");
  EXPECT_EQ(address_key("2001:db8:1:2::1", 128), "2001:db8:1:2::1");
  EXPECT_EQ(address_key("2001:db8:1:2::1", 48), "2001:db8:1::/48");
  connection_limits l{100, 1, 128};
  auto a = l.admit("2001:db8:1:2::1");
  EXPECT_TRUE(a && l.admit("2001:db8:1:2::2"));
}

// An io_context nobody runs yet stands for an I/O thread that is behind.
TEST(ThreadBacklog, RefusesPastTheBoundUntilTheThreadCatchesUp) {
  prometheus::Registry registry;
  auto& refused = prometheus::BuildCounter().Name("refused").Register(registry).Add({});
  thread_backlog backlog{5, refused};
  boost::asio::io_context behind{1}, other{1};
  int ran = 0;
  auto count = [&ran] { ++ran; };
  EXPECT_TRUE(backlog.post(behind.get_executor(), count, 3)) << "a broadcast to 3 of its sockets";
  EXPECT_TRUE(backlog.post(behind.get_executor(), count, 2));
  EXPECT_EQ(backlog.queued(behind.get_executor()), 5u);
  EXPECT_FALSE(backlog.post(behind.get_executor(), count)) << "past the bound";
  EXPECT_EQ(refused.Value(), 1);
  EXPECT_FALSE(backlog.post(behind.get_executor(), count, 4));
  EXPECT_EQ(refused.Value(), 5) << "counted in deliveries";
  EXPECT_TRUE(backlog.post(behind.get_executor(), count, 1, thread_backlog::kind::owed)) << "replies are never refused";
  EXPECT_EQ(backlog.queued(behind.get_executor()), 6u);
  EXPECT_TRUE(backlog.post(other.get_executor(), count, 5)) << "each thread has its own";

  behind.run();
  EXPECT_EQ(ran, 3);
  EXPECT_EQ(backlog.queued(behind.get_executor()), 0u);
  EXPECT_TRUE(backlog.post(behind.get_executor(), count, 5)) << "room again once it ran";
  EXPECT_FALSE(backlog.post(behind.get_executor(), count, 6)) << "a post heavier than the bound never goes";
  behind.restart();
  behind.run();
  other.run();
  EXPECT_EQ(ran, 5);
  EXPECT_EQ(backlog.queued(other.get_executor()), 0u);
}

TEST(ThreadBacklog, AHandlerThatThrowsStillLeavesTheBacklog) {
  prometheus::Registry registry;
  auto& refused = prometheus::BuildCounter().Name("refused").Register(registry).Add({});
  thread_backlog backlog{1, refused};
  boost::asio::io_context ctx{1};
  backlog.post(ctx.get_executor(), [] { throw std::runtime_error("sink failed"); });
  EXPECT_THROW(ctx.run(), std::runtime_error);
  EXPECT_EQ(backlog.queued(ctx.get_executor()), 0u);
  EXPECT_TRUE(backlog.post(ctx.get_executor(), [] {}));
}

}  // namespace
}  // namespace sidecast::gateway
