// core::message_queue on one thread: order, the bound (a refused message
// stays with the caller), and queues long enough to cross, reuse and free
// chunks. Cross-thread use is tested with local_link (tests/integration).
#include <string>

#include <gtest/gtest.h>

#include "core/message_queue.hpp"

namespace {

using sidecast::core::message_queue;

zmq::message_t text(const std::string& s) { return zmq::message_t{s.data(), s.size()}; }

TEST(MessageQueue, KeepsOrderAndSaysWhenEmpty) {
  message_queue q{8};
  zmq::message_t m;
  EXPECT_TRUE(q.empty());
  EXPECT_FALSE(q.pop(m));
  for (auto s : {"a", "b", "c"}) {
    auto in = text(s);
    ASSERT_TRUE(q.push(in));
    EXPECT_EQ(in.size(), 0u) << "a pushed message is taken";
  }
  EXPECT_FALSE(q.empty());
  for (auto s : {"a", "b", "c"}) {
    ASSERT_TRUE(q.pop(m));
    EXPECT_EQ(m.to_string(), s);
  }
  EXPECT_TRUE(q.empty());
  EXPECT_FALSE(q.pop(m));
}

TEST(MessageQueue, RefusesPastItsBoundAndKeepsTheMessageWithTheCaller) {
  message_queue q{2};
  auto a = text("a"), b = text("b"), c = text("c");
  ASSERT_TRUE(q.push(a));
  ASSERT_TRUE(q.push(b));
  EXPECT_FALSE(q.push(c));
  EXPECT_EQ(c.to_string(), "c") << "a refused message is left as it was";
  zmq::message_t m;
  ASSERT_TRUE(q.pop(m));
  EXPECT_TRUE(q.push(c)) << "one taken, one more fits";
  ASSERT_TRUE(q.pop(m));
  EXPECT_EQ(m.to_string(), "b");
  ASSERT_TRUE(q.pop(m));
  EXPECT_EQ(m.to_string(), "c");
}

TEST(MessageQueue, CrossesChunksInBothDirectionsAndAtEveryFill) {
  // 256 slots a chunk: a queue a few chunks deep, filled and drained at
  // lengths that put the turn-overs on every side of a chunk's edge.
  message_queue q{2000};
  int next_in = 0, next_out = 0;
  zmq::message_t m;
  for (int fill : {1, 255, 256, 257, 511, 1000, 2000, 3, 700}) {
    for (int i = 0; i < fill; ++i) {
      auto in = text(std::to_string(next_in));
      ASSERT_TRUE(q.push(in)) << "at " << next_in;
      ++next_in;
    }
    while (q.pop(m)) {
      ASSERT_EQ(m.to_string(), std::to_string(next_out));
      ++next_out;
    }
  }
  EXPECT_EQ(next_in, next_out);
}

TEST(MessageQueue, FreesWhatIsLeftInIt) {
  // Run under ASan (build-asan): a large message left behind, over several
  // chunks, must not leak.
  message_queue q{1000};
  for (int i = 0; i < 600; ++i) {
    zmq::message_t big{4096};
    ASSERT_TRUE(q.push(big));
  }
  zmq::message_t m;
  for (int i = 0; i < 300; ++i) ASSERT_TRUE(q.pop(m));
}

}  // namespace
