// core::input_wait over real inproc sockets: what it reports ready, that an
// idle socket costs nothing and is still woken by new input, and that a
// socket left with input (a loop that stopped short of EAGAIN) is reported
// again without its descriptor firing. Then core::input_reactor, which runs
// such a loop's turns on an io_context's thread: a turn for each kind of
// source, at the deadline, after a send, and nothing once it is gone.
#include <poll.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/post.hpp>
#include <gtest/gtest.h>
#include <zmq.hpp>

#include "core/input_reactor.hpp"
#include "core/input_wait.hpp"
#include "core/local_link.hpp"
#include "core/wakeup.hpp"

namespace {

using namespace std::chrono_literals;
using clock_type = std::chrono::steady_clock;

struct pair_sockets {
  zmq::context_t context{1};
  zmq::socket_t ours{context, zmq::socket_type::pair};
  zmq::socket_t peer{context, zmq::socket_type::pair};
  explicit pair_sockets(const char* name) {
    ours.bind(name);
    peer.connect(name);
  }
};

// Receives until EAGAIN; returns how many messages came.
int drain(zmq::socket_t& s) {
  int n = 0;
  zmq::message_t m;
  while (s.recv(m, zmq::recv_flags::dontwait)) ++n;
  return n;
}

// wait() reports socket `in` ready well before its 5 s limit, and the
// socket then holds `n` messages.
void expect_ready_soon(sidecast::core::input_wait& input, std::size_t in, zmq::socket_t& s, int n) {
  auto start = clock_type::now();
  input.wait(5s);
  EXPECT_TRUE(input.ready(in));
  EXPECT_LT(clock_type::now() - start, 1s);
  EXPECT_EQ(drain(s), n);
}

TEST(InputWait, ReportsASocketWithInputAndTimesOutOnAnIdleOne) {
  pair_sockets p{"inproc://input-wait-1"};
  sidecast::core::input_wait input;
  auto in = input.add(p.ours);

  auto start = clock_type::now();
  input.wait(50ms);
  EXPECT_FALSE(input.ready(in));
  EXPECT_GE(clock_type::now() - start, 40ms);

  p.peer.send(zmq::str_buffer("a"));
  expect_ready_soon(input, in, p.ours, 1);

  // Drained to EAGAIN (and said so): nothing is reported until the peer
  // sends again, and then the descriptor announces it.
  input.drained(in);
  input.wait(50ms);
  EXPECT_FALSE(input.ready(in));
  p.peer.send(zmq::str_buffer("b"));
  expect_ready_soon(input, in, p.ours, 1);
}

TEST(InputWait, ASocketLeftWithInputIsReportedAgainAtOnce) {
  pair_sockets p{"inproc://input-wait-2"};
  sidecast::core::input_wait input;
  auto in = input.add(p.ours);
  for (int i = 0; i < 3; ++i) p.peer.send(zmq::str_buffer("x"));

  input.wait(5s);
  ASSERT_TRUE(input.ready(in));
  zmq::message_t m;
  ASSERT_TRUE(p.ours.recv(m, zmq::recv_flags::dontwait));  // one of three: the batch ended early

  // The mailbox signal was consumed by that receive; the socket is asked.
  expect_ready_soon(input, in, p.ours, 2);
}

TEST(InputWait, AUsedSocketIsAskedBeforeBlocking) {
  pair_sockets p{"inproc://input-wait-3"};
  sidecast::core::input_wait input;
  auto in = input.add(p.ours);
  input.wait(10ms);  // the first turn asks every socket
  EXPECT_FALSE(input.ready(in));

  // Input arrives, then the loop sends on the socket and reads ZMQ_EVENTS
  // itself: its mailbox signal is gone, so only asking finds the message.
  p.peer.send(zmq::str_buffer("late"));
  p.ours.send(zmq::str_buffer("reply"));
  (void)p.ours.get(zmq::sockopt::events);
  input.used(in);
  expect_ready_soon(input, in, p.ours, 1);
}

TEST(InputWait, WatchesPlainDescriptorsNextToSockets) {
  pair_sockets p{"inproc://input-wait-4"};
  sidecast::core::wakeup wake;
  sidecast::core::input_wait input;
  auto sock = input.add(p.ours);
  auto fd = input.add(wake.fd());

  wake.signal();
  input.wait(5s);
  EXPECT_TRUE(input.ready(fd));
  EXPECT_FALSE(input.ready(sock));
  wake.drain();

  input.wait(30ms);
  EXPECT_FALSE(input.ready(fd));
  EXPECT_FALSE(input.ready(sock));
}

// An input_wait over a socket, an eventfd and a local:// router, driven by
// an input_reactor on a thread of its own. Each turn takes what it was told
// was ready (as a loop must: the waits are edge-triggered), notes it, and
// asks for the next turn within `period`.
struct reactor_rig {
  explicit reactor_rig(const std::string& name, std::chrono::milliseconds every = 5s)
      : p{("inproc://" + name).c_str()}, router{"local://" + name}, period{every} {
    sock = input.add(p.ours);
    fd = input.add(wake.fd());
    local = input.add(router.fd(), [this] { return router.has_input(); });
    boost::asio::post(io, [this] {
      reactor = std::make_unique<sidecast::core::input_reactor>(io, input, [this] { turn(); }, "test loop");
      reactor->on_failure([this](const std::string& why) {
        std::lock_guard lock{mutex};
        failure = why;
        changed.notify_all();
      });
      router.hook(reactor->poker(local));
      reactor->watch();
      reactor->next(clock_type::now() + period);
    });
    thread = std::thread{[this] {
      auto work = boost::asio::make_work_guard(io);
      io.run();
    }};
  }
  ~reactor_rig() { stop(); }

  void turn() {
    if (throw_next) throw std::runtime_error("the turn failed");
    std::vector<std::string> seen;
    if (input.ready(sock)) {
      seen.push_back("sock " + std::to_string(drain(p.ours)));
      input.drained(sock);
    }
    if (input.ready(fd) && wake.drain()) seen.push_back("fd");
    if (input.ready(local)) {
      std::lock_guard lock{mutex};
      int n = 0;
      std::string_view peer;
      zmq::message_t m;
      while (router.receive(peer, m)) ++n;
      local_total += n;
      seen.push_back("local " + std::to_string(n));
    }
    if (seen.empty()) seen.push_back("none");
    {
      std::lock_guard lock{mutex};
      for (auto& s : seen) turns.push_back({std::move(s), clock_type::now()});
    }
    changed.notify_all();
    reactor->next(clock_type::now() + period);
  }

  // Waits up to 5 s until the turns took `n` local:// messages in all.
  bool took_local(int n) {
    std::unique_lock lock{mutex};
    return changed.wait_for(lock, 5s, [&] { return local_total == n; });
  }

  // Waits up to 5 s for a turn that saw `what`; true when one did.
  bool saw(const std::string& what) {
    std::unique_lock lock{mutex};
    return changed.wait_for(lock, 5s, [&] {
      for (auto& t : turns)
        if (t.first == what) return true;
      return false;
    });
  }
  void forget() {
    std::lock_guard lock{mutex};
    turns.clear();
  }

  void stop() {
    if (!thread.joinable()) return;
    io.stop();
    thread.join();
    reactor.reset();  // no thread runs the context now
  }

  boost::asio::io_context io{1};
  pair_sockets p;
  sidecast::core::wakeup wake;
  sidecast::core::local_router router;
  sidecast::core::input_wait input;
  std::size_t sock = 0, fd = 0, local = 0;
  std::chrono::milliseconds period;
  std::unique_ptr<sidecast::core::input_reactor> reactor;
  std::mutex mutex;
  std::condition_variable changed;
  std::vector<std::pair<std::string, clock_type::time_point>> turns;
  int local_total = 0;  // under mutex
  std::atomic<bool> throw_next{false};
  std::string failure;  // on_failure's reason, under mutex
  std::thread thread;
};

TEST(InputReactor, ATurnComesForASocketADescriptorAndHookedLocalInput) {
  reactor_rig rig{"reactor-1"};
  rig.p.peer.send(zmq::str_buffer("a"));
  EXPECT_TRUE(rig.saw("sock 1"));
  rig.wake.signal();
  EXPECT_TRUE(rig.saw("fd"));
  auto dealer = sidecast::core::local_dealer::connect("local://reactor-1", "d1", 8, 8);
  ASSERT_TRUE(dealer);
  for (const char* text : {"x", "y"}) {
    zmq::message_t m{text, 1};
    ASSERT_TRUE(dealer->send(m));
  }
  // In one turn or two: the connection rang first, and may have been taken
  // before its messages came.
  EXPECT_TRUE(rig.took_local(2));
  // And again, now that a turn armed the doorbell once more.
  zmq::message_t m{"z", 1};
  ASSERT_TRUE(dealer->send(m));
  EXPECT_TRUE(rig.took_local(3));
  // Hooked: the router's eventfd was never written.
  pollfd pfd{rig.router.fd(), POLLIN, 0};
  EXPECT_EQ(::poll(&pfd, 1, 0), 0) << "a hooked doorbell wrote its descriptor";
}

TEST(InputReactor, ATurnComesAtTheDeadlineWithNothingReady) {
  reactor_rig rig{"reactor-2", 50ms};
  ASSERT_TRUE(rig.saw("none"));
  rig.forget();
  auto start = clock_type::now();
  ASSERT_TRUE(rig.saw("none"));
  EXPECT_GE(clock_type::now() - start, 30ms) << "turns came early, again and again";
}

// A send may take the mailbox signal that announces input: a socket the turn
// marks used() is asked by next(), not left to its descriptor.
TEST(InputReactor, ASocketUsedInATurnIsAskedBeforeTheNextWait) {
  reactor_rig rig{"reactor-3", 60s};  // no deadline turn to read it by chance
  std::this_thread::sleep_for(50ms);  // the first turn's look has passed: waiting on the descriptors now
  rig.forget();
  boost::asio::post(rig.io, [&rig] {
    rig.p.peer.send(zmq::str_buffer("late"));
    rig.p.ours.send(zmq::str_buffer("reply"));
    (void)rig.p.ours.get(zmq::sockopt::events);  // takes the signal
    rig.input.used(rig.sock);
    rig.reactor->next(clock_type::now() + 5s);
  });
  EXPECT_TRUE(rig.saw("sock 1"));
}

TEST(InputReactor, AHookRungAfterTheReactorIsGoneDoesNothing) {
  auto rig = std::make_unique<reactor_rig>("reactor-4");
  auto dealer = sidecast::core::local_dealer::connect("local://reactor-4", "d1", 8, 8);
  ASSERT_TRUE(dealer);
  zmq::message_t m{"a", 1};
  ASSERT_TRUE(dealer->send(m));
  ASSERT_TRUE(rig->took_local(1));
  rig->stop();  // the reactor is gone; its hook stays on the doorbell
  zmq::message_t late{"b", 1};
  EXPECT_TRUE(dealer->send(late));  // rings the hook: no post, no crash (ASan: no use after free)
  rig.reset();
}

// A turn that throws ends the loop, as a thread of its own would end, and
// says so: nothing joins a thread to notice (worker::start_on, broker::run_on).
TEST(InputReactor, ATurnThatThrowsEndsTheLoopAndCallsItsFailureHandler) {
  reactor_rig rig{"reactor-5"};
  rig.p.peer.send(zmq::str_buffer("a"));
  ASSERT_TRUE(rig.saw("sock 1"));
  rig.throw_next = true;
  rig.wake.signal();
  {
    std::unique_lock lock{rig.mutex};
    ASSERT_TRUE(rig.changed.wait_for(lock, 5s, [&] { return !rig.failure.empty(); }));
    EXPECT_EQ(rig.failure, "the turn failed");
  }
  rig.throw_next = false;
  rig.forget();
  rig.wake.signal();
  std::this_thread::sleep_for(100ms);
  std::lock_guard lock{rig.mutex};
  EXPECT_TRUE(rig.turns.empty()) << "a turn came after the loop failed";
}

// On the context's own thread a chain of rings (gateway → broker → worker
// → ...) runs in one handler, in order, ahead of what was posted after the
// first ring; but a chain that never ends still lets other handlers run.
TEST(RingPoster, AChainOfRingsOnTheContextsThreadRunsInOneHandler) {
  boost::asio::io_context io{1};
  std::vector<std::string> order;
  std::shared_ptr<sidecast::core::ring_poster> a, b;
  sidecast::core::ring_hook ring_a, ring_b;
  b = sidecast::core::ring_poster::make(io, [&](std::uint64_t) { order.push_back("b"); });
  a = sidecast::core::ring_poster::make(io, [&](std::uint64_t) {
    order.push_back("a");
    (*ring_b)();
  });
  ring_a = a->hook(0);
  ring_b = b->hook(0);
  boost::asio::post(io, [&] {
    (*ring_a)();
    boost::asio::post(io, [&] { order.push_back("posted"); });
  });
  io.run();
  EXPECT_EQ(order, (std::vector<std::string>{"a", "b", "posted"}));
  a->close();
  b->close();
}

TEST(RingPoster, AnEndlessChainStillLetsOtherHandlersRun) {
  boost::asio::io_context io{1};
  int hops = 0, hops_when_posted_ran = -1;
  sidecast::core::ring_hook ring_a, ring_b;
  auto a = sidecast::core::ring_poster::make(io, [&](std::uint64_t) {
    if (++hops < 10000) (*ring_b)();
  });
  auto b = sidecast::core::ring_poster::make(io, [&](std::uint64_t) {
    if (++hops < 10000) (*ring_a)();
  });
  ring_a = a->hook(0);
  ring_b = b->hook(0);
  boost::asio::post(io, [&] {
    (*ring_a)();
    boost::asio::post(io, [&] { hops_when_posted_ran = hops; });
  });
  io.run();
  EXPECT_EQ(hops, 10000);
  EXPECT_GE(hops_when_posted_ran, 1);
  EXPECT_LT(hops_when_posted_ran, 100) << "the chain kept the handler waiting";
  a->close();
  b->close();
}

}  // namespace
