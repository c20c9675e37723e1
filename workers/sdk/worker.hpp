#pragma once
// The worker SDK: serve one or more services behind the broker.
//
//   sidecast::worker w{options};
//   w.add(sidecast::service{"demo", 16}
//             .on("echo", [](sidecast::request req) { req.reply(req.args_text()); }));
//   w.run();  // until stop()
//
// Handlers run on a thread pool, so a long task never delays heartbeats.
// A `request` is a cheap shared handle: keep a copy to answer later from any
// thread. Every request is answered exactly once; if the last handle goes
// away unanswered the requester gets no ack (as in Socket.IO), and the broker
// still learns that the worker is free.
#include <chrono>
#include <functional>
#include <atomic>
#include <memory>
#include <optional>
#include <stdexcept>
#include <stop_token>
#include <string>
#include <string_view>
#include <vector>

#include <boost/json/array.hpp>
#include <boost/json/value.hpp>
#include <zmq.hpp>

#include "proto/codec.hpp"

namespace boost::asio {
class io_context;
}

namespace sidecast {

using attachments = std::vector<std::string>;

struct worker_options {
  std::string id;                                 // peer id; default "w-<host>-<pid>"
  std::string broker = "tcp://127.0.0.1:7700";    // the broker's ROUTER
  std::string publish = "tcp://127.0.0.1:7701";   // the broker's XSUB (room events)
  std::string backup_broker;   // a broker pair's other ROUTER (empty: one broker)
  std::string backup_publish;  // its XSUB: set both or neither (else the constructor throws std::invalid_argument)
  std::chrono::milliseconds heartbeat_interval{1000};
  unsigned heartbeat_liveness = 3;
  std::size_t threads = 0;          // handler threads; 0: the total capacity, at most 256
  // Messages handlers may queue for the I/O thread (replies: no bound, see
  // below). One larger than the broker takes (its --max-message-bytes, said
  // in its Welcome) is not sent, since it would cost the worker its
  // connection and all in flight on it: an answer goes as INTERNAL, anything
  // else is dropped and counted in outbox_dropped.
  std::size_t outbox_limit = 10000;
  std::size_t queue_limit = 10000;  // requests waiting for a handler thread; past it answered BUSY
  std::chrono::milliseconds outbox_wait{5000};  // a handler's emit waits this long for room, then is dropped;
                                                // a reply never waits nor is dropped (it frees the broker's credit)
  std::size_t pending_acks_limit = 10000;       // emits waiting for a client's ack, and socket checks awaited
  int hwm = 100000;  // the broker link's queue each way, the PUB socket's, and what is held for a Welcome
  // Answers kept after they are sent, at most this many and bytes (0: none):
  // a job the broker sends again (it came back on a new socket, see
  // docs/protocol.md) that this worker answered gets its answer again,
  // instead of running twice. A job still running here is never run again.
  std::size_t kept_replies = 1024;
  std::size_t kept_reply_bytes = 4 << 20;
  // One-way messages kept after they are sent (emits to a sid, joins,
  // leaves, disconnects) until a broker heartbeat says it read them, at
  // most this many and bytes (0: none): those that died in a socket the
  // worker replaced go again once the broker's Welcome says what it read
  // (docs/protocol.md, "What a replaced socket held").
  std::size_t kept_notices = 16384;
  std::size_t kept_notice_bytes = 8 << 20;
  std::string curve_secret;      // this worker's CURVE secret key (Z85); empty: no CURVE
  std::string curve_server_key;  // the broker's CURVE public key (Z85)
};

/// Fires when the broker cancels a request (deadline passed, requester gave
/// up), when its deadline passes (the worker's I/O thread fires it itself,
/// for a broker that sends no Cancel), or when the worker stops. Long
/// handlers poll it, sleep on it or wait on stop_token(). Copies may
/// go to other threads: each sees the request's deadline as it is now (an
/// early ack() lifts it).
class cancel_token {
 public:
  using clock = std::chrono::steady_clock;
  /// The deadline (a clock::rep) is the request's, shared: it moves for every copy.
  cancel_token(std::stop_token stop, std::shared_ptr<const std::atomic<clock::rep>> deadline)
      : stop_{std::move(stop)}, deadline_{std::move(deadline)} {}

  bool cancelled() const;
  /// Sleeps up to `d` (any length: milliseconds::max() sleeps until
  /// cancelled); returns false if cancelled (or the deadline passed) first.
  bool sleep_for(std::chrono::milliseconds d) const;
  clock::time_point deadline() const { return clock::time_point{clock::duration{deadline_->load()}}; }
  const std::stop_token& stop_token() const { return stop_; }

 private:
  std::stop_token stop_;
  std::shared_ptr<const std::atomic<clock::rep>> deadline_;
};

/// The result of a client's ack to emit_with_ack.
struct ack_result {
  proto::Code code = proto::OK;  // TIMEOUT: no ack in time; CANCELLED: the worker stopped
  std::string args;              // JSON array text
  sidecast::attachments attachments;
  std::string message;           // why, when the gateway answered for the client (code not OK)
};

class worker;
namespace detail {
struct request_state;
struct worker_core;
}  // namespace detail

/// Thrown by a handler that has not answered: the request is answered with
/// `code` and the message (a handler's other exceptions answer INTERNAL).
/// For a failure the client should hear as what it is, such as BUSY for a
/// resource that is locked for the moment.
struct answer_error : std::runtime_error {
  answer_error(proto::Code c, const std::string& message) : std::runtime_error{message}, code{c} {}
  proto::Code code;
};

class request {
 public:
  enum class kind { event, connect, disconnect };

  kind type() const;
  const std::string& id() const;
  const std::string& service() const;
  const std::string& sid() const;
  const std::string& nsp() const;
  const std::string& event() const;  // "connect" / "disconnect" for lifecycle
  const std::string& user() const;
  /// The event's arguments as JSON array text, untouched.
  const std::string& args_text() const;
  /// The arguments parsed; an empty array if they are not a JSON array.
  boost::json::array args() const;
  /// The same, but nothing when they are not a JSON array (a lone surrogate
  /// escaped, say): for a handler that must refuse such arguments rather
  /// than read them as none.
  std::optional<boost::json::array> parsed_args() const;
  /// The socket's CONNECT auth payload (JSON text; "{}" when none).
  const std::string& auth_text() const;
  const sidecast::attachments& attachments() const;
  bool wants_reply() const;
  unsigned attempt() const;
  const cancel_token& cancel() const;
  /// The id of the worker handling this request.
  const std::string& worker_id() const;

  /// Answers (the ack for events; accepts a connect with data). Once only:
  /// later answers are ignored and return false. The args are written into
  /// the reply before it returns (a view of the request's own args_text()
  /// answers with them, uncopied).
  bool reply(std::string_view args_json = "[]", const sidecast::attachments& att = {});
  bool reply(const boost::json::array& args);
  /// Answers with an error (REFUSED refuses a connect with `message`).
  bool fail(proto::Code code, std::string message);
  /// Answers now and keeps working: the client gets its ack, this worker
  /// keeps the request's capacity until the handle is done (last copy gone,
  /// or reply()), and the request's deadline no longer applies — for long
  /// tasks that report progress with emit(). Call from the handler's thread.
  bool ack(std::string_view args_json = "[]", const sidecast::attachments& att = {});

  /// The emits, join and leave below return false, sending nothing, when an
  /// event name or a room is not valid UTF-8 (the broker would refuse the
  /// message) or the outbox stays full.
  /// Emits to the socket that asked.
  bool emit(std::string event, std::string args_json, sidecast::attachments att = {});
  /// Emits to the asking socket and calls `on_ack` (on a handler thread) with
  /// the client's ack, with TIMEOUT after `timeout`, with CANCELLED when
  /// the worker stops first, or with INTERNAL at once when the emit is
  /// larger than the broker takes (not sent). False (and no call) once the
  /// worker is stopping.
  bool emit_with_ack(std::string event, std::string args_json, sidecast::attachments att,
                     std::function<void(ack_result)> on_ack, std::chrono::milliseconds timeout);
  bool join(std::string room);
  bool leave(std::string room);
  /// Disconnects the asking socket from this namespace.
  bool disconnect();
  /// Emits to every socket in a room of this namespace (except `except_sids`).
  bool emit_to_room(const std::string& room, std::string event, std::string args_json,
                    std::vector<std::string> except_sids = {}, sidecast::attachments att = {});
  /// Emits to every socket of this namespace.
  bool broadcast(std::string event, std::string args_json, std::vector<std::string> except_sids = {},
                 sidecast::attachments att = {});
  /// Room-wide, in this namespace, as worker::sockets_join() and the rest:
  /// every socket in `in_room` (std::nullopt: every socket of the namespace).
  bool sockets_join(const std::string& room, const std::optional<std::string>& in_room);
  bool sockets_leave(const std::string& room, const std::optional<std::string>& in_room);
  bool disconnect_sockets(const std::optional<std::string>& in_room);
  bool close_room(const std::string& room);

 private:
  friend class worker;
  friend struct detail::worker_core;
  explicit request(std::shared_ptr<detail::request_state> state) : state_{std::move(state)} {}
  std::shared_ptr<detail::request_state> state_;
};

using handler = std::function<void(request)>;

/// A gateway the broker gave up on (GatewayGone, docs/protocol.md "A gateway
/// lost"): it crashed, or was cut off past the broker's
/// --gateway-gone-after. Every socket whose sid begins with sid_prefix() is
/// gone, and no DISCONNECT will come for any of them: a service forgets
/// what it keeps per socket. Every worker hears it, whether or not it
/// served those sockets, so the hook must not mind sids it never saw.
class gateway_gone {
 public:
  const std::string& gateway() const { return gateway_; }
  const std::string& sid_prefix() const { return sid_prefix_; }
  /// "silent" (lost to silence), "goodbye" (drained and stopped),
  /// "restarted" (back as a new process under its id), "replaced" (it
  /// ended its sockets and took a new prefix), "replayed" (announced in the
  /// last 10 minutes, sent again as this worker registered).
  const std::string& reason() const { return reason_; }
  /// True for a sid of that gateway's sockets.
  bool owns(std::string_view sid) const { return sid.starts_with(sid_prefix_); }
  /// Emits to every socket in `room` of namespace `nsp` (to say who left),
  /// as worker::emit_to_room does.
  bool emit_to_room(const std::string& nsp, const std::string& room, std::string event, std::string args_json) const;

 private:
  friend struct detail::worker_core;
  gateway_gone(std::shared_ptr<detail::worker_core> core, std::string gateway, std::string sid_prefix,
               std::string reason)
      : core_{std::move(core)},
        gateway_{std::move(gateway)},
        sid_prefix_{std::move(sid_prefix)},
        reason_{std::move(reason)} {}
  std::shared_ptr<detail::worker_core> core_;
  std::string gateway_, sid_prefix_, reason_;
};
using gone_hook = std::function<void(const gateway_gone&)>;

/// What worker::check_socket() learned of a socket.
enum class socket_state {
  present,     // its gateway has it
  gone,        // its gateway has no such socket (it disconnected): it never comes back
  no_gateway,  // no live gateway has its sid's prefix: its gateway is lost, or, just
               // after a broker restart, not back yet (one the broker dropped for
               // silence, in its --gateway-gone-after grace, reads unknown)
  unknown,     // no answer in time (lost on the way, or a gateway of an earlier build)
};
using check_hook = std::function<void(socket_state)>;

/// A broker that did not know this worker's link welcomed it
/// (Welcome.previous_hello 0): at its start, and again from a broker that
/// restarted, the other of a pair, or one that had dropped the worker. What a
/// service keeps per socket may be stale then: a socket that ended while no
/// worker of the service ran (or while the broker that held its DISCONNECT
/// died) sends no DISCONNECT again. The hook checks the sockets it keeps
/// (check_socket) and forgets those gone. It runs twice the heartbeat
/// liveness (interval × liveness) after the Welcome: gateways say Hello to
/// a broker that just started within that, and until one does, the broker
/// answers a check of its sockets no_gateway.
class welcome {
 public:
  /// The first Welcome this worker had since it started.
  bool first() const { return first_; }
  /// As worker::check_socket.
  bool check_socket(const std::string& nsp, const std::string& sid, check_hook done,
                    std::chrono::milliseconds timeout = std::chrono::seconds{10}) const;
  /// As worker::emit_to_room.
  bool emit_to_room(const std::string& nsp, const std::string& room, std::string event, std::string args_json) const;

 private:
  friend struct detail::worker_core;
  welcome(std::shared_ptr<detail::worker_core> core, bool first) : core_{std::move(core)}, first_{first} {}
  std::shared_ptr<detail::worker_core> core_;
  bool first_;
};
using welcome_hook = std::function<void(const welcome&)>;

class service {
 public:
  explicit service(std::string name, unsigned capacity = 16);
  /// Handles one event ("*": every event without its own handler); events
  /// with no handler are ignored (answered silently).
  service& on(std::string event, handler h);
  /// The same for a handler that returns at once: no I/O, no sleeping, no
  /// waiting on cancel() or on anything else. It runs on the worker's I/O
  /// thread instead of the pool, which saves two thread hand-offs per
  /// request; a quick handler that blocks stalls the whole worker, heartbeats
  /// included, and it must not call worker::stop(). Its emit_with_ack
  /// callbacks still run on the pool. Its replies never wait for room in the
  /// outbox (--outbox-limit), nor are dropped: past a full outbox they wait
  /// beside it, as every thread's answers do. Its other sends past a full
  /// outbox are dropped and counted, as any I/O-thread send is.
  service& on_quick(std::string event, handler h);
  /// Connect hook: reply() accepts (default), fail(REFUSED, msg) refuses.
  service& on_connect(handler h);
  /// Disconnect hook: a socket the service accepted is gone. It may run on
  /// another worker of the service than the one that accepted the socket,
  /// except after a late accept: a connect hook that accepts after its
  /// connect's deadline (the client got connect_error) is followed, on this
  /// worker, by the socket's DISCONNECT (reason "the connect was not
  /// answered in time"), which the broker sends once the accept reached it.
  /// A late refusal is followed by nothing.
  service& on_disconnect(handler h);
  /// A gateway is lost with all its sockets (see gateway_gone): runs on the
  /// pool, once per announcement, on every worker of the service, without
  /// taking capacity; the outbox bound does not apply (at most one per
  /// gateway lost, and the last 10 minutes' again when the worker
  /// registers: the hook must not mind a prefix it forgot already). What it
  /// throws is logged and counted as a handler error.
  service& on_gateway_gone(gone_hook h);
  /// The broker welcomed this worker (see welcome): runs on the pool, once
  /// per such Welcome (twice the heartbeat liveness later; once for several
  /// within that), without taking capacity. What it throws is logged and
  /// counted as a handler error.
  service& on_welcome(welcome_hook h);

  const std::string& name() const { return name_; }
  unsigned capacity() const { return capacity_; }

 private:
  friend struct detail::worker_core;
  std::string name_;
  unsigned capacity_;
  struct event_handler {
    handler run;
    bool quick = false;
  };
  std::unordered_map<std::string, event_handler> events_;
  handler on_connect_;
  handler on_disconnect_;
  gone_hook on_gateway_gone_;
  welcome_hook on_welcome_;
};

struct worker_stats {
  std::uint64_t requests = 0;
  std::uint64_t replies = 0;
  std::uint64_t cancels = 0;
  std::uint64_t outbox_dropped = 0;
  std::uint64_t handler_errors = 0;
  std::uint64_t reconnects = 0;
  std::uint64_t acks_refused = 0;  // emit_with_ack and check_socket calls refused: pending_acks_limit awaited
  std::uint64_t requests_refused = 0;  // answered BUSY: queue_limit requests already waited for a handler thread
  std::uint64_t running = 0;  // requests taken and not done with (a handler, or an answer, still holds them)
  bool draining = false;      // drain() has begun
  std::uint64_t jobs_again = 0;      // jobs sent again that this worker held or answered: not run again
  std::uint64_t replies_resent = 0;  // kept answers sent again for those
  std::uint64_t kept_bytes = 0;      // what the kept answers hold now (kept_reply_bytes bounds it)
  std::uint64_t notices_resent = 0;     // one-way messages that died in a replaced socket, sent again
  std::uint64_t kept_notice_bytes = 0;  // what the kept one-way messages hold now (kept_notice_bytes bounds it)
  std::uint64_t held = 0;  // messages held until the broker welcomes a new socket (hwm bounds it)
  std::uint64_t recalled = 0;  // final answers the broker asked for again (Recall; the kept ones count in replies_resent)
  std::uint64_t gateways_gone = 0;  // GatewayGone announcements heard
  std::uint64_t requests_expired = 0;  // cancelled or past their deadline while they waited for a thread: not run
};

class worker {
 public:
  /// `context` may be shared (inproc endpoints need the broker's context).
  explicit worker(worker_options options, zmq::context_t* context = nullptr);
  ~worker();
  worker(const worker&) = delete;
  worker& operator=(const worker&) = delete;

  /// Adds a service; before start() only.
  void add(service s);
  /// Starts the I/O thread and the handler pool.
  void start();
  /// Instead of start(): the handler pool, and no I/O thread: the I/O
  /// loop's turns (quick handlers included) run on the thread that runs
  /// `context` (core/input_reactor.hpp). `sidecast demo --threads 1` runs
  /// its workers on the gateway's thread this way. Then stop() must be
  /// called once no thread runs `context` any more, and before it is
  /// destroyed: it releases what the worker holds there.
  void start_on(boost::asio::io_context& context);
  /// Cancels what runs (handlers not yet started never start; acks still
  /// awaited hear CANCELLED), sends what handlers queued and a Goodbye (the
  /// broker re-dispatches what this worker held at once), stops the threads. Idempotent, thread-safe: a
  /// second caller returns once the first has finished; a handler may stop
  /// its own worker (a quick one may not: std::logic_error, see
  /// service::on_quick). Before start(), it makes start() a no-op.
  void stop();
  /// Stops gracefully: the broker sends this worker nothing new from now on
  /// (other workers of its services get it), what it holds runs to its end
  /// for up to `timeout` (replies, progress emits and all), and so does a
  /// job the broker sent before it read the Drain (the broker's answer to
  /// the Drain comes after every such job; a worker not connected to a
  /// broker does not wait for it), then stop():
  /// what still runs is cancelled, and the broker gives it to another
  /// worker at once. True when nothing was left running. Thread-safe; not
  /// from a handler, nor after start_on() from the thread that runs the
  /// context (it would wait for itself: std::logic_error). After
  /// start_on() it does not stop the worker: its owner calls stop() then,
  /// as always once no thread runs the context.
  bool drain(std::chrono::milliseconds timeout);
  /// start(), then blocks until stop(), or until the I/O loop fails
  /// (failure() says why; call stop() then).
  void run();

  // Traffic not tied to a request. Thread-safe; false when the outbox stayed full.
  /// `report_delivered`: also get a DELIVERED report once the socket has
  /// taken it (queued for its client; failures are always reported).
  bool emit_to_sid(const std::string& nsp, const std::string& sid, std::string event,
                   std::string args_json, sidecast::attachments att = {}, bool report_delivered = false);
  bool emit_to_room(const std::string& nsp, const std::string& room, std::string event,
                    std::string args_json, std::vector<std::string> except_sids = {},
                    sidecast::attachments att = {});
  bool broadcast(const std::string& nsp, std::string event, std::string args_json,
                 std::vector<std::string> except_sids = {}, sidecast::attachments att = {});
  bool join(const std::string& nsp, const std::string& sid, const std::string& room);
  bool leave(const std::string& nsp, const std::string& sid, const std::string& room);
  bool disconnect(const std::string& nsp, const std::string& sid);
  // Room-wide, on every gateway (Socket.IO's io.in(room).socketsJoin(),
  // socketsLeave(), disconnectSockets()): every socket of namespace `nsp`
  // in room `in_room` (std::nullopt: every socket of `nsp`) joins or leaves
  // `room`, or is disconnected from `nsp`. Published as a room emit is:
  // behind this worker's room emits, applied by each gateway to the members
  // it has when it arrives; no delivery report. (The room comes before the
  // optional `in_room`, as in the Python SDK.)
  bool sockets_join(const std::string& nsp, const std::string& room, const std::optional<std::string>& in_room);
  bool sockets_leave(const std::string& nsp, const std::string& room, const std::optional<std::string>& in_room);
  bool disconnect_sockets(const std::string& nsp, const std::optional<std::string>& in_room);
  /// Every socket in `room` leaves it (Flask-SocketIO's close_room()).
  bool close_room(const std::string& nsp, const std::string& room);
  /// Asks the gateway of socket `sid` whether it still has it (a Control
  /// CHECK, answered by a delivery report): `done` runs on a handler thread
  /// with what it said, or with socket_state::unknown after `timeout` or when
  /// the worker stops first. `nsp` may be empty (the socket's own); a socket
  /// of another namespace than a named one reads unknown. False (and no
  /// call) for an empty `done`, when the outbox stayed full,
  /// pending_acks_limit acks and checks are awaited already, or the worker
  /// is stopping. on_report() does not see these reports (one that comes
  /// after its check's timeout, it does).
  bool check_socket(const std::string& nsp, const std::string& sid, check_hook done,
                    std::chrono::milliseconds timeout = std::chrono::seconds{10});

  /// Called (on a handler thread) for every delivery report: failures always,
  /// successes only for emits that asked for them. A reply the broker could
  /// not pass to its requester comes back as one too (REQUESTER_GONE, or
  /// REJECTED when the requester's pipe is full; ref() = the request id).
  /// May be set or replaced at any time, from any thread (an empty
  /// function: no callback).
  void on_report(std::function<void(const proto::DeliveryReport&)> callback);

  const std::string& id() const;
  /// True while the broker has welcomed this worker.
  bool connected() const;
  /// Why its I/O loop ended, when an error ended it (e.g. an endpoint
  /// libzmq refuses): the worker serves nothing any more.
  std::optional<std::string> failure() const;
  /// Called once the I/O loop fails (on its thread; set it before start()):
  /// with start_on() nothing waits in run(), so a main stops the process
  /// with it (sidecast demo).
  void on_failure(std::function<void()> callback);
  worker_stats stats() const;

 private:
  std::shared_ptr<detail::worker_core> core_;
};

}  // namespace sidecast
