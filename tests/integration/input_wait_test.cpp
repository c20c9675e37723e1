// core::input_wait over real inproc sockets: what it reports ready, that an
// idle socket costs nothing and is still woken by new input, and that a
// socket left with input (a loop that stopped short of EAGAIN) is reported
// again without its descriptor firing.
#include <chrono>

#include <gtest/gtest.h>
#include <zmq.hpp>

#include "core/input_wait.hpp"
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

}  // namespace
