#pragma once
// The state machine of a broker pair: Binary Star (ZeroMQ guide, chapter 4),
// the two brokers of a primary/backup pair telling each other their state
// every heartbeat interval, gateways and workers connected to the one that
// is active and moving to the other when it goes silent.
//
// As in the guide: a broker starts as primary or backup; the primary becomes
// active when it hears the backup (or hears nobody and a peer comes), the
// backup passive when it hears an active primary; a passive broker refuses
// peers while it hears the other, and becomes active when a peer comes after
// the other has been silent for a while (failover: it takes both the
// other's silence and a peer that left it), or at once when the other
// restarts. The backup never becomes active before it has heard the primary
// once. There is no fail-back: a failed primary restarts passive.
//
// Unlike the guide, two active brokers (the active one was stopped long
// enough for the other to take over, then resumed; or the pair's own link
// was cut while peers reached both) do not abort: each activation takes a
// term above any it has heard, and the broker with the lower term (the
// backup on a tie) steps down to passive. The peers that took over moved to
// the later one; the earlier one's are told to move (Error STANDBY).
//
// A term is also at least the wall clock's milliseconds at the activation.
// A broker restarted while the other is stopped has heard no term (it
// remembers none across the restart): counting from 0, it would activate
// below the stopped one, which would win when it resumed, though its peers
// had all moved and had their requests answered BROKER_LOST. By the clock
// the later activation outranks the earlier one all the same, as long as
// the two hosts' clocks agree to within the time between the activations:
// at least about a liveness when one of them restarted (it waits that long
// before it serves alone), and NTP keeps clocks within milliseconds. A
// term heard is still outranked by one, whatever the clocks say.
//
// Pure logic: the broker feeds it what it hears and reads its decisions.
#include <chrono>
#include <cstdint>
#include <optional>
#include <string_view>

namespace sidecast::broker {

class pair_fsm {
 public:
  using clock = std::chrono::steady_clock;
  using wall_clock = std::chrono::system_clock;  // only for terms (see above)
  // Numbered as PairState.State on the wire (broker.cpp checks).
  enum class state { primary = 1, backup = 2, active = 3, passive = 4 };

  /// `silence`: how long after its last state the other counts as silent
  /// (the broker gives its peers' liveness: a heartbeat interval times
  /// the liveness). Starts at `now`: a primary waits that long for the
  /// backup to speak before it serves alone (a restarted primary must not
  /// serve while the backup is active).
  pair_fsm(bool primary, clock::duration silence, clock::time_point now);

  state current() const { return state_; }
  bool active() const { return state_ == state::active; }
  bool is_primary() const { return primary_; }
  std::uint64_t term() const { return term_; }

  /// What changed, for the broker to act on and log.
  struct change {
    bool changed = false;       // the state changed (else `why` is about the pair's configuration)
    bool activated = false;     // now active (was not)
    bool stepped_down = false;  // was active, now passive: its peers must move
    const char* why = "";       // for the log; empty: nothing to say
    explicit operator bool() const { return *why != '\0'; }
  };

  /// The other broker's state message. `wall`: the wall clock now, for the
  /// term of an activation it causes.
  change on_peer(state theirs, std::uint64_t their_term, clock::time_point now, wall_clock::time_point wall);
  /// A message from a gateway or worker: serve it (true, and `c` says
  /// whether that made this broker active) or refuse it (false).
  bool on_client(clock::time_point now, wall_clock::time_point wall, change& c);

  /// This broker's own thread did not run for `late` (a stall): that time
  /// is not the other's silence (as it is not its peers', broker::check_stall).
  void away(clock::duration late, clock::time_point now);

  /// How far past this pair's terms and this host's clock (in ms) a term
  /// the other says may be: 2^42 ms is 139 years, so any clock set since
  /// 1970 is within it, and 2^22 such steps to wrap a term past 2^64; a
  /// larger jump is not the other's (ignored).
  static constexpr std::uint64_t max_term_step = std::uint64_t{1} << 42;

  /// The term of a wall clock reading: its milliseconds since 1970 (0 before).
  static std::uint64_t term_of(wall_clock::time_point wall);

  /// When the other was last heard (or the start), plus the silence.
  clock::time_point peer_expiry() const { return peer_expiry_; }
  clock::duration silence() const { return silence_; }

 private:
  change activate(const char* why, wall_clock::time_point wall);

  const bool primary_;
  const clock::duration silence_;
  state state_;
  std::uint64_t term_ = 0;       // this broker's, set at its last activation
  std::uint64_t peer_term_ = 0;  // the highest the other has said
  clock::time_point peer_expiry_;
  // While active: since when the other has said it is active with an
  // earlier term (it should step down on hearing this one; still active a
  // silence later, it does not hear this one: a link broken one way).
  std::optional<clock::time_point> outranked_since_;
};

std::string_view name_of(pair_fsm::state s);

}  // namespace sidecast::broker
