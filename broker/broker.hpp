#pragma once
// The broker: one thread, one loop (core::input_wait). A ROUTER socket for gateways,
// workers and plain clients (requests, replies, addressed traffic), and an
// XSUB/XPUB pair that carries room and broadcast events. See docs/protocol.md.
// Gateways and workers of the broker's own process may connect to its
// local:// name instead of the ROUTER (core/local_link.hpp); the broker
// treats both kinds of connection alike.
#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <string>
#include <memory>
#include <mutex>
#include <optional>
#include <unordered_map>
#include <vector>

#include <zmq.hpp>

#include "broker/event_streams.hpp"
#include "broker/pair.hpp"
#include "broker/service_table.hpp"
#include "core/curve.hpp"
#include "core/input_reactor.hpp"
#include "core/input_wait.hpp"
#include "core/kept_ring.hpp"
#include "core/local_link.hpp"
#include "core/log.hpp"
#include "core/metrics.hpp"
#include "core/recent_keys.hpp"
#include "core/string_hash.hpp"
#include "core/wakeup.hpp"

namespace sidecast::broker {

struct broker_config {
  std::string id = "broker";
  std::string router_endpoint = "tcp://127.0.0.1:7700";  // gateways, workers, clients
  std::string xsub_endpoint = "tcp://127.0.0.1:7701";    // workers' PUB sockets connect here
  std::string xpub_endpoint = "tcp://127.0.0.1:7702";    // gateways' SUB sockets connect here
  std::string local_endpoint;  // "local://NAME": in-process gateways and workers; empty: none
  std::chrono::milliseconds heartbeat_interval{1000};
  unsigned heartbeat_liveness = 3;
  std::chrono::milliseconds default_timeout{30000};  // requests that name none
  std::chrono::milliseconds max_timeout{3600000};
  table_limits limits;
  // The longest service name a request or a Hello may carry: each name is a
  // label of the broker's metrics series and a key of its maps (a 1 MiB
  // name made 3 MiB of /metrics while its request waited).
  std::size_t max_service_bytes = 128;
  int sndhwm = 100000;  // per peer, messages
  int rcvhwm = 100000;
  std::int64_t max_message_bytes = 16 << 20;  // larger: libzmq drops the peer's connection
  // One subscription a gateway sends the XPUB: a topic (a namespace's, a
  // room's). libzmq keeps each in a trie of about 32 bytes per byte, so
  // this bounds what one costs (their number: whoever may connect; CURVE).
  std::int64_t max_subscription_bytes = 8192;
  std::size_t batch = 1024;  // messages handled per socket per loop turn
  std::size_t max_parked = 10000;  // messages kept for registered peers without a connection (see park())
  std::size_t max_parked_bytes = 64 << 20;  // ... and their bytes
  // HTTP requests relayed between gateways (HttpForward) whose answer has
  // not come: remembered so that, when the owner gateway is lost, each asker
  // hears at once instead of at its relay deadline (up to 65 s).
  std::size_t max_forwards = 65536;
  // Registered peers (gateways, workers, clients) at once: each keeps its
  // entry and a ring of what was sent to it (--kept-sent-bytes) until its
  // liveness runs out. Past it a new peer's Hello is refused.
  std::size_t max_peers = 10000;
  // A gateway silent past its liveness is dropped; past this much more
  // silence (it did not come back with the same sid prefix) every worker
  // hears that its sockets are gone (GatewayGone, docs/protocol.md "A
  // gateway lost"). 0: as soon as it is dropped.
  std::chrono::milliseconds gateway_gone_after{30000};
  // What was sent to each peer over the ROUTER and it has not said it read
  // (Heartbeat.peer_read; from a peer that does not say, what was sent in
  // its last heartbeat interval), at most this many messages and bytes per
  // peer: sent again if they died in a socket the peer replaced
  // (send_unread()). 0: none.
  std::size_t kept_sent = 4096;
  std::size_t kept_sent_bytes = 1 << 20;
  // Counters numbering the events published on each topic (event_streams.hpp):
  // gateways count by them what the XPUB dropped for them.
  std::size_t event_streams = 65536;
  // A broker pair (pair.hpp, docs/deployment.md "A broker pair"): "primary"
  // or "backup"; empty: a broker alone. Its state goes out on a PUB bound
  // at `pair_bind`, the other's comes on a SUB connected to `pair_connect`.
  // With CURVE the two share one key pair (curve_secret).
  std::string pair_role;
  std::string pair_bind;
  std::string pair_connect;
  std::string curve_secret;               // set: CURVE on every socket, only `curve_allow` keys admitted
  std::vector<std::string> curve_allow;   // Z85 public keys of gateways and workers
};

struct broker_stats {
  std::uint64_t received = 0;
  std::uint64_t dropped = 0;
  std::uint64_t dispatched = 0;
  std::uint64_t replies = 0;
  std::uint64_t events = 0;
  std::uint64_t owed_disconnects = 0;  // see broker::owe_disconnect
};

class broker {
 public:
  broker(broker_config config, zmq::context_t& context, core::registry_ptr registry);
  ~broker();
  broker(const broker&) = delete;
  broker& operator=(const broker&) = delete;

  /// Binds all sockets. Throws zmq::error_t on a bad or busy endpoint
  /// (std::runtime_error for a local:// one).
  void bind();
  /// Runs the loop until stop(). Never throws for peer input.
  void run();
  /// Instead of run(): the loop's turns run on the thread that runs
  /// `context` (core/input_reactor.hpp), from a handler this posts to it;
  /// returns at once. `sidecast demo --threads 1` runs the broker on the
  /// gateway's thread this way. Then stop() must be called once no thread
  /// runs `context` any more, and before it is destroyed: it releases what
  /// the broker holds there. `on_failure` is called (on that thread) if
  /// the loop fails and stops (run() would throw then).
  void run_on(boost::asio::io_context& context, std::function<void()> on_failure = {});
  /// Thread-safe (but see run_on).
  void stop();
  /// Thread-safe: the loop turned recently.
  bool healthy() const;
  /// Thread-safe: the peers and services as of the last heartbeat tick, as
  /// JSON (the /status page; docs/deployment.md says what it holds).
  std::string status() const;

  /// Loop-thread only (tests call it after stop()).
  const broker_stats& stats() const { return stats_; }
  const service_table& table() const { return table_; }

 private:
  // Where a message sent to a peer stands: its number in the peer's count
  // (peer::sent), and when it went.
  struct sent_at {
    std::uint64_t number = 0;
    clock::time_point at{};
  };
  using sent_kept = core::kept_ring<sent_at>::entry;
  struct peer {
    proto::Role role = proto::ROLE_UNSPECIFIED;
    clock::time_point expiry{};
    clock::time_point joined{};
    std::uint64_t incarnation = 0;  // its Hello's: the link and the socket it came on
    std::uint64_t connection = 0;
    std::uint64_t hello = 0;     // its Hello's number on the link (Hello.hello)
    std::uint64_t received = 0;  // messages read from it since that Hello (Welcome.received)
    std::uint64_t sent = 0;      // messages sent to it over the ROUTER, Welcomes not counted (Welcome.sent)
    std::uint64_t welcomed_at = 0;  // `sent` at the Welcome that waits for its Heartbeat.read
    core::kept_ring<sent_at> kept;  // the last of those (config kept_sent), see send_unread()
    bool reports_reads = false;     // its heartbeats say what it read: kept until then (forget_read_sends())
    std::string sid_prefix;         // a gateway's (Hello.sid_prefix); empty: its loss is announced to no one
  };
  struct metrics;
  void send_unread(const std::string& to, const proto::ReadReport& read);
  /// Forgets what each peer that does not say what it read was sent more
  /// than a heartbeat interval ago (but not a suspect's: what it lost is
  /// not known yet).
  void forget_old_sends(clock::time_point now);
  /// The same for one peer, suspect or not.
  void forget_old_sends(peer& p, clock::time_point now);
  /// What a peer's heartbeat says it read (Heartbeat.peer_read) is forgotten.
  void forget_read_sends(const std::string& from, const proto::PeerRead& read);

  void open_input();
  clock::time_point before_wait();  // heartbeats; when the loop must wake at the latest
  void after_wait();                // what the wait found
  void receive_router();
  void receive_local();
  void on_router_message(std::string_view routing_id, zmq::message_t& payload);
  void on_hello(const std::string& routing_id, const proto::Hello& hello, clock::time_point now);
  void check_stall(clock::time_point now);
  /// Of a pair, not active: whether the message from `routing_id` is
  /// served (it may make this broker active); if not, the peer is told
  /// to go to the other (Error STANDBY, naming `job`, a Request's or
  /// Lifecycle's id: it did not run; or giving back `refused`, a one-way
  /// message, whole).
  bool serve_as_pair(std::string_view routing_id, std::string_view job, std::string_view refused);
  void receive_pair();
  void subscribe_events(bool on);
  void send_pair_state();
  void on_pair_change(const pair_fsm::change& c);
  /// Stepping down: every peer is told to go to the other broker, and
  /// all this broker held is forgotten (they count it lost there).
  void forget_everything();
  void trust(const std::string& who, const char* how);
  /// Ends the suspicion of `who`, counted by `how`; false when it had none.
  bool clear_suspicion(const std::string& who, const char* how);
  void on_job(const std::string& routing_id, const proto::hot_envelope& head, zmq::message_t& payload,
              clock::time_point now);
  void on_reply(const std::string& routing_id, const proto::hot_envelope& reply, zmq::message_t& payload);
  void owe_disconnect(const std::string& worker, std::string_view connect_id, const zmq::message_t& connect);
  void on_addressed(const std::string& routing_id, const proto::Envelope& env, std::string_view payload);
  void on_cancel(const std::string& routing_id, const proto::Cancel& cancel);
  /// A room or namespace Emit, or a room-wide Control, that came over the
  /// ROUTER (from a gateway's publish API, say), onto the XPUB under
  /// `topic`; an empty topic is dropped as malformed, with `no_topic`.
  void publish(const std::string& topic, std::string_view payload, const char* no_topic);
  void forward_events();
  /// Sends one event on the XPUB: its topic, its envelope, and its stamp.
  void send_event(zmq::message_t& topic, zmq::message_t& body);
  void drain_subscriptions();
  void apply_subscriptions();  // before a turn's first publish (see there)
  void dispatch(clock::time_point now);
  void fail(const failure& f);
  void answer(const std::string& requester, const std::string& worker, std::string_view id, zmq::message_t& payload);
  /// For a registered peer that has no connection for the moment (it
  /// replaced its socket and its new one is not attached yet, or libzmq is
  /// reconnecting it): keeps `payload` (taken) until a message comes from
  /// it (then sends what was kept, in order), or until its liveness runs
  /// out or it is dropped (then tells `report.to`, as if sent to nobody).
  /// False, `payload` left, when the peer is not registered or max_parked
  /// messages (or max_parked_bytes) are kept. Jobs and heartbeats are kept
  /// past max_parked: see park().
  struct undelivered {
    std::string to;  // who hears the DeliveryReport
    proto::DeliveryReport::Status status;
    std::string sid, ref, detail;
  };
  bool park(const std::string& to, zmq::message_t& payload, const undelivered& report);
  void set_parked(std::size_t messages, std::size_t bytes);
  enum class sent { ok, full, gone };
  sent deliver(std::string_view to, zmq::message_t& payload, const undelivered& report);
  void unpark(const std::string& to);
  void expire_parked(clock::time_point now);
  void report_parked(const std::string& to);
  bool send_job(std::string_view worker, job& work, clock::time_point now);
  // How a peer left: a gateway lost to silence is announced gone later
  // (pending_gone_), one that said Goodbye at once; one that came back as
  // another process under its id is announced by on_hello.
  enum class leaving { lost, goodbye, replaced };
  void remove_peer(const std::string& routing_id, leaving how = leaving::lost);
  /// Tells every worker that the sockets of `prefix` are gone (GatewayGone).
  void announce_gone(const std::string& prefix, const char* reason);
  std::optional<std::string> take_pending_gone(const std::string& gateway);
  /// What a gateway's Hello means for its announcement: one back with the
  /// prefix it left with is not announced; a new prefix announces the old.
  void settle_gone(const std::string& gateway, const std::string& prefix);
  void announce_due_gone(clock::time_point now);
  std::string gone_message(const std::string& prefix, const char* reason);
  void replay_gone(const std::string& worker);
  static constexpr std::chrono::minutes replayed_gone{10};
  static constexpr std::size_t max_replayed_gone = 1024;
  std::uint64_t max_message_said() const;
  bool send_held_again(const std::string& worker, clock::time_point now);
  // The answer to a forward whose owner gateway is not there (or, `busy`,
  // whose pipe is full): what the owner would answer for a session it does
  // not have.
  proto::Envelope forward_refused(std::string_view forward_id, bool api, bool session, bool busy) const;
  void tick(clock::time_point now);
  void publish_status(clock::time_point now);
  bool allowed(proto::Role role, proto::Envelope::KindCase kind) const;
  /// How long a peer may be silent before it is dropped.
  clock::duration liveness_window() const { return config_.heartbeat_interval * config_.heartbeat_liveness; }
  void confirm_drain(const std::string& worker);

  bool send(std::string_view routing_id, std::string_view payload);
  bool send(std::string_view routing_id, zmq::message_t&& payload);
  /// Takes `payload` only when it is sent: otherwise it is left as it was.
  sent send_to(std::string_view routing_id, zmq::message_t& payload);
  bool send(std::string_view routing_id, const proto::Envelope& env);
  void send_reply(const std::string& to, const std::string& id, proto::Code code, std::string message);
  static proto::Envelope error_of(proto::Code code, std::string message, std::string id = {});
  void send_error(const std::string& to, proto::Code code, std::string message, std::string id = {});
  bool welcome(const std::string& to, const proto::Hello& hello, const peer* before = nullptr,
               bool marks_resent = false);
  void send_report(const std::string& to, proto::DeliveryReport::Status status, std::string sid,
                   std::string ref, std::string detail);
  void send_report(undelivered&& r);
  /// Why a message was dropped: the `reason` of sidecast_broker_dropped_total
  /// (docs/protocol.md). Every reason is exported from the start, at 0.
  enum class drop_reason {
    malformed,
    unknown_peer,
    not_allowed,
    bad_hello,
    foreign_id,
    foreign_sid,
    duplicate,
    not_holder,
    not_requester,
    unroutable,
    hwm,
    unreachable,
    curve_refused,
    service_limit,
    standby,
    peer_limit,
    count
  };
  void drop(drop_reason reason, std::string_view detail);

  broker_config config_;
  zmq::context_t& context_;
  zmq::socket_t router_;
  zmq::socket_t xsub_;
  zmq::socket_t xpub_;
  core::wakeup wakeup_;
  std::unique_ptr<core::zap_handler> zap_;
  std::unique_ptr<core::local_router> local_;  // config_.local_endpoint's connections
  core::input_wait input_;  // the loop's wait on the sockets above
  std::unique_ptr<core::input_reactor> reactor_;  // run_on() only
  std::optional<pair_fsm> pair_;  // config_.pair_role set
  bool subscriptions_applied_ = false;  // this turn (apply_subscriptions())
  bool events_doubtful_ = false;  // active, after a stall of its own, and the other not heard since
  zmq::socket_t pair_pub_;
  zmq::socket_t pair_sub_;
  std::size_t router_in_ = 0, xsub_in_ = 0, xpub_in_ = 0, wake_in_ = 0, zap_in_ = 0, local_in_ = 0, pair_in_ = 0;
  std::atomic<bool> stopping_{false};
  std::atomic<std::int64_t> last_turn_ns_{0};

  service_table table_;
  // Looked up by string_view too (send_to): no key copies.
  std::unordered_map<std::string, peer, core::string_hash, std::equal_to<>> peers_;
  struct parked_message {
    zmq::message_t payload;
    clock::time_point since;
    undelivered report;
    bool bounded = true;  // counts under max_parked (see park())
  };
  std::unordered_map<std::string, std::deque<parked_message>> parked_;  // see park()
  struct forward_route {
    std::string asker, owner;
    bool api = false, session = false;  // an HTTP API request; of a session (else a socket's)
    clock::time_point since;
  };
  std::unordered_map<std::string, forward_route> forwards_;  // by forward id, until answered (max_forwards)
  clock::time_point forward_sweep_{};
  // Gateways lost to silence, by id, to be announced gone when `due` comes
  // unless they are back first (at most max_peers: past it the one due
  // first is announced at once).
  struct gone_gateway {
    std::string sid_prefix;
    clock::time_point due;
  };
  std::unordered_map<std::string, gone_gateway> pending_gone_;
  // Prefixes announced gone (a day, at most max_peers): a gateway that
  // comes back with one is told so in its Welcome (prefix_gone).
  core::recent_keys announced_gone_{std::chrono::hours(24), config_.max_peers};
  std::size_t parked_count_ = 0;
  std::size_t parked_bounded_ = 0;  // of parked_count_, those max_parked bounds (park())
  std::size_t parked_bytes_ = 0;
  struct suspicion {
    std::uint64_t probe;  // 0: waits for the peer's Heartbeat.read (see on_hello)
    clock::time_point since;
  };
  // Peers asked, after our own stall, to show which connection they are on
  // (see check_stall()), or to say what they read after coming back on a
  // new socket; what we send them is parked meanwhile.
  std::unordered_map<std::string, suspicion> suspects_;
  std::uint64_t next_probe_ = 0;
  clock::time_point next_tick_{};
  clock::time_point now_{};  // read once per loop turn
  alignas(16) std::array<char, 8192> arena_block_{};  // first arena block for decoding
  std::uint64_t next_ref_ = 0;

  core::registry_ptr registry_;
  std::unique_ptr<metrics> metrics_;
  // Ids of the DISCONNECTs the broker makes: "<id>.owed.<start ms>:<n>". The
  // start time keeps a restarted broker of the same id from repeating an id
  // a worker may still hold.
  std::string owed_prefix_;
  // Drawn at start (and at each activation of a pair's broker), never 0,
  // sent in every Welcome: a peer that meets a new one knows what it sent
  // this broker's predecessor (or the other of the pair) is gone.
  std::uint64_t incarnation_;
  // The events' numbers (reset with each incarnation: the streams of a
  // broker that stepped down and came back are not continued).
  event_streams streams_;
  std::uint64_t next_owed_ = 0;
  broker_stats stats_;
  core::log_limiter log_limit_;
  mutable std::mutex status_mutex_;
  std::string status_;  // publish_status(), read by status() on another thread
};

}  // namespace sidecast::broker
