// core::edge_set on one io_context, with Unix socket pairs for descriptors:
// edges reported once each, unwatch (also from inside another watcher's
// call, with its event already fetched), and a watcher that throws.
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "core/edge_set.hpp"

namespace {

using namespace std::chrono_literals;
using sidecast::core::edge_set;
using sidecast::core::edge_watcher;

// A watcher that records what it was told and runs `then` on each edge.
struct recorder : edge_watcher {
  std::vector<std::uint32_t> edges;
  int threw = 0;
  std::function<void()> then;
  void on_edge(std::uint32_t events) override {
    edges.push_back(events);
    if (then) then();
  }
  void on_edge_threw(const std::exception&) override { ++threw; }
  int readable() const {
    int n = 0;
    for (auto e : edges) n += (e & EPOLLIN) != 0;
    return n;
  }
};

// Both ends of a non-blocking Unix stream pair, closed at the end.
struct pair_of_ends {
  int ours = -1, theirs = -1;
  pair_of_ends() {
    int fds[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, fds) != 0)
      throw std::runtime_error("socketpair");
    ours = fds[0];
    theirs = fds[1];
  }
  ~pair_of_ends() {
    if (ours >= 0) ::close(ours);
    if (theirs >= 0) ::close(theirs);
  }
  void send(const std::string& s) const { ASSERT_EQ(::write(theirs, s.data(), s.size()), ssize_t(s.size())); }
};

class EdgeSet : public ::testing::Test {
 protected:
  // Runs handlers until `done` holds or a second passes.
  bool run_until(const std::function<bool()>& done) {
    auto until = std::chrono::steady_clock::now() + 1s;
    while (!done() && std::chrono::steady_clock::now() < until) {
      ioc.restart();
      ioc.run_for(5ms);
    }
    return done();
  }
  void settle() {
    ioc.restart();
    ioc.run_for(50ms);
  }

  boost::asio::io_context ioc;
  std::vector<std::string> errors;
  edge_set set{ioc, [this](const std::string& what) { errors.push_back(what); }};
};

TEST_F(EdgeSet, ReportsWritableThenEachNewArrivalOnce) {
  pair_of_ends p;
  auto w = std::make_shared<recorder>();
  ASSERT_TRUE(set.watch(p.ours, w));
  ASSERT_TRUE(run_until([&] { return !w->edges.empty(); }));
  EXPECT_TRUE(w->edges.front() & EPOLLOUT) << "a fresh socket is writable";
  EXPECT_EQ(w->readable(), 0);

  p.send("a");
  ASSERT_TRUE(run_until([&] { return w->readable() == 1; }));
  settle();
  EXPECT_EQ(w->readable(), 1) << "edge-triggered: unread data is not reported again";

  p.send("b");
  ASSERT_TRUE(run_until([&] { return w->readable() == 2; })) << "new data is a new edge";
  EXPECT_TRUE(errors.empty());
}

TEST_F(EdgeSet, UnwatchHandsBackTheWatcherAndStopsItsEvents) {
  pair_of_ends p;
  auto w = std::make_shared<recorder>();
  ASSERT_TRUE(set.watch(p.ours, w));
  EXPECT_EQ(w.use_count(), 2) << "the set holds the watcher";
  ASSERT_TRUE(run_until([&] { return !w->edges.empty(); }));

  auto held = set.unwatch(*w);
  EXPECT_EQ(held, w);
  held.reset();
  EXPECT_EQ(w.use_count(), 1) << "the set let go of it";
  EXPECT_EQ(set.unwatch(*w), nullptr) << "a second unwatch is harmless";

  auto seen = w->edges.size();
  p.send("x");
  settle();
  EXPECT_EQ(w->edges.size(), seen);
}

TEST_F(EdgeSet, AWatcherUnwatchedByAnotherInTheSameBatchIsNotCalled) {
  pair_of_ends pa, pb, pc;
  auto a = std::make_shared<recorder>(), b = std::make_shared<recorder>(), c = std::make_shared<recorder>();
  ASSERT_TRUE(set.watch(pa.ours, a));
  ASSERT_TRUE(set.watch(pb.ours, b));
  ASSERT_TRUE(run_until([&] { return !a->edges.empty() && !b->edges.empty(); }));

  // Both become readable before the set looks; a's call (first: epoll's
  // ready list keeps arrival order) takes b out and puts c in b's slot, so
  // b's event in the same batch is stale and must reach neither b nor c.
  a->then = [&] {
    set.unwatch(*b);
    ASSERT_TRUE(set.watch(pc.ours, c));
  };
  pa.send("1");
  pb.send("2");
  ASSERT_TRUE(run_until([&] { return a->readable() == 1; }));
  settle();
  EXPECT_EQ(b->readable(), 0);
  EXPECT_EQ(c->readable(), 0) << "the reused slot's new watcher got the old descriptor's event";

  pc.send("3");
  EXPECT_TRUE(run_until([&] { return c->readable() == 1; })) << "the new watcher is served";
}

TEST_F(EdgeSet, MoreDescriptorsReadyThanOneBatchAreAllReportedAndTheSetStillWaits) {
  // 600 ready at once: three epoll_wait batches of at most 256. The set
  // waits for its own descriptor's next edge without re-arming it, so it
  // must drain every batch itself, and still see the round after.
  constexpr int count = 600;
  std::vector<std::unique_ptr<pair_of_ends>> pairs;
  std::vector<std::shared_ptr<recorder>> watchers;
  for (int i = 0; i < count; ++i) {
    pairs.push_back(std::make_unique<pair_of_ends>());
    watchers.push_back(std::make_shared<recorder>());
    ASSERT_TRUE(set.watch(pairs.back()->ours, watchers.back()));
  }
  auto all_read = [&](int n) {
    return [&, n] {
      for (auto& w : watchers)
        if (w->readable() != n) return false;
      return true;
    };
  };
  for (int round = 1; round <= 2; ++round) {
    for (auto& p : pairs) p->send("x");
    ASSERT_TRUE(run_until(all_read(round))) << "round " << round;
  }
  settle();
  EXPECT_TRUE(all_read(2)());
  EXPECT_TRUE(errors.empty());
}

// The owners in the tree (the gateway's ws_loop, the generator's
// client_edges) are io_context services that close their set in
// shutdown(). Made before the reactor (the first I/O object of the
// io_context), such a service shuts down after the reactor has: the set's
// pending wait was abandoned by then, and closing it must still free
// everything once (ASan, in the sanitizer preset).
class set_service : public boost::asio::execution_context::service {
 public:
  using key_type = set_service;
  static inline boost::asio::execution_context::id id;
  explicit set_service(boost::asio::execution_context& context)
      : service{context}, set{static_cast<boost::asio::io_context&>(context), [](const std::string&) {}} {}
  edge_set set;

 private:
  void shutdown() override { set.close(); }
};

TEST(EdgeSetLifetime, AServiceMadeBeforeTheReactorClosesItsSetAfterTheReactorShutDown) {
  pair_of_ends p;
  auto w = std::make_shared<recorder>();
  {
    boost::asio::io_context ioc{1};
    auto& owner = boost::asio::use_service<set_service>(ioc);  // before anything made the reactor
    ASSERT_TRUE(owner.set.watch(p.ours, w));                  // makes it, and the set's wait
    ioc.run_for(20ms);
    EXPECT_FALSE(w->edges.empty());
  }
  EXPECT_EQ(w.use_count(), 1) << "the set let go of its watcher";
}

TEST_F(EdgeSet, AThrowingWatcherIsToldAndTheOthersAreStillServed) {
  pair_of_ends pa, pb;
  auto a = std::make_shared<recorder>(), b = std::make_shared<recorder>();
  ASSERT_TRUE(set.watch(pa.ours, a));
  ASSERT_TRUE(set.watch(pb.ours, b));
  ASSERT_TRUE(run_until([&] { return !a->edges.empty() && !b->edges.empty(); }));
  a->then = [] { throw std::runtime_error("boom"); };
  pa.send("1");
  pb.send("2");
  ASSERT_TRUE(run_until([&] { return a->threw == 1 && b->readable() == 1; }));
  EXPECT_TRUE(errors.empty());
}

TEST_F(EdgeSet, AWatcherThatThrowsAgainWhenToldIsReportedAndTheOthersServed) {
  struct throws_again : recorder {
    void on_edge(std::uint32_t) override { throw 42; }  // not even a std::exception
    void on_edge_threw(const std::exception&) override {
      ++threw;
      throw std::runtime_error("cannot end");
    }
  };
  pair_of_ends pa, pb;
  auto a = std::make_shared<throws_again>();
  auto b = std::make_shared<recorder>();
  ASSERT_TRUE(set.watch(pa.ours, a));
  ASSERT_TRUE(set.watch(pb.ours, b));
  pa.send("1");
  pb.send("2");
  ASSERT_TRUE(run_until([&] { return a->threw >= 1 && b->readable() == 1; }));
  ASSERT_FALSE(errors.empty());
  EXPECT_EQ(errors.front(), "a watcher failed to end itself: cannot end");
}

TEST_F(EdgeSet, ABadDescriptorIsRefusedWithErrno) {
  auto w = std::make_shared<recorder>();
  errno = 0;
  EXPECT_FALSE(set.watch(-1, w));
  EXPECT_EQ(errno, EBADF);
  EXPECT_EQ(w.use_count(), 1);
  EXPECT_EQ(set.unwatch(*w), nullptr);
}

TEST_F(EdgeSet, CloseDropsEveryWatcher) {
  pair_of_ends p;
  auto w = std::make_shared<recorder>();
  ASSERT_TRUE(set.watch(p.ours, w));
  set.close();
  EXPECT_EQ(w.use_count(), 1);
  EXPECT_EQ(set.unwatch(*w), nullptr);
}

}  // namespace
