#include <map>
#include <random>

#include <gtest/gtest.h>

#include "broker/service_table.hpp"

namespace sidecast::broker {
namespace {

using namespace std::chrono_literals;

const clock::time_point t0{std::chrono::seconds(1000)};

job make_job(std::string id, std::string service = "svc", clock::duration timeout = 10s,
             bool wants_reply = true) {
  job j;
  j.id = std::move(id);
  j.service = std::move(service);
  j.requester = "gw";
  j.payload = zmq::message_t{"p:" + j.id};
  j.wants_reply = wants_reply;
  j.received = t0;
  j.deadline = t0 + timeout;
  return j;
}

std::vector<std::pair<std::string, std::string>> pairs(const std::vector<assignment>& as) {
  std::vector<std::pair<std::string, std::string>> out;
  for (const auto& a : as) out.emplace_back(a.worker, a.work->id);
  return out;
}

using P = std::vector<std::pair<std::string, std::string>>;

TEST(ServiceTable, WaitsForAWorkerThenDispatches) {
  service_table t{{}};
  EXPECT_EQ(t.submit(make_job("a")), service_table::admit::queued);
  EXPECT_TRUE(t.dispatch().empty());
  EXPECT_EQ(t.queued("svc"), 1u);
  t.add_worker("w1", "svc", 1);
  EXPECT_EQ(pairs(t.dispatch()), (P{{"w1", "a"}}));
  EXPECT_EQ(t.queued("svc"), 0u);
  EXPECT_EQ(t.in_flight(), 1u);
}

TEST(ServiceTable, LeastRecentlyUsedWorkerFirst) {
  service_table t{{}};
  t.add_worker("w1", "svc", 1);
  t.add_worker("w2", "svc", 1);
  t.add_worker("w3", "svc", 1);
  for (auto id : {"a", "b", "c", "d"}) t.submit(make_job(id));
  EXPECT_EQ(pairs(t.dispatch()), (P{{"w1", "a"}, {"w2", "b"}, {"w3", "c"}}));
  ASSERT_TRUE(t.complete("b", "w2"));
  EXPECT_EQ(pairs(t.dispatch()), (P{{"w2", "d"}}));
  ASSERT_TRUE(t.complete("a", "w1"));
  ASSERT_TRUE(t.complete("c", "w3"));
  for (auto id : {"e", "f"}) t.submit(make_job(id));
  EXPECT_EQ(pairs(t.dispatch()), (P{{"w1", "e"}, {"w3", "f"}}));
}

TEST(ServiceTable, CapacityCreditsRotate) {
  service_table t{{}};
  t.add_worker("w1", "svc", 2);
  t.add_worker("w2", "svc", 1);
  for (auto id : {"a", "b", "c", "d"}) t.submit(make_job(id));
  // w1 gets one, goes to the back, w2 one, then w1 its second; d waits.
  EXPECT_EQ(pairs(t.dispatch()), (P{{"w1", "a"}, {"w2", "b"}, {"w1", "c"}}));
  EXPECT_EQ(t.queued("svc"), 1u);
  ASSERT_TRUE(t.complete("c", "w1"));
  EXPECT_EQ(pairs(t.dispatch()), (P{{"w1", "d"}}));
}

TEST(ServiceTable, ServicesAreSeparate) {
  service_table t{{}};
  t.add_worker("w1", "chat", 1);
  t.submit(make_job("a", "vm"));
  t.submit(make_job("b", "chat"));
  EXPECT_EQ(pairs(t.dispatch()), (P{{"w1", "b"}}));
  EXPECT_EQ(t.queued("vm"), 1u);
  EXPECT_EQ(t.workers("vm"), 0u);
  EXPECT_EQ(t.workers("chat"), 1u);
}

TEST(ServiceTable, QueueBoundAnswersBusyAndDuplicatesAreRefused) {
  service_table t{{.queue_limit = 2, .max_attempts = 3}};
  EXPECT_EQ(t.submit(make_job("a")), service_table::admit::queued);
  EXPECT_EQ(t.submit(make_job("a")), service_table::admit::duplicate);
  EXPECT_EQ(t.submit(make_job("b")), service_table::admit::queued);
  EXPECT_EQ(t.submit(make_job("c")), service_table::admit::busy);
  EXPECT_EQ(t.submit(make_job("d", "other")), service_table::admit::queued) << "bound is per service";
  t.add_worker("w1", "svc", 1);
  t.dispatch();
  EXPECT_EQ(t.submit(make_job("a")), service_table::admit::duplicate) << "held jobs are known too";
  EXPECT_EQ(t.submit(make_job("c")), service_table::admit::queued);
}

TEST(ServiceTable, ExpiryTellsUnavailableFromTimeout) {
  service_table t{{}};
  t.submit(make_job("queued", "nobody", 1s));
  t.submit(make_job("held", "svc", 2s));
  t.submit(make_job("later", "svc", 5s));
  t.add_worker("w1", "svc", 1);
  t.dispatch();
  EXPECT_EQ(t.next_deadline(), t0 + 1s);
  EXPECT_TRUE(t.expire(t0 + 999ms).empty());
  auto first = t.expire(t0 + 1s);
  ASSERT_EQ(first.size(), 1u);
  EXPECT_EQ(first[0].work.id, "queued");
  EXPECT_EQ(first[0].code, proto::UNAVAILABLE);
  EXPECT_TRUE(first[0].worker.empty());
  auto second = t.expire(t0 + 2s);
  ASSERT_EQ(second.size(), 1u);
  EXPECT_EQ(second[0].work.id, "held");
  EXPECT_EQ(second[0].code, proto::TIMEOUT);
  EXPECT_EQ(second[0].worker, "w1") << "the holder gets a Cancel";
  // The worker keeps its credit until it answers the expired job.
  EXPECT_TRUE(t.dispatch().empty());
  bool held = false;
  EXPECT_FALSE(t.complete("held", "w1", &held));
  EXPECT_TRUE(held);
  EXPECT_EQ(pairs(t.dispatch()), (P{{"w1", "later"}}));
}

TEST(ServiceTable, DeadWorkerJobsRetryFirstThenFail) {
  service_table t{{.queue_limit = 100, .max_attempts = 2}};
  t.add_worker("w1", "svc", 2);
  t.submit(make_job("a"));
  t.submit(make_job("b"));
  t.submit(make_job("c"));
  EXPECT_EQ(pairs(t.dispatch()), (P{{"w1", "a"}, {"w1", "b"}}));
  EXPECT_TRUE(t.remove_worker("w1").empty());
  EXPECT_EQ(t.workers("svc"), 0u);
  EXPECT_EQ(t.queued("svc"), 3u);
  t.add_worker("w2", "svc", 3);
  auto second = t.dispatch();
  EXPECT_EQ(pairs(second), (P{{"w2", "a"}, {"w2", "b"}, {"w2", "c"}})) << "retried jobs keep their place";
  EXPECT_EQ(second[0].work->attempt, 2u);
  EXPECT_EQ(second[2].work->attempt, 1u);
  auto lost = t.remove_worker("w2");
  ASSERT_EQ(lost.size(), 2u);
  for (const auto& f : lost) EXPECT_EQ(f.code, proto::WORKER_LOST);
  EXPECT_EQ(t.queued("svc"), 1u) << "c has one attempt left";
}

TEST(ServiceTable, CompleteOnlyByTheHolder) {
  service_table t{{}};
  t.add_worker("w1", "svc", 1);
  t.add_worker("w2", "svc", 1);
  t.submit(make_job("a"));
  t.dispatch();
  bool held = true;
  EXPECT_FALSE(t.complete("a", "w2", &held));
  EXPECT_FALSE(held) << "an id a worker never held is not a job completion";
  EXPECT_TRUE(t.complete("a", "w1"));
  EXPECT_FALSE(t.complete("a", "w1")) << "a second reply is ignored";
  EXPECT_EQ(t.in_flight(), 0u);
}

TEST(ServiceTable, CancelQueuedAndHeld) {
  service_table t{{}};
  t.add_worker("w1", "svc", 1);
  t.submit(make_job("a"));
  t.submit(make_job("b"));
  t.dispatch();
  std::string worker;
  EXPECT_TRUE(t.cancel("b", &worker));
  EXPECT_TRUE(worker.empty());
  EXPECT_EQ(t.queued("svc"), 0u);
  EXPECT_TRUE(t.cancel("a", &worker));
  EXPECT_EQ(worker, "w1");
  EXPECT_FALSE(t.cancel("a", &worker));
  EXPECT_FALSE(t.next_deadline());
}

TEST(ServiceTable, RequesterOfNamesTheAskerWhileTheJobLives) {
  service_table t{{}};
  t.add_worker("w1", "svc", 1);
  auto a = make_job("a");
  a.requester = "gw1";
  t.submit(std::move(a));
  EXPECT_EQ(t.requester_of("a"), "gw1") << "queued";
  t.dispatch();
  EXPECT_EQ(t.requester_of("a"), "gw1") << "held";
  EXPECT_EQ(t.requester_of("b"), "") << "no such job";
  EXPECT_TRUE(t.complete("a", "w1"));
  EXPECT_EQ(t.requester_of("a"), "") << "answered";
}

TEST(ServiceTable, ReRegisteringChangesCapacity) {
  service_table t{{}};
  t.add_worker("w1", "svc", 1);
  t.add_worker("w1", "svc", 3);
  EXPECT_EQ(t.workers("svc"), 1u);
  for (auto id : {"a", "b", "c"}) t.submit(make_job(id));
  EXPECT_EQ(t.dispatch().size(), 3u);
}

TEST(ServiceTable, EarlyAnswerKeepsCapacityDropsDeadlineAndRetry) {
  service_table t{{}};
  t.add_worker("w1", "svc", 1);
  t.submit(make_job("long", "svc", 1s));
  t.submit(make_job("next", "svc", 10s));
  t.dispatch();
  EXPECT_EQ(t.answer_early("long", "w2"), nullptr) << "only the holder answers";
  const job* early = t.answer_early("long", "w1");
  ASSERT_NE(early, nullptr);
  EXPECT_TRUE(early->answered);
  EXPECT_EQ(t.answer_early("long", "w1"), nullptr) << "once";
  EXPECT_TRUE(t.expire(t0 + 5s).empty()) << "no deadline once answered";
  EXPECT_TRUE(t.dispatch().empty()) << "capacity stays taken";
  EXPECT_TRUE(t.remove_worker("w1").empty()) << "answered work is not retried or reported";
  EXPECT_EQ(t.queued("svc"), 1u);
  t.add_worker("w2", "svc", 1);
  EXPECT_EQ(pairs(t.dispatch()), (P{{"w2", "next"}}));
}

// The deadline heap and the queues against a plain model: random deadlines,
// cancels in the middle of queues and held jobs answered early; every job
// that still had a deadline expires exactly once, in deadline order.
TEST(ServiceTable, DeadlinesExpireInOrderThroughCancelsAndEarlyAnswers) {
  service_table t{{.queue_limit = 1000, .max_attempts = 3}};
  t.add_worker("w1", "a", 40);
  std::mt19937 rng{7};
  std::map<std::string, clock::time_point> expected;
  for (int i = 0; i < 600; ++i) {
    auto id = "j" + std::to_string(i);
    auto timeout = std::chrono::milliseconds(1 + rng() % 5000);
    ASSERT_EQ(t.submit(make_job(id, i % 3 == 0 ? "a" : (i % 3 == 1 ? "b" : "c"), timeout)),
              service_table::admit::queued);
    expected[id] = t0 + timeout;
  }
  auto held = t.dispatch();
  ASSERT_EQ(held.size(), 40u);
  for (std::size_t i = 0; i < held.size(); i += 4) {
    ASSERT_NE(t.answer_early(held[i].work->id, "w1"), nullptr);
    expected.erase(held[i].work->id);
  }
  for (int i = 1; i < 600; i += 5) {
    auto id = "j" + std::to_string(i);
    std::string worker;
    if (expected.contains(id) && t.cancel(id, &worker)) expected.erase(id);
  }
  clock::time_point last{};
  std::size_t seen = 0;
  for (auto now = t0; now <= t0 + 6s; now += 250ms) {
    for (const auto& f : t.expire(now)) {
      ASSERT_TRUE(expected.contains(f.work.id)) << f.work.id << " expired twice or should not have";
      EXPECT_LE(f.work.deadline, now);
      EXPECT_GE(f.work.deadline, last) << "expired out of deadline order";
      last = f.work.deadline;
      expected.erase(f.work.id);
      ++seen;
    }
  }
  EXPECT_TRUE(expected.empty()) << expected.size() << " jobs never expired";
  EXPECT_GT(seen, 400u);
  EXPECT_FALSE(t.next_deadline());
  EXPECT_EQ(t.queued("a") + t.queued("b") + t.queued("c"), 0u);
}

// dispatch_due() against dispatch() itself: through random submits, new
// workers and capacities, completions, cancels, early answers, lost workers
// and expiries, whenever dispatch() would hand out work the table said it
// was due (the broker skips dispatch() after a message otherwise).
TEST(ServiceTable, DispatchIsDueWheneverItWouldHandOutWork) {
  service_table t{{.queue_limit = 50, .max_attempts = 2}};
  std::mt19937 rng{11};
  const std::vector<std::string> services{"a", "b", "c"}, workers{"w1", "w2", "w3"};
  std::map<std::string, std::string> held;  // id -> worker
  auto now = t0;
  int next_id = 0, handed_out = 0, skipped = 0;
  for (int step = 0; step < 5000; ++step) {
    switch (rng() % 8) {
      case 0:
      case 1: {
        auto j = make_job("j" + std::to_string(next_id++), services[rng() % 3], std::chrono::milliseconds(50 + rng() % 500));
        j.received = now;
        j.deadline = now + (j.deadline - t0);
        t.submit(std::move(j));
        break;
      }
      case 2: t.add_worker(workers[rng() % 3], services[rng() % 3], 1 + rng() % 3); break;
      case 3:
      case 4:
        if (!held.empty()) {
          auto it = std::next(held.begin(), static_cast<long>(rng() % held.size()));
          if (rng() % 4 == 0) {
            t.answer_early(it->first, it->second);
          } else {
            t.complete(it->first, it->second);
            held.erase(it);
          }
        }
        break;
      case 5: {
        std::string worker;
        t.cancel("j" + std::to_string(rng() % (next_id + 1)), &worker);
        break;
      }
      case 6:
        if (rng() % 10 == 0) {
          auto gone = workers[rng() % 3];
          t.remove_worker(gone);
          std::erase_if(held, [&](const auto& h) { return h.second == gone; });
        } else {
          now += std::chrono::milliseconds(rng() % 100);
          t.expire(now);
        }
        break;
      default: break;
    }
    if (rng() % 2 == 0) continue;  // several changes between two dispatches
    const bool due = t.dispatch_due();
    const auto& out = t.dispatch();
    if (!due) {
      ASSERT_TRUE(out.empty()) << "step " << step << ": dispatch() handed out work it was not due to";
      ++skipped;
    }
    for (const auto& a : out) held[a.work->id] = a.worker;
    handed_out += static_cast<int>(out.size());
    EXPECT_FALSE(t.dispatch_due()) << "a dispatch() leaves nothing due";
  }
  EXPECT_GT(handed_out, 500);
  EXPECT_GT(skipped, 100);
}

// Slots are reused: a long run of request/reply cycles leaves nothing behind.
TEST(ServiceTable, CompletedJobsLeaveNothingBehind) {
  service_table t{{}};
  t.add_worker("w1", "svc", 8);
  t.add_worker("w2", "svc", 8);
  for (int round = 0; round < 2000; ++round) {
    for (int i = 0; i < 10; ++i) t.submit(make_job(std::to_string(round) + ":" + std::to_string(i)));
    std::vector<std::pair<std::string, std::string>> done;
    for (const auto& a : t.dispatch()) done.emplace_back(a.work->id, std::string{a.worker});
    for (const auto& [id, worker] : done) ASSERT_TRUE(t.complete(id, worker));
  }
  EXPECT_EQ(t.in_flight(), 0u);
  EXPECT_EQ(t.queued("svc"), 0u);
  EXPECT_FALSE(t.next_deadline());
  EXPECT_FALSE(t.submit(make_job("0:0")) == service_table::admit::duplicate) << "a finished id is free again";
}

}  // namespace
}  // namespace sidecast::broker
