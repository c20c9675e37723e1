#pragma once
// The gateway's ZeroMQ side: the DEALER to the broker and the SUB for room
// events, driven by an Asio io_context (the sockets' ZMQ_FD notifications
// are waited on like any descriptor). With one gateway I/O thread it shares
// that thread's io_context, so a request and its reply cross no thread on
// their way through the gateway; with several, it has its own thread.
// Sessions hand it commands by posting (bounded in number); it hands
// deliveries back by posting onto each sink's executor (bounded in number
// per thread, thread_backlog.hpp). It also owns the
// gateway's view of who is where: sid -> sink and rooms, room -> local members, and
// requests awaiting replies.
#include <array>
#include <atomic>
#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/unordered/unordered_flat_map.hpp>
#include <boost/unordered/unordered_flat_set.hpp>
#include <spdlog/spdlog.h>
#include <zmq.hpp>

#include "core/input_reactor.hpp"
#include "core/kept_ring.hpp"
#include "core/log.hpp"
#include "core/recent_keys.hpp"
#include "core/string_hash.hpp"
#include "core/thread_spares.hpp"
#include "gateway/config.hpp"
#include "gateway/io.hpp"
#include "gateway/metrics.hpp"
#include "gateway/reply_slot.hpp"
#include "gateway/sink.hpp"
#include "gateway/thread_backlog.hpp"
#include "proto/codec.hpp"

namespace sidecast::core {
class peer_link;
}

namespace sidecast::gateway {

/// Why a message for a socket was refused: its thread is past --max-thread-backlog.
inline constexpr std::string_view kThreadBehind = "the gateway thread of the socket is behind";

/// What a Control (join, leave, disconnect) for one of this gateway's
/// sockets came to (bridge::control()).
enum class control_outcome {
  applied,          // done: a publish to the room after it reaches the socket
  unknown_sid,      // no such socket here (any more)
  other_namespace,  // a worker's Control named a namespace the socket is not in
  room_limit,       // a join past --max-rooms: not applied
  long_room,        // a join of a room named longer than --max-room-bytes: not applied
  thread_behind,    // a disconnect for a socket whose thread is past --max-thread-backlog
  no_such_action,
};

/// The delivery report a worker gets for an outcome other than `applied`
/// (DELIVERED for it), and the report's detail.
std::pair<proto::DeliveryReport::Status, std::string_view> report_of(control_outcome outcome);

struct bridge_commands;  // names the spare blocks of bridge::post

// A command posted to the bridge, whose operation Asio makes from blocks
// the posting thread has spare (a burst of requests outgrows Asio's own
// per-thread cache of 32). Its allocator is its own member, not an
// asio::bind_allocator: a binder makes Asio wrap the handler in a
// work_dispatcher (work counted on the io_context, a second dispatch).
template <typename F>
struct spared_command {
  F f;
  using allocator_type = core::spare_block_allocator<char, bridge_commands>;
  allocator_type get_allocator() const noexcept { return {}; }
  void operator()() { f(); }
};

/// A Reply that answers a worker's emit_with_ack without the client's ack.
proto::Envelope ack_refusal(std::string ack_id, proto::Code code, std::string message);

class bridge {
 public:
  /// Request ids are "<config.id>:<n>", n counting up from first_id + 1.
  /// `sid_prefix`: what the gateway's sids begin with now (Hello.sid_prefix).
  bridge(const gateway_config& config, zmq::context_t& context, gateway_metrics& metrics,
         std::uint64_t first_id = 0, std::string sid_prefix = {});
  ~bridge();
  bridge(const bridge&) = delete;
  bridge& operator=(const bridge&) = delete;

  /// Runs on `shared` (a gateway I/O thread's context, run by the caller)
  /// or, when null, on a thread of its own.
  void start(boost::asio::io_context* shared = nullptr);
  /// Call after the shared context's thread has stopped.
  void stop();

  // Thread-safe. Each returns false when the command queue is full (counted),
  // but for what the gateway owes whatever the load: detach() and
  // send_owed(), bounded by the sockets (or the acks awaited) themselves.

  /// Makes `sid` reachable for addressed traffic and namespace broadcasts.
  /// For a sid already attached, `sink` takes it over with its rooms; then
  /// `after` runs on the bridge thread: whatever the bridge delivered to the
  /// previous sink was posted before anything `after` posts.
  bool attach(std::string sid, std::string nsp, std::weak_ptr<client_sink> sink, std::function<void()> after = {});
  /// Forgets `sid` and its rooms; replies still on their way are dropped.
  /// Never refused: a sid left behind would keep its rooms subscribed.
  void detach(std::string sid);
  /// Gives up requests `seqs` (from next_seq()) of a socket that ended
  /// before their answers: a Cancel for each still awaited, so that one
  /// still queued at the broker does not run, and a running handler sees
  /// its cancel token. Never refused (bounded by the socket's
  /// --max-pending-acks).
  void cancel(std::vector<std::uint64_t> seqs);
  /// Sends a Request or a Lifecycle CONNECT; the Reply reaches
  /// sink->deliver_reply(tag, ...), or a TIMEOUT reply after `timeout` + 1 s.
  /// `if_gone` (a CONNECT's DISCONNECT notice) is sent instead when the
  /// reply is OK and the sink is gone: the service accepted a socket that
  /// no longer exists. (A hook that accepts after its CONNECT's deadline
  /// hears its DISCONNECT from the broker: broker::owe_disconnect.)
  bool request(const proto::Envelope& env, std::weak_ptr<client_sink> sink, std::uint64_t tag,
               std::chrono::milliseconds timeout, std::optional<proto::Envelope> if_gone = std::nullopt);
  /// The same, serialized: `message` holds the envelope, whose id is `id`.
  bool request(std::string_view id, zmq::message_t message, std::weak_ptr<client_sink> sink, std::uint64_t tag,
               std::chrono::milliseconds timeout, std::unique_ptr<zmq::message_t> if_gone = nullptr);
  /// Sends anything else (client acks, publish API emits, notices).
  bool send(const proto::Envelope& env);
  bool send(zmq::message_t message);
  /// The same, never refused by --bridge-queue: a DISCONNECT notice, or
  /// the refusal of an ack a worker awaits (one per socket, or per ack).
  void send_owed(const proto::Envelope& env);
  /// Forwards a polling (or HTTP API: `request.target()` set) request for
  /// another gateway's sid through the broker; the owner's answer (or a
  /// timeout) completes `slot`.
  /// Its id is the request's when set (from next_id()), else one made here.
  bool forward(proto::HttpForward request, std::shared_ptr<reply_slot> slot, std::chrono::milliseconds timeout);
  /// Applies `control` (join, leave or disconnect) to one of this gateway's
  /// sockets on the bridge thread, as a worker's Control is applied, and
  /// calls `done` there with what it came to. False when --bridge-queue is
  /// full (`done` is not called).
  bool control(proto::Control control, std::function<void(control_outcome)> done);
  /// One of this gateway's sockets as the bridge knows it (describe()).
  struct socket_info {
    std::string nsp;
    std::vector<std::string> rooms;  // in the order it joined them
  };
  /// Calls `done` on the bridge thread with what it knows of `sid`
  /// (nothing: not a socket of this gateway). False when --bridge-queue is
  /// full (`done` is not called).
  bool describe(std::string sid, std::function<void(std::optional<socket_info>)> done);
  /// Serves forwarded requests for our own sids (set before start()); the
  /// handler runs on the bridge thread and must not block.
  void on_forward(std::function<void(proto::HttpForward)> handler) { forward_handler_ = std::move(handler); }
  /// Called (on the bridge thread) when its sockets cannot be made, e.g.
  /// an endpoint libzmq refuses: the bridge then serves nothing.
  void on_failure(std::function<void(const std::string&)> handler) { failure_handler_ = std::move(handler); }
  /// Called (on the bridge thread) when the broker says it announced the
  /// sid prefix gone (Welcome.prefix_gone): the handler ends the sockets
  /// of that prefix and returns the new one, which the link says at once.
  void on_prefix_gone(std::function<std::string(const std::string&)> handler) {
    prefix_gone_handler_ = std::move(handler);
  }
  /// Bridge thread (a forward handler): posts `handler` to a session's
  /// thread under that thread's --max-thread-backlog; false when refused.
  template <typename Handler>
  bool hand_to(const io_executor& ex, Handler&& handler) {
    return backlog_.post(ex, std::forward<Handler>(handler));
  }

  /// gateway::drain: every attached sink's shut_down(), on its thread;
  /// with a `prefix`, only those whose sid begins with it.
  void shut_down_all(std::string prefix = {});
  /// Sids attached (any thread; the bridge thread's count after its last command).
  std::size_t members() const { return members_count_.load(std::memory_order_relaxed); }
  /// CONNECTs sent and not yet answered (any thread): a drain waits for
  /// them, so a service that accepts a socket whose client has left still
  /// gets its DISCONNECT (request()'s `if_gone`) before the gateway stops.
  std::size_t connects_awaited() const { return connects_awaited_.load(std::memory_order_relaxed); }

  /// A new request id "<gateway id>:<n>", n in base 36 (lower case).
  std::string next_id();
  /// The n of the next id, which id_of(n) writes (a request's seq, for cancel()).
  std::uint64_t next_seq() { return ++next_id_; }
  /// "<our id>:<seq>" in base 36, as next_id() makes them.
  std::string id_of(std::uint64_t seq) const;
  const std::string& id() const { return id_; }
  bool connected() const { return welcomed_; }
  /// The largest message the broker said it takes (Welcome.max_message_bytes;
  /// 0: not said yet). Any thread.
  std::uint64_t max_message_bytes() const { return max_message_bytes_.load(std::memory_order_relaxed); }

 private:
  /// The link refused a message: counted, logged; false.
  bool link_full();
  bool unread_full();  // past --max-unread-bytes: counted, logged

  struct member {
    std::weak_ptr<client_sink> sink;
    std::string nsp;
    // The rooms joined: their topics, as keys of topics_ (one copy of a
    // room's name, however many local members it has).
    std::vector<const std::string*> topics;
    // A disconnect is on its way to the socket's thread: another is done
    // already (one posting per member, however many disconnects name it).
    bool disconnecting = false;
  };
  using member_entry = std::pair<const std::string, member>;  // of members_: its address is stable
  // A room's local members: open addressing, so a broadcast walks one array.
  using members_of_topic = boost::unordered_flat_set<member_entry*>;
  // A room or namespace with local members: who they are, and how far its
  // events were heard (a gap in their numbers is events lost on the way).
  struct local_topic {
    members_of_topic members;
    proto::heard_stream heard;
    // Set when the topic came while its filter's unsubscription was recent:
    // its first gap before then may be the time it was not subscribed
    // (add_to_topic(), on_event()).
    std::chrono::steady_clock::time_point forgive_until{};
  };
  using time_point = std::chrono::steady_clock::time_point;
  // What was sent to the broker: a copy sharing the bytes sent (empty: never
  // sent again), and where on the link it went (its epoch, or the one at
  // which a new broker named it): sent again if it died in a socket the link
  // replaced (resend_lost()).
  using sent_message = core::kept_sends::entry;
  struct pending {
    std::weak_ptr<client_sink> sink;
    std::uint64_t tag;
    time_point deadline;
    std::unique_ptr<zmq::message_t> if_gone = {};  // see request()
    sent_message out = {};
  };
  struct pending_forward {
    std::shared_ptr<reply_slot> slot;
    time_point deadline;
    bool api = false;  // an HTTP API request (its failures answered as the API's)
    sent_message out = {};
  };

  // A ZeroMQ socket's ZMQ_FD, waited on through a dup of it (ZeroMQ owns
  // and closes the original; the peer link replaces its socket on reconnect).
  struct watch {
    std::optional<std::uint64_t> generation;  // of the socket the descriptor belongs to
    std::optional<boost::asio::posix::basic_stream_descriptor<io_executor>> fd;
    bool waiting = false;
    bool dirty = true;  // may hold input its descriptor will not announce: read or ask it
  };

  // Runs `command` (move-only is fine) on the bridge's thread; false when
  // --bridge-queue commands are already waiting.
  template <typename Command>
  bool post(Command&& command, bool owed = false);
  // Runs `delivery` (a call into a sink) on `ex`: at once when that is the
  // bridge's own thread (--threads 1), else posted, counting `weight` (the
  // sinks it reaches) against that thread's --max-thread-backlog. False
  // when refused there (counted). Every delivery to a sink goes through
  // here, so a sink sees them in the bridge's order.
  template <typename Delivery>
  bool to_sink(const io_executor& ex, Delivery&& delivery, std::size_t weight = 1,
               thread_backlog::kind kind = thread_backlog::kind::sheddable);
  bool take_turn(bool owed);
  bool begin_command();
  void end_command();
  void open();
  void schedule_pump();
  void pump();
  template <typename ReadOne>
  bool drain(watch& w, ReadOne read_one);
  void arm();
  template <typename FdOf>
  bool arm(watch& w, std::uint64_t generation, FdOf fd_of);
  void on_broker(proto::Envelope& env);  // on an arena: what outlives the call is moved out
  /// An Envelope{Reply} from the link, unparsed: its body is parsed into
  /// parsed_reply_ (false leaves the bytes to the link's parser).
  bool take_reply(std::string_view bytes);
  void on_reply(proto::Reply& r);
  /// An event from the broker's XPUB; `stamp` its number (none from a
  /// broker before the stamps).
  void on_event(std::string_view topic, std::string_view body, std::optional<proto::event_stamp> stamp);
  void on_control(const proto::Control& control);
  void deliver_emit(proto::Emit& emit);  // moves its strings out
  void reply_to(pending p, reply_data reply);
  /// A broker pair's standby refused request or forward `seq` (it did not
  /// run): held to go again after the next Welcome, or failed now. False
  /// when no request or forward `seq` awaits an answer.
  bool refused_by_broker(std::uint64_t seq);
  /// A one-way message a pair's standby gave back (Error.refused): held to
  /// go after the next Welcome, or dropped (counted) when it cannot be.
  /// `names_ours`: it named one of our ids that awaits no answer.
  void given_back(const std::string& refused, bool names_ours);
  /// n of an id "<our id>:<n>" (every id id_of() made); nothing for any other.
  std::optional<std::uint64_t> own_seq(std::string_view id) const;
  void add_deadline(time_point at, std::uint64_t seq);
  /// The request or forward `seq` still waits, with this deadline.
  bool live(time_point at, std::uint64_t seq) const;
  void compact_deadlines();
  // Counts and logs args from a worker that fail socketio::valid_args.
  void refuse_args(std::string_view what, std::string_view about);
  // What makes a worker's event unfit for clients (bad args, a reserved
  // name, framed for `emit_nsp`, not the socket's or topic's `nsp`),
  // counted and logged; empty if none.
  std::string_view event_fault(const proto::Emit& emit, std::string_view emit_nsp, std::string_view nsp,
                               std::string_view about);
  /// A room-wide Control (published on `topic`, whose local members are
  /// `members`): applied to each of them.
  void on_room_control(std::string_view topic, const members_of_topic& members,
                       const proto::Control& control);
  /// Makes `who` a local member of `topic`, subscribing to it when it is
  /// the first: the topics_ key, which lives while the topic has members.
  const std::string* add_to_topic(std::string topic, member_entry& who);
  /// `who` leaves `topic` (which may be the topics_ key itself: not used
  /// after the last member leaves).
  void remove_from_topic(const std::string& topic, member_entry& who);
  /// Subscribes the SUB to `topic` (a local socket is the first in it) or
  /// unsubscribes it (the last left), as --room-subscriptions says: a room
  /// is subscribed to by itself or through its namespace's rooms_prefix().
  void subscribe(const std::string& topic, bool on);
  void send_now(const proto::Envelope& env);  // bridge thread: straight onto the broker link
  // report() from a sink's thread (at once when that is the bridge's own).
  void report_from(proto::DeliveryReport::Status status, std::string to, std::string sid, std::string ref,
                   std::string_view detail);
  /// A Control for one of our sockets, applied (on_control(), control()).
  /// A disconnect is refused when the socket's thread is past
  /// --max-thread-backlog, unless `owed` (a room-wide one: not to be half
  /// done, and bounded by the members: one posting each, see
  /// member::disconnecting).
  control_outcome apply_control(const proto::Control& control, bool owed = false);
  void report(const std::string& to, proto::DeliveryReport::Status status, const std::string& sid,
              const std::string& ref, std::string_view detail = {});
  void expire(std::chrono::steady_clock::time_point now);
  /// A new broker welcomed us: what its predecessor held ends now.
  void fail_lost_to_restart();
  void renew_sid_prefix();
  /// Sends again what died in a socket the link replaced, then what was
  /// held (hold()) once the link no longer holds.
  void resend_lost();
  /// A broker heartbeat said what it read: the kept one-way messages among
  /// it are forgotten (core::forget_read()).
  void forget_read();
  /// While the link waits for the Welcome of a new socket, and until what
  /// died in the old one goes again (resend_lost()), messages wait instead
  /// of going: in `out`, as held(n), up to --hwm of them. True when it
  /// took `message` so.
  bool holding() const;
  bool may_hold() const;  // holding(), and fewer than --hwm held
  bool hold(zmq::message_t& message, sent_message& out);
  /// `out` (its message kept) joins the held ones: after those held before
  /// it; or, `given_back` by a standby, ahead of every one held for any
  /// other reason and after those given back before it (see given_back()).
  void hold_kept(sent_message& out, bool given_back = false);
  /// A held request or forward expired: one fewer held.
  void unhold(std::size_t bytes);
  /// Sends `message` (or, `may_hold`, holds it), keeping a copy and where
  /// it went in `out`. What resend_lost() sends is never held.
  bool send_kept(zmq::message_t&& message, sent_message& out, bool may_hold = true);
  /// Sends a message nobody answers (or holds it), kept (notices_) to send
  /// again too.
  bool send_notice(zmq::message_t&& message, bool may_hold = true);
  /// Stopping: what is held goes as it is, in its order.
  void send_held();

  const gateway_config& config_;
  zmq::context_t& context_;
  gateway_metrics& metrics_;
  std::string id_;
  std::string sid_prefix_;  // bridge thread (after start())
  std::uint64_t prefixes_gone_ = 0;  // the link's count, as last acted on
  std::atomic<std::uint64_t> next_id_{0};
  std::uint64_t offset_ = 0;  // bridge thread: offsets of outbound events
  std::atomic<std::size_t> members_count_{0};  // members_.size(), for members()
  std::atomic<std::size_t> connects_awaited_{0};  // pending_ entries with an if_gone
  std::atomic<std::size_t> queued_{0};  // commands posted, not yet run (bound: bridge_queue)
  thread_backlog backlog_;              // deliveries posted to I/O threads, not yet run there
  std::unique_ptr<boost::asio::io_context> own_context_;  // with several I/O threads
  std::thread thread_;
  std::optional<io_executor> ex_;
  std::atomic<bool> stopped_{false};
  std::atomic<bool> welcomed_{false};
  std::atomic<std::uint64_t> max_message_bytes_{0};

  // Bridge executor only.
  std::optional<timer> timer_;
  std::chrono::steady_clock::time_point timer_at_{};
  bool timer_pending_ = false;
  bool pump_posted_ = false;
  std::uint64_t broker_restarts_ = 0;  // the link's count, as last acted on
  std::uint64_t broker_received_ = 0;  // the link's received_by_broker().count, as last acted on
  core::link_position broker_read_;    // the link's read_by_broker(), as last acted on
  std::uint64_t held_ = 0;  // messages held since resend_lost() last sent them (hold()), less those that expired
  std::uint64_t held_bytes_ = 0;  // their bytes (--max-unread-bytes counts them with the link's unread ones)
  std::uint64_t held_seq_ = 0;  // numbers them in the order held (held_ goes down as they expire)
  std::uint64_t given_back_ = 0;  // of those, the ones a standby gave back (hold_kept())
  core::kept_sends notices_;  // the last one-way messages sent (--kept-notices, --kept-notice-bytes)
  watch link_watch_, sub_watch_;
  std::shared_ptr<core::ring_poster> poster_;  // the link's local:// doorbell hook
  std::unique_ptr<core::peer_link> link_;
  alignas(16) std::array<char, 8192> arena_block_;  // where each received envelope is parsed
  proto::Reply parsed_reply_;  // where each Reply is parsed (see take_reply)
  const std::function<bool(std::string_view)> take_reply_ = [this](std::string_view bytes) { return take_reply(bytes); };
  std::unique_ptr<zmq::socket_t> sub_;
  std::unordered_map<std::string, member> members_;
  // topic -> its local members, pointing into members_ (a member leaves
  // every topic before its entry is erased): no sid copied per room.
  std::unordered_map<std::string, local_topic, core::string_hash, std::equal_to<>> topics_;
  // The SUB's unsubscriptions of the last few seconds, by filter: a topic
  // whose filter was among them may still be brought events from before
  // (add_to_topic()). At most --max-recent-unsubscriptions of them.
  core::recent_keys unsubscribed_;
  // Requests and forwards awaiting answers, by the n of their ids: neither a
  // request nor its answer allocates here.
  boost::unordered_flat_map<std::uint64_t, pending> pending_;
  boost::unordered_flat_map<std::uint64_t, pending_forward> forwards_;
  std::function<void(proto::HttpForward)> forward_handler_;
  std::function<void(const std::string&)> failure_handler_;
  std::function<std::string(const std::string&)> prefix_gone_handler_;
  // Their deadlines, a min-heap (earliest first). An answered entry stays
  // until its time comes (it then finds nothing, or a later deadline), and
  // compact_deadlines() keeps those to about as many as the live ones.
  std::vector<std::pair<time_point, std::uint64_t>> deadlines_;
  core::log_limiter log_limit_;
};

template <typename Command>
bool bridge::post(Command&& command, bool owed) {
  if (!take_turn(owed)) return false;
  auto run = [this, command = std::forward<Command>(command)]() mutable {
    if (!begin_command()) return;
    command();
    end_command();
  };
  boost::asio::post(*ex_, spared_command<decltype(run)>{std::move(run)});
  return true;
}

template <typename Delivery>
bool bridge::to_sink(const io_executor& ex, Delivery&& delivery, std::size_t weight, thread_backlog::kind kind) {
  if (!ex.running_in_this_thread()) return backlog_.post(ex, std::forward<Delivery>(delivery), weight, kind);
  // In the middle of a pump: a sink that throws must not end the turn
  // before the bridge waits again.
  try {
    delivery();
  } catch (const std::exception& e) {
    if (log_limit_.allow()) spdlog::error("gateway bridge: a session's delivery failed: {}", e.what());
  }
  return true;
}

}  // namespace sidecast::gateway
