// core::edge_wait on one io_context with eventfds: a wait completes on the
// next edge only (no re-arm: a descriptor left readable does not complete
// the next wait, which is what shows that no EPOLL_CTL_MOD was made), a
// handler may wait again, and a wait that is cancelled, destroyed, or still
// pending when the io_context goes away frees its operation without calling
// the handler (ASan checks the frees in the sanitizer preset).
#include <sys/eventfd.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <stdexcept>
#include <vector>

#include <gtest/gtest.h>

#include "core/edge_wait.hpp"

namespace {

using namespace std::chrono_literals;
using sidecast::core::edge_wait;

struct event_fd {
  int fd = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  event_fd() {
    if (fd < 0) throw std::runtime_error("eventfd");
  }
  ~event_fd() { ::close(fd); }
  void ring() const {
    std::uint64_t one = 1;
    ASSERT_EQ(::write(fd, &one, sizeof one), ssize_t(sizeof one));
  }
  std::uint64_t drain() const {
    std::uint64_t n = 0;
    return ::read(fd, &n, sizeof n) == ssize_t(sizeof n) ? n : 0;
  }
};

class EdgeWait : public ::testing::Test {
 protected:
  boost::asio::io_context ioc{1};
  event_fd bell;
  std::vector<boost::system::error_code> calls;
  edge_wait::handler record = [this](boost::system::error_code ec) { calls.push_back(ec); };

  void turn() {
    ioc.restart();
    ioc.run_for(20ms);
  }
};

TEST_F(EdgeWait, CompletesOnceOnTheNextEdge) {
  edge_wait w{ioc, bell.fd, record};
  w.wait();
  w.wait();  // already pending: nothing more
  EXPECT_TRUE(w.pending());
  turn();
  EXPECT_TRUE(calls.empty());  // nothing came

  bell.ring();
  turn();
  ASSERT_EQ(calls.size(), 1u);
  EXPECT_FALSE(calls[0]);
  EXPECT_FALSE(w.pending());
  turn();
  EXPECT_EQ(calls.size(), 1u);
  EXPECT_EQ(bell.drain(), 1u);
}

TEST_F(EdgeWait, ADescriptorLeftReadableDoesNotCompleteTheNextWait) {
  edge_wait w{ioc, bell.fd, record};
  w.wait();
  bell.ring();
  turn();
  ASSERT_EQ(calls.size(), 1u);
  // Still readable (not drained). Asio's async_wait would re-arm with an
  // EPOLL_CTL_MOD and complete at once; this waits for the next edge.
  w.wait();
  turn();
  EXPECT_EQ(calls.size(), 1u);
  bell.ring();
  turn();
  EXPECT_EQ(calls.size(), 2u);
  EXPECT_EQ(bell.drain(), 2u);
}

TEST_F(EdgeWait, AHandlerWaitsAgainAndSeesEachLaterEdge) {
  std::optional<edge_wait> w;
  w.emplace(ioc, bell.fd, [&](boost::system::error_code ec) {
    calls.push_back(ec);
    bell.drain();  // take what it announced, then wait again
    w->wait();
  });
  w->wait();
  for (int i = 0; i < 5; ++i) {
    bell.ring();
    turn();
  }
  EXPECT_EQ(calls.size(), 5u);
  EXPECT_TRUE(w->pending());
}

TEST_F(EdgeWait, AnEdgeBeforeTheWaitIsSeenWhenTheReactorLooksAfterIt) {
  // The case edge_set relies on: input comes after the owner's last look
  // but before its wait starts, on the same thread; the reactor has not yet
  // looked, so the edge is still there for it.
  edge_wait w{ioc, bell.fd, record};
  bell.ring();
  w.wait();
  turn();
  EXPECT_EQ(calls.size(), 1u);
}

TEST_F(EdgeWait, CancelCompletesThePendingWaitAsAborted) {
  edge_wait w{ioc, bell.fd, record};
  w.wait();
  w.cancel();
  turn();
  ASSERT_EQ(calls.size(), 1u);
  EXPECT_EQ(calls[0], boost::asio::error::operation_aborted);
  EXPECT_FALSE(w.pending());
  // It can wait again after that.
  w.wait();
  bell.ring();
  turn();
  ASSERT_EQ(calls.size(), 2u);
  EXPECT_FALSE(calls[1]);
}

TEST_F(EdgeWait, DestroyedWhilePendingItsHandlerIsNeverCalled) {
  {
    edge_wait w{ioc, bell.fd, record};
    w.wait();
  }
  bell.ring();
  turn();  // runs the aborted operation, which frees itself
  EXPECT_TRUE(calls.empty());
}

TEST_F(EdgeWait, DestroyedAfterItsEdgeCameButBeforeItsHandlerRan) {
  event_fd other;
  std::optional<edge_wait> w;
  w.emplace(ioc, bell.fd, record);
  // The first handler to run destroys the other wait, whose completion is
  // queued behind it in the same batch of the reactor.
  edge_wait killer{ioc, other.fd, [&](boost::system::error_code) { w.reset(); }};
  killer.wait();
  w->wait();
  other.ring();
  bell.ring();
  turn();
  EXPECT_TRUE(calls.empty());  // epoll reports them in the order they became ready: the killer first
  EXPECT_FALSE(w.has_value());
}

TEST(EdgeWaitLifetime, APendingWaitOutlivedByItsIoContextIsFreed) {
  event_fd bell;
  int called = 0;
  auto ioc = std::make_unique<boost::asio::io_context>(1);
  auto w = std::make_unique<edge_wait>(*ioc, bell.fd, [&](boost::system::error_code) { ++called; });
  w->wait();
  bell.ring();
  ioc->run_for(0ms);  // may or may not have taken the edge: either way the operation is in the io_context
  w.reset();
  ioc.reset();
  EXPECT_LE(called, 1);
}

TEST(EdgeWaitLifetime, ABadDescriptorIsRefused) {
  boost::asio::io_context ioc{1};
  EXPECT_THROW(edge_wait(ioc, -1, [](boost::system::error_code) {}), boost::system::system_error);
}

}  // namespace
