// The broker pair's state machine (broker/pair.hpp), table-driven: Binary
// Star's transitions, and the terms that settle two active brokers.
#include <gtest/gtest.h>

#include "broker/pair.hpp"

namespace sidecast::broker {
namespace {

using state = pair_fsm::state;
using namespace std::chrono_literals;
constexpr auto interval = 1000ms;
constexpr auto silence = 2 * interval;  // after which the other counts as silent
const auto t0 = pair_fsm::clock::time_point{} + 1h;
// A wall clock that reads 1970 gives no term of its own: terms count
// activations, as in the tables below. Real clocks are in the tests of
// clock terms further down.
const auto w_none = pair_fsm::wall_clock::time_point{};
// 2026-01-01T00:00:00Z, for those.
const auto w0 = pair_fsm::wall_clock::time_point{} + std::chrono::milliseconds{1767225600000};

// A step: the other says `theirs` (with its term) at t0 + `at`, or, with
// `client`, a peer comes then. Then this broker is in `then`.
struct step {
  std::chrono::milliseconds at;
  bool client;
  state theirs;
  std::uint64_t their_term;
  state then;
  bool served = false;  // a peer's message: whether it is served
};

struct scenario {
  const char* name;
  bool primary;
  std::vector<step> steps;
};

void run(const scenario& s) {
  pair_fsm fsm{s.primary, silence, t0};
  for (std::size_t i = 0; i < s.steps.size(); ++i) {
    const auto& st = s.steps[i];
    SCOPED_TRACE(std::string{s.name} + ", step " + std::to_string(i));
    if (st.client) {
      pair_fsm::change c;
      bool was_active = fsm.active();
      EXPECT_EQ(fsm.on_client(t0 + st.at, w_none, c), st.served);
      EXPECT_EQ(c.activated, !was_active && st.then == state::active);
    } else {
      bool was_active = fsm.active();
      auto c = fsm.on_peer(st.theirs, st.their_term, t0 + st.at, w_none);
      EXPECT_EQ(c.activated, !was_active && st.then == state::active);
      EXPECT_EQ(c.stepped_down, was_active && st.then == state::passive);
    }
    EXPECT_EQ(name_of(fsm.current()), name_of(st.then));
  }
}

TEST(PairFsm, BinaryStarTransitions) {
  const scenario all[] = {
      {"the primary meets the backup and serves",
       true,
       {{0ms, true, {}, 0, state::primary, false},  // a peer before the backup could speak: refused
        {100ms, false, state::backup, 0, state::active},
        {200ms, true, {}, 0, state::active, true}}},
      {"a primary alone serves once the backup had time to speak",
       true,
       {{1999ms, true, {}, 0, state::primary, false}, {2000ms, true, {}, 0, state::active, true}}},
      {"a restarted primary finds the backup active and goes passive",
       true,
       {{100ms, false, state::active, 3, state::passive}, {200ms, true, {}, 0, state::passive, false}}},
      {"the backup refuses peers until it has heard an active primary, whatever the silence",
       false,
       {{0ms, true, {}, 0, state::backup, false},
        {60s, true, {}, 0, state::backup, false},
        {61s, false, state::primary, 0, state::backup},
        {62s, false, state::active, 1, state::passive}}},
      {"failover: the passive backup takes over when the primary is silent and a peer comes",
       false,
       {{0ms, false, state::active, 1, state::passive},
        {1000ms, false, state::active, 1, state::passive},
        {2999ms, true, {}, 0, state::passive, false},  // heard 1999 ms ago: still alive
        {3000ms, true, {}, 0, state::active, true}}},  // silent two intervals, and a peer came
      {"silence alone does not make the backup active",
       false,
       {{0ms, false, state::active, 1, state::passive}, {10s, false, state::passive, 0, state::passive}}},
      {"a passive broker takes over at once when the other restarts",
       true,
       {{0ms, false, state::active, 4, state::passive}, {5s, false, state::backup, 0, state::active}}},
      {"a passive backup takes over when the primary restarts (no fail-back)",
       false,
       {{0ms, false, state::active, 1, state::passive}, {5s, false, state::primary, 0, state::active}}},
      {"two passive: the primary takes over",
       true,
       {{0ms, false, state::active, 2, state::passive}, {5s, false, state::passive, 0, state::active}}},
      {"two passive: the backup waits for the primary",
       false,
       {{0ms, false, state::active, 2, state::passive}, {5s, false, state::passive, 0, state::passive}}},
      {"two active: the one with the lower term steps down (a stalled primary that resumes)",
       true,
       {{0ms, false, state::backup, 0, state::active},     // term 1
        {60s, false, state::active, 2, state::passive}}},  // the backup took over with term 2
      {"two active: the later term stays",
       false,
       {{0ms, false, state::active, 1, state::passive},
        {5s, true, {}, 0, state::active, true},          // failover: term 2
        {6s, false, state::active, 1, state::active}}},  // the old primary resumes with 1: it steps down
      {"two active with the same term: the primary stays",
       true,
       {{0ms, false, state::backup, 0, state::active}, {1s, false, state::active, 1, state::active}}},
      {"two active with the same term: the backup steps down",
       false,
       {{0ms, false, state::active, 0, state::passive},
        {5s, true, {}, 0, state::active, true},  // term 1
        {6s, false, state::active, 1, state::passive}}},
      {"two primaries (misconfigured) never serve while they hear each other",
       true,
       {{0ms, false, state::primary, 0, state::primary},
        {1500ms, false, state::primary, 0, state::primary},
        {3000ms, true, {}, 0, state::primary, false}}},
  };
  for (const auto& s : all) run(s);
}

TEST(PairFsm, EachActivationTakesATermAboveAnyHeard) {
  pair_fsm fsm{false, silence, t0};
  fsm.on_peer(state::active, 7, t0, w_none);
  EXPECT_EQ(fsm.term(), 0u);
  pair_fsm::change c;
  ASSERT_TRUE(fsm.on_client(t0 + 2 * interval, w_none, c));
  EXPECT_TRUE(c.activated);
  EXPECT_FALSE(c.stepped_down);
  EXPECT_EQ(fsm.term(), 8u);
  // Stepping down says so; the term stays until the next activation.
  auto down = fsm.on_peer(state::active, 9, t0 + 3 * interval, w_none);
  EXPECT_TRUE(down.stepped_down);
  EXPECT_FALSE(down.activated);
  EXPECT_EQ(fsm.term(), 8u);
  auto up = fsm.on_peer(state::primary, 0, t0 + 10 * interval, w_none);
  EXPECT_TRUE(up.activated);
  EXPECT_EQ(fsm.term(), 10u);
}

// The active backup is stopped (SIGSTOP, a paused VM), and the primary
// crashes and is restarted meanwhile: it hears nobody, and after a liveness
// a peer makes it active alone, with no term heard. Every peer moves to
// it. When the backup resumes, still active from before, the primary's
// activation is the later one and stays. Counting terms from 0 after its
// restart, the primary took term 1 against the backup's 2, stepped down,
// and the stale backup ran jobs whose clients had been answered BROKER_LOST.
TEST(PairFsm, ALaterActivationOutranksAnEarlierOneItNeverHeard) {
  for (auto behind : {0ms, 1000ms}) {  // the primary's clock that far behind the backup's
    SCOPED_TRACE("the primary's clock " + std::to_string(behind.count()) + " ms behind");
    pair_fsm primary{true, silence, t0};
    pair_fsm backup{false, silence, t0};
    primary.on_peer(state::backup, backup.term(), t0, w0 - behind);
    ASSERT_TRUE(primary.active());
    backup.on_peer(state::active, primary.term(), t0, w0);
    ASSERT_EQ(backup.current(), state::passive);
    // The primary dies; a peer comes to the backup after the silence.
    pair_fsm::change c;
    ASSERT_TRUE(backup.on_client(t0 + 10s, w0 + 10s, c));
    ASSERT_TRUE(c.activated) << "failover";
    // The backup stops at 11 s; the primary restarts at 12 s and serves
    // alone a liveness later.
    pair_fsm restarted{true, silence, t0 + 12s};
    ASSERT_FALSE(restarted.on_client(t0 + 12s, w0 + 12s - behind, c)) << "it waits for the backup to speak";
    ASSERT_TRUE(restarted.on_client(t0 + 12s + silence, w0 + 12s + silence - behind, c));
    ASSERT_TRUE(c.activated);
    EXPECT_GT(restarted.term(), backup.term());
    // The backup resumes at 40 s and hears the restarted primary active.
    backup.away(29s, t0 + 40s);
    auto down = backup.on_peer(state::active, restarted.term(), t0 + 40s, w0 + 40s);
    EXPECT_TRUE(down.stepped_down) << "the stale backup stayed active";
    EXPECT_EQ(backup.current(), state::passive);
    auto stays = restarted.on_peer(state::active, backup.term(), t0 + 40s, w0 + 40s - behind);
    EXPECT_FALSE(stays.stepped_down) << "the later activation gave way to the earlier one";
    EXPECT_TRUE(restarted.active());
  }
}

// A term heard is outranked by one, whatever the wall clock says: a clock
// behind the other's, or stepped back, still takes a term above all heard
// and above its own.
TEST(PairFsm, ATermHeardIsOutrankedWhateverTheClockSays) {
  pair_fsm fsm{false, silence, t0};
  const auto theirs = pair_fsm::term_of(w0 + 1h);  // the other's clock an hour ahead
  fsm.on_peer(state::active, theirs, t0, w0);
  pair_fsm::change c;
  ASSERT_TRUE(fsm.on_client(t0 + silence, w0, c));
  EXPECT_EQ(fsm.term(), theirs + 1);
  fsm.on_peer(state::active, theirs + 2, t0 + silence + interval, w0);  // it took over again
  ASSERT_EQ(fsm.current(), state::passive);
  ASSERT_TRUE(fsm.on_peer(state::primary, 0, t0 + 10s, w0 - 24h).activated);  // it restarted; this clock stepped back
  EXPECT_EQ(fsm.term(), theirs + 3);
  // With a clock ahead of every term, the clock's milliseconds.
  fsm.on_peer(state::active, theirs + 4, t0 + 11s, w0 + 2h);
  ASSERT_TRUE(fsm.on_peer(state::backup, 0, t0 + 12s, w0 + 2h).activated);
  EXPECT_EQ(fsm.term(), pair_fsm::term_of(w0 + 2h));
}

// The broker's own stall is not the other's silence: a passive broker that
// did not run for a while gives the other the time it was away.
TEST(PairFsm, TimeAwayIsNotTheOthersSilence) {
  pair_fsm fsm{false, silence, t0};
  fsm.on_peer(state::active, 1, t0, w_none);
  fsm.away(5s, t0 + 5s);  // stalled from t0 to t0 + 5 s
  pair_fsm::change c;
  EXPECT_FALSE(fsm.on_client(t0 + 5s, w_none, c)) << "the active one was not silent: this broker was away";
  EXPECT_FALSE(fsm.on_client(t0 + 5s + silence - 1ms, w_none, c));
  EXPECT_TRUE(fsm.on_client(t0 + 5s + silence, w_none, c));
  EXPECT_TRUE(c.activated);
}

// A term far past the pair's is not the other's (forged, or corrupt):
// ignored, it neither deposes this broker nor makes its next term wrap.
TEST(PairFsm, ATermFarPastThePairsIsIgnored) {
  pair_fsm fsm{true, silence, t0};
  fsm.on_peer(state::backup, 0, t0, w_none);  // the backup is up: active, term 1
  ASSERT_TRUE(fsm.active());
  auto forged = fsm.on_peer(state::active, ~std::uint64_t{0}, t0 + interval, w_none);
  EXPECT_TRUE(bool(forged)) << "it says so";
  EXPECT_FALSE(forged.changed);
  EXPECT_TRUE(fsm.active()) << "deposed by a forged term";
  auto real = fsm.on_peer(state::active, 2, t0 + 2 * interval, w_none);
  EXPECT_TRUE(real.stepped_down) << "a real later term still wins";
  auto up = fsm.on_peer(state::primary, 0, t0 + 10 * interval, w_none);
  EXPECT_TRUE(up.activated);
  EXPECT_EQ(fsm.term(), 3u) << "the forged term counted";
}

// Two active brokers: the one with the earlier term steps down when it
// hears the other. One that stays active a silence later does not hear this
// one (the pair's link broken one way: both serve, and never heal): this
// broker says so, and only then.
TEST(PairFsm, AnOutrankedBrokerThatStaysActiveIsReported) {
  pair_fsm fsm{false, silence, t0};
  fsm.on_peer(state::active, 1, t0, w_none);
  pair_fsm::change c;
  ASSERT_TRUE(fsm.on_client(t0 + silence, w_none, c));  // failover: active, term 2
  EXPECT_FALSE(bool(fsm.on_peer(state::active, 1, t0 + silence + interval, w_none))) << "it may not have heard yet";
  EXPECT_FALSE(bool(fsm.on_peer(state::active, 1, t0 + 2 * silence, w_none)));
  auto stuck = fsm.on_peer(state::active, 1, t0 + 3 * silence + interval, w_none);
  EXPECT_TRUE(bool(stuck)) << "a link broken one way went unreported";
  EXPECT_FALSE(stuck.changed);
  EXPECT_TRUE(fsm.active());
  EXPECT_FALSE(bool(fsm.on_peer(state::passive, 1, t0 + 4 * silence, w_none))) << "it stepped down at last";
}

TEST(PairFsm, AMisconfiguredPairSaysSoWithoutChangingState) {
  pair_fsm fsm{false, silence, t0};
  auto c = fsm.on_peer(state::backup, 0, t0, w_none);
  EXPECT_TRUE(bool(c));
  EXPECT_FALSE(c.changed);
  EXPECT_FALSE(c.activated);
  EXPECT_FALSE(c.stepped_down);
  EXPECT_EQ(fsm.current(), state::backup);
}

}  // namespace
}  // namespace sidecast::broker
