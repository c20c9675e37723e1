#include <algorithm>
#include <cctype>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <vector>

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

// ---------------------------------------------------------------- the table
// Each case is a script of operations on one table, each with the answer
// it must give (`run` below says what an operation writes):
//   worker W SVC N     add_worker                  "" | no_service | "evicted NAME[ ID:CODE ...]"
//   submit ID [SVC] [TIMEOUT_MS]  (svc, 10000)     queued | busy | duplicate | id_in_use | no_service
//   dispatch           "W:ID ..." in order (":ID#2": its second attempt)
//   complete ID W      job (it ended) | held (a job W held, already over) | none
//   cancel ID          queued | held by W | none
//   drop W             remove_worker: "ID:CODE ..." of the jobs that failed
//   drain W            drain_worker: ok | unknown
//   held W             held_by(W)
//   draining SVC       draining_workers(SVC)
//   expire MS          expire(t0 + MS): "ID:CODE[@W] ..."
//   deadline           next_deadline() in ms after t0, or none
//   queued SVC / workers SVC / in_flight           a count
//   prune              the names it forgot, sorted; services: the known ones

struct step {
  std::string op;
  std::string expect;
};

struct table_case {
  std::string name;
  table_limits limits;
  std::vector<step> steps;
};

void PrintTo(const table_case& c, std::ostream* os) { *os << '"' << c.name << '"'; }

std::string code_name(proto::Code c) { return proto::Code_Name(c); }

std::string failures(const std::vector<failure>& fs) {
  std::string out;
  for (const auto& f : fs) {
    if (!out.empty()) out += ' ';
    out += f.work.id + ':' + code_name(f.code);
    if (!f.worker.empty()) out += '@' + f.worker;
  }
  return out;
}

std::string run(service_table& t, const std::string& op) {
  std::istringstream in{op};
  std::string verb, a, b;
  in >> verb;
  if (verb == "worker") {
    unsigned n = 0;
    in >> a >> b >> n;
    service_table::eviction evicted;
    if (!t.add_worker(a, b, n, &evicted)) return "no_service";
    if (evicted.name.empty()) return "";
    std::string out = "evicted " + evicted.name;
    for (const auto& f : evicted.failed) out += " " + f.work.id + ":" + proto::Code_Name(f.code);
    return out;
  }
  if (verb == "submit") {
    std::string svc = "svc";
    long ms = 10000;
    in >> a;
    if (!(in >> svc)) svc = "svc";
    if (!(in >> ms)) ms = 10000;
    switch (t.submit(make_job(a, svc, std::chrono::milliseconds(ms)))) {
      case service_table::admit::queued: return "queued";
      case service_table::admit::busy: return "busy";
      case service_table::admit::duplicate: return "duplicate";
      case service_table::admit::id_in_use: return "id_in_use";
      case service_table::admit::no_service: return "no_service";
    }
  }
  if (verb == "dispatch") {
    std::string out;
    for (const auto& as : t.dispatch()) {
      if (!out.empty()) out += ' ';
      out += std::string{as.worker} + ':' + as.work->id;
      if (as.work->attempt > 1) out += '#' + std::to_string(as.work->attempt);
    }
    return out;
  }
  if (verb == "complete") {
    in >> a >> b;
    bool held = false;
    if (t.complete(a, b, &held)) return "job";
    return held ? "held" : "none";
  }
  if (verb == "cancel") {
    in >> a;
    std::string worker;
    if (!t.cancel(a, &worker)) return "none";
    return worker.empty() ? "queued" : "held by " + worker;
  }
  if (verb == "drop") {
    in >> a;
    return failures(t.remove_worker(a));
  }
  if (verb == "drain") return in >> a, t.drain_worker(a) ? "ok" : "unknown";
  if (verb == "held") return in >> a, std::to_string(t.held_by(a));
  if (verb == "draining") return in >> a, std::to_string(t.draining_workers(a));
  if (verb == "expire") {
    long ms = 0;
    in >> ms;
    return failures(t.expire(t0 + std::chrono::milliseconds(ms)));
  }
  if (verb == "deadline") {
    auto d = t.next_deadline();
    if (!d) return "none";
    return std::to_string(std::chrono::duration_cast<std::chrono::milliseconds>(*d - t0).count());
  }
  if (verb == "queued") return in >> a, std::to_string(t.queued(a));
  if (verb == "workers") return in >> a, std::to_string(t.workers(a));
  if (verb == "in_flight") return std::to_string(t.in_flight());
  if (verb == "prune" || verb == "services") {
    auto names = verb == "prune" ? t.prune() : t.services();
    std::sort(names.begin(), names.end());
    std::string out;
    for (const auto& n : names) out += (out.empty() ? "" : " ") + n;
    return out;
  }
  ADD_FAILURE() << "unknown operation '" << op << "'";
  return "?";
}

const std::vector<table_case>& cases() {
  static const std::vector<table_case> all = {
      {"a job waits for a worker, then goes to it", {}, {
           {"submit a", "queued"}, {"dispatch", ""}, {"queued svc", "1"},
           {"worker w1 svc 1", ""}, {"dispatch", "w1:a"}, {"queued svc", "0"}, {"in_flight", "1"}}},
      {"least recently used worker first", {}, {
           {"worker w1 svc 1", ""}, {"worker w2 svc 1", ""}, {"worker w3 svc 1", ""},
           {"submit a", "queued"}, {"submit b", "queued"}, {"submit c", "queued"}, {"submit d", "queued"},
           {"dispatch", "w1:a w2:b w3:c"},
           {"complete b w2", "job"}, {"dispatch", "w2:d"},
           {"complete a w1", "job"}, {"complete c w3", "job"},
           {"submit e", "queued"}, {"submit f", "queued"}, {"dispatch", "w1:e w3:f"}}},
      // w1 gets one and goes to the back, w2 one, then w1 its second; d waits.
      {"capacity credits rotate", {}, {
           {"worker w1 svc 2", ""}, {"worker w2 svc 1", ""},
           {"submit a", "queued"}, {"submit b", "queued"}, {"submit c", "queued"}, {"submit d", "queued"},
           {"dispatch", "w1:a w2:b w1:c"}, {"queued svc", "1"},
           {"complete c w1", "job"}, {"dispatch", "w1:d"}}},
      // A draining worker keeps what it holds (answered, it frees no credit
      // for new jobs), takes nothing new, and does not count as a worker.
      {"a draining worker finishes what it holds and gets nothing new", {}, {
           {"worker w1 svc 2", ""}, {"worker w1 other 1", ""}, {"worker w2 svc 1", ""},
           {"submit a", "queued"}, {"dispatch", "w1:a"},
           {"drain w1", "ok"}, {"drain w1", "ok"}, {"drain nobody", "unknown"},
           {"workers svc", "1"}, {"draining svc", "1"}, {"workers other", "0"}, {"draining other", "1"},
           {"held w1", "1"},
           {"submit b", "queued"}, {"submit c", "queued"}, {"submit d other", "queued"},
           {"dispatch", "w2:b"},  // w1 has a free credit, and takes nothing
           {"complete a w1", "job"}, {"held w1", "0"}, {"dispatch", ""},
           {"worker w1 third 1", ""}, {"submit e third", "queued"}, {"dispatch", ""},  // nor of a new service
           {"complete b w2", "job"}, {"dispatch", "w2:c"},
           {"drop w1", ""}, {"draining svc", "0"}, {"workers svc", "1"}, {"queued other", "1"},
           {"worker w1 other 1", ""}, {"dispatch", "w1:d"}}},  // registered anew: not draining
      // What a draining worker held when it is lost (or says goodbye) goes
      // to another worker, as for any worker; an ended job's credit too.
      {"a draining worker's jobs go elsewhere when it leaves", {}, {
           {"worker w1 svc 2", ""}, {"submit a", "queued"}, {"submit b svc 500", "queued"},
           {"dispatch", "w1:a w1:b"}, {"drain w1", "ok"},
           {"expire 500", "b:TIMEOUT@w1"}, {"held w1", "2"},  // b's credit is held until w1 answers
           {"worker w2 svc 1", ""}, {"drop w1", ""}, {"dispatch", "w2:a#2"}}},
      // A retry of an id whose job ended (answered TIMEOUT) while its
      // worker still runs it is told so (the broker answers it BUSY), not
      // dropped as the duplicate of a job still to answer; once the worker
      // answers, the id is free.
      {"an ended job's id is in use until its worker answers", {}, {
           {"worker w1 svc 2", ""}, {"submit a svc 500", "queued"}, {"dispatch", "w1:a"},
           {"submit a", "duplicate"}, {"expire 500", "a:TIMEOUT@w1"},
           {"submit a", "id_in_use"}, {"complete a w1", "held"}, {"submit a", "queued"}}},
      {"re-registering changes the capacity", {}, {
           {"worker w1 svc 1", ""}, {"worker w1 svc 3", ""}, {"workers svc", "1"},
           {"submit a", "queued"}, {"submit b", "queued"}, {"submit c", "queued"},
           {"dispatch", "w1:a w1:b w1:c"}}},
      {"services are separate", {}, {
           {"worker w1 chat 1", ""}, {"submit a vm", "queued"}, {"submit b chat", "queued"},
           {"dispatch", "w1:b"}, {"queued vm", "1"}, {"workers vm", "0"}, {"workers chat", "1"}}},
      {"the queue bound answers busy, per service; duplicates are refused", {.queue_limit = 2, .max_attempts = 3}, {
           {"submit a", "queued"}, {"submit a", "duplicate"}, {"submit b", "queued"}, {"submit c", "busy"},
           {"submit d other", "queued"},
           {"worker w1 svc 1", ""}, {"dispatch", "w1:a"},
           {"submit a", "duplicate"},  // held jobs are known too
           {"submit c", "queued"}}},
      // The holder of an expired job keeps its credit until it answers.
      {"expiry tells unavailable (never dispatched) from timeout (held)", {}, {
           {"submit queued nobody 1000", "queued"}, {"submit held svc 2000", "queued"},
           {"submit later svc 5000", "queued"},
           {"worker w1 svc 1", ""}, {"dispatch", "w1:held"}, {"deadline", "1000"},
           {"expire 999", ""}, {"expire 1000", "queued:UNAVAILABLE"}, {"expire 2000", "held:TIMEOUT@w1"},
           {"dispatch", ""}, {"complete held w1", "held"}, {"dispatch", "w1:later"}}},
      // Retried jobs keep their place at the front; a job dispatched
      // max_attempts times is lost with its worker.
      {"a dead worker's jobs retry first, then fail", {.queue_limit = 100, .max_attempts = 2}, {
           {"worker w1 svc 2", ""}, {"submit a", "queued"}, {"submit b", "queued"}, {"submit c", "queued"},
           {"dispatch", "w1:a w1:b"},
           {"drop w1", ""}, {"workers svc", "0"}, {"queued svc", "3"},
           {"worker w2 svc 3", ""}, {"dispatch", "w2:a#2 w2:b#2 w2:c"},
           {"drop w2", "a:WORKER_LOST b:WORKER_LOST"}, {"queued svc", "1"}}},
      {"only the holder completes a job, once", {}, {
           {"worker w1 svc 1", ""}, {"worker w2 svc 1", ""}, {"submit a", "queued"}, {"dispatch", "w1:a"},
           {"complete a w2", "none"},  // an id w2 never held: not a completion
           {"complete a w1", "job"}, {"complete a w1", "none"}, {"in_flight", "0"}}},
      // Names no worker serves live while their requests wait; past the
      // bound a new name is refused, a served one is kept at 0 workers, and
      // a pruned index is reused with nothing of its old service left.
      {"services are bounded; names no worker served are forgotten", {.max_services = 2}, {
           {"worker w1 svc 1", ""}, {"submit a junk1 1000", "queued"}, {"submit b junk2", "no_service"},
           {"services", "junk1 svc"},
           {"prune", ""}, {"expire 1000", "a:UNAVAILABLE"}, {"prune", "junk1"}, {"services", "svc"},
           {"drop w1", ""}, {"prune", ""}, {"workers svc", "0"},
           {"worker w2 late 1", ""}, {"submit c late", "queued"}, {"queued junk1", "0"}, {"dispatch", "w2:c"},
           {"submit d junk3", "no_service"}}},
      // A worker's new service is never kept out by names no worker serves
      // now: one with no job waiting gives way first (a name whose workers
      // left, kept till then at 0 workers), else the one with the fewest
      // waiting, whose jobs end UNAVAILABLE. Only when workers serve every
      // known name is it refused.
      {"a worker's service makes room among names no worker serves", {.max_services = 3}, {
           {"worker w1 svc 1", ""}, {"worker w2 gone 1", ""}, {"drop w2", ""},
           {"submit a junk1", "queued"}, {"submit b junk1", "queued"}, {"submit c junk2", "no_service"},
           {"worker w3 new1 1", "evicted gone"}, {"services", "junk1 new1 svc"},
           {"worker w4 new2 1", "evicted junk1 a:UNAVAILABLE b:UNAVAILABLE"}, {"queued junk1", "0"},
           {"in_flight", "0"}, {"deadline", "none"}, {"services", "new1 new2 svc"},
           {"worker w5 new3 1", "no_service"}, {"submit d new2", "queued"}, {"dispatch", "w4:d"},
           {"drop w3", ""}, {"worker w5 new3 1", "evicted new1"}, {"services", "new2 new3 svc"}}},
      {"cancel a queued job and a held one", {}, {
           {"worker w1 svc 1", ""}, {"submit a", "queued"}, {"submit b", "queued"}, {"dispatch", "w1:a"},
           {"cancel b", "queued"}, {"queued svc", "0"}, {"cancel a", "held by w1"}, {"cancel a", "none"},
           {"deadline", "none"}}},
  };
  return all;
}

class ServiceTableScript : public ::testing::TestWithParam<table_case> {};

TEST_P(ServiceTableScript, AnswersEveryStepAsWritten) {
  const auto& c = GetParam();
  service_table t{c.limits};
  for (std::size_t i = 0; i < c.steps.size(); ++i)
    EXPECT_EQ(run(t, c.steps[i].op), c.steps[i].expect) << "step " << i + 1 << ": " << c.steps[i].op;
}

INSTANTIATE_TEST_SUITE_P(Cases, ServiceTableScript, ::testing::ValuesIn(cases()),
                         [](const ::testing::TestParamInfo<table_case>& param) {
                           std::string name;
                           for (char ch : param.param.name)
                             name += std::isalnum(static_cast<unsigned char>(ch)) ? ch : '_';
                           return name;
                         });

// ------------------------------------------------- what a script cannot say

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

// A worker holds at most --max-capacity jobs of a service, whatever its
// Hello announced: each held job keeps its request.
TEST(ServiceTable, AnnouncedCapacityIsBoundedByMaxCapacity) {
  table_limits limits;
  limits.max_capacity = 2;
  service_table t{limits};
  t.add_worker("w1", "svc", 1000000);
  for (const char* id : {"a", "b", "c"}) t.submit(make_job(id));
  EXPECT_EQ(t.dispatch().size(), 2u);
  EXPECT_EQ(t.queued("svc"), 1u) << "the third waits for a free slot";
  EXPECT_TRUE(t.complete("a", "w1"));
  EXPECT_EQ(pairs(t.dispatch()), (P{{"w1", "c"}}));
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
  {
    // Answered work is not retried nor answered again: it only ends
    // (worker_lost in the metrics, every dispatch having one end).
    auto ended = t.remove_worker("w1");
    ASSERT_EQ(ended.size(), 1u);
    EXPECT_EQ(ended[0].work.id, "long");
    EXPECT_EQ(ended[0].code, proto::WORKER_LOST);
    EXPECT_FALSE(ended[0].work.wants_reply) << "its requester has its answer";
    EXPECT_TRUE(ended[0].worker.empty()) << "no Cancel to a worker that is gone";
  }
  EXPECT_EQ(t.queued("svc"), 1u);
  t.add_worker("w2", "svc", 1);
  EXPECT_EQ(pairs(t.dispatch()), (P{{"w2", "next"}}));
}

// A CONNECT that ended while a worker held it keeps its envelope for that
// worker's late answer; handed over, its DISCONNECT is held by the same
// worker in the same capacity and expires like any job. If that worker is
// lost, an owed DISCONNECT is dropped (what it would undo went with the
// worker); any other job handed over goes to the next worker.
TEST(ServiceTable, ALateConnectIsHandedOverToItsDisconnectOnTheSameWorker) {
  service_table t{{}};
  t.add_worker("w1", "svc", 1);
  t.add_worker("w2", "svc", 1);
  auto c1 = make_job("c1", "svc", 1s);
  c1.connect = true;
  auto c2 = make_job("c2", "svc", 1100ms);
  c2.connect = true;
  t.submit(std::move(c1));
  t.submit(std::move(c2));
  t.submit(make_job("r", "svc", 1200ms));  // a request, not a connect
  EXPECT_EQ(pairs(t.dispatch()), (P{{"w1", "c1"}, {"w2", "c2"}}));
  EXPECT_EQ(t.late_connect("c1", "w1"), nullptr) << "still live";
  EXPECT_EQ(failures(t.expire(t0 + 2s)), "c1:TIMEOUT@w1 c2:TIMEOUT@w2 r:UNAVAILABLE");
  EXPECT_EQ(t.ended_connects(), 2u);
  const zmq::message_t* kept = t.late_connect("c1", "w1");
  ASSERT_NE(kept, nullptr);
  EXPECT_EQ(kept->to_string_view(), "p:c1");
  EXPECT_EQ(t.late_connect("c1", "w2"), nullptr) << "only its holder's answer";
  EXPECT_EQ(t.late_connect("nope", "w1"), nullptr);

  auto d1 = make_job("d1", "svc", 5s, false);
  d1.requester.clear();
  EXPECT_FALSE(t.hand_over("c1", "w2", make_job("x"))) << "not w2's";
  EXPECT_FALSE(t.hand_over("c1", "w1", make_job("c2"))) << "an id taken";
  EXPECT_TRUE(t.hand_over("c1", "w1", std::move(d1)));
  EXPECT_EQ(t.late_connect("c1", "w1"), nullptr) << "handed over once";
  EXPECT_EQ(t.ended_connects(), 1u);
  EXPECT_FALSE(t.complete("c1", "w1")) << "the connect's id is gone";
  EXPECT_EQ(t.in_flight(), 1u);
  EXPECT_EQ(t.held_slots(), 2u) << "d1 held by w1, and c2 ended while w2 holds it";
  t.submit(make_job("next", "svc", 10s));
  EXPECT_TRUE(t.dispatch().empty()) << "w1's capacity stays taken, w2's by its ended connect";
  EXPECT_EQ(t.next_deadline(), t0 + 5s);

  // w2 answers its ended connect with a refusal: only its capacity is freed.
  bool held = false;
  EXPECT_FALSE(t.complete("c2", "w2", &held));
  EXPECT_TRUE(held);
  EXPECT_EQ(pairs(t.dispatch()), (P{{"w2", "next"}}));
  EXPECT_EQ(t.ended_connects(), 0u);

  // w1 is lost before answering the DISCONNECT: it goes to the next worker.
  EXPECT_TRUE(t.remove_worker("w1").empty());
  EXPECT_EQ(t.queued("svc"), 1u);
  EXPECT_TRUE(t.complete("next", "w2"));
  auto again = t.dispatch();
  ASSERT_EQ(pairs(again), (P{{"w2", "d1"}}));
  EXPECT_EQ(again[0].work->attempt, 2u);
  EXPECT_FALSE(again[0].work->wants_reply);
  auto done = t.complete("d1", "w2");
  ASSERT_TRUE(done);
  EXPECT_EQ(done->requester, "");
  EXPECT_EQ(t.in_flight(), 0u);

  // A request that ends while held keeps nothing for a late answer.
  EXPECT_EQ(t.held_slots(), 0u) << "a handed-over CONNECT's slot still counted as ended";
  auto slots = t.held_slots();
  t.submit(make_job("r2", "svc", 1s));
  t.dispatch();
  EXPECT_EQ(failures(t.expire(t0 + 3s)), "r2:TIMEOUT@w2");
  EXPECT_EQ(t.late_connect("r2", "w2"), nullptr);
  // Ended, it still takes w2's slot until w2 answers: held, not in flight.
  EXPECT_EQ(t.in_flight(), 0u);
  EXPECT_EQ(t.held_slots(), slots + 1);
  EXPECT_EQ(t.ended_connects(), 0u);

  // A new worker of capacity 1 takes a CONNECT `id` that then times out
  // (at `timeout`, later than any before): it ends while the worker holds it.
  auto end_connect_on_new_worker = [&](const std::string& worker, const std::string& id, clock::duration timeout) {
    t.add_worker(worker, "svc", 1);
    auto c = make_job(id, "svc", timeout);
    c.connect = true;
    t.submit(std::move(c));
    EXPECT_EQ(pairs(t.dispatch()), (P{{worker, id}}));
    EXPECT_EQ(failures(t.expire(t0 + timeout)), id + ":TIMEOUT@" + worker);
  };

  // A worker lost with an ended CONNECT: nothing is left waiting for it.
  end_connect_on_new_worker("w3", "c3", 4s);
  EXPECT_EQ(t.ended_connects(), 1u);
  EXPECT_TRUE(t.remove_worker("w3").empty());
  EXPECT_EQ(t.ended_connects(), 0u);
  EXPECT_EQ(t.late_connect("c3", "w3"), nullptr);

  // The broker's owed DISCONNECT is not re-dispatched when its worker is
  // lost: the socket it would undo lived only in that worker.
  end_connect_on_new_worker("w4", "c4", 5s);
  auto d4 = make_job("d4", "svc", 9s, false);
  d4.requester.clear();
  d4.owed = true;
  ASSERT_TRUE(t.hand_over("c4", "w4", std::move(d4)));
  EXPECT_EQ(t.in_flight(), 1u);
  {
    auto ended = t.remove_worker("w4");  // dropped, not failed to a requester: only counted
    ASSERT_EQ(ended.size(), 1u);
    EXPECT_EQ(ended[0].work.id, "d4");
    EXPECT_FALSE(ended[0].work.wants_reply);
  }
  EXPECT_EQ(t.in_flight(), 0u);
  EXPECT_EQ(t.queued("svc"), 0u);
  EXPECT_TRUE(t.dispatch().empty()) << "nothing is left to dispatch";
  EXPECT_FALSE(t.complete("d4", "w2"));
}

// The deadline heap and the queues against a plain model: random deadlines,
// The waiting jobs of every service together hold at most queue_bytes: a
// job for a service that has jobs waiting already is busy past it; one for
// a service with none waiting is taken (it is for a worker now, or the
// first of its queue: past the bound by at most one job per service), so a
// saturated service's backlog does not make the others busy. A dispatched
// job's bytes no longer count; a retried one (back at the front) is never
// refused.
TEST(ServiceTable, WaitingJobsAreBoundedInBytesAcrossServices) {
  service_table t{{.queue_limit = 100, .queue_bytes = 10}};
  auto sized = [](std::string id, std::string service, std::size_t bytes) {
    auto j = make_job(std::move(id), std::move(service));
    j.payload = zmq::message_t{std::string(bytes, 'x')};
    return j;
  };
  EXPECT_EQ(t.submit(sized("a", "one", 4)), service_table::admit::queued);
  EXPECT_EQ(t.submit(sized("b", "one", 4)), service_table::admit::queued);
  EXPECT_EQ(t.waiting_bytes(), 8u);
  EXPECT_EQ(t.submit(sized("c", "one", 3)), service_table::admit::busy);
  EXPECT_EQ(t.submit(sized("d", "one", 2)), service_table::admit::queued) << "exactly at the bound";
  EXPECT_EQ(t.submit(sized("e", "two", 5)), service_table::admit::queued) << "another service's first job";
  EXPECT_EQ(t.submit(sized("f", "two", 1)), service_table::admit::busy) << "its second, past the bound";
  EXPECT_EQ(t.waiting_bytes(), 15u);
  t.add_worker("w1", "one", 2);
  ASSERT_EQ(t.dispatch().size(), 2u);
  EXPECT_EQ(t.waiting_bytes(), 7u);
  EXPECT_EQ(t.submit(sized("c", "one", 3)), service_table::admit::queued);
  EXPECT_EQ(t.waiting_bytes(), 10u);
  // w1's two jobs go back to the front of their queue: 18 bytes wait now.
  (void)t.remove_worker("w1");
  EXPECT_EQ(t.waiting_bytes(), 18u);
  EXPECT_EQ(t.submit(sized("g", "one", 1)), service_table::admit::busy);
}

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
