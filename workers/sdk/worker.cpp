#include "workers/sdk/worker.hpp"

#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <condition_variable>
#include <deque>
#include <map>
#include <mutex>
#include <span>
#include <thread>
#include <unordered_map>
#include <utility>

#include <boost/asio/post.hpp>
#include <boost/json/parse.hpp>
#include <boost/json/serialize.hpp>
#include <spdlog/spdlog.h>

#include "core/bounded_queue.hpp"
#include "core/input_reactor.hpp"
#include "core/input_wait.hpp"
#include "core/kept_ring.hpp"
#include "core/log.hpp"
#include "core/peer_link.hpp"
#include "core/thread_spares.hpp"
#include "core/utf8.hpp"
#include "core/wakeup.hpp"

namespace sidecast {
namespace detail {

using clock = std::chrono::steady_clock;
using proto::Envelope;

// What a handler thread hands to the I/O thread.
struct outgoing {
  std::string topic;        // non-empty: publish on the PUB socket under this topic
  zmq::message_t envelope;  // serialized once, straight into the message that is sent
  bool answer = false;      // a Reply: never dropped, and not kept as a one-way message (see resend_lost)
  bool keep = false;        // a handler's answer: kept once sent (see had_before)
};

// A pending emit_with_ack (callback), or check_socket (check: settled by
// the delivery report its Control asks for, whose ref is this entry's id).
struct pending_ack {
  std::function<void(ack_result)> callback;
  clock::time_point deadline;
  check_hook check;
};

// What a check_socket's report says.
socket_state state_of(proto::DeliveryReport::Status status) {
  switch (status) {
    case proto::DeliveryReport::DELIVERED: return socket_state::present;
    case proto::DeliveryReport::CLIENT_GONE: return socket_state::gone;
    case proto::DeliveryReport::GATEWAY_GONE: return socket_state::no_gateway;
    default: return socket_state::unknown;  // REJECTED: another namespace, a full pipe, an older gateway
  }
}

// Memory for request states (each with its shared_ptr control block, one
// block): blocks freed on a worker's I/O thread are kept there for its next
// requests, so a request that starts and ends on the I/O thread (a quick
// handler's) costs no allocation. Blocks freed on any other thread go back
// to the heap, as they all came from it.
using spare_blocks = core::spare_lists<1, 1024>;  // one size: request states

// The I/O thread's spares while its loop runs; null on every other thread.
thread_local spare_blocks* io_spares = nullptr;

template <typename T>
struct io_thread_allocator {
  using value_type = T;
  io_thread_allocator() = default;
  template <typename U>
  io_thread_allocator(const io_thread_allocator<U>&) noexcept {}
  T* allocate(std::size_t n) {
    static_assert(alignof(T) <= __STDCPP_DEFAULT_NEW_ALIGNMENT__);
    return static_cast<T*>(io_spares ? io_spares->take(n * sizeof(T)) : ::operator new(n * sizeof(T)));
  }
  void deallocate(T* p, std::size_t n) noexcept {
    if (io_spares) io_spares->give(p, n * sizeof(T));
    else ::operator delete(p);
  }
  friend bool operator==(const io_thread_allocator&, const io_thread_allocator&) { return true; }
};

// A request's strings. The I/O thread keeps the sets that requests are done
// with and swaps their buffers into the next requests it parses, so a
// request's strings cost no allocation once the buffers are big enough.
struct request_fields {
  std::string id, service, sid, nsp, event, user, args, auth;
  sidecast::attachments att;
};

struct request_state {
  std::shared_ptr<worker_core> core;
  request::kind type = request::kind::event;
  std::unique_ptr<request_fields> f;
  bool wants_reply = true;
  unsigned attempt = 1;
  std::atomic<bool> answered{false};
  // Held from deciding an answer to queueing it: an ack and the reply made
  // on two threads reach the outbox in the order they were decided (the
  // final one first would end the job at the broker, which would then drop
  // the ack, and the client get nothing).
  std::mutex answer_mutex;
  std::atomic<bool> acked{false};  // answered early; the final reply is silent
  std::atomic<bool> replied{false};  // the final reply is in the outbox (see had_before)

  // The cancel token is made when a handler first asks for it; most never
  // do, and a std::stop_source is a heap block. A Cancel (I/O thread) and
  // cancel() (a handler's thread) meet under the mutex.
  const cancel_token& token() {
    std::lock_guard lock{cancel_mutex};
    if (!token_) {
      stop_ = std::stop_source{};
      if (cancel_asked_) stop_.request_stop();
      shared_deadline_ = std::make_shared<std::atomic<clock::rep>>(deadline_.time_since_epoch().count());
      token_.emplace(stop_.get_token(), shared_deadline_);
    }
    return *token_;
  }
  void cancel() {
    std::lock_guard lock{cancel_mutex};
    cancel_asked_ = true;
    if (token_) stop_.request_stop();
  }
  void set_deadline(clock::time_point at) {
    std::lock_guard lock{cancel_mutex};
    deadline_ = at;
    if (shared_deadline_) shared_deadline_->store(at.time_since_epoch().count());
  }
  clock::time_point deadline() {
    std::lock_guard lock{cancel_mutex};
    return deadline_;
  }
  // Why a request that waited for a handler thread is not to run: cancelled
  // meanwhile, or past its deadline (the requester has had its TIMEOUT).
  std::optional<proto::Code> over(clock::time_point now) {
    std::lock_guard lock{cancel_mutex};
    if (now >= deadline_) return proto::TIMEOUT;  // its deadline also fires cancel()
    if (cancel_asked_) return proto::CANCELLED;
    return std::nullopt;
  }

  ~request_state();

 private:
  std::mutex cancel_mutex;
  clock::time_point deadline_;
  std::shared_ptr<std::atomic<clock::rep>> shared_deadline_;  // the token's (and its copies'), once made
  bool cancel_asked_ = false;
  std::stop_source stop_{std::nostopstate};
  std::optional<cancel_token> token_;
};

// A fixed pool of handler threads fed through one queue. Its requests are
// bounded by the broker's credits (a worker never holds more requests than
// its capacity) and by queue_limit; acks and reports by their own limits.
//
// stop() runs what the queue holds, then joins the threads — all but the
// caller's, when a handler stops its own worker: that thread runs what the
// others left (with one thread, everything) before stop() returns, and is
// then let go to finish its own task. That task may hold the last reference
// to the worker, and so to this pool, so the threads share the queue's state
// rather than point into the pool.
class thread_pool {
 public:
  void start(std::size_t n) {
    for (std::size_t i = 0; i < n; ++i) threads_.emplace_back([s = state_] { run(*s); });
  }
  void post(std::function<void()> task) {
    {
      std::lock_guard lock{state_->mutex};
      state_->tasks.push_back(std::move(task));
    }
    state_->ready.notify_one();
  }
  std::size_t pending() {
    std::lock_guard lock{state_->mutex};
    return state_->tasks.size();
  }
  bool on_pool_thread() const { return current == state_.get(); }

  void stop() {
    {
      std::lock_guard lock{state_->mutex};
      state_->stopping = true;
    }
    state_->ready.notify_all();
    bool caller_is_ours = false;
    for (auto& t : threads_) {
      if (t.get_id() == std::this_thread::get_id()) {
        t.detach();
        caller_is_ours = true;
      } else if (t.joinable()) {
        t.join();
      }
    }
    threads_.clear();
    if (caller_is_ours) run(*state_);  // returns once the queue is empty
  }

 private:
  struct state {
    std::mutex mutex;
    std::condition_variable ready;
    std::deque<std::function<void()>> tasks;
    bool stopping = false;
  };
  static inline thread_local const state* current = nullptr;  // the pool a thread serves
  static void run(state& s) {
    current = &s;
    for (;;) {
      std::function<void()> task;
      {
        std::unique_lock lock{s.mutex};
        s.ready.wait(lock, [&] { return s.stopping || !s.tasks.empty(); });
        if (s.tasks.empty()) return;
        task = std::move(s.tasks.front());
        s.tasks.pop_front();
      }
      try {
        task();
      } catch (const std::exception& e) {
        // A callback's exception (an ack's, a report's) ends neither the
        // thread nor the process. Handlers catch their own: they answer.
        spdlog::error("worker callback threw: {}", e.what());
      } catch (...) {
        spdlog::error("worker callback threw a non-exception");
      }
    }
  }
  std::shared_ptr<state> state_ = std::make_shared<state>();
  std::vector<std::thread> threads_;  // start() and stop() only: see worker_core::stop
};

struct worker_core : std::enable_shared_from_this<worker_core> {
  worker_options options;
  zmq::context_t* context;
  std::unique_ptr<zmq::context_t> own_context;
  std::vector<service> services;
  std::unordered_map<std::string, const service*> by_name;

  core::bounded_queue<outgoing> outbox;
  core::wakeup wake;
  std::thread io_thread;
  boost::asio::io_context* attached = nullptr;  // start_on()'s context
  std::atomic<std::thread::id> io_thread_id{};  // set by the I/O thread itself, while it runs
  thread_pool pool;
  std::atomic<bool> stopping{false};
  std::atomic<bool> started{false};
  std::atomic<bool> welcomed{false};
  // start() and stop() come from any thread (a signal handler's, a
  // handler's, the owner's destructor): io_thread, the pool's threads and
  // `stopped` are theirs, under this mutex.
  std::mutex lifecycle_mutex;
  std::condition_variable lifecycle_changed;
  bool stopped = false;  // stop() has finished
  std::optional<std::string> failure;  // the I/O loop ended on an error (a bad endpoint, ...)
  std::function<void()> failure_handler;  // worker::on_failure (set before start)

  // I/O thread only.
  // When the loop woke: one clock reading per turn, shared by the requests
  // it takes (their deadlines), its heartbeats and its ack expiry.
  clock::time_point turn_now{};
  std::unordered_map<std::string, std::weak_ptr<request_state>> in_flight;
  // The tracked requests by deadline, soonest first (a heap; I/O thread
  // only): fire_deadlines(). Bounded as in_flight is, swept the same way.
  using deadline_entry = std::pair<clock::time_point, std::weak_ptr<request_state>>;
  std::vector<deadline_entry> deadlines;
  std::size_t deadlines_sweep_at = 1024;
  std::unordered_map<std::string, pending_ack> acks;
  std::multimap<clock::time_point, std::string> ack_deadlines;
  std::size_t sweep_at = 1024;
  core::log_limiter log_limit;
  proto::Request parsed;  // requests are parsed into it (see take_request)
  // Answers made while the outbox was full, on any thread (see enqueue):
  // never refused, so not bounded by the outbox; each request is answered
  // at most twice (an early ack and the reply), so by what runs at once.
  std::mutex beside_mutex;
  std::vector<outgoing> beside;
  bool io_queued = false;  // the I/O thread queued something in this turn (see io_turn)
  struct io_objects;
  std::unique_ptr<io_objects> io;  // the loop's sockets: see io_loop
  std::vector<std::unique_ptr<request_fields>> spare_fields;  // see recycle()
  // The answers sent last (see worker_options::kept_replies), looked up
  // only for a job sent again, by the id in the bytes.
  core::kept_ring<> kept{options.kept_replies, options.kept_reply_bytes};
  // The one-way messages sent that the broker has not said it read (see
  // worker_options::kept_notices), and the link's received_by_broker().count
  // and read_by_broker() as last acted on (resend_lost, forget_read).
  core::kept_sends notices{options.kept_notices, options.kept_notice_bytes};
  std::uint64_t received_seen = 0;
  core::link_position read_seen;
  bool holding = false;  // what the handlers queue waits for the link's Welcome (see send_in_order)
  bool ever_welcomed = false;              // a Welcome came since start (on_welcomed)
  std::uint64_t fresh_welcomes_seen = 0;   // the link's fresh_welcomes() at the last on_welcomed
  std::uint64_t broker_restarts_seen = 0;  // and its broker_restarts() (a broker of another
                                           // incarnation that knew the link: the other of a pair)
  std::optional<clock::time_point> welcome_due;  // when the welcome hooks run (run_welcome_hooks)
  bool welcome_first = false;                    // ... for the first Welcome
  std::vector<outgoing> held_out;  // ... here
  std::vector<outgoing> given_back;  // held too: what a standby gave back (on_message), to go ahead of held_out
  static constexpr std::size_t max_spare_fields = 1024;
  static constexpr std::size_t max_spare_bytes = 16 * 1024;

  // Shared between threads.
  std::mutex acks_mutex;  // guards acks/ack_deadlines registration from handler threads
  bool io_closed = false;  // under acks_mutex: the I/O loop is gone (stop, or a failure): nothing more is awaited
  // Ack ids are "<worker id>:<n>", n from a random point below 2^48 at each
  // start: a client's ack to an emit of an earlier start under the same id
  // (pinned, or the same host and pid: pid 1 in a container) must not
  // answer one of this start's.
  std::atomic<std::uint64_t> next_ack{core::draw_incarnation() >> 16};
  using report_fn = std::function<void(const proto::DeliveryReport&)>;
  std::mutex text_log_mutex;  // handlers on any thread log through one limiter
  core::log_limiter text_log_limit;
  std::mutex report_mutex;  // worker::on_report may replace the callback at any time
  std::shared_ptr<const report_fn> report_callback;
  std::atomic<std::uint64_t> n_requests{0}, n_replies{0}, n_cancels{0}, n_dropped{0}, n_errors{0},
      n_reconnects{0}, n_acks_refused{0}, n_requests_refused{0}, n_jobs_again{0}, n_replies_resent{0},
      kept_bytes{0}, n_notices_resent{0}, kept_notice_bytes{0}, n_held{0},
      n_recalled{0}, n_gateways_gone{0},  // the six before this line: written by the I/O thread only
      n_requests_expired{0};
  // Requests posted to the pool, not yet started (the pool's queue also
  // holds ack and report callbacks, which have bounds of their own).
  std::atomic<std::size_t> requests_waiting{0};
  // Requests taken and not yet done with (their state still exists: a
  // handler, or an answer, still holds them); drain() waits for none.
  std::atomic<std::size_t> live_requests{0};
  std::atomic<bool> drain_asked{false};  // the I/O thread tells the broker (peer_link::drain)
  // The broker confirmed the Drain (peer_link::drain_confirmed), or there is
  // no broker to send more: nothing new will arrive. Set by the I/O thread.
  std::atomic<bool> drain_settled{false};
  // How long the last messages (replies, the Goodbye) may take to leave
  // once the link is closed: a broker that is gone costs stop() that long.
  static constexpr std::chrono::milliseconds goodbye_linger{500};

  explicit worker_core(worker_options o, zmq::context_t* ctx)
      : options{std::move(o)}, context{ctx}, outbox{options.outbox_limit} {
    // The PUB follows the link to the broker it is on (follow_link()): with
    // a backup broker and not its XSUB, it would stay with the old broker
    // after a failover, and every room event published to it be lost.
    if (options.backup_broker.empty() != options.backup_publish.empty())
      throw std::invalid_argument(
          "worker_options: backup_broker and backup_publish go together (a broker pair's other ROUTER and XSUB)");
    if (!context) {
      own_context = std::make_unique<zmq::context_t>(1);
      context = own_context.get();
    }
    if (options.id.empty()) {
      char host[64] = {};
      ::gethostname(host, sizeof host - 1);
      std::string h{host};
      std::erase_if(h, [](char c) { return c == '.' || c == ':'; });
      options.id = "w-" + h + "-" + std::to_string(::getpid());
    }
  }

  // An answer (out.answer) is never dropped: it also frees the request's
  // credit at the broker.
  bool enqueue(outgoing out) {
    if (stopping) {
      ++n_dropped;  // a handler still running as the worker stops: counted, not lost in silence
      return false;
    }
    const bool reply = out.answer;
    // The I/O thread drains the outbox, so it must never wait for room, nor
    // wake itself: it drains the outbox before it polls again.
    bool on_io_thread = turning == this;
    if (on_io_thread) io_queued = true;  // the turn sends it after the message it answers
    if (reply) {
      // Never waits, never dropped (its request's credit at the broker):
      // past a full outbox it waits beside it, as every answer after it
      // does until the lane is taken (answers leave in the order they came:
      // an early ack before its reply), and goes after what the outbox held
      // then (send_queued), so after its handler's own emits.
      std::lock_guard lock{beside_mutex};
      if (!beside.empty() || !outbox.try_push(std::move(out))) beside.push_back(std::move(out));
      if (!on_io_thread) wake.signal();
      return true;
    }
    if (outbox.try_push(std::move(out))) {
      if (!on_io_thread) wake.signal();
      return true;
    }
    if (!on_io_thread && outbox.push_wait(std::move(out), options.outbox_wait)) {
      wake.signal();
      return true;
    }
    ++n_dropped;
    return false;
  }

  bool send(const Envelope& env) { return enqueue({.envelope = core::message_of(env)}); }

  // A room (room != nullptr) or namespace emit, over the PUB socket.
  // Protobuf strings must be UTF-8: an event name, a room or a sid that is
  // not would make a message the broker refuses as malformed, dropped far
  // from its cause. Refused here instead: false, and a (rate-limited) log.
  bool all_utf8(std::initializer_list<std::string_view> texts, std::string_view what) {
    for (auto text : texts) {
      if (core::valid_utf8(text)) continue;
      std::lock_guard lock{text_log_mutex};
      if (text_log_limit.allow()) spdlog::warn("worker {}: {} not sent: a name in it is not valid UTF-8", options.id, what);
      return false;
    }
    return true;
  }

  bool publish_to(const std::string& nsp, const std::string* room, std::string event, std::string args,
                  std::vector<std::string> except_sids, sidecast::attachments att) {
    if (!all_utf8({nsp, event, room ? std::string_view{*room} : std::string_view{}}, "an emit")) return false;
    for (const auto& s : except_sids)
      if (!all_utf8({s}, "an emit")) return false;
    Envelope env;
    auto* e = env.mutable_emit();
    *e = make_emit(nsp, std::move(event), std::move(args), std::move(att));
    if (room) e->set_room(*room);
    else e->set_broadcast(true);
    for (auto& s : except_sids) e->add_except_sids(std::move(s));
    return enqueue({.topic = proto::topic_for(*e), .envelope = core::message_of(env)});
  }

  // A room-wide Control: published on the room's (or the namespace's)
  // topic, behind this worker's room emits.
  bool publish_control(proto::Control::Action action, const std::string& nsp,
                       const std::optional<std::string>& in_room, const std::string& room) {
    if (!all_utf8({nsp, room, in_room.value_or("")}, "a room-wide join, leave or disconnect")) return false;
    Envelope env;
    auto* c = env.mutable_control();
    c->set_action(action);
    c->set_nsp(nsp);
    c->set_room(room);
    if (in_room) c->set_in_room(*in_room);
    else c->set_in_namespace(true);
    c->set_origin(options.id);
    auto topic = proto::topic_for(*c);
    if (topic.empty()) {  // no namespace: the broker would drop it
      std::lock_guard lock{text_log_mutex};
      if (text_log_limit.allow())
        spdlog::warn("worker {}: a room-wide join, leave or disconnect names no namespace: not sent", options.id);
      return false;
    }
    return enqueue({.topic = std::move(topic), .envelope = core::message_of(env)});
  }

  proto::Emit make_emit(const std::string& nsp, std::string event, std::string args,
                        sidecast::attachments att) {
    proto::Emit e;
    e.set_nsp(nsp);
    e.set_event(std::move(event));
    e.set_args(std::move(args));
    for (auto& a : att) e.add_attachments(std::move(a));
    e.set_origin(options.id);
    return e;
  }

  bool emit_to_sid(const std::string& nsp, const std::string& sid, std::string event, std::string args,
                   sidecast::attachments att, std::string ack_id = {}, bool report_delivered = false) {
    if (!all_utf8({nsp, sid, event}, "an emit")) return false;
    Envelope env;
    auto* e = env.mutable_emit();
    *e = make_emit(nsp, std::move(event), std::move(args), std::move(att));
    e->set_sid(sid);
    e->set_ack_id(std::move(ack_id));
    e->set_report_delivery(report_delivered);
    return send(env);
  }

  bool control(proto::Control::Action action, const std::string& nsp, const std::string& sid,
               const std::string& room) {
    if (!all_utf8({nsp, sid, room}, "a join, leave or disconnect")) return false;
    Envelope env;
    auto* c = env.mutable_control();
    c->set_action(action);
    c->set_nsp(nsp);
    c->set_sid(sid);
    c->set_room(room);
    c->set_origin(options.id);
    return send(env);
  }

  // Any thread answers. The Reply is written straight into the message that
  // is sent (proto::encode_reply): nothing is copied on the way.
  bool answer(request_state& st, proto::Code code, std::string_view message, std::string_view args,
              std::span<const std::string> att, bool silent, bool partial = false) {
    std::lock_guard order{st.answer_mutex};
    if (partial ? (st.answered || st.acked.exchange(true)) : st.answered.exchange(true)) return false;
    if (!partial && st.acked) {
      // The requester has its answer: this only frees the capacity.
      code = proto::OK;
      silent = true;
      args = {};
      att = {};
    }
    // The message is a protobuf string: the broker refuses a Reply whose
    // message is not UTF-8, and the requester would wait for its deadline.
    if (!core::valid_utf8(message)) message = "(the handler's error message was not valid UTF-8)";
    const proto::reply_fields r{.id = st.f->id,
                                .code = code,
                                .message = message,
                                .args = args,
                                .attachments = att,
                                .silent = silent,
                                .partial = partial};
    zmq::message_t reply{proto::encoded_size(r)};
    proto::encode_reply(r, static_cast<char*>(reply.data()));
    if (!partial) ++n_replies;
    // Never refused for a full outbox (enqueue): it also frees the credit.
    enqueue({.envelope = std::move(reply), .answer = true, .keep = true});
    if (!partial) st.replied = true;
    return true;
  }

  std::size_t pool_threads() const {
    std::size_t capacity = 0;
    for (const auto& s : services) capacity += s.capacity();
    return options.threads ? options.threads : std::min<std::size_t>(std::max<std::size_t>(capacity, 1), 256);
  }

  void start() {
    std::lock_guard lock{lifecycle_mutex};
    if (started) throw std::logic_error("worker::start() twice");
    started = true;
    if (stopping) return;  // stopped before it started: nothing to run
    pool.start(pool_threads());
    io_thread = std::thread([self = shared_from_this()] { self->io_loop(); });
  }

  // The first caller stops the threads; any other waits until that is done
  // (so a destructor racing a signal handler's stop() never frees what the
  // stop still uses), unless it is one of those threads.
  void stop() {
    if (std::this_thread::get_id() == io_thread_id.load())
      throw std::logic_error("worker::stop() from a quick handler: call it from a pool handler or another thread");
    std::unique_lock lock{lifecycle_mutex};
    if (stopping.exchange(true)) {
      // A handler's stop() returns at once: the first stop() joins its thread.
      if (!pool.on_pool_thread()) lifecycle_changed.wait(lock, [&] { return stopped; });
      return;
    }
    auto io_t = std::move(io_thread);
    lock.unlock();
    wake.signal();
    if (io_t.joinable()) {
      io_t.join();
    } else if (attached && io_thread_id.load() != std::thread::id{}) {
      close_io();  // start_on(): no thread runs the context now (see worker.hpp)
    }
    outbox.close();
    pool.stop();  // without the lock: a handler it waits for may call stop()
    lock.lock();
    stopped = true;
    lifecycle_changed.notify_all();
  }

  // A request's state is gone: one fewer for drain() to wait for. The
  // count and drain_asked are both seq_cst (drain() stores the flag, then
  // reads the count; this changes the count, then reads the flag): with
  // weaker orders both could read the old value, and drain() would sleep
  // through its last request until its timeout. (drain_settled, set once
  // the Drain went out, is read after drain_asked was set, under the mutex.)
  void request_done() {
    if (live_requests.fetch_sub(1) != 1 || !drain_asked) return;
    std::lock_guard lock{lifecycle_mutex};  // drain() is between its check and its wait, or waiting
    lifecycle_changed.notify_all();
  }

  bool drain(std::chrono::milliseconds timeout) {
    if (pool.on_pool_thread() || std::this_thread::get_id() == io_thread_id.load())
      throw std::logic_error(
          "worker::drain() from a handler, or from the thread that runs the worker's I/O: it would wait for itself");
    drain_asked = true;
    wake.signal();  // the I/O thread sends the Drain
    // Done when nothing runs and nothing more can come: a job the broker
    // dispatched just before it read the Drain may still be on its way.
    // (Not welcomed: not started, or no broker now; the I/O thread settles
    // the drain if it loses the broker while this waits.)
    bool idle, settled;
    {
      std::unique_lock lock{lifecycle_mutex};
      auto done = [&] { return live_requests.load() == 0 && (drain_settled || !welcomed); };
      lifecycle_changed.wait_for(lock, timeout, [&] { return done() || stopped || failure; });
      idle = live_requests.load() == 0;
      settled = done() || stopped || failure;
    }
    if (!idle)
      spdlog::warn("worker {}: drain timed out with {} requests running", options.id, live_requests.load());
    else if (!settled)
      spdlog::warn("worker {}: drain timed out before the broker confirmed it", options.id);
    if (!attached) stop();  // start_on(): its owner stops it once no thread runs the context
    return idle;
  }

  void wait_stopped() {
    std::unique_lock lock{lifecycle_mutex};
    lifecycle_changed.wait(lock, [&] { return stopped || failure; });
  }

  // The I/O loop: on a thread of its own (start()), or in turns on the
  // thread of an io_context (start_on(), core/input_reactor.hpp). Either
  // way the same three steps: before_wait(), the wait, io_turn().
  void io_loop() {
    io_thread_id = std::this_thread::get_id();
    try {
      open_io();
      while (!stopping) {
        auto timeout = std::max(std::chrono::duration_cast<std::chrono::milliseconds>(before_wait() - clock::now()),
                                std::chrono::milliseconds(0));
        try {
          io->input.wait(timeout + std::chrono::milliseconds(1));
        } catch (const zmq::error_t& e) {
          if (e.num() == EINTR) continue;
          throw;
        }
        io_turn();
      }
    } catch (const std::exception& e) {
      spdlog::critical("worker {} I/O thread failed: {}", options.id, e.what());
      fail(e.what());
    }
    close_io();
  }

  // The I/O loop cannot go on: run() returns, on_failure's handler runs.
  void fail(std::string why) {
    {
      std::lock_guard lock{lifecycle_mutex};
      failure = std::move(why);
    }
    lifecycle_changed.notify_all();
    if (failure_handler) failure_handler();
  }

  void start_on(boost::asio::io_context& io_context) {
    std::lock_guard lock{lifecycle_mutex};
    if (started) throw std::logic_error("worker::start() twice");
    started = true;
    if (stopping) return;
    pool.start(pool_threads());
    attached = &io_context;
    boost::asio::post(io_context, [self = shared_from_this()] { self->open_attached(); });
  }

  void open_attached() {
    if (stopping) return;
    io_thread_id = std::this_thread::get_id();
    try {
      open_io();
      io->reactor = std::make_unique<core::input_reactor>(
          *attached, io->input,
          [this] {
            if (stopping) return;
            io_turn();
            io->reactor->next(before_wait());
          },
          "worker " + options.id + " I/O");
      io->reactor->on_failure([this](const std::string& why) { fail(why); });  // a turn threw: the loop ends
      io->link.hook(io->reactor->poker(link_index));  // the broker's messages schedule a turn
      io->reactor->next(before_wait());               // before_wait() watches the input
    } catch (const std::exception& e) {
      spdlog::critical("worker {} I/O failed: {}", options.id, e.what());
      fail(e.what());
    }
  }

  // What the I/O loop owns (made on the thread that runs it).
  struct io_objects {
    io_objects(zmq::context_t& context, const core::peer_link_options& lo)
        : link{context, lo}, pub{context, zmq::socket_type::pub} {}
    spare_blocks spares;  // see io_thread_allocator
    core::peer_link link;
    zmq::socket_t pub;
    std::vector<outgoing> batch;
    alignas(16) std::array<char, 8192> arena_block;
    std::function<bool(std::string_view)> take;
    core::input_wait input;
    std::size_t wake_in = 0;
    std::optional<std::uint64_t> input_for;  // the link's reconnect count when input was set up
    bool pub_on_backup = false;  // pub is connected to options.backup_publish (follow_link())
    std::unique_ptr<core::input_reactor> reactor;  // start_on() only; goes first
  };
  static constexpr std::size_t link_index = 0;  // the link's place in io->input

  void open_io() {
    core::peer_link_options lo;
    lo.endpoint = options.broker;
    lo.backup_endpoint = options.backup_broker;
    lo.id = options.id;
    lo.role = proto::ROLE_WORKER;
    lo.heartbeat_interval = options.heartbeat_interval;
    lo.heartbeat_liveness = options.heartbeat_liveness;
    lo.sndhwm = lo.rcvhwm = options.hwm;
    lo.curve = {options.curve_secret, options.curve_server_key};
    for (const auto& s : services) lo.services.emplace_back(s.name(), s.capacity());
    io = std::make_unique<io_objects>(*context, lo);
    auto& pub = io->pub;
    pub.set(zmq::sockopt::linger, 0);
    pub.set(zmq::sockopt::sndhwm, options.hwm);
    core::apply(pub, lo.curve);
    if (!options.publish.empty()) pub.connect(options.publish);  // of a broker pair: follow_link() moves it
    io->take = [this](std::string_view bytes) { return take_request(bytes); };
  }

  // Before the wait: when the loop must wake at the latest.
  clock::time_point before_wait() {
    auto& o = *io;
    auto wake_at = o.link.next_tick();
    {
      std::lock_guard lock{acks_mutex};
      if (!ack_deadlines.empty()) wake_at = std::min(wake_at, ack_deadlines.begin()->first);
    }
    // Those of requests already done with go first: no wake-up for them.
    while (!deadlines.empty() && deadlines.front().second.expired()) {
      std::pop_heap(deadlines.begin(), deadlines.end(), later_deadline);
      deadlines.pop_back();
    }
    if (!deadlines.empty()) wake_at = std::min(wake_at, deadlines.front().first);
    if (welcome_due && o.link.welcomed()) wake_at = std::min(wake_at, *welcome_due);  // unwelcomed: not yet
    // First turn, or the link made a new socket (which may sit at the
    // old one's address, its descriptor at the old number).
    if (o.input_for != o.link.stats().reconnects) {
      o.input_for = o.link.stats().reconnects;
      o.input = {};
      o.input.add(o.link.fd(), [&link = o.link] { return link.has_input(); });  // link_index
      o.wake_in = o.input.add(wake.fd());
      if (o.reactor) o.reactor->watch();
    }
    return wake_at;
  }

  // After the wait: what it found, what the handlers sent, heartbeats.
  void io_turn() {
    auto& o = *io;
    auto& link = o.link;
    turn_scope scope{this};
    auto now = turn_now = clock::now();
    if (o.input.ready(o.wake_in)) wake.drain();
    if (drain_asked && !link.draining()) {
      link.drain();
      spdlog::info("worker {} draining: the broker sends it nothing new", options.id);
    }
    // Every send of the turn comes before the recv that finds the socket
    // empty: what the pool's handlers sent first, then what each quick
    // handler sends as soon as it returns. That recv also takes any command
    // a send left in the mailbox, so the socket needs no ZMQ_EVENTS before
    // the wait (a system call saved per turn, and one less before the
    // replies go out, since libzmq's I/O thread on the same core waits for
    // this one to block).
    bool unasked = send_in_order();  // sent since the socket was last found empty
    for (int i = 0; i < 1024 && o.input.ready(link_index); ++i) {
      // A Request goes to take_request() unparsed; anything else is
      // parsed on an arena over a reused block (what on_message keeps of
      // it is swapped out), so the envelope never needs the heap.
      google::protobuf::Arena arena{proto::arena_on(o.arena_block)};
      auto& env = *google::protobuf::Arena::CreateMessage<Envelope>(&arena);
      if (!link.receive_into(env, o.take)) {
        o.input.drained(link_index);
        unasked = false;
        break;
      }
      if (env.kind_case() != Envelope::KIND_NOT_SET) on_message(env);  // else take_request() had it
      if (io_queued) unasked = send_in_order() || unasked;
    }
    if (io_queued || holding || link.received_by_broker().count != received_seen)
      unasked = send_in_order() || unasked;
    if (link.read_by_broker() != read_seen) forget_read();
    if (now >= link.next_tick()) {
      link.tick(now);
      unasked = true;
    }
    if (link.on_backup() != o.pub_on_backup) follow_link();
    // A send after that recv may have taken the command that announces new
    // input: ask the socket before blocking. Otherwise its descriptor will tell.
    if (unasked) o.input.used(link_index);
    welcomed = link.welcomed();
    if (welcomed && (link.fresh_welcomes() != fresh_welcomes_seen || link.broker_restarts() != broker_restarts_seen))
      on_welcomed(now);
    run_welcome_hooks(now);
    if (link.draining() && !drain_settled && (link.drain_confirmed() || !link.welcomed())) {
      drain_settled = true;
      std::lock_guard lock{lifecycle_mutex};
      lifecycle_changed.notify_all();
    }
    n_reconnects.store(link.stats().reconnects, std::memory_order_relaxed);  // for stats()
    expire_acks(now);
    fire_deadlines(now);
  }

  // Of a broker pair: the PUB publishes to the broker the link is on (only
  // the active one takes events), and leaves the other, so that one that
  // stopped and comes back has nothing of ours to deliver late.
  void follow_link() {
    auto& o = *io;
    const auto& from = o.pub_on_backup ? options.backup_publish : options.publish;
    o.pub_on_backup = o.link.on_backup();
    const auto& to = o.pub_on_backup ? options.backup_publish : options.publish;
    if (from.empty() || to.empty()) return;
    o.pub.disconnect(from);
    o.pub.connect(to);
  }

  // Sends what the handlers queued (send_queued), after what died in a
  // socket the link replaced (resend_lost). While the link waits for the
  // broker's Welcome on its new socket (peer_link::holding()), which those
  // are is not known yet: what the handlers queue is held (held_out), and
  // goes once the Welcome came, after them. True when it sent on the link.
  bool send_in_order() {
    bool sent = false;
    if (io->link.received_by_broker().count != received_seen) sent = resend_lost();
    holding = io->link.holding();
    return send_queued() || sent;
  }

  // Sends what waits in the outbox (the pool's messages, and the I/O
  // thread's own) and beside it, after what was held; while `holding`,
  // holds it instead, up to worker_options::hwm messages (the link's own
  // queue bound), past which it goes at once. True when it sent on the link.
  bool send_queued() {
    auto& o = *io;
    io_queued = false;
    // The answers beside the full outbox are taken with what it holds, at
    // once for enqueue (the lock): each came after its handler's emits, in
    // the outbox then, and before any answer the outbox takes after.
    std::vector<outgoing> answers;
    {
      std::lock_guard lock{beside_mutex};
      answers.swap(beside);
      outbox.drain(o.batch);
    }
    for (auto& out : answers) o.batch.push_back(std::move(out));
    bool on_link = false;
    if (!holding && (!given_back.empty() || !held_out.empty())) {
      for (auto* held : {&given_back, &held_out}) {
        for (auto& out : *held) on_link = send_one(out) || on_link;
        held->clear();
        if (held->capacity() > 1024) *held = std::vector<outgoing>{};
      }
    }
    for (auto& out : o.batch) {
      if (holding && may_hold()) held_out.push_back(std::move(out));
      else on_link = send_one(out) || on_link;
    }
    count_held();
    o.batch.clear();
    if (o.batch.capacity() > 1024) o.batch = std::vector<outgoing>{};  // a burst leaves no large buffer behind
    return on_link;
  }

  // Fewer than worker_options::hwm held (held_out and given_back).
  bool may_hold() const { return held_out.size() + given_back.size() < static_cast<std::size_t>(options.hwm); }
  void count_held() { n_held.store(held_out.size() + given_back.size(), std::memory_order_relaxed); }

  // True when it went on the link (else to the PUB socket).
  bool send_one(outgoing& out) {
    auto& o = *io;
    if (auto limit = o.link.max_message_bytes(); limit != 0 && out.envelope.size() > limit && !shrink(out, limit))
      return false;
    if (!out.topic.empty()) {
      o.pub.send(zmq::buffer(out.topic), zmq::send_flags::sndmore | zmq::send_flags::dontwait);
      o.pub.send(out.envelope, zmq::send_flags::dontwait);
      return false;
    }
    if (!out.answer) {
      send_notice(std::move(out.envelope));
      return true;
    }
    if (out.keep) keep_reply(out.envelope);
    if (!o.link.send_message(std::move(out.envelope))) ++n_dropped;
    return true;
  }

  // A message larger than the broker takes (Welcome.max_message_bytes)
  // would cost the worker its connection, and every message in flight on
  // it. An answer goes as an error instead (its client hears why, and the
  // broker gets the capacity back); anything else is dropped, counted.
  // False when nothing is to be sent.
  bool shrink(outgoing& out, std::uint64_t limit) {
    auto size = out.envelope.size();
    if (log_limit.allow())
      spdlog::error("worker {}: a message of {} bytes is more than the broker takes ({}, its --max-message-bytes): {}",
                    options.id, size, limit, out.answer ? "answered INTERNAL instead" : "dropped");
    Envelope env;
    bool read = env.ParseFromArray(out.envelope.data(), static_cast<int>(size));
    if (!out.answer) {
      ++n_dropped;
      // An emit_with_ack's callback hears so now, not at its timeout.
      if (read && env.has_emit() && !env.emit().ack_id().empty()) {
        proto::Reply refused;
        refused.set_id(env.emit().ack_id());
        refused.set_code(proto::INTERNAL);
        refused.set_message("the emit is " + std::to_string(size) + " bytes, more than the broker takes (" +
                            std::to_string(limit) + ")");
        refused.set_args("[]");
        on_ack(refused);
      }
      return false;
    }
    if (!read || !env.has_reply()) {
      ++n_dropped;  // cannot happen: every answer is a Reply this SDK made
      return false;
    }
    auto& r = *env.mutable_reply();
    r.set_code(proto::INTERNAL);
    r.set_message("the answer is " + std::to_string(size) + " bytes, more than the broker takes (" +
                  std::to_string(limit) + ")");
    r.set_args("[]");
    r.clear_attachments();
    r.set_silent(false);
    out.envelope = core::message_of(env);
    return true;
  }

  // A one-way message (an emit to a sid, a join, a leave, a disconnect),
  // kept once sent (resend_lost).
  bool send_notice(zmq::message_t&& message) {
    core::kept_sends::entry e;
    if (!io->link.send_message(std::move(message), e)) {
      ++n_dropped;
      return false;
    }
    notices.push(std::move(e));  // keeps nothing when kept_notices is 0
    kept_notice_bytes.store(notices.bytes(), std::memory_order_relaxed);
    return true;
  }

  // The broker's Welcome on a new socket said how much of what the old one
  // sent it read (a broker that stalled past the link's liveness, a network
  // that did); the rest died with the old socket. The kept one-way messages
  // among it go again, in the order they were first sent, on the new
  // socket: the broker never read them, so none acts twice. (Answers are
  // not among them: the broker sends their jobs again, and had_before
  // answers from the kept ones.) True when it sent on the link.
  bool resend_lost() {
    const auto& received = io->link.received_by_broker();
    received_seen = received.count;
    std::vector<core::kept_sends::entry> lost;
    core::take_lost(notices, received, false, [&](core::kept_sends::entry&& e) { lost.push_back(std::move(e)); });
    forget_read();  // what waited behind those the Welcome settled
    if (lost.empty()) return false;
    if (log_limit.allow())
      spdlog::warn("worker {}: {} messages died in the socket to the broker it replaced; sending them again",
                   options.id, lost.size());
    for (auto& e : lost)
      if (send_notice(std::move(e.message))) ++n_notices_resent;
    return true;
  }

  // A broker heartbeat said what it read: the kept one-way messages among it
  // can no longer die in a socket the link replaces (core::forget_read()).
  void forget_read() {
    read_seen = io->link.read_by_broker();
    core::forget_read(notices, read_seen, io->link.welcomed_hello());
    kept_notice_bytes.store(notices.bytes(), std::memory_order_relaxed);
  }

  // A turn of the I/O loop: its spare blocks serve the requests it makes,
  // and what its handlers send waits for the end of the turn (enqueue).
  struct turn_scope {
    explicit turn_scope(worker_core* w) : spares{io_spares}, was{turning} {
      io_spares = &w->io->spares;
      turning = w;
    }
    ~turn_scope() {
      io_spares = spares;
      turning = was;
    }
    spare_blocks* spares;
    const worker_core* was;
  };
  static inline thread_local const worker_core* turning = nullptr;

  // The loop is over: what the handlers queued is sent, then Goodbye (the
  // broker gives what this worker still holds to another at once, instead
  // of after its heartbeats stop); its sockets go, and what still waits on
  // it learns so.
  void close_io() {
    if (io) {
      try {
        holding = false;  // the last messages go, held or not
        send_queued();
        io->link.goodbye(goodbye_linger);
      } catch (const std::exception& e) {
        spdlog::warn("worker {}: its last messages were not sent: {}", options.id, e.what());
      }
    }
    io.reset();
    welcomed = false;
    // Whatever still runs learns that the worker is going away.
    for (auto& [id, weak] : in_flight)
      if (auto st = weak.lock()) st->cancel();
    in_flight.clear();
    deadlines.clear();
    // Client acks still awaited will not come now: their callbacks hear
    // CANCELLED on the pool (which runs what it holds before it stops), and
    // let go of the requests they captured, which hold this core. Kept, they
    // made a cycle that outlived the worker.
    std::vector<pending_ack> awaited;
    {
      std::lock_guard lock{acks_mutex};
      for (auto& [id, a] : acks) awaited.push_back(std::move(a));
      acks.clear();
      ack_deadlines.clear();
      io_closed = true;  // none awaited from now on: nothing would expire them
    }
    for (auto& a : awaited) settle(std::move(a), ack_result{proto::CANCELLED, "[]", {}, "the worker stopped"});
    io_thread_id = std::thread::id{};  // a later thread may get this id
  }

  void on_message(Envelope& env) {
    switch (env.kind_case()) {
      case Envelope::kRequest: on_request(*env.mutable_request()); break;  // one take_request() left alone
      case Envelope::kLifecycle: on_lifecycle(*env.mutable_lifecycle()); break;
      case Envelope::kCancel: {
        auto it = in_flight.find(env.cancel().id());
        if (it == in_flight.end()) break;
        // The entry stays while the handler runs (it expires when the
        // request is done with): a Recall must see that it still runs.
        if (auto st = it->second.lock()) {
          st->cancel();
          ++n_cancels;
        }
        break;
      }
      case Envelope::kRecall: on_recall(env.recall()); break;
      case Envelope::kGatewayGone: on_gateway_gone(*env.mutable_gateway_gone()); break;
      case Envelope::kReply: on_ack(env.reply()); break;
      case Envelope::kReport: {
        // A check_socket's answer settles it, and goes nowhere else.
        if (!env.report().ref().empty())
          if (auto check = take_ack(env.report().ref(), true)) {
            settle(std::move(*check), {}, state_of(env.report().status()));
            break;
          }
        std::shared_ptr<const report_fn> cb;
        {
          std::lock_guard lock{report_mutex};
          cb = report_callback;
        }
        if (!cb) break;
        // Reports are advisory: past the outbox bound they are dropped, counted.
        if (pool.pending() >= options.outbox_limit) {
          ++n_dropped;
          break;
        }
        pool.post([cb = std::move(cb), r = env.report()] { (*cb)(r); });
        break;
      }
      case Envelope::kError:
        // A pair's standby, or a restarted broker before our Hello, gives
        // back a one-way message (an emit, a control, a report) it did not
        // act on: held, it goes to whichever broker welcomes the link next.
        // It was sent before anything held now (the link holds from the
        // first refusal on), and the broker gives back in the order it
        // read: it goes ahead of what is held, behind what it gave back
        // before, so the order the worker sent in holds. Not a job's answer:
        // no other broker holds that job (a broker that has it sends it
        // again, and the kept answer goes then).
        if ((env.error().code() == proto::STANDBY || env.error().code() == proto::NOT_REGISTERED) &&
            !env.error().refused().empty() &&
            proto::kind_of(env.error().refused()) != Envelope::kReply) {
          const auto& refused = env.error().refused();
          if (may_hold()) {
            given_back.push_back({{}, zmq::message_t{refused.data(), refused.size()}});
            count_held();
          } else {
            ++n_dropped;
          }
        }
        break;  // else the link logged it
      default:
        if (log_limit.allow()) spdlog::warn("unexpected {} from the broker", proto::kind_name(env));
        break;
    }
  }

  // A request's strings are swapped out of the parsed message into a
  // recycled request_fields (whose old buffers go back into the message, for
  // the next parse), not copied. Only a handler that outlives its turn needs
  // an in_flight entry (a Cancel looks there): a quick handler that answered
  // in its turn leaves none.
  std::shared_ptr<request_state> new_request() {
    ++n_requests;
    live_requests.fetch_add(1, std::memory_order_relaxed);
    auto st = std::allocate_shared<request_state>(io_thread_allocator<request_state>{});
    st->core = shared_from_this();
    if (spare_fields.empty()) {
      st->f = std::make_unique<request_fields>();
    } else {
      st->f = std::move(spare_fields.back());
      spare_fields.pop_back();
    }
    return st;
  }

  // A request is done with its strings: on the I/O thread they are kept for
  // the next one (at most max_spare_fields sets, none with a large buffer).
  void recycle(std::unique_ptr<request_fields> f) {
    if (turning != this) return;
    if (spare_fields.size() >= max_spare_fields) return;
    for (auto* s : {&f->id, &f->service, &f->sid, &f->nsp, &f->event, &f->user, &f->args, &f->auth})
      if (s->capacity() > max_spare_bytes) *s = std::string{};
    f->att.clear();
    spare_fields.push_back(std::move(f));
  }

  // An Envelope{Request} as bytes (peer_link hands them over unparsed): the
  // body is parsed into `parsed`, a Request kept across messages (its strings
  // keep their buffers); false leaves the bytes to peer_link's parser.
  bool take_request(std::string_view bytes) {
    auto body = proto::request_body(bytes);
    if (!body || !parsed.ParseFromArray(body->data(), static_cast<int>(body->size()))) return false;
    on_request(parsed);
    return true;
  }

  // Keeps a copy of an answer about to be sent; the oldest go past the
  // count or the bytes allowed.
  void keep_reply(zmq::message_t& message) {
    core::kept_ring<>::entry e;
    e.message.copy(message);
    kept.push(std::move(e));
    kept_bytes.store(kept.bytes(), std::memory_order_relaxed);
  }

  // A job sent again (attempt > 1): after a worker comes back on a new
  // socket the broker sends it every job it holds again, since one may
  // have died on the old socket. A job running here is not run twice (its
  // early answer, if it gave one, goes again), and one answered here gets
  // its kept answer again (that may have died on the old socket). True
  // when it was one of those: not to be run.
  bool had_before(const std::string& id) {
    // Running until its final reply is in the outbox (a handler thread may
    // be between deciding its answer and queueing it): that reply comes.
    bool running = false;
    if (auto it = in_flight.find(id); it != in_flight.end())
      if (auto st = it->second.lock()) running = !st->replied;
    // Replies queued and not yet sent are kept as they are sent: send them.
    // (A job comes on a socket the broker welcomed: nothing is held.)
    send_in_order();
    bool resent = false;
    kept.for_each([&](auto& k) {  // the oldest first: an early answer before the final one
      if (proto::peek(k.message.to_string_view()).id != id) return;
      zmq::message_t again;
      again.copy(k.message);
      enqueue({.envelope = std::move(again), .answer = true});
      ++n_replies_resent;
      resent = true;
    });
    if (!running && !resent) return false;
    ++n_jobs_again;
    if (log_limit.allow())
      spdlog::info("worker {}: {} came again; {}", options.id, id,
                   running ? "it still runs here" : "its answer went again");
    return true;
  }

  // After this worker came back on a new socket, the broker asks again for
  // the final answers of jobs it holds here but does not send again
  // (answered early, or ended while held): they may have died in the old
  // socket, and each keeps capacity until its answer comes. One that still
  // runs answers when it ends. One answered here gets its kept final answer
  // again. One this worker knows nothing of (never received, or its answer
  // is no longer kept) is answered CANCELLED, silently: the broker only
  // gives its capacity back (docs/protocol.md "Answers owed").
  void on_recall(const proto::Recall& recall) {
    send_in_order();  // answers queued and not yet sent are kept as they are sent
    for (const auto& id : recall.ids()) {
      ++n_recalled;
      if (auto it = in_flight.find(id); it != in_flight.end())
        if (auto st = it->second.lock(); st && !st->replied) continue;
      zmq::message_t* last = nullptr;
      kept.for_each([&](auto& k) {
        auto peeked = proto::peek(k.message.to_string_view());
        if (peeked.id == id && !peeked.partial) last = &k.message;
      });
      zmq::message_t again;
      if (last) {
        again.copy(*last);
        ++n_replies_resent;
      } else {
        const proto::reply_fields r{.id = id,
                                    .code = proto::CANCELLED,
                                    .message = "this worker holds no answer for the job",
                                    .silent = true};
        again.rebuild(proto::encoded_size(r));
        proto::encode_reply(r, static_cast<char*>(again.data()));
      }
      enqueue({.envelope = std::move(again), .answer = true});
    }
    if (log_limit.allow())
      spdlog::info("worker {}: the broker asked again for {} answers", options.id, recall.ids_size());
  }

  void on_request(proto::Request& r) {
    if (r.attempt() > 1 && had_before(r.id())) return;
    auto st = new_request();
    auto& f = *st->f;
    st->type = request::kind::event;
    f.id.swap(*r.mutable_id());
    f.service.swap(*r.mutable_service());
    f.sid.swap(*r.mutable_sid());
    f.nsp.swap(*r.mutable_nsp());
    f.event.swap(*r.mutable_event());
    f.user.swap(*r.mutable_user());
    if (r.args().empty()) f.args = "[]";
    else f.args.swap(*r.mutable_args());
    if (r.auth().empty()) f.auth = "{}";
    else f.auth.swap(*r.mutable_auth());
    f.att.reserve(r.attachments_size());
    for (auto& a : *r.mutable_attachments()) f.att.emplace_back().swap(a);
    st->wants_reply = r.wants_reply();
    st->attempt = r.attempt();
    dispatch(std::move(st), r.timeout_ms());
  }

  void on_lifecycle(proto::Lifecycle& l) {
    if (l.attempt() > 1 && had_before(l.id())) return;
    auto st = new_request();
    auto& f = *st->f;
    bool connect = l.kind() == proto::Lifecycle::CONNECT;
    st->type = connect ? request::kind::connect : request::kind::disconnect;
    f.id.swap(*l.mutable_id());
    f.service.swap(*l.mutable_service());
    f.sid.swap(*l.mutable_sid());
    f.nsp.swap(*l.mutable_nsp());
    f.event = connect ? "connect" : "disconnect";
    f.user.swap(*l.mutable_user());
    f.args = connect ? "[]" : boost::json::serialize(boost::json::array{boost::json::string{l.reason()}});
    if (l.auth().empty()) f.auth = "{}";
    else f.auth.swap(*l.mutable_auth());
    st->wants_reply = connect;
    st->attempt = l.attempt();
    dispatch(std::move(st), l.timeout_ms());
  }

  void dispatch(std::shared_ptr<request_state> st, std::uint32_t timeout_ms) {
    st->set_deadline(turn_now + std::chrono::milliseconds(timeout_ms ? timeout_ms : 30000));
    auto svc = by_name.find(st->f->service);
    if (svc == by_name.end()) {
      answer(*st, proto::BAD_REQUEST, "service not served here: " + st->f->service, "[]", {}, false);
      return;
    }
    const service& s = *svc->second;
    const handler* h = nullptr;  // the service's own: services are fixed once the worker runs
    bool quick = false;
    switch (st->type) {
      case request::kind::connect: h = &s.on_connect_; break;
      case request::kind::disconnect: h = &s.on_disconnect_; break;
      case request::kind::event: {
        auto it = s.events_.find(st->f->event);
        if (it == s.events_.end()) it = s.events_.find("*");
        if (it != s.events_.end()) {
          h = &it->second.run;
          quick = it->second.quick;
        }
        break;
      }
    }
    if (!h || !*h) {
      // Defaults: accept connects, ignore disconnects and unknown events.
      if (st->type == request::kind::connect) answer(*st, proto::OK, {}, "{}", {}, false);
      else answer(*st, proto::OK, {}, "[]", {}, true);
      return;
    }
    if (quick) {
      // Here, on the I/O thread: see service::on_quick.
      std::weak_ptr<request_state> watched = st;
      run_handler(*h, std::move(st));
      if (auto still = watched.lock(); still && !still->answered) track(still);
      return;
    }
    // The broker's credits keep this queue to the capacity announced; this
    // bound holds when they do not (a restarted broker hands out fresh
    // credits while the old requests still run).
    if (requests_waiting.load(std::memory_order_relaxed) >= options.queue_limit) {
      ++n_requests_refused;
      answer(*st, proto::BUSY, "the worker's handler queue is full", "[]", {}, false);
      return;
    }
    track(st);
    requests_waiting.fetch_add(1, std::memory_order_relaxed);
    pool.post([this, h, st = std::move(st)]() mutable {
      requests_waiting.fetch_sub(1, std::memory_order_relaxed);
      if (stopping) return;  // queued when the worker stopped: the request is cancelled
      // Cancelled, or past its deadline, while it waited for a thread (a
      // pool busy with longer jobs, or with callbacks the broker's credits
      // do not count): its requester has had its answer, and a handler run
      // now would act on a request the client was told failed (a chat
      // message stored after its TIMEOUT, sent again, stored twice). A
      // DISCONNECT always runs: it is the service's cleanup.
      if (st->type != request::kind::disconnect) {
        if (auto code = st->over(clock::now())) {
          ++n_requests_expired;
          answer(*st, *code,
                 *code == proto::TIMEOUT ? "the deadline passed before a handler thread was free"
                                         : "cancelled before a handler thread was free",
                 "[]", {}, false);
          return;
        }
      }
      run_handler(*h, std::move(st));
    });
  }

  // Each service's hook, on the pool: a gateway's sockets are gone. Not
  // bounded by the outbox: at most one per gateway the broker lost. A
  // prefix that names no gateway's sockets (no '.', ending in one) is not
  // passed on: "" would own every sid.
  void on_gateway_gone(proto::GatewayGone& g) {
    auto dot = g.sid_prefix().find('.');
    if (dot == std::string::npos || g.sid_prefix().back() == '.') {
      if (log_limit.allow()) spdlog::warn("a GatewayGone with no sid prefix ignored");
      return;
    }
    ++n_gateways_gone;
    spdlog::info("gateway {} is gone ({}): its sockets {}* are forgotten", core::printable(g.gateway()),
                 core::printable(g.reason()), core::printable(g.sid_prefix()));
    auto gone = std::make_shared<const gateway_gone>(
        gateway_gone{shared_from_this(), std::move(*g.mutable_gateway()), std::move(*g.mutable_sid_prefix()),
                     std::move(*g.mutable_reason())});
    post_hooks(&service::on_gateway_gone_, std::move(gone), "on_gateway_gone");
  }

  // At each Welcome from a broker that did not know this worker's link (the
  // first; a restarted broker's, the other of a pair's, one that had dropped
  // the worker: the DISCONNECTs held for it, or queued for its services
  // meanwhile, may be lost), and from one of another incarnation than the
  // last (the other of a pair, which knew the link): each service's welcome hook
  // runs on the pool twice the heartbeat liveness later, once the gateways
  // have had time to say Hello to a broker that just started (until they
  // do, it answers a check of their sockets GATEWAY_GONE).
  void on_welcomed(clock::time_point now) {
    welcome_first = welcome_first || !ever_welcomed;
    ever_welcomed = true;
    fresh_welcomes_seen = io->link.fresh_welcomes();
    broker_restarts_seen = io->link.broker_restarts();
    welcome_due = now + 2 * io->link.heartbeat_liveness() * io->link.heartbeat_interval();
  }
  void run_welcome_hooks(clock::time_point now) {
    if (!welcome_due || now < *welcome_due || !welcomed) return;
    welcome_due.reset();
    post_hooks(&service::on_welcome_, std::make_shared<const welcome>(welcome{shared_from_this(), welcome_first}),
               "on_welcome");
    welcome_first = false;
  }

  // Runs hook `member` of every service that has one with `arg`, on the
  // pool, taking no capacity: what it throws is logged and counted.
  template <class Hook, class Arg>
  void post_hooks(Hook service::*member, std::shared_ptr<const Arg> arg, const char* what) {
    for (const auto& s : services) {
      if (!(s.*member)) continue;
      pool.post([this, hook = &(s.*member), arg, what] {
        try {
          (*hook)(*arg);
        } catch (const std::exception& e) {
          ++n_errors;
          std::lock_guard lock{text_log_mutex};
          if (text_log_limit.allow()) spdlog::error("worker {}: {} threw: {}", options.id, what, e.what());
        } catch (...) {
          ++n_errors;
        }
      });
    }
  }

  void run_handler(const handler& h, std::shared_ptr<request_state> st) {
    request req{std::move(st)};
    try {
      h(req);
    } catch (const answer_error& e) {
      req.fail(e.code, e.what());  // an answer the handler chose, not an error of its own
    } catch (const std::exception& e) {
      ++n_errors;
      req.fail(proto::INTERNAL, e.what());
    } catch (...) {
      // Not a std::exception: on the I/O thread (a quick handler) it would
      // end the process; on the pool, the request would be answered OK.
      ++n_errors;
      req.fail(proto::INTERNAL, "the handler threw something other than a std::exception");
    }
  }

  // Lets a Cancel find the request while it runs, and its deadline fire
  // its cancel token (I/O thread only).
  void track(const std::shared_ptr<request_state>& st) {
    deadlines.emplace_back(st->deadline(), st);
    std::push_heap(deadlines.begin(), deadlines.end(), later_deadline);
    if (deadlines.size() > deadlines_sweep_at) {
      // Answered requests leave their entries until their deadline.
      std::erase_if(deadlines, [](const auto& d) { return d.second.expired(); });
      std::make_heap(deadlines.begin(), deadlines.end(), later_deadline);
      deadlines_sweep_at = std::max<std::size_t>(1024, 2 * deadlines.size());
    }
    in_flight[st->f->id] = st;
    if (in_flight.size() > sweep_at) {
      // Answered requests leave only expired weak pointers behind.
      std::erase_if(in_flight, [](const auto& kv) { return kv.second.expired(); });
      sweep_at = std::max<std::size_t>(1024, 2 * in_flight.size());
    }
  }

  // The awaited ack `id`, no longer awaited; nothing if it was not (answered,
  // timed out, cancelled). Its deadline entry is found by its time, not by a
  // scan of every deadline.
  // `check`: only a check_socket's (a report's ref), not an ack's.
  std::optional<pending_ack> take_ack(const std::string& id, bool check = false) {
    std::lock_guard lock{acks_mutex};
    auto it = acks.find(id);
    if (it == acks.end() || (check && !it->second.check)) return std::nullopt;
    auto [first, last] = ack_deadlines.equal_range(it->second.deadline);
    for (auto d = first; d != last; ++d)
      if (d->second == id) {
        ack_deadlines.erase(d);
        break;
      }
    pending_ack ack = std::move(it->second);
    acks.erase(it);
    return ack;
  }

  // Runs what awaited `a` on the pool: an ack's callback with `result`, a
  // check's with `state`.
  void settle(pending_ack a, ack_result result, socket_state state = socket_state::unknown) {
    if (a.check) pool.post([cb = std::move(a.check), state] { cb(state); });
    else pool.post([cb = std::move(a.callback), result = std::move(result)]() mutable { cb(std::move(result)); });
  }

  void on_ack(const proto::Reply& reply) {
    auto ack = take_ack(reply.id());
    if (!ack) return;  // late: already timed out
    ack_result result;
    result.code = reply.code();
    result.args = reply.args();
    result.attachments.assign(reply.attachments().begin(), reply.attachments().end());
    result.message = reply.message();
    settle(std::move(*ack), std::move(result));
  }

  // A request's deadline fires its cancel token here, as the broker's
  // Cancel would: a handler waiting on cancel().stop_token() wakes even when
  // no Cancel comes (the broker gone or restarted meanwhile). An early ack()
  // lifted the deadline: no fire then.
  static bool later_deadline(const deadline_entry& a, const deadline_entry& b) { return a.first > b.first; }
  void fire_deadlines(clock::time_point now) {
    while (!deadlines.empty() && deadlines.front().first <= now) {
      std::pop_heap(deadlines.begin(), deadlines.end(), later_deadline);
      auto st = deadlines.back().second.lock();
      deadlines.pop_back();
      if (st && !st->answered && st->deadline() <= now) st->cancel();
    }
  }

  void expire_acks(clock::time_point now) {
    std::vector<pending_ack> expired;
    {
      std::lock_guard lock{acks_mutex};
      while (!ack_deadlines.empty() && ack_deadlines.begin()->first <= now) {
        auto it = acks.find(ack_deadlines.begin()->second);
        if (it != acks.end()) {
          expired.push_back(std::move(it->second));
          acks.erase(it);
        }
        ack_deadlines.erase(ack_deadlines.begin());
      }
    }
    for (auto& a : expired) settle(std::move(a), ack_result{proto::TIMEOUT, "[]", {}, "no ack in time"});
  }

  // A Control CHECK for `sid`, its ref the id of a pending entry that its
  // report settles (or its timeout, or a stop).
  bool check_socket(const std::string& nsp, const std::string& sid, check_hook done,
                    std::chrono::milliseconds timeout) {
    if (!done || !all_utf8({nsp, sid}, "a socket check")) return false;
    auto ref = register_ack({}, timeout, std::move(done));
    if (!ref) return false;
    Envelope env;
    auto* c = env.mutable_control();
    c->set_action(proto::Control::CHECK);
    c->set_nsp(nsp);
    c->set_sid(sid);
    c->set_origin(options.id);
    c->set_ref(*ref);
    if (send(env)) return true;
    return !take_ack(*ref);  // not sent: false, and no call, unless a stop() already settled it
  }

  std::optional<std::string> register_ack(std::function<void(ack_result)> cb, std::chrono::milliseconds timeout,
                                          check_hook check = {}) {
    std::lock_guard lock{acks_mutex};
    if (stopping || io_closed) return std::nullopt;
    if (acks.size() >= options.pending_acks_limit) {
      n_acks_refused.fetch_add(1, std::memory_order_relaxed);
      return std::nullopt;
    }
    auto id = options.id + ":" + std::to_string(++next_ack);
    // now + timeout saturated: a "forever" timeout (milliseconds::max())
    // overflows the clock's nanoseconds, and expired at once.
    auto now = clock::now();
    auto deadline = timeout >= std::chrono::duration_cast<std::chrono::milliseconds>(clock::time_point::max() - now)
                        ? clock::time_point::max()
                        : now + timeout;
    acks.emplace(id, pending_ack{std::move(cb), deadline, std::move(check)});
    ack_deadlines.emplace(deadline, id);
    return id;
  }
};

request_state::~request_state() {
  // The last handle is gone: make sure the broker hears the worker is free.
  if (!answered && core) {
    if (type == request::kind::connect)
      core->answer(*this, proto::OK, {}, "{}", {}, false);
    else
      core->answer(*this, proto::OK, {}, "[]", {}, true);
  }
  if (core && f) core->recycle(std::move(f));
  if (core) core->request_done();
}

}  // namespace detail

// ---- cancel_token ----

bool cancel_token::cancelled() const {
  return stop_.stop_requested() || clock::now() >= deadline();
}

bool cancel_token::sleep_for(std::chrono::milliseconds d) const {
  std::mutex m;
  std::condition_variable_any cv;
  std::unique_lock lock{m};
  // now + d saturated: a "forever" d would overflow the clock (and spin).
  auto now = clock::now();
  auto deadline = this->deadline();
  auto left = deadline > now ? std::chrono::duration_cast<std::chrono::milliseconds>(deadline - now)
                             : std::chrono::milliseconds::zero();
  auto until = d >= left ? deadline : now + d;
  cv.wait_until(lock, stop_, until, [] { return false; });
  return !cancelled();
}

// ---- request ----

request::kind request::type() const { return state_->type; }
const std::string& request::id() const { return state_->f->id; }
const std::string& request::service() const { return state_->f->service; }
const std::string& request::sid() const { return state_->f->sid; }
const std::string& request::nsp() const { return state_->f->nsp; }
const std::string& request::event() const { return state_->f->event; }
const std::string& request::user() const { return state_->f->user; }
const std::string& request::args_text() const { return state_->f->args; }
const std::string& request::auth_text() const { return state_->f->auth; }
const attachments& request::attachments() const { return state_->f->att; }
bool request::wants_reply() const { return state_->wants_reply; }
unsigned request::attempt() const { return state_->attempt; }
const cancel_token& request::cancel() const { return state_->token(); }
const std::string& request::worker_id() const { return state_->core->options.id; }

boost::json::array request::args() const { return parsed_args().value_or(boost::json::array{}); }

std::optional<boost::json::array> request::parsed_args() const {
  boost::system::error_code ec;
  // As deep as the gateway lets through (socketio::max_json_depth): Boost's
  // default of 32 made valid arguments nested 33 to 64 deep read as [].
  boost::json::parse_options deep;
  deep.max_depth = 64;
  auto v = boost::json::parse(state_->f->args, ec, {}, deep);
  if (ec || !v.is_array()) return std::nullopt;
  return std::move(v.as_array());
}

bool request::reply(std::string_view args_json, const sidecast::attachments& att) {
  return state_->core->answer(*state_, proto::OK, {}, args_json, att, false);
}

bool request::reply(const boost::json::array& args) { return reply(boost::json::serialize(args)); }

bool request::ack(std::string_view args_json, const sidecast::attachments& att) {
  if (!state_->core->answer(*state_, proto::OK, {}, args_json, att, false, true)) return false;
  state_->set_deadline(std::chrono::steady_clock::time_point::max());
  return true;
}

bool request::fail(proto::Code code, std::string message) {
  return state_->core->answer(*state_, code, message, "[]", {}, false);
}

bool request::emit(std::string event, std::string args_json, sidecast::attachments att) {
  return state_->core->emit_to_sid(state_->f->nsp, state_->f->sid, std::move(event), std::move(args_json),
                                   std::move(att));
}

bool request::emit_with_ack(std::string event, std::string args_json, sidecast::attachments att,
                            std::function<void(ack_result)> on_ack, std::chrono::milliseconds timeout) {
  auto id = state_->core->register_ack(std::move(on_ack), timeout);
  if (!id) return false;
  if (state_->core->emit_to_sid(state_->f->nsp, state_->f->sid, std::move(event), std::move(args_json), std::move(att),
                                *id))
    return true;
  // Not sent: false, and no call — unless a stop() already answered it.
  return !state_->core->take_ack(*id);
}

bool request::join(std::string room) {
  return state_->core->control(proto::Control::JOIN, state_->f->nsp, state_->f->sid, room);
}
bool request::leave(std::string room) {
  return state_->core->control(proto::Control::LEAVE, state_->f->nsp, state_->f->sid, room);
}
bool request::disconnect() {
  return state_->core->control(proto::Control::DISCONNECT, state_->f->nsp, state_->f->sid, {});
}

bool request::sockets_join(const std::string& room, const std::optional<std::string>& in_room) {
  return state_->core->publish_control(proto::Control::JOIN, state_->f->nsp, in_room, room);
}
bool request::sockets_leave(const std::string& room, const std::optional<std::string>& in_room) {
  return state_->core->publish_control(proto::Control::LEAVE, state_->f->nsp, in_room, room);
}
bool request::disconnect_sockets(const std::optional<std::string>& in_room) {
  return state_->core->publish_control(proto::Control::DISCONNECT, state_->f->nsp, in_room, {});
}
bool request::close_room(const std::string& room) { return sockets_leave(room, room); }

bool request::emit_to_room(const std::string& room, std::string event, std::string args_json,
                           std::vector<std::string> except_sids, sidecast::attachments att) {
  return state_->core->publish_to(state_->f->nsp, &room, std::move(event), std::move(args_json),
                                  std::move(except_sids), std::move(att));
}

bool request::broadcast(std::string event, std::string args_json, std::vector<std::string> except_sids,
                        sidecast::attachments att) {
  return state_->core->publish_to(state_->f->nsp, nullptr, std::move(event), std::move(args_json),
                                  std::move(except_sids), std::move(att));
}

// ---- service ----

service::service(std::string name, unsigned capacity) : name_{std::move(name)}, capacity_{capacity} {}

service& service::on(std::string event, handler h) {
  events_[std::move(event)] = {std::move(h), false};
  return *this;
}
service& service::on_quick(std::string event, handler h) {
  events_[std::move(event)] = {std::move(h), true};
  return *this;
}
service& service::on_connect(handler h) {
  on_connect_ = std::move(h);
  return *this;
}
service& service::on_disconnect(handler h) {
  on_disconnect_ = std::move(h);
  return *this;
}
service& service::on_gateway_gone(gone_hook h) {
  on_gateway_gone_ = std::move(h);
  return *this;
}
service& service::on_welcome(welcome_hook h) {
  on_welcome_ = std::move(h);
  return *this;
}

bool welcome::check_socket(const std::string& nsp, const std::string& sid, check_hook done,
                           std::chrono::milliseconds timeout) const {
  return core_->check_socket(nsp, sid, std::move(done), timeout);
}

bool welcome::emit_to_room(const std::string& nsp, const std::string& room, std::string event,
                           std::string args_json) const {
  return core_->publish_to(nsp, &room, std::move(event), std::move(args_json), {}, {});
}

bool gateway_gone::emit_to_room(const std::string& nsp, const std::string& room, std::string event,
                                std::string args_json) const {
  return core_->publish_to(nsp, &room, std::move(event), std::move(args_json), {}, {});
}

// ---- worker ----

worker::worker(worker_options options, zmq::context_t* context)
    : core_{std::make_shared<detail::worker_core>(std::move(options), context)} {}

worker::~worker() { stop(); }

void worker::add(service s) {
  if (core_->started) throw std::logic_error("worker::add after start()");
  core_->services.push_back(std::move(s));
  core_->by_name.clear();
  for (const auto& svc : core_->services) core_->by_name[svc.name()] = &svc;
}

void worker::start() { core_->start(); }
void worker::start_on(boost::asio::io_context& context) { core_->start_on(context); }
void worker::stop() {
  auto core = core_;  // a stop() waiting for another outlives the owner's destructor
  core->stop();
}

bool worker::drain(std::chrono::milliseconds timeout) {
  auto core = core_;
  return core->drain(timeout);
}

void worker::run() {
  if (!core_->started) start();
  core_->wait_stopped();
}

bool worker::emit_to_sid(const std::string& nsp, const std::string& sid, std::string event,
                         std::string args_json, sidecast::attachments att, bool report_delivered) {
  return core_->emit_to_sid(nsp, sid, std::move(event), std::move(args_json), std::move(att), {}, report_delivered);
}

bool worker::emit_to_room(const std::string& nsp, const std::string& room, std::string event,
                          std::string args_json, std::vector<std::string> except_sids,
                          sidecast::attachments att) {
  return core_->publish_to(nsp, &room, std::move(event), std::move(args_json), std::move(except_sids),
                           std::move(att));
}

bool worker::broadcast(const std::string& nsp, std::string event, std::string args_json,
                       std::vector<std::string> except_sids, sidecast::attachments att) {
  return core_->publish_to(nsp, nullptr, std::move(event), std::move(args_json), std::move(except_sids),
                           std::move(att));
}

bool worker::join(const std::string& nsp, const std::string& sid, const std::string& room) {
  return core_->control(proto::Control::JOIN, nsp, sid, room);
}
bool worker::leave(const std::string& nsp, const std::string& sid, const std::string& room) {
  return core_->control(proto::Control::LEAVE, nsp, sid, room);
}
bool worker::disconnect(const std::string& nsp, const std::string& sid) {
  return core_->control(proto::Control::DISCONNECT, nsp, sid, {});
}

bool worker::sockets_join(const std::string& nsp, const std::string& room, const std::optional<std::string>& in_room) {
  return core_->publish_control(proto::Control::JOIN, nsp, in_room, room);
}
bool worker::sockets_leave(const std::string& nsp, const std::string& room,
                           const std::optional<std::string>& in_room) {
  return core_->publish_control(proto::Control::LEAVE, nsp, in_room, room);
}
bool worker::disconnect_sockets(const std::string& nsp, const std::optional<std::string>& in_room) {
  return core_->publish_control(proto::Control::DISCONNECT, nsp, in_room, {});
}
bool worker::close_room(const std::string& nsp, const std::string& room) { return sockets_leave(nsp, room, room); }
bool worker::check_socket(const std::string& nsp, const std::string& sid, check_hook done,
                          std::chrono::milliseconds timeout) {
  return core_->check_socket(nsp, sid, std::move(done), timeout);
}

void worker::on_report(std::function<void(const proto::DeliveryReport&)> callback) {
  auto cb = callback ? std::make_shared<const detail::worker_core::report_fn>(std::move(callback)) : nullptr;
  std::lock_guard lock{core_->report_mutex};
  core_->report_callback = std::move(cb);
}

const std::string& worker::id() const { return core_->options.id; }

void worker::on_failure(std::function<void()> callback) { core_->failure_handler = std::move(callback); }

std::optional<std::string> worker::failure() const {
  std::lock_guard lock{core_->lifecycle_mutex};
  return core_->failure;
}
bool worker::connected() const { return core_->welcomed; }

worker_stats worker::stats() const {
  return {core_->n_requests,     core_->n_replies,          core_->n_cancels,
          core_->n_dropped,      core_->n_errors,           core_->n_reconnects,
          core_->n_acks_refused, core_->n_requests_refused, core_->live_requests.load(),
          core_->drain_asked.load(), core_->n_jobs_again, core_->n_replies_resent,
          core_->kept_bytes.load(),    core_->n_notices_resent,   core_->kept_notice_bytes.load(),
          core_->n_held.load(),        core_->n_recalled,         core_->n_gateways_gone,
          core_->n_requests_expired};
}

}  // namespace sidecast
