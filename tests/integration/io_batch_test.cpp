// gateway/io_batch: a batch of non-blocking recv / sendmsg calls over real
// loopback TCP connections returns, call by call, what the same calls made
// one by one return. Every test runs with io_uring (where the kernel allows
// it) and without.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <cstring>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "gateway/io_batch.hpp"

namespace sidecast::gateway {
namespace {

// A connected pair of loopback TCP sockets: `ours` (non-blocking, the one
// the batch uses) and `theirs` (blocking, the test's).
struct tcp_pair {
  int ours = -1;
  int theirs = -1;

  tcp_pair() {
    int listener = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof a;
    if (::bind(listener, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 ||
        ::getsockname(listener, reinterpret_cast<sockaddr*>(&a), &len) != 0 || ::listen(listener, 1) != 0)
      ADD_FAILURE() << "listen: " << std::strerror(errno);
    theirs = ::socket(AF_INET, SOCK_STREAM, 0);
    if (::connect(theirs, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0)
      ADD_FAILURE() << "connect: " << std::strerror(errno);
    ours = ::accept4(listener, nullptr, nullptr, SOCK_NONBLOCK);
    ::close(listener);
    int one = 1;
    ::setsockopt(ours, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    timeval tv{5, 0};
    ::setsockopt(theirs, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  }
  tcp_pair(const tcp_pair&) = delete;
  tcp_pair& operator=(const tcp_pair&) = delete;
  ~tcp_pair() {
    if (ours >= 0) ::close(ours);
    if (theirs >= 0) ::close(theirs);
  }

  void say(const std::string& s) const { ASSERT_EQ(::send(theirs, s.data(), s.size(), 0), static_cast<long>(s.size())); }
  std::string hear(std::size_t n) const {
    std::string s(n, '\0');
    std::size_t got = 0;
    while (got < n) {
      auto r = ::recv(theirs, s.data() + got, n - got, 0);
      if (r <= 0) break;
      got += static_cast<std::size_t>(r);
    }
    s.resize(got);
    return s;
  }
};

// Waits until `fd` has at least `n` bytes to read (loopback delivery is
// immediate, but not inside the sender's call on every kernel).
void wait_readable(int fd, std::size_t n) {
  for (int i = 0; i < 1000; ++i) {
    char buf[256];
    auto r = ::recv(fd, buf, sizeof buf, MSG_PEEK | MSG_DONTWAIT);
    if (r >= static_cast<long>(n)) return;
    ::usleep(1000);
  }
  ADD_FAILURE() << "no data came";
}

class IoBatch : public ::testing::TestWithParam<bool> {};

TEST_P(IoBatch, ResultsComeBackInTheOrderOfTheCalls) {
  io_batch batch{GetParam()};
  tcp_pair a, b, c, d;
  a.say("alpha");
  c.say("gamma!");
  wait_readable(a.ours, 5);
  wait_readable(c.ours, 6);
  char ra[16], rb[16], rc[16];
  std::string out = "to d";
  iovec iov{out.data(), out.size()};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  batch.recv(a.ours, ra, sizeof ra);
  batch.recv(b.ours, rb, sizeof rb);  // nothing there
  batch.recv(c.ours, rc, 3);          // more there than room
  batch.sendmsg(d.ours, &msg, MSG_NOSIGNAL);
  ASSERT_EQ(batch.size(), 4u);
  auto results = batch.run();
  ASSERT_EQ(results.size(), 4u);
  EXPECT_EQ(results[0], 5);
  EXPECT_EQ(std::string(ra, 5), "alpha");
  EXPECT_EQ(results[1], -EAGAIN) << "a call on an empty socket must not wait";
  EXPECT_EQ(results[2], 3);
  EXPECT_EQ(std::string(rc, 3), "gam");
  EXPECT_EQ(results[3], 4);
  EXPECT_EQ(d.hear(4), "to d");
  EXPECT_EQ(batch.size(), 0u) << "run() empties the batch";
  if (GetParam()) {
    EXPECT_TRUE(batch.using_ring() || !batch.ring_error().empty()) << "neither the ring nor a reason";
  } else {
    EXPECT_FALSE(batch.using_ring());
  }
}

TEST_P(IoBatch, AClosedPeerReadsAsTheEndAndRefusesWrites) {
  io_batch batch{GetParam()};
  tcp_pair a, b;
  ::close(a.theirs);
  a.theirs = -1;
  ::shutdown(b.theirs, SHUT_RDWR);
  ::close(b.theirs);
  b.theirs = -1;
  char buf[8];
  for (int i = 0; i < 1000; ++i) {  // until the FIN is in
    if (::recv(a.ours, buf, sizeof buf, MSG_PEEK | MSG_DONTWAIT) == 0) break;
    ::usleep(1000);
  }
  // Writes to a closed peer fail once it has answered the first with a reset.
  std::string out = "x";
  ::send(b.ours, out.data(), 1, MSG_NOSIGNAL);
  ::usleep(20000);
  iovec iov{out.data(), out.size()};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  batch.recv(a.ours, buf, sizeof buf);
  batch.sendmsg(b.ours, &msg, MSG_NOSIGNAL);
  batch.recv(-1, buf, sizeof buf);
  auto results = batch.run();
  ASSERT_EQ(results.size(), 3u);
  EXPECT_EQ(results[0], 0) << "end of stream";
  EXPECT_TRUE(results[1] == -EPIPE || results[1] == -ECONNRESET) << results[1];
  EXPECT_EQ(results[2], -EBADF);
}

TEST_P(IoBatch, AFullBatchAndTheNextOne) {
  io_batch batch{GetParam()};
  constexpr std::size_t pairs = io_batch::capacity / 2;
  std::vector<std::unique_ptr<tcp_pair>> conns;
  for (std::size_t i = 0; i < pairs; ++i) conns.push_back(std::make_unique<tcp_pair>());
  std::vector<std::string> out(pairs);
  std::vector<iovec> iov(pairs);
  std::vector<msghdr> msg(pairs);
  std::vector<std::array<char, 32>> in(pairs);
  for (int round = 0; round < 2; ++round) {
    for (std::size_t i = 0; i < pairs; ++i) conns[i]->say("in " + std::to_string(i) + " " + std::to_string(round));
    for (std::size_t i = 0; i < pairs; ++i) wait_readable(conns[i]->ours, 6);
    for (std::size_t i = 0; i < pairs; ++i) {
      out[i] = "out " + std::to_string(i) + " " + std::to_string(round);
      iov[i] = {out[i].data(), out[i].size()};
      msg[i] = {};
      msg[i].msg_iov = &iov[i];
      msg[i].msg_iovlen = 1;
      batch.recv(conns[i]->ours, in[i].data(), in[i].size());
      batch.sendmsg(conns[i]->ours, &msg[i], MSG_NOSIGNAL);
    }
    ASSERT_EQ(batch.size(), io_batch::capacity);
    auto results = batch.run();
    ASSERT_EQ(results.size(), io_batch::capacity);
    for (std::size_t i = 0; i < pairs; ++i) {
      auto expected = "in " + std::to_string(i) + " " + std::to_string(round);
      ASSERT_EQ(results[2 * i], static_cast<long>(expected.size())) << i;
      EXPECT_EQ(std::string(in[i].data(), expected.size()), expected);
      EXPECT_EQ(results[2 * i + 1], static_cast<long>(out[i].size())) << i;
      EXPECT_EQ(conns[i]->hear(out[i].size()), out[i]);
    }
  }
  if (batch.using_ring()) {
    EXPECT_EQ(batch.ring_batches(), 2u);
    EXPECT_EQ(batch.ring_calls(), 2 * io_batch::capacity);
  }
}

// The gateway stops at capacity; a batch past it is made one by one, each
// call answered, rather than run out of submission entries.
TEST_P(IoBatch, MoreCallsThanTheRingHoldsAreMadeOneByOne) {
  io_batch batch{GetParam()};
  constexpr std::size_t calls = io_batch::capacity + 2;
  tcp_pair a;
  std::string out = "x";
  iovec iov{out.data(), out.size()};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  for (std::size_t i = 0; i < calls; ++i) batch.sendmsg(a.ours, &msg, MSG_NOSIGNAL);
  auto results = batch.run();
  ASSERT_EQ(results.size(), calls);
  for (std::size_t i = 0; i < calls; ++i) EXPECT_EQ(results[i], 1) << i;
  EXPECT_EQ(a.hear(calls), std::string(calls, 'x'));
  EXPECT_EQ(batch.ring_calls(), 0u);
}

TEST_P(IoBatch, AnEmptyBatchAndASingleCall) {
  io_batch batch{GetParam()};
  EXPECT_TRUE(batch.run().empty());
  tcp_pair a;
  a.say("one");
  wait_readable(a.ours, 3);
  char buf[8];
  batch.recv(a.ours, buf, sizeof buf);
  auto results = batch.run();
  ASSERT_EQ(results.size(), 1u);
  EXPECT_EQ(results[0], 3);
  EXPECT_EQ(batch.ring_calls(), 0u) << "one call is made directly: the ring would cost the same entry";
}

// A caller whose batch failed before run() (ws_loop's batch guard) drops
// its queued calls: the next batch makes only its own, and a dropped send
// is never made.
TEST_P(IoBatch, DiscardedCallsAreNeverMade) {
  io_batch batch{GetParam()};
  tcp_pair a, b;
  const std::string stale = "stale";
  iovec iov{const_cast<char*>(stale.data()), stale.size()};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  batch.sendmsg(b.ours, &msg, MSG_NOSIGNAL);
  char ignored[8];
  batch.recv(b.ours, ignored, sizeof ignored);
  batch.discard();
  EXPECT_EQ(batch.size(), 0u);
  a.say("ab");
  b.say("cd");
  wait_readable(a.ours, 2);
  wait_readable(b.ours, 2);
  char buf_a[8], buf_b[8];
  batch.recv(a.ours, buf_a, sizeof buf_a);
  batch.recv(b.ours, buf_b, sizeof buf_b);
  auto results = batch.run();
  ASSERT_EQ(results.size(), 2u);
  EXPECT_EQ(results[0], 2);
  EXPECT_EQ(results[1], 2);
  EXPECT_EQ(std::string(buf_b, 2), "cd");
  // Nothing of the dropped send reached b's peer.
  EXPECT_EQ(::recv(b.theirs, buf_b, sizeof buf_b, MSG_DONTWAIT), -1);
  EXPECT_EQ(errno, EAGAIN);
}

INSTANTIATE_TEST_SUITE_P(Calls, IoBatch, ::testing::Values(true, false),
                         [](const auto& p) { return p.param ? "io_uring" : "one_by_one"; });

}  // namespace
}  // namespace sidecast::gateway
