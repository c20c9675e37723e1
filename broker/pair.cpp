#include "broker/pair.hpp"

#include <algorithm>

namespace sidecast::broker {

pair_fsm::pair_fsm(bool primary, clock::duration silence, clock::time_point now)
    : primary_{primary},
      silence_{silence},
      state_{primary ? state::primary : state::backup},
      peer_expiry_{now + silence} {}

void pair_fsm::away(clock::duration late, clock::time_point now) {
  peer_expiry_ = std::min(peer_expiry_ + late, now + silence_);
}

std::uint64_t pair_fsm::term_of(wall_clock::time_point wall) {
  auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(wall.time_since_epoch()).count();
  return ms > 0 ? static_cast<std::uint64_t>(ms) : 0;
}

pair_fsm::change pair_fsm::activate(const char* why, wall_clock::time_point wall) {
  outranked_since_.reset();
  // Above any term heard, whatever the clock says (a clock stepped back, or
  // behind the other's); and at least the clock, so that an activation
  // that heard nothing (after a restart) outranks the earlier ones.
  term_ = std::max({term_ + 1, peer_term_ + 1, term_of(wall)});
  state_ = state::active;
  change c;
  c.changed = c.activated = true;
  c.why = why;
  return c;
}

pair_fsm::change pair_fsm::on_peer(state theirs, std::uint64_t their_term, clock::time_point now,
                                   wall_clock::time_point wall) {
  change c;
  // Terms are a clock's milliseconds or one past a term heard, and the two
  // brokers' stay close. One far past ours and past this host's clock is
  // not the other's (a forged or corrupt state: whoever answers at
  // --pair-connect without CURVE); taken, it would depose this broker, and
  // at 2^64 - 1 make its next term wrap to 0.
  if (auto base = std::max({term_, peer_term_, term_of(wall)});
      their_term > base && their_term - base > max_term_step) {
    c.why = "the other broker says a term far past this one's: ignored (check --pair-connect; use CURVE)";
    return c;
  }
  peer_expiry_ = now + silence_;
  peer_term_ = std::max(peer_term_, their_term);
  auto go_passive = [&](const char* why) {
    c.stepped_down = state_ == state::active;
    c.changed = true;
    state_ = state::passive;
    c.why = why;
  };
  switch (state_) {
    case state::primary:
      if (theirs == state::backup) return activate("the backup is up: active", wall);
      if (theirs == state::active) go_passive("the backup is active: passive");
      else if (theirs == state::primary) c.why = "the other broker is a primary too: check --pair on both";
      break;
    case state::backup:
      if (theirs == state::active) go_passive("the primary is active: passive");
      else if (theirs == state::backup) c.why = "the other broker is a backup too: check --pair on both";
      break;
    case state::active:
      // Two active brokers: the later activation stays, the primary on a tie.
      if (theirs == state::active && (term_ < their_term || (term_ == their_term && !primary_))) {
        outranked_since_.reset();
        go_passive("the other broker is active with a later term: passive");
      } else if (theirs == state::active) {
        // It steps down when it hears this one, within an interval. Still
        // active a silence later, it does not hear this one: both serve
        // (a split that does not heal), and only this broker can tell.
        if (!outranked_since_) outranked_since_ = now;
        else if (now - *outranked_since_ > silence_)
          c.why = "the other broker stays active with an earlier term: it does not hear this one "
                  "(check its --pair-connect and this one's --pair-bind); both serve";
      } else {
        outranked_since_.reset();
      }
      break;
    case state::passive:
      if (theirs == state::primary || theirs == state::backup)
        return activate("the other broker restarted: active", wall);
      if (theirs == state::passive && primary_) return activate("both brokers were passive: the primary is active", wall);
      break;
  }
  return c;
}

bool pair_fsm::on_client(clock::time_point now, wall_clock::time_point wall, change& c) {
  switch (state_) {
    case state::active: return true;
    case state::backup: return false;  // never before it has heard an active primary
    case state::primary:
      if (now < peer_expiry_) return false;
      c = activate("no backup heard: active alone", wall);
      return true;
    case state::passive:
      if (now < peer_expiry_) return false;
      c = activate("the active broker went silent and a peer came: failover, active", wall);
      return true;
  }
  return false;
}

std::string_view name_of(pair_fsm::state s) {
  switch (s) {
    case pair_fsm::state::primary: return "primary";
    case pair_fsm::state::backup: return "backup";
    case pair_fsm::state::active: return "active";
    case pair_fsm::state::passive: return "passive";
  }
  return "?";
}

}  // namespace sidecast::broker
