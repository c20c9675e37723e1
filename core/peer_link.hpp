#pragma once
// The DEALER side of the broker protocol, shared by gateways and workers:
// announces the peer (Hello), keeps heartbeats both ways, notices a dead or
// restarted broker and re-announces. It owns no thread: the owning loop
// waits on fd() (asking has_input() before it blocks, as for ZMQ_FD, and
// after tick(), which may hand out messages the link held), calls
// receive() while it returns messages, and calls tick() at next_tick().
//
// A "local://NAME" endpoint connects to a broker of the same process through
// core/local_link.hpp instead of a DEALER socket; everything else is the same.
#include <chrono>
#include <deque>
#include <memory>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include <zmq.hpp>

#include "core/curve.hpp"
#include "core/kept_ring.hpp"
#include "core/local_link.hpp"
#include "core/log.hpp"
#include "proto/codec.hpp"

namespace sidecast::core {

using clock = std::chrono::steady_clock;

struct peer_link_options {
  std::string endpoint;  // the broker's ROUTER endpoint, or its local:// name
  // The other broker of a primary/backup pair (docs/deployment.md, "A broker
  // pair"; neither may be local://): the link moves between the two when
  // the one it is on goes silent for its liveness, or keeps saying it is the
  // standby (Error STANDBY) for a liveness. Empty: one broker.
  std::string backup_endpoint;
  std::string id;        // routing id, sid prefix for gateways; valid_peer_id()
  std::string sid_prefix;  // gateways: Hello.sid_prefix, see renew_sid_prefix()
  proto::Role role = proto::ROLE_WORKER;
  std::vector<std::pair<std::string, unsigned>> services;  // workers: name, capacity
  std::chrono::milliseconds heartbeat_interval{1000};      // until the broker's Welcome
  unsigned heartbeat_liveness = 3;
  int sndhwm = 100000;
  int rcvhwm = 100000;
  curve_client curve;  // empty: no encryption
};

struct peer_link_stats {
  std::uint64_t reconnects = 0;     // sockets replaced after broker silence
  std::uint64_t hellos = 0;         // Hello messages sent
  std::uint64_t send_dropped = 0;   // sends refused (HWM reached, or no local broker)
  std::uint64_t malformed = 0;      // undecodable messages from the broker
};

/// 64 random bits, never 0: a broker's incarnation (in its Welcome), a
/// link's (in its Hello). One drawn again after a restart differs.
std::uint64_t draw_incarnation();

/// An envelope serialized straight into a message ZeroMQ can send (no
/// string in between).
zmq::message_t message_of(const proto::Envelope& env);

class peer_link {
 public:
  peer_link(zmq::context_t& context, peer_link_options options);

  /// Readable when input may wait; it changes when stats().reconnects does.
  int fd() const;
  /// True when a message waits. Ask before blocking on fd() if the link was
  /// used since receive() last came back empty: a send may take the signal
  /// the descriptor would have given.
  bool has_input();

  /// Next message for the application, or nullopt when none is waiting.
  /// Welcome, Heartbeat and registration errors are handled here. A pair's
  /// STANDBY comes through when it names a job or gives back a one-way
  /// message (Error.refused): neither acted, the application sends it again.
  /// So does a restarted broker's NOT_REGISTERED that names a job (a
  /// request it took; a forward it did not) or gives one back.
  std::optional<proto::Envelope> receive();
  /// The same, parsed into `env` (which may live on an arena); false when
  /// none is waiting.
  bool receive_into(proto::Envelope& env);
  /// The same, but a message `take` accepts (it gets the bytes first; true
  /// when it handled them, a Request it parses its own way, say) is not
  /// parsed: then receive_into returns true and leaves `env` empty (kind
  /// not set), whatever link messages were read into it before.
  bool receive_into(proto::Envelope& env, const std::function<bool(std::string_view)>& take);

  /// Sends without blocking; false (and counted) when the queue is full.
  bool send(const proto::Envelope& env);
  bool send_bytes(std::string_view bytes);
  bool send_message(zmq::message_t&& message);
  /// The same, leaving in `kept` a copy sharing the bytes sent (a
  /// reference count, no allocation) and where it went; when the send is
  /// refused, `kept` holds the message.
  bool send_message(zmq::message_t&& message, kept_sends::entry& kept);

  /// A worker that is stopping: tells the broker to send it nothing new
  /// (Drain), now and in every Hello from then on (a restarted broker).
  void drain();
  bool draining() const { return draining_; }
  /// The broker answered the Drain (or a draining Hello) with its own: every
  /// job it dispatched to this worker before has arrived, and it sends no
  /// more. Until then a drain that finds nothing running may not be done.
  bool drain_confirmed() const { return drain_confirmed_; }
  /// The last message: the broker forgets this peer at once (Goodbye).
  /// What was sent before it, and it, get up to `linger` to leave when the
  /// link is destroyed (a broker that is gone costs that long).
  void goodbye(std::chrono::milliseconds linger);

  /// Heartbeats and broker liveness; call at or after next_tick(). A call
  /// more than an interval late (the caller's thread did not run) does not
  /// count the time since next_tick() as the broker's silence.
  void tick(clock::time_point now);
  clock::time_point next_tick() const;

  /// A local:// link rings `h` instead of writing fd() when a message
  /// arrives (doorbell::hook), on this connection and on those it makes
  /// later; a tcp/ipc/inproc link ignores it. Then look: has_input().
  void hook(ring_hook h);

  /// True once the broker welcomed this connection.
  bool welcomed() const { return welcomed_; }
  /// True from when the link replaces a socket the broker had welcomed
  /// (its silence) until the broker welcomes the new one. What died in the
  /// old socket is known only then (received_by_broker()), and goes again
  /// first: an application that wants its messages to arrive in the order
  /// it sent them holds them back meanwhile, and sends them after those.
  /// Also true from a broker pair's STANDBY (what is sent there is refused)
  /// until a broker welcomes the link: held, it goes to whichever does; and
  /// from a restarted broker's NOT_REGISTERED until its Welcome: what it
  /// gives back (refused before the Hello) goes first.
  bool holding() const { return replaced_since_welcome_ || refused_since_welcome_; }

  /// Hellos sent so far: what the link sends now reaches the broker after
  /// Hello number epoch(). An application that keeps what it sent until it
  /// is answered (a gateway's requests) notes it with each.
  std::uint64_t epoch() const { return stats_.hellos; }
  /// Counts the brokers met after the first: a Welcome of a new incarnation.
  std::uint64_t broker_restarts() const { return broker_restarts_; }
  /// Counts the Welcomes from a broker that did not know this link
  /// (Welcome.previous_hello 0): the first, a restarted broker's, the other
  /// of a pair's, and one from a broker that had dropped the link. What it
  /// held for this peer, or for the peer's service, may be lost.
  std::uint64_t fresh_welcomes() const { return fresh_welcomes_; }
  /// Counts the Welcomes that said the broker announced our sid prefix gone
  /// (Welcome.prefix_gone): the gateway ends its sockets and renews it.
  std::uint64_t prefixes_gone() const { return prefixes_gone_; }
  /// The largest message the broker said it takes (Welcome.max_message_bytes);
  /// 0 until a Welcome says.
  std::uint64_t max_message_bytes() const { return max_message_bytes_; }
  /// A gateway's new sid prefix: said at once in a Hello again (on the same
  /// socket: nothing sent before it is lost), and in every Hello after.
  void renew_sid_prefix(std::string prefix);
  /// At the last of those: what was sent at an epoch below this went to the
  /// broker that is gone (or died in a socket the link replaced), and
  /// nobody answers it, except a job the new broker named in Error
  /// NOT_REGISTERED (the link returns those to the application). Sent from
  /// this epoch on, it reached the new broker.
  std::uint64_t lost_below() const { return lost_below_; }
  /// Messages sent since the last Hello (Hello number epoch()): a message
  /// sent now is number sent_since_hello() after it.
  std::uint64_t sent_since_hello() const { return sent_since_hello_; }
  /// Where the message sent last went.
  link_position last_sent() const { return {epoch(), sent_since_hello_}; }
  /// What the broker said it read of what this link sent before the Hello
  /// it last welcomed (Welcome.previous_hello, .received); `count` goes up
  /// with each such Welcome.
  using broker_received = core::broker_received;
  const broker_received& received_by_broker() const { return received_by_broker_; }
  /// What the broker's heartbeats last said it read of what this link
  /// sent: up to the `sent`th message after Hello number `epoch`
  /// (Heartbeat.broker_read; only goes up). What an application keeps of
  /// those can no longer die in a socket the link replaces (forget_read()).
  link_position read_by_broker() const { return read_by_broker_; }
  /// Bytes of the messages sent since the last Hello that the broker has
  /// not said it read (read_by_broker()): what waits in the socket's queue
  /// and the broker's, which a broker that stalls lets grow. Counted to
  /// within `unread_grain` bytes (plus a message) over, and only ever over:
  /// the broker's heartbeats say what it read every interval, so a
  /// healthy link shows what it sent in about that time. 0 until a
  /// heartbeat on this socket says what the broker read: a broker of a
  /// build before Heartbeat.broker_read never does, and what it reads
  /// cannot be told from what it does not.
  std::uint64_t unread_bytes() const { return reads_reported_ ? sent_bytes_ - read_bytes_ : 0; }
  static constexpr std::uint64_t unread_grain = 64 * 1024;
  /// The number of the Hello the last Welcome answered (0: none yet). What
  /// was sent before it is settled once the application has acted on that
  /// Welcome (take_lost()): see forget_read().
  std::uint64_t welcomed_hello() const { return welcome_hello_; }
  /// The heartbeat interval and liveness in force (the broker's Welcome says them).
  std::chrono::milliseconds heartbeat_interval() const { return interval_; }
  unsigned heartbeat_liveness() const { return liveness_; }
  const peer_link_stats& stats() const { return stats_; }
  const peer_link_options& options() const { return options_; }
  /// The endpoint the link is on now: options().endpoint or its backup_endpoint.
  const std::string& endpoint() const { return on_backup_ ? options_.backup_endpoint : options_.endpoint; }
  /// On the backup_endpoint. The events sockets of a gateway or worker
  /// follow: they connect to the events endpoint of the broker the link is on.
  bool on_backup() const { return on_backup_; }

 private:
  void connect();
  void start();
  void send_hello();
  void heard_from_broker(clock::time_point now);
  bool hold_tail(proto::Envelope::KindCase kind) const;
  void release_tail();

  zmq::context_t& context_;
  peer_link_options options_;
  const bool is_local_;                   // options_.endpoint is local://
  zmq::socket_t socket_;                  // a tcp/ipc/inproc broker
  std::unique_ptr<local_dealer> local_;   // a local:// broker, when one is bound
  ring_hook hook_;                         // for local_, and the ones after it
  bool welcomed_ = false;
  bool draining_ = false;
  bool drain_confirmed_ = false;
  const std::uint64_t own_incarnation_;  // this link's, in every Hello
  std::uint64_t incarnation_ = 0;      // of the broker that welcomed us last; 0: none yet
  std::uint64_t unwelcomed_from_ = 0;  // epoch of the first Hello since the last Welcome, or of the
                                       // current socket's, if later; 0: none
  std::uint64_t broker_restarts_ = 0;
  std::uint64_t fresh_welcomes_ = 0;
  std::uint64_t prefixes_gone_ = 0;
  std::uint64_t max_message_bytes_ = 0;
  std::uint64_t renewed_at_hello_ = 0;  // the Hello that said the last renewed prefix
  std::uint64_t lost_below_ = 0;
  std::uint64_t sent_since_hello_ = 0;
  // Bytes sent since the Hello, and those the broker read as far as the
  // last checkpoint at or before its read report: a checkpoint (message
  // number, bytes sent) is taken every unread_grain bytes, at most
  // max_checkpoints of them (past that, unread_bytes() counts more over).
  std::uint64_t sent_bytes_ = 0;
  std::uint64_t read_bytes_ = 0;
  bool reads_reported_ = false;  // a heartbeat since the Hello said what the broker read
  std::deque<std::pair<std::uint64_t, std::uint64_t>> checkpoints_;
  static constexpr std::size_t max_checkpoints = 65536;  // 4 GiB at the grain: the gateway's bound at most
  // What this link read of what the broker sent it, in the broker's count
  // (Welcome.sent): up to `read_to_` on the socket that read the last
  // Welcome, then `read_tail_` on sockets that replaced it. A Welcome to a
  // new socket's Hello is answered with both (Heartbeat.read).
  std::uint64_t read_to_ = 0;
  std::uint64_t read_tail_ = 0;
  std::uint64_t welcome_hello_ = 0;  // the Hello the last Welcome answered; with read_to_ in each heartbeat
  bool replaced_since_welcome_ = false;
  // The tail's application messages, held until the broker's Heartbeat.resent
  // (awaiting_resent_) or a Welcome that promises none; then released_, which
  // receive_into() hands out before reading on.
  std::deque<zmq::message_t> tail_;
  std::deque<zmq::message_t> released_;
  bool awaiting_resent_ = false;
  clock::time_point resent_due_{};  // two livenesses after the Welcome: the tail goes then without the mark
  broker_received received_by_broker_;
  link_position read_by_broker_;
  std::chrono::milliseconds interval_;
  unsigned liveness_;
  clock::time_point broker_expiry_;
  bool on_backup_ = false;  // connected to options_.backup_endpoint
  // The broker said it is a pair's standby (Error STANDBY): the link moves
  // on at `standby_expiry_` (a liveness later; the heartbeats meanwhile let
  // a standby whose other broker died take over), unless that broker
  // welcomes it first.
  bool standby_ = false;
  clock::time_point standby_expiry_{};
  bool refused_since_welcome_ = false;  // a STANDBY or NOT_REGISTERED came after the last Welcome (holding())
  clock::time_point next_heartbeat_;
  peer_link_stats stats_;
  log_limiter log_limit_;
};

}  // namespace sidecast::core
