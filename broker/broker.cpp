#include "broker/broker.hpp"

#include <algorithm>
#include <cctype>

#include <boost/asio/post.hpp>
#include <boost/json.hpp>
#include <spdlog/spdlog.h>

#include "core/peer_link.hpp"

namespace sidecast::broker {

using proto::Envelope;
namespace asio = boost::asio;

// What happened to requests, as labels of sidecast_broker_requests_total.
enum class outcome { dispatched, ok, error, busy, timeout, unavailable, worker_lost, cancelled, count };
constexpr const char* outcome_names[] = {"dispatched", "ok",          "error",       "busy",
                                         "timeout",    "unavailable", "worker_lost", "cancelled"};
// Why messages were dropped, as labels of sidecast_broker_dropped_total, in
// the order of broker::drop_reason.
constexpr const char* drop_reason_names[] = {"malformed",   "unknown_peer",  "not_allowed", "bad_hello",
                                             "foreign_id",  "foreign_sid",   "duplicate",   "not_holder",
                                             "not_requester", "unroutable",  "hwm",         "unreachable",
                                             "curve_refused", "service_limit", "standby",   "peer_limit"};

outcome outcome_of(proto::Code code) {
  switch (code) {
    case proto::OK: return outcome::ok;
    case proto::UNAVAILABLE: return outcome::unavailable;
    case proto::TIMEOUT: return outcome::timeout;
    case proto::BUSY: return outcome::busy;
    case proto::WORKER_LOST: return outcome::worker_lost;
    case proto::CANCELLED: return outcome::cancelled;
    default: return outcome::error;
  }
}

struct broker::metrics {
  explicit metrics(prometheus::Registry& r)
      : received{core::counters(r, "sidecast_broker_messages_received_total",
                                "Messages received on the ROUTER socket, by kind")},
        requests{core::counters(r, "sidecast_broker_requests_total", "Requests by service and outcome")},
        dropped{core::counters(r, "sidecast_broker_dropped_total", "Messages dropped, by reason")},
        reports{core::counters(r, "sidecast_broker_delivery_reports_total",
                               "Delivery reports the broker produced, by status")},
        owed_disconnects{
            core::counter(r, "sidecast_broker_owed_disconnects_total",
                          "DISCONNECTs sent to a worker whose connect hook accepted after its CONNECT ended")},
        gateways_gone{core::counters(r, "sidecast_broker_gateways_gone_total",
                                     "Gateways announced gone to every worker (GatewayGone), by reason: silent past "
                                     "--gateway-gone-after, said goodbye, restarted under the same id, or replaced "
                                     "its sid prefix")},
        gone_pending{core::gauge(r, "sidecast_broker_gateways_gone_pending",
                                 "Gateways lost to silence whose announcement waits for --gateway-gone-after "
                                 "(bounded by --max-peers)")},
        reconnects{core::counter(r, "sidecast_broker_peer_reconnects_total",
                                 "Hellos from a live peer on a new socket (it heard nothing from the broker for its "
                                 "liveness): it keeps what it held; a worker gets its jobs again")},
        forwards{core::gauge(r, "sidecast_broker_forwards_in_flight",
                             "HTTP requests relayed between gateways awaiting their answer, remembered so that "
                             "their askers hear at once when the owner gateway is lost (bounded by --max-forwards)")},
        parked{core::gauge(r, "sidecast_broker_parked_messages",
                           "Answers and events kept for live peers whose connection is gone for the moment (bounded by "
                           "--max-parked)")},
        parked_bytes{core::gauge(r, "sidecast_broker_parked_bytes",
                                 "What the parked messages hold (bounded by --max-parked-bytes)")},
        unparked{core::counters(r, "sidecast_broker_parked_total",
                                "Messages kept for a peer without a connection, by outcome: delivered when it came "
                                "back, or reported undelivered")},
        probes{core::counters(r, "sidecast_broker_probes_total",
                              "Peers probed after a stall of the broker's thread, by how they showed their connection: "
                              "answered the probe, said Hello, or neither within their liveness (sent to as before)")},
        read_reports{
            core::counters(r, "sidecast_broker_read_reports_total",
                           "Peers back on a new socket, by whether they said what they read of what the broker sent "
                           "before (read), showed they read the Welcome and had nothing to say (none: welcomed by "
                           "another broker since), or neither within their liveness (unanswered); what they get "
                           "waits until then")},
        sent_again{
            core::counter(r, "sidecast_broker_sent_again_total",
                          "Messages sent again to a peer whose read report said they died in a socket it replaced")},
        capacity_clamped{core::counter(r, "sidecast_broker_capacity_clamped_total",
                                       "Services in workers' Hellos whose capacity was past --max-capacity "
                                       "(taken as --max-capacity)")},
        answers_recalled{
            core::counter(r, "sidecast_broker_answers_recalled_total",
                          "Final answers asked of a worker back on a new socket again (Recall): of jobs it answered "
                          "early or that ended while it held them, which may have died in the socket it replaced")},
        kept_sent_bytes{
            core::gauge(r, "sidecast_broker_kept_sent_bytes",
                        "Bytes of the messages sent to peers that they have not said they read (to a peer "
                        "that does not say, in its last heartbeat interval), kept to be sent again (bounded "
                        "per peer by --kept-sent, --kept-sent-bytes)")},
        stalls{core::counter(r, "sidecast_broker_stalls_total",
                             "Heartbeat ticks more than an interval late (the broker's thread did not run): the time "
                             "away was not counted against the peers")},
        events{
            core::counter(r, "sidecast_broker_events_total", "Room and broadcast events forwarded from XSUB to XPUB")},
        streams_taken_over{core::counter(
            r, "sidecast_broker_event_streams_taken_over_total",
            "Events whose topic took the counter (--event-streams) another topic held: its subscribers start "
            "counting that topic's lost events again from there")},
        pair_state{core::gauges(r, "sidecast_broker_pair_state",
                                "Of a broker pair (--pair): 1 for the state this broker is in (primary and backup: "
                                "starting, undecided; active; passive), 0 for the others")},
        pair_term{core::gauge(r, "sidecast_broker_pair_term",
                              "Of a broker pair: the term of this broker's last activation (0: never active)")},
        pair_activations{core::counter(r, "sidecast_broker_pair_activations_total",
                                       "Of a broker pair: times this broker became active (at start, or taking "
                                       "over from the other)")},
        queue_depth{core::gauges(r, "sidecast_broker_queue_depth", "Requests waiting for a worker, by service")},
        queued_bytes{core::gauge(r, "sidecast_broker_queued_bytes",
                                 "Bytes of the requests waiting for a worker, every service's (bounded by "
                                 "--queue-bytes)")},
        workers{core::gauges(r, "sidecast_broker_workers", "Live workers that take new requests, by service")},
        draining{core::gauges(r, "sidecast_broker_draining_workers",
                              "Live workers that are stopping (Drain): they finish what they hold, take nothing new")},
        peers{core::gauges(r, "sidecast_broker_peers", "Live peers, by role")},
        in_flight{core::gauge(r, "sidecast_broker_in_flight",
                              "Requests held by workers, those that ended while held included (each keeps its "
                              "worker's slot until the worker answers)")},
        dispatch_latency{core::latency_histogram(r, "sidecast_broker_dispatch_seconds",
                                                 "Time from a request's arrival to its dispatch to a worker")},
        request_latency{core::latency_histogram(r, "sidecast_broker_request_seconds",
                                                "Time from a request's arrival to its worker's reply")} {}

  // Hot path: one hash lookup of the service name, no label maps.
  prometheus::Counter& count(const std::string& service, outcome what) {
    auto it = outcomes.find(service);
    if (it == outcomes.end()) {
      std::array<prometheus::Counter*, static_cast<std::size_t>(outcome::count)> all{};
      for (std::size_t i = 0; i < all.size(); ++i)
        all[i] = &requests.Add({{"service", service}, {"outcome", outcome_names[i]}});
      it = outcomes.emplace(service, all).first;
    }
    return *it->second[static_cast<std::size_t>(what)];
  }
  // A pruned service's series go with it (service_table::prune).
  void forget(const std::string& service) {
    if (auto it = outcomes.find(service); it != outcomes.end()) {
      for (auto* c : it->second) requests.Remove(c);
      outcomes.erase(it);
    }
    queue_depth.Remove(&queue_depth.Add({{"service", service}}));
    workers.Remove(&workers.Add({{"service", service}}));
    draining.Remove(&draining.Add({{"service", service}}));
  }

  static_assert(std::size(drop_reason_names) == static_cast<std::size_t>(drop_reason::count));
  prometheus::Counter& drop(drop_reason reason) { return *drops[static_cast<std::size_t>(reason)]; }

  prometheus::Family<prometheus::Counter>& received;
  prometheus::Family<prometheus::Counter>& requests;
  prometheus::Family<prometheus::Counter>& dropped;
  prometheus::Family<prometheus::Counter>& reports;
  prometheus::Counter& owed_disconnects;
  prometheus::Family<prometheus::Counter>& gateways_gone;
  prometheus::Gauge& gone_pending;
  prometheus::Counter& reconnects;
  prometheus::Gauge& forwards;
  prometheus::Gauge& parked;
  prometheus::Gauge& parked_bytes;
  prometheus::Family<prometheus::Counter>& unparked;
  prometheus::Family<prometheus::Counter>& probes;
  prometheus::Family<prometheus::Counter>& read_reports;
  prometheus::Counter& sent_again;
  prometheus::Counter& capacity_clamped;
  prometheus::Counter& answers_recalled;
  prometheus::Gauge& kept_sent_bytes;
  prometheus::Counter& stalls;
  prometheus::Counter& events;
  prometheus::Counter& streams_taken_over;
  prometheus::Family<prometheus::Gauge>& pair_state;
  prometheus::Gauge& pair_term;
  prometheus::Counter& pair_activations;
  prometheus::Family<prometheus::Gauge>& queue_depth;
  prometheus::Gauge& queued_bytes;
  prometheus::Family<prometheus::Gauge>& workers;
  prometheus::Family<prometheus::Gauge>& draining;
  prometheus::Family<prometheus::Gauge>& peers;
  prometheus::Gauge& in_flight;
  prometheus::Histogram& dispatch_latency;
  prometheus::Histogram& request_latency;
  // Observed per request on the broker thread, published each tick.
  core::batched_histogram dispatch_batch{dispatch_latency};
  core::batched_histogram request_batch{request_latency};
  std::unordered_map<std::string, std::array<prometheus::Counter*, static_cast<std::size_t>(outcome::count)>>
      outcomes;
  using drop_counters = std::array<prometheus::Counter*, static_cast<std::size_t>(drop_reason::count)>;
  static drop_counters make_drops(prometheus::Family<prometheus::Counter>& family) {
    drop_counters all{};
    for (std::size_t i = 0; i < all.size(); ++i) all[i] = &family.Add({{"reason", drop_reason_names[i]}});
    return all;
  }
  drop_counters drops = make_drops(dropped);
  // By the kinds this build knows (an unknown one is malformed before it
  // is counted here: the parse leaves it KIND_NOT_SET).
  std::array<prometheus::Counter*, proto::last_kind + 1> by_kind{};
};

namespace {

double seconds_since(clock::time_point then, clock::time_point now) {
  return std::chrono::duration<double>(now - then).count();
}

}  // namespace

broker::broker(broker_config config, zmq::context_t& context, core::registry_ptr registry)
    : config_{std::move(config)},
      context_{context},
      router_{context_, zmq::socket_type::router},
      xsub_{context_, zmq::socket_type::xsub},
      xpub_{context_, zmq::socket_type::xpub},
      table_{config_.limits},
      registry_{std::move(registry)},
      metrics_{std::make_unique<metrics>(*registry_)},
      owed_prefix_{config_.id + ".owed." +
                   std::to_string(std::chrono::duration_cast<std::chrono::milliseconds>(
                                      std::chrono::system_clock::now().time_since_epoch())
                                      .count()) +
                   ":"},
      incarnation_{core::draw_incarnation()},
      streams_{config_.event_streams, core::draw_incarnation(), core::draw_incarnation()} {}

broker::~broker() = default;

void broker::bind() {
  if (!config_.curve_secret.empty()) {
    // The ZAP handler first: CURVE handshakes ask it about every peer.
    auto allowed = config_.curve_allow;
    // A pair's two brokers share the key pair: the other's pair SUB comes with it.
    if (!config_.pair_role.empty()) allowed.push_back(core::curve_public_of(config_.curve_secret));
    zap_ = std::make_unique<core::zap_handler>(context_, allowed);
    for (auto* s : {&router_, &xsub_, &xpub_}) core::apply_server(*s, config_.curve_secret);
    spdlog::info("CURVE on: {} allowed peer keys; broker public key {}", config_.curve_allow.size(),
                 core::curve_public_of(config_.curve_secret));
  }
  router_.set(zmq::sockopt::router_mandatory, 1);
  router_.set(zmq::sockopt::router_handover, 1);
  router_.set(zmq::sockopt::sndhwm, config_.sndhwm);
  router_.set(zmq::sockopt::rcvhwm, config_.rcvhwm);
  router_.set(zmq::sockopt::linger, 0);
  // A peer's frame may declare any length: libzmq would allocate it. Past
  // the bound it drops that connection (tcp and ipc; inproc has no decoder).
  router_.set(zmq::sockopt::maxmsgsize, config_.max_message_bytes);
  router_.bind(config_.router_endpoint);
  xsub_.set(zmq::sockopt::rcvhwm, config_.rcvhwm);
  xsub_.set(zmq::sockopt::linger, 0);
  xsub_.set(zmq::sockopt::maxmsgsize, config_.max_message_bytes);
  xsub_.bind(config_.xsub_endpoint);
  // Publishers send everything to the broker; gateways' subscriptions are
  // applied here, at the XPUB, so a join takes effect after one hop. A
  // pair's broker subscribes while it is active only: a publisher that
  // still reaches the other sends it nothing (its PUB filters).
  if (config_.pair_role.empty()) subscribe_events(true);
  xpub_.set(zmq::sockopt::sndhwm, config_.sndhwm);
  xpub_.set(zmq::sockopt::linger, 0);
  xpub_.set(zmq::sockopt::maxmsgsize, config_.max_subscription_bytes);  // what a peer sends it: subscriptions
  // ZMTP pings on each gateway's connection, answered by its libzmq I/O
  // thread: a gateway whose process has stopped (SIGSTOP, a paused VM)
  // leaves its TCP connection open, and every event for it piled up in its
  // queue here until --hwm of them (400 broadcasts of 500 KB: 200 MB, and
  // 100000 of any size were taken). Unanswered for a liveness, the
  // connection is dropped with its queue; the gateway's SUB reconnects when
  // it runs again and counts the events it lost (events_lost_total). A
  // gateway that only reads slowly answers, unless its SUB has fallen
  // --hwm events behind: libzmq then stops reading the connection, pings
  // and all, until it is down to half, and the gateway is dropped the same
  // way if that takes a liveness (it was losing events already).
  xpub_.set(zmq::sockopt::heartbeat_ivl, static_cast<int>(config_.heartbeat_interval.count()));
  xpub_.set(zmq::sockopt::heartbeat_timeout,
            static_cast<int>(std::chrono::duration_cast<std::chrono::milliseconds>(liveness_window()).count()));
  xpub_.bind(config_.xpub_endpoint);
  if (!config_.local_endpoint.empty()) local_ = std::make_unique<core::local_router>(config_.local_endpoint);
  if (!config_.pair_role.empty()) {
    if (config_.heartbeat_liveness < 2)
      throw std::runtime_error("a broker pair needs --heartbeat-liveness 2 or more: with 1, a tick an interval "
                               "late looks like a dead broker");
    pair_pub_ = zmq::socket_t{context_, zmq::socket_type::pub};
    pair_pub_.set(zmq::sockopt::linger, 0);
    pair_pub_.set(zmq::sockopt::sndhwm, 16);  // a state older than the next is worth nothing
    // All it takes in is the other's subscription to everything (one byte)
    // and, with CURVE, its handshake (a few hundred bytes, which this bound
    // applies to as well): a long subscription from anyone who connects
    // would cost ~32 bytes a byte.
    pair_pub_.set(zmq::sockopt::maxmsgsize, std::int64_t{4096});
    if (!config_.curve_secret.empty()) core::apply_server(pair_pub_, config_.curve_secret);
    pair_pub_.bind(config_.pair_bind);
    pair_sub_ = zmq::socket_t{context_, zmq::socket_type::sub};
    pair_sub_.set(zmq::sockopt::linger, 0);
    pair_sub_.set(zmq::sockopt::rcvhwm, 16);
    pair_sub_.set(zmq::sockopt::maxmsgsize, std::int64_t{4096});
    if (!config_.curve_secret.empty()) {
      // The two share one key pair (gateways and workers know one broker
      // key), and each admits its own public key: the other's SUB.
      core::apply(pair_sub_, core::curve_client{config_.curve_secret, core::curve_public_of(config_.curve_secret)});
    }
    pair_sub_.set(zmq::sockopt::subscribe, "");
    pair_sub_.connect(config_.pair_connect);
    // The other counts as silent after a liveness, as a peer does: a
    // tick late by up to an interval is not a stall, and must not look
    // like a dead broker.
    pair_.emplace(config_.pair_role == "primary", liveness_window(), clock::now());
    spdlog::info("broker {} is the {} of a pair: state on {}, the other's from {}", config_.id, config_.pair_role,
                 config_.pair_bind, config_.pair_connect);
  }
  spdlog::info("broker {} listening: router {}, xsub {}, xpub {}{}{}", config_.id, config_.router_endpoint,
               config_.xsub_endpoint, config_.xpub_endpoint, local_ ? ", local " : "", config_.local_endpoint);
}

void broker::stop() {
  stopping_ = true;
  wakeup_.signal();
  if (reactor_) {
    // run_on(): no thread runs the context now (see broker.hpp).
    if (local_) local_->hook(nullptr);
    reactor_.reset();
  }
}

std::string broker::status() const {
  std::lock_guard lock{status_mutex_};
  return status_.empty() ? R"({"broker":null,"peers":[],"services":[]})" : status_;  // before the first tick
}

// Once a tick: O(peers + services), and the admin thread only copies a string.
void broker::publish_status(clock::time_point now) {
  namespace json = boost::json;
  auto millis = [](clock::duration d) { return std::chrono::duration_cast<std::chrono::milliseconds>(d).count(); };
  auto window = liveness_window();
  std::unordered_map<std::string_view, const worker_view*> loads;
  auto views = table_.worker_views();
  for (const auto& v : views) loads.emplace(v.name, &v);
  std::vector<const std::pair<const std::string, peer>*> sorted;
  sorted.reserve(peers_.size());
  for (const auto& p : peers_) sorted.push_back(&p);
  std::sort(sorted.begin(), sorted.end(), [](const auto* a, const auto* b) { return a->first < b->first; });
  json::array peers;
  for (const auto* p : sorted) {
    auto role = proto::Role_Name(p->second.role);
    if (role.starts_with("ROLE_")) role.erase(0, 5);
    std::transform(role.begin(), role.end(), role.begin(), [](unsigned char ch) { return std::tolower(ch); });
    json::object o{{"id", p->first},
                   {"role", role},
                   {"joined_ms_ago", millis(now - p->second.joined)},
                   {"heard_ms_ago", millis(now - (p->second.expiry - window))}};
    if (auto it = loads.find(p->first); it != loads.end()) {
      o["draining"] = it->second->draining;
      json::array serves;
      for (const auto& l : it->second->serves)
        serves.push_back(json::object{{"service", l.service}, {"capacity", l.capacity}, {"busy", l.busy}});
      o["services"] = std::move(serves);
    }
    peers.push_back(std::move(o));
  }
  json::array services;
  for (const auto& name : table_.services())
    services.push_back(json::object{{"name", name},
                                    {"workers", table_.workers(name)},
                                    {"draining", table_.draining_workers(name)},
                                    {"queued", table_.queued(name)}});
  json::object status{{"broker", config_.id},
                      {"in_flight", table_.in_flight()},
                      {"peers", std::move(peers)},
                      {"services", std::move(services)}};
  if (pair_) {
    status["pair"] = json::object{{"role", config_.pair_role},
                                  {"state", name_of(pair_->current())},
                                  {"term", pair_->term()},
                                  {"other_heard_ms_ago", millis(now - (pair_->peer_expiry() - pair_->silence()))}};
  }
  auto text = json::serialize(status);
  std::lock_guard lock{status_mutex_};
  status_ = std::move(text);
}

bool broker::healthy() const {
  auto last = std::chrono::steady_clock::time_point{std::chrono::nanoseconds{last_turn_ns_.load()}};
  return !stopping_ && clock::now() - last < config_.heartbeat_interval * 5;
}

void broker::open_input() {
  input_ = {};
  router_in_ = input_.add(router_);
  xsub_in_ = input_.add(xsub_);
  xpub_in_ = input_.add(xpub_);
  wake_in_ = input_.add(wakeup_.fd());
  if (zap_) zap_in_ = input_.add(zap_->socket());
  if (local_) local_in_ = input_.add(local_->fd(), [this] { return local_->has_input(); });
  if (pair_) pair_in_ = input_.add(pair_sub_);
  next_tick_ = clock::now();
  now_ = next_tick_;
}

void broker::run() {
  open_input();
  while (!stopping_) {
    auto timeout = std::chrono::duration_cast<std::chrono::milliseconds>(before_wait() - now_) +
                   std::chrono::milliseconds(1);
    try {
      input_.wait(std::max(timeout, std::chrono::milliseconds(0)));
    } catch (const zmq::error_t& e) {
      now_ = clock::now();
      if (e.num() == EINTR) continue;
      throw;
    }
    after_wait();
  }
  spdlog::info("broker {} stopped", config_.id);
}

void broker::run_on(boost::asio::io_context& context, std::function<void()> on_failure) {
  asio::post(context, [this, &context, on_failure = std::move(on_failure)] {
    open_input();
    reactor_ = std::make_unique<core::input_reactor>(context, input_, [this] {
      after_wait();
      if (stopping_) {
        spdlog::info("broker {} stopped", config_.id);
        return;
      }
      reactor_->next(before_wait());
    }, "broker " + config_.id);
    if (on_failure) reactor_->on_failure([on_failure](const std::string&) { on_failure(); });
    // In-process gateways and workers schedule a turn: no eventfd, no wake-up.
    if (local_) local_->hook(reactor_->poker(local_in_));
    reactor_->watch();
    reactor_->next(before_wait());
  });
}

clock::time_point broker::before_wait() {
  last_turn_ns_ = std::chrono::duration_cast<std::chrono::nanoseconds>(now_.time_since_epoch()).count();
  if (now_ >= next_tick_) tick(now_);
  auto wake = next_tick_;
  if (auto d = table_.next_deadline()) wake = std::min(wake, *d);
  return wake;
}

void broker::after_wait() {
  // One clock reading per turn: messages of a batch share a timestamp.
  // Deadlines before input: a reply read in the same turn as its job's
  // deadline finds the job expired (the requester was told `timeout`),
  // even when this thread woke late, or was stopped, with both waiting.
  now_ = clock::now();
  subscriptions_applied_ = false;
  check_stall(now_);
  if (auto d = table_.next_deadline(); d && *d <= now_) {
    for (const auto& f : table_.expire(now_)) fail(f);
  }
  if (input_.ready(wake_in_)) wakeup_.drain();
  if (zap_ && input_.ready(zap_in_) && !zap_->handle()) metrics_->drop(drop_reason::curve_refused).Increment();
  if (pair_ && input_.ready(pair_in_)) receive_pair();  // before peers: the other's state decides for them
  bool received = false;
  if (input_.ready(router_in_)) {
    receive_router();
    received = true;
  }
  if (local_ && input_.ready(local_in_)) {
    receive_local();
    received = true;
  }
  if (received) dispatch(now_);
  if (input_.ready(xsub_in_)) forward_events();
  if (input_.ready(xpub_in_)) drain_subscriptions();
}

void broker::receive_router() {
  // Each request is dispatched as soon as it is read, so the turn's sends
  // come before the recv that finds the socket empty: that recv also takes
  // any command a send left in the mailbox, and the ROUTER needs no
  // ZMQ_EVENTS before the wait (a system call saved per turn, and, since a
  // sibling I/O thread on the same core waits for this one to block, a
  // system call less before the turn's messages go out).
  for (std::size_t i = 0; i < config_.batch; ++i) {
    zmq::message_t identity, payload;
    if (!router_.recv(identity, zmq::recv_flags::dontwait)) {
      input_.drained(router_in_);  // until send() uses it again
      return;
    }
    if (!identity.more() || !router_.recv(payload, zmq::recv_flags::dontwait)) {
      drop(drop_reason::malformed, "a message without a payload frame");
      continue;
    }
    if (payload.more()) {
      zmq::message_t extra;
      while (router_.recv(extra, zmq::recv_flags::dontwait) && extra.more()) {
      }
      drop(drop_reason::malformed, "extra frames");
      continue;
    }
    on_router_message(identity.to_string_view(), payload);
    if (table_.dispatch_due()) dispatch(now_);
  }
}

void broker::receive_local() {
  for (std::size_t i = 0; i < config_.batch; ++i) {
    std::string_view routing_id;
    zmq::message_t payload;
    if (!local_->receive(routing_id, payload)) {
      input_.drained(local_in_);  // its descriptor announces the next one
      return;
    }
    on_router_message(routing_id, payload);
  }
}

void broker::on_router_message(std::string_view routing_id_view, zmq::message_t& payload) {
  ++stats_.received;
  auto bytes = payload.to_string_view();
  // Requests and replies, nearly all the traffic, are routed from a peek at
  // their wire bytes; the rest is parsed on an arena whose first block is a
  // member buffer, so a typical envelope costs no malloc at all.
  auto head = proto::peek(bytes);
  std::optional<google::protobuf::Arena> arena;
  Envelope* env = nullptr;
  auto kind = head.kind;
  if (kind == Envelope::KIND_NOT_SET) {
    arena.emplace(proto::arena_on(arena_block_));
    env = google::protobuf::Arena::CreateMessage<Envelope>(&*arena);
    if (!proto::decode_into(bytes, *env)) {
      drop(drop_reason::malformed, "undecodable envelope");
      return;
    }
    kind = env->kind_case();
  }
  // The id of a Request, Lifecycle or HttpForward (parsed or peeked), for
  // the errors that name the job.
  auto job_id = [&]() -> std::string_view {
    if (kind == Envelope::kForward) return env->forward().id();
    if (kind != Envelope::kRequest && kind != Envelope::kLifecycle) return {};
    if (!env) return head.id;
    return kind == Envelope::kRequest ? env->request().id() : env->lifecycle().id();
  };
  // A job is named, so that its requester knows it did not run here; a
  // one-way message comes back whole, for its sender to send again.
  if (pair_ && !pair_->active()) {
    // (A Lifecycle too: a DISCONNECT notice is one; a CONNECT its gateway
    // finds by its id. And a Reply: a client's ack to a worker's emit.)
    bool one_way = kind == Envelope::kEmit || kind == Envelope::kControl || kind == Envelope::kReport ||
                   kind == Envelope::kLifecycle || kind == Envelope::kReply || kind == Envelope::kAnswer;
    if (!serve_as_pair(routing_id_view, job_id(), one_way ? bytes : std::string_view{})) return;
  }
  auto*& kind_counter = metrics_->by_kind.at(static_cast<std::size_t>(kind));
  if (!kind_counter) kind_counter = &metrics_->received.Add({{"kind", std::string{proto::kind_name(kind)}}});
  kind_counter->Increment();

  std::string routing_id{routing_id_view};
  auto now = now_;
  if (kind == Envelope::kHello) {
    on_hello(routing_id, env->hello(), now);
    if (!parked_.empty()) unpark(routing_id);  // after its Welcome (unless it is to say what it read first)
    return;
  }
  auto it = peers_.find(routing_id);
  proto::Role role = proto::ROLE_CLIENT;
  if (it == peers_.end()) {
    if (kind == Envelope::kGoodbye) {
      // Gone already (dropped, or the broker restarted). Dropped for its
      // silence and due to be announced, it is announced now: it is not
      // coming back with those sockets.
      if (auto prefix = take_pending_gone(routing_id)) announce_gone(*prefix, "goodbye");
      return;
    }
    if (auto g = pending_gone_.find(routing_id); g != pending_gone_.end())
      // A gateway lost to silence is back (its heartbeat, or what it sent
      // before its Hello): the Hello follows our NOT_REGISTERED, a round
      // trip later. Its announcement waits for it at least a liveness.
      g->second.due = std::max(g->second.due, now_ + liveness_window());
    if (!routing_id.empty() && routing_id.front() == '\0') {
      // An id libzmq made up: a pipe it renamed when a peer's new socket
      // took the peer's id (what the old socket held; the peer sends it
      // again, protocol.md "What a replaced socket held"), or a peer that
      // set none. Nobody reads that pipe: no answer.
      drop(drop_reason::unknown_peer, routing_id);
      return;
    }
    // A peer we do not know: most likely the broker restarted. Ask it to
    // announce itself; requests are still served so nothing is lost.
    // A job is named, so that the peer knows this broker holds it. What is
    // not served comes back to be sent again after the Welcome, as a pair's
    // standby gives it back: a forward by its id, a one-way message (an
    // emit, a control, a report, a client's ack, an HTTP answer) whole;
    // dropped here, a restart lost every one sent before the peer's Hello.
    if (kind != Envelope::kRequest && kind != Envelope::kLifecycle) {
      auto refusal = error_of(proto::NOT_REGISTERED, "send Hello first", std::string{job_id()});
      bool one_way = kind == Envelope::kEmit || kind == Envelope::kControl || kind == Envelope::kReport ||
                     kind == Envelope::kReply || kind == Envelope::kAnswer;
      if (one_way) refusal.mutable_error()->set_refused(std::string{bytes});
      send(routing_id, refusal);
      drop(drop_reason::unknown_peer, routing_id);
      return;
    }
    send_error(routing_id, proto::NOT_REGISTERED, "send Hello first", std::string{job_id()});
  } else {
    it->second.expiry = now + liveness_window();
    ++it->second.received;
    role = it->second.role;
    if (!parked_.empty()) unpark(routing_id);
  }
  if (it != peers_.end() && !allowed(role, kind)) {
    send_error(routing_id, proto::BAD_REQUEST,
               std::string{"message not allowed for this role: "} + std::string{proto::kind_name(kind)});
    drop(drop_reason::not_allowed, proto::kind_name(kind));
    return;
  }
  if (env && (kind == Envelope::kRequest || kind == Envelope::kReply || kind == Envelope::kLifecycle))
    head = proto::head_of(*env);
  switch (kind) {
    case Envelope::kHeartbeat: {
      const auto& beat = env->heartbeat();
      if (auto s = suspects_.find(routing_id); s != suspects_.end()) {
        if (s->second.probe == 0 && beat.has_read()) {
          send_unread(routing_id, beat.read());
          trust(routing_id, "read");
        } else if (s->second.probe == 0 && beat.has_peer_read() && it != peers_.end() &&
                   beat.peer_read().hello() == it->second.hello) {
          // It read our Welcome (it counts its reads from it), and would
          // have sent its report first, on this same socket: it has none.
          // A link welcomed by another broker since (the other of a pair)
          // counted what it read in that one's numbers, which mean nothing
          // here: what died in its old socket cannot be told, as when no
          // report comes, but what waits need not wait a liveness for it.
          trust(routing_id, "none");
          forget_read_sends(routing_id, beat.peer_read());
        } else if (s->second.probe != 0 && beat.probe() == s->second.probe) {
          trust(routing_id, "answered");
        }
      } else if (beat.has_peer_read()) {
        forget_read_sends(routing_id, beat.peer_read());
      }
      break;
    }
    case Envelope::kRequest:
    case Envelope::kLifecycle: on_job(routing_id, head, payload, now); break;
    case Envelope::kReply: on_reply(routing_id, head, payload); break;
    case Envelope::kEmit:
    case Envelope::kControl:
    case Envelope::kReport: on_addressed(routing_id, *env, bytes); break;
    case Envelope::kCancel: on_cancel(routing_id, env->cancel()); break;
    case Envelope::kDrain: {
      // Logged (and its jobs counted, a scan of the table) once a drain: a
      // worker may send Drain again, as often as it likes.
      bool first = !table_.draining(routing_id);
      table_.drain_worker(routing_id);
      if (first) spdlog::info("worker {} is draining ({} requests held)", routing_id, table_.held_by(routing_id));
      confirm_drain(routing_id);
      break;
    }
    case Envelope::kGoodbye:
      spdlog::info("{} {} said goodbye", proto::Role_Name(role), routing_id);
      remove_peer(routing_id, leaving::goodbye);
      dispatch(now);  // what it held, to the others
      break;
    case Envelope::kForward: {
      // To the gateway that owns the sid; if it is gone, the asker hears so.
      const auto& f = env->forward();
      auto owner = std::string{proto::sid_owner(f.sid())};
      auto gw = peers_.find(owner);
      bool known = !owner.empty() && gw != peers_.end() && gw->second.role == proto::ROLE_GATEWAY;
      bool api = !f.target().empty(), session = f.target().starts_with("/api/v1/sessions/");
      if (!known || !send(owner, bytes)) {
        send(routing_id, forward_refused(f.id(), api, session, known));
        break;
      }
      // A GONE is not answered (its client left); past the bound a forward
      // goes untracked, and waits out its relay deadline if its owner dies.
      if (f.method() != "GONE" && forwards_.size() < config_.max_forwards)
        forwards_.insert_or_assign(f.id(), forward_route{routing_id, owner, api, session, now});
      metrics_->forwards.Set(static_cast<double>(forwards_.size()));
      break;
    }
    case Envelope::kAnswer: {
      if (!forwards_.empty() && forwards_.erase(env->answer().id()))
        metrics_->forwards.Set(static_cast<double>(forwards_.size()));
      auto owner = std::string{proto::id_owner(env->answer().id())};
      if (owner.empty() || !peers_.contains(owner) || !send(owner, bytes)) drop(drop_reason::unroutable, "http answer");
      break;
    }
    default: break;
  }
}

bool broker::allowed(proto::Role role, Envelope::KindCase kind) const {
  switch (kind) {
    case Envelope::kHeartbeat:
    case Envelope::kRequest:
    case Envelope::kCancel:
    case Envelope::kReply:  // workers end jobs; gateways return clients' acks
    case Envelope::kGoodbye:
      return true;
    case Envelope::kDrain: return role == proto::ROLE_WORKER;
    case Envelope::kLifecycle:
    case Envelope::kReport:
    case Envelope::kForward:
    case Envelope::kAnswer: return role == proto::ROLE_GATEWAY;
    case Envelope::kEmit: return role == proto::ROLE_WORKER || role == proto::ROLE_GATEWAY;
    case Envelope::kControl: return role == proto::ROLE_WORKER || role == proto::ROLE_GATEWAY;
    default: return false;  // Welcome and Error only flow from the broker
  }
}

void broker::on_hello(const std::string& routing_id, const proto::Hello& hello, clock::time_point now) {
  if (hello.protocol_version() != proto::protocol_version) {
    send_error(routing_id, proto::UNSUPPORTED_VERSION,
               "broker speaks protocol version " + std::to_string(proto::protocol_version));
    drop(drop_reason::bad_hello, "unsupported version");
    return;
  }
  if (!proto::valid_peer_id(hello.id()) || hello.id() != routing_id) {
    send_error(routing_id, proto::BAD_REQUEST, "peer id must be valid and equal the routing id");
    drop(drop_reason::bad_hello, "bad id");
    return;
  }
  if (hello.role() != proto::ROLE_GATEWAY && hello.role() != proto::ROLE_WORKER &&
      hello.role() != proto::ROLE_CLIENT) {
    send_error(routing_id, proto::BAD_REQUEST, "unknown role");
    drop(drop_reason::bad_hello, "bad role");
    return;
  }
  if (static_cast<std::size_t>(hello.services_size()) > config_.limits.max_services) {
    // More than the table may know at once: each name past it would be
    // looked for again (a Hello of a million names held the loop 1.6 s).
    send_error(routing_id, proto::BAD_REQUEST, "a Hello names at most --max-services services");
    drop(drop_reason::bad_hello, "too many services");
    return;
  }
  for (const auto& s : hello.services()) {
    if (s.name().size() > config_.max_service_bytes) {
      send_error(routing_id, proto::BAD_REQUEST,
                 "a service name is at most " + std::to_string(config_.max_service_bytes) + " bytes (--max-service-bytes)");
      drop(drop_reason::service_limit, "a Hello naming a service of " + std::to_string(s.name().size()) + " bytes");
      return;
    }
  }
  if (!hello.sid_prefix().empty() &&
      (hello.role() != proto::ROLE_GATEWAY || !proto::valid_sid_prefix(hello.id(), hello.sid_prefix()))) {
    send_error(routing_id, proto::BAD_REQUEST,
               "a sid_prefix is a gateway's: its id, '.', and 1 to 32 of [A-Za-z0-9_-]");
    drop(drop_reason::bad_hello, "bad sid prefix");
    return;
  }
  auto existing = peers_.find(routing_id);
  if (existing != peers_.end()) {
    auto& known = existing->second;
    if (hello.incarnation() != 0 && hello.incarnation() == known.incarnation && hello.role() == known.role) {
      // The same link, alive, holding what it held: it stays registered.
      if (hello.connection() < known.connection) {
        // From a socket the link has replaced since: the newer Hello counts.
        drop(drop_reason::duplicate, "a Hello from a replaced socket");
        return;
      }
      if (known.sid_prefix != hello.sid_prefix()) {
        // A gateway told its prefix was announced gone (Welcome.prefix_gone)
        // ended its sockets and took a new one; the old one, if it was not
        // announced yet, is announced now: none of its sockets is left.
        auto old = std::exchange(known.sid_prefix, hello.sid_prefix());
        if (!old.empty() && !announced_gone_.seen(old, now)) announce_gone(old, "replaced");
      }
      // On the same socket, it answered several NOT_REGISTERED at once
      // (sent before its first Hello came), or Hellos crossed: nothing was
      // lost there. On a new one, it heard nothing from us for its liveness
      // (we stalled, or the network did) and replaced the old socket, where
      // what we sent it lately may have died: a worker gets its jobs again
      // on this one. It runs none twice (it knows the ids it holds and
      // answered), and one it never got runs now. Given to another worker
      // instead, a job it still runs would run twice.
      bool new_socket = hello.connection() > known.connection;
      clear_suspicion(routing_id, "hello");
      bool drains = welcome(routing_id, hello, &known, new_socket && hello.hello() != 0);
      if (new_socket && hello.hello() != 0) {
        // What we sent it before this Welcome may have died in the socket
        // it replaced (libzmq dropped what that pipe held when the new one
        // took its id). A link that numbers its Hellos says at once what
        // it read (Heartbeat.read); what we send it waits until then, to
        // go after what is sent again (send_unread()).
        known.welcomed_at = known.sent;
        suspects_[routing_id] = {0, now};
      }
      known.connection = hello.connection();
      known.expiry = now + liveness_window();
      known.hello = hello.hello();
      known.received = 0;
      if (new_socket && hello.role() == proto::ROLE_WORKER && !send_held_again(routing_id, now)) {
        // Full: lost as any worker whose pipe fails.
        spdlog::warn("worker {} unreachable; dropping it", routing_id);
        remove_peer(routing_id);
        dispatch(now);
        return;
      }
      if (drains) confirm_drain(routing_id);  // after its jobs: none comes after it
      if (new_socket) {
        metrics_->reconnects.Increment();
        spdlog::info("{} {} came back on a new socket", proto::Role_Name(hello.role()), routing_id);
      }
      return;
    }
    // A peer announcing itself again otherwise lost its state (a restart
    // under the same id): whatever it held goes elsewhere, and a gateway's
    // sockets are gone.
    auto old = known.sid_prefix;
    remove_peer(routing_id, leaving::replaced);
    if (!old.empty() && old != hello.sid_prefix()) announce_gone(old, "restarted");
  }
  if (peers_.size() >= config_.max_peers) {
    drop(drop_reason::peer_limit, routing_id);  // counted before the peer can hear of it
    send_error(routing_id, proto::BUSY, "the broker has --max-peers peers registered");
    return;  // a gateway lost to silence stays due to be announced
  }
  if (hello.role() == proto::ROLE_GATEWAY) settle_gone(routing_id, hello.sid_prefix());
  auto& added = peers_[routing_id] = peer{hello.role(), now + liveness_window(), now,
                                          hello.incarnation(), hello.connection(), hello.hello()};
  added.kept = core::kept_ring<sent_at>{config_.kept_sent, config_.kept_sent_bytes};
  added.sid_prefix = hello.sid_prefix();
  if (hello.role() == proto::ROLE_WORKER) {
    // The services the table knows first: once this worker serves them, a
    // new one of its own cannot take their place (make_room takes only
    // names no worker serves, as its own are after remove_peer).
    std::vector<const proto::Service*> order;
    for (const auto& s : hello.services()) order.push_back(&s);
    std::stable_partition(order.begin(), order.end(), [&](const auto* s) { return table_.knows(s->name()); });
    for (const auto* sp : order) {
      const auto& s = *sp;
      if (s.name().empty()) continue;
      if (s.capacity() > config_.limits.max_capacity) {
        metrics_->capacity_clamped.Increment();
        if (log_limit_.allow())
          spdlog::warn("worker {} announced capacity {} for {}: taken as --max-capacity {}", routing_id,
                       s.capacity(), s.name(), config_.limits.max_capacity);
      }
      service_table::eviction evicted;
      if (!table_.add_worker(routing_id, s.name(), s.capacity(), &evicted)) {
        // Every known service has a worker: this one is not served here
        // (the worker is registered for its others).
        drop(drop_reason::service_limit, s.name());
        continue;
      }
      if (evicted.name.empty()) continue;
      // A name no worker served gave way: its waiting requests end now.
      for (const auto& f : evicted.failed) fail(f);
      metrics_->forget(evicted.name);
    }
  }
  bool drains = welcome(routing_id, hello);
  if (hello.role() == proto::ROLE_WORKER) replay_gone(routing_id);
  if (drains) confirm_drain(routing_id);  // last: nothing follows it
  spdlog::info("{} {} joined ({} services)", proto::Role_Name(hello.role()), routing_id,
               hello.services_size());
  dispatch(now);
}

// A worker back on a new socket: the jobs it holds go again (it may have
// lost them in the old one), then a Recall of those that do not, whose
// final answers may have died there: without them their capacity would
// never come back. False when its pipe took not all of it.
bool broker::send_held_again(const std::string& worker, clock::time_point now) {
  for (job* work : table_.resend_held(worker))
    if (!send_job(worker, *work, now)) return false;
  auto owed = table_.owed_answers(worker);
  if (owed.empty()) return true;
  Envelope recall;
  for (auto& id : owed) recall.mutable_recall()->add_ids(std::move(id));
  if (!send(worker, recall)) return false;
  metrics_->answers_recalled.Increment(static_cast<double>(owed.size()));
  return true;
}

// A worker whose Hello says it drains (re-announced after a restart of
// ours, or a Hello again) drains here too; true then: the caller sends the
// confirmation, after the Welcome and after any job it sends it again.
// `before`: the peer, registered by an earlier Hello of the same link. The
// Welcome says how much of what the link sent since then came: what its
// replaced socket held when the new one took the peer's id died there
// (libzmq drops what the old pipe held, or gives it another id).
bool broker::welcome(const std::string& to, const proto::Hello& hello, const peer* before, bool marks_resent) {
  bool drains = hello.role() == proto::ROLE_WORKER && hello.draining();
  if (drains) table_.drain_worker(to);  // idempotent
  Envelope env;
  auto* w = env.mutable_welcome();
  w->set_protocol_version(proto::protocol_version);
  w->set_heartbeat_interval_ms(static_cast<std::uint32_t>(config_.heartbeat_interval.count()));
  w->set_heartbeat_liveness(config_.heartbeat_liveness);
  w->set_broker_id(config_.id);
  w->set_incarnation(incarnation_);
  w->set_hello(hello.hello());
  if (auto it = peers_.find(to); it != peers_.end()) w->set_sent(it->second.sent);
  if (before && before->hello != 0) {
    w->set_previous_hello(before->hello);
    w->set_received(before->received);
  }
  w->set_marks_resent(marks_resent);  // send_unread() ends with the mark
  w->set_max_message_bytes(max_message_said());
  if (hello.role() == proto::ROLE_GATEWAY && !hello.sid_prefix().empty() &&
      announced_gone_.seen(hello.sid_prefix(), now_))
    w->set_prefix_gone(true);  // it ends its sockets and comes again with a new prefix
  // On the connection the Hello came on, before anything kept for the peer
  // (what the broker keeps of what it sent it must not be forgotten by
  // sending that first: send_unread() may still need it).
  auto message = core::message_of(env);
  if (send_to(to, message) != sent::ok) drop(drop_reason::unreachable, to);
  return drains;
}

// The Drain back to a draining worker: on its pipe, every job sent to it
// before comes before this, and none comes after. Its drain waits for it,
// then for what it holds, so it cannot stop between a job's dispatch and
// the job's arrival.
void broker::confirm_drain(const std::string& worker) {
  Envelope env;
  env.mutable_drain();
  send(worker, env);
}

// `payload` becomes the job's (moved: `head` points into it).
void broker::on_job(const std::string& routing_id, const proto::hot_envelope& head, zmq::message_t& payload,
                    clock::time_point now) {
  if (head.id.empty() || head.service.empty()) {
    if (!head.id.empty()) send_reply(routing_id, std::string{head.id}, proto::BAD_REQUEST, "request without a service");
    drop(drop_reason::malformed, "request without id or service");
    return;
  }
  if (head.service.size() > config_.max_service_bytes) {
    if (head.wants_reply)
      send_reply(routing_id, std::string{head.id}, proto::BAD_REQUEST,
                 "a service name is at most " + std::to_string(config_.max_service_bytes) + " bytes (--max-service-bytes)");
    drop(drop_reason::service_limit, "a request naming a service of " + std::to_string(head.service.size()) + " bytes");
    return;
  }
  if (proto::id_owner(head.id) != routing_id) {
    // Ids are "<requester id>:<n>": one peer cannot take another's ids, and
    // so cannot make the broker drop that peer's request as a duplicate.
    if (head.wants_reply) send_reply(routing_id, std::string{head.id}, proto::BAD_REQUEST,
                                     "request id must be \"" + routing_id + ":<n>\"");
    drop(drop_reason::foreign_id, head.id);
    return;
  }
  if (!head.sid.empty() && proto::sid_owner(head.sid) != routing_id) {
    // A sid is "<gateway id>.<random>": only that gateway speaks for its
    // sockets. Another peer naming one would act as that browser to the
    // worker (say something in its name, cancel a task it started).
    if (head.wants_reply) send_reply(routing_id, std::string{head.id}, proto::BAD_REQUEST,
                                     "a request may name only a sid of its sender's (a gateway's)");
    drop(drop_reason::foreign_sid, head.sid);
    return;
  }
  auto timeout = head.timeout_ms ? std::chrono::milliseconds(head.timeout_ms) : config_.default_timeout;
  timeout = std::min(timeout, config_.max_timeout);
  job work;
  work.id = head.id;
  work.service = head.service;
  work.wants_reply = head.wants_reply;
  work.connect = head.kind == Envelope::kLifecycle && head.wants_reply;
  work.requester = routing_id;
  work.received = now;
  work.deadline = now + timeout;
  // Workers read attempt and timeout_ms from the envelope. Gateways send
  // what the broker enforces; anything else is rewritten at dispatch.
  work.stale = head.attempt != 1 || head.timeout_ms != static_cast<std::uint32_t>(timeout.count());
  work.payload = std::move(payload);
  switch (table_.submit(std::move(work))) {
    case service_table::admit::queued: break;
    case service_table::admit::busy:
      metrics_->count(work.service, outcome::busy).Increment();
      if (work.wants_reply) send_reply(routing_id, work.id, proto::BUSY, "service queue is full: " + work.service);
      break;
    case service_table::admit::duplicate:
      // A retransmission of a request still in progress: the first answers.
      drop(drop_reason::duplicate, work.id);
      break;
    case service_table::admit::id_in_use:
      // A retry of a request that ended (TIMEOUT, CANCELLED: answered) while
      // its worker still runs it: no first is left to answer, so this one
      // is, at once; the id is free again once the worker answers. Counted
      // as busy (it was answered), not as a duplicate drop, under the
      // service of the job that holds the id (submit() says which).
      if (!work.service.empty()) metrics_->count(work.service, outcome::busy).Increment();
      if (work.wants_reply)
        send_reply(routing_id, work.id, proto::BUSY, "an earlier request of this id ended but its worker still runs it");
      break;
    case service_table::admit::no_service:
      // A name past --max-services: no series is made for it either.
      drop(drop_reason::service_limit, work.service);
      if (work.wants_reply) send_reply(routing_id, work.id, proto::UNAVAILABLE, "too many services: " + work.service);
      break;
  }
}

void broker::dispatch(clock::time_point now) {
  std::vector<std::string> unreachable;
  for (const auto& a : table_.dispatch()) {
    job& work = *a.work;
    bool ok = send_job(a.worker, work, now);
    ++stats_.dispatched;
    metrics_->count(work.service, outcome::dispatched).Increment();
    metrics_->dispatch_batch.observe(seconds_since(work.received, now));
    if (!ok) unreachable.emplace_back(a.worker);
  }
  if (unreachable.empty()) return;
  // A worker whose pipe is gone or full is treated as lost: its jobs retry
  // on the others.
  std::sort(unreachable.begin(), unreachable.end());
  unreachable.erase(std::unique(unreachable.begin(), unreachable.end()), unreachable.end());
  for (const auto& worker : unreachable) {
    spdlog::warn("worker {} unreachable; dropping it", worker);
    remove_peer(worker);
  }
  dispatch(now);
}

// The job's envelope to its worker: the bytes as received (a copy shares
// them, refcounted: the job keeps them for a retry), or rewritten when the
// timeout or attempt in them no longer hold.
bool broker::send_job(std::string_view worker, job& work, clock::time_point now) {
  auto waited = now - work.received;
  auto attempt = work.attempt + work.resent;
  if (!work.stale && attempt <= 1 && waited <= std::chrono::milliseconds(1)) {
    zmq::message_t copy;
    copy.copy(work.payload);
    return send(worker, std::move(copy));
  }
  auto env = proto::decode(work.payload.to_string_view());
  auto left = std::chrono::duration_cast<std::chrono::milliseconds>(work.deadline - now).count();
  auto left_ms = static_cast<std::uint32_t>(std::max<long long>(left, 1));
  if (env && env->has_request()) {
    env->mutable_request()->set_attempt(attempt);
    env->mutable_request()->set_timeout_ms(left_ms);
  } else if (env && env->has_lifecycle()) {
    env->mutable_lifecycle()->set_attempt(attempt);
    env->mutable_lifecycle()->set_timeout_ms(left_ms);
  }
  return env ? send(worker, *env) : send(worker, work.payload.to_string_view());
}

// `payload` is forwarded as it is (moved: `reply` points into it).
void broker::on_reply(const std::string& routing_id, const proto::hot_envelope& reply, zmq::message_t& payload) {
  if (reply.partial) {
    if (const job* early = table_.answer_early(reply.id, routing_id)) {
      metrics_->request_batch.observe(seconds_since(early->received, now_));
      if (early->wants_reply) answer(early->requester, routing_id, reply.id, payload);
    }
    return;
  }
  if (reply.code == proto::OK && table_.ended_connects() > 0)
    if (const auto* connect = table_.late_connect(reply.id, routing_id)) {
      owe_disconnect(routing_id, reply.id, *connect);
      return;
    }
  bool held = false;
  auto done = table_.complete(reply.id, routing_id, &held);
  if (done) {
    ++stats_.replies;
    if (!done->answered) metrics_->request_batch.observe(seconds_since(done->received, now_));
    // Answered early, the job's outcome is its ack's: its final answer only
    // frees the capacity (OK from the SDKs; CANCELLED for a Recall the
    // worker had no answer for).
    metrics_->count(done->service, outcome_of(done->answered ? proto::OK : reply.code)).Increment();
    if (done->wants_reply && !done->answered) answer(done->requester, routing_id, reply.id, payload);
    return;
  }
  if (held) return;  // a late answer to a job that expired or was cancelled
  if (!table_.requester_of(reply.id).empty()) {
    // Another peer's job, which this peer does not hold: a stale or forged
    // answer must not reach the requester in place of the holder's.
    drop(drop_reason::not_holder, reply.id);
    return;
  }
  // Not a job: a client's ack of a worker's Emit, which only a gateway
  // sends, routed to the worker named by the id. Anything else would let a
  // peer answer, ahead of the broker, a request it is about to receive: a
  // gateway's own request ids are predictable.
  auto from = peers_.find(routing_id);
  if (from == peers_.end() || from->second.role != proto::ROLE_GATEWAY) {
    drop(drop_reason::not_holder, reply.id);
    return;
  }
  auto owner = std::string{proto::id_owner(reply.id)};
  auto to = owner.empty() ? peers_.end() : peers_.find(owner);
  if (to == peers_.end() || to->second.role != proto::ROLE_WORKER) {
    drop(drop_reason::unroutable, reply.id);
    return;
  }
  send(owner, std::move(payload));
}

// A connect hook accepted after its CONNECT ended: the gateway has answered
// the client TIMEOUT (or gave up on the broker and cancelled), and the
// service holds a socket that is not there. The worker that accepted it
// hears the socket's DISCONNECT, so that state kept per worker is undone
// where it was made and after it was made; it takes the capacity the
// CONNECT took. Its user is the one the CONNECT named (a token's): the
// broker does not read the hook's answer.
void broker::owe_disconnect(const std::string& worker, std::string_view connect_id, const zmq::message_t& connect) {
  Envelope env;
  if (!env.ParseFromArray(connect.data(), static_cast<int>(connect.size())) || !env.has_lifecycle()) {
    table_.complete(connect_id, worker);  // cannot happen: it was parsed on arrival
    return;
  }
  auto& l = *env.mutable_lifecycle();
  job work;
  work.id = owed_prefix_ + std::to_string(++next_owed_);  // a "." no peer id has: no request can take it
  work.service = l.service();
  work.requester.clear();  // the broker's own: its answer goes nowhere
  work.wants_reply = false;
  work.owed = true;
  work.received = now_;
  work.deadline = now_ + std::min(config_.default_timeout, config_.max_timeout);
  l.set_kind(proto::Lifecycle::DISCONNECT);
  l.set_id(work.id);
  l.clear_auth();
  l.set_reason("the connect was not answered in time");
  l.set_attempt(1);
  l.set_timeout_ms(static_cast<std::uint32_t>(std::min(config_.default_timeout, config_.max_timeout).count()));
  work.payload = core::message_of(env);
  zmq::message_t out;
  out.copy(work.payload);
  if (!table_.hand_over(connect_id, worker, std::move(work))) {
    spdlog::error("worker {} accepted {} late, and its DISCONNECT could not take the connect's place", worker,
                  l.sid());  // cannot happen: late_connect found it, and no peer's id holds a "."
    table_.complete(connect_id, worker);
    return;
  }
  if (!send(worker, std::move(out))) {
    // As in dispatch(): a worker that cannot be reached is lost. The
    // DISCONNECT goes with it (see service_table::remove_worker), and what
    // else it held goes to other workers.
    spdlog::warn("worker {} unreachable; dropping it", worker);
    remove_peer(worker);
    dispatch(now_);
    return;
  }
  ++stats_.owed_disconnects;
  ++stats_.dispatched;
  metrics_->owed_disconnects.Increment();
  metrics_->count(l.service(), outcome::dispatched).Increment();
  spdlog::debug("worker {} accepted {} after its connect ended: sent its DISCONNECT", worker, l.sid());
}

void broker::on_addressed(const std::string& routing_id, const Envelope& env, std::string_view payload) {
  std::string sid, origin, ref;
  if (env.has_emit()) {
    const auto& e = env.emit();
    if (e.to_case() != proto::Emit::kSid) {
      publish(proto::topic_for(e), payload, "emit without a target");
      return;
    }
    sid = e.sid();
    origin = e.origin().empty() ? routing_id : e.origin();
    ref = e.ref();
  } else if (env.has_control()) {
    if (auto to = env.control().to_case(); to == proto::Control::kInRoom || to == proto::Control::kInNamespace) {
      publish(proto::topic_for(env.control()), payload, "room-wide control that names no one");
      return;
    }
    sid = env.control().sid();
    origin = env.control().origin().empty() ? routing_id : env.control().origin();
    ref = env.control().ref();
  } else {
    // A gateway's delivery report goes to the origin it names.
    const auto& to = env.report().to();
    if (to.empty() || !peers_.contains(to) || !send(to, payload)) drop(drop_reason::unroutable, "delivery report");
    return;
  }
  auto gateway = std::string{proto::sid_owner(sid)};
  auto it = peers_.find(gateway);
  undelivered report{origin, proto::DeliveryReport::GATEWAY_GONE, sid, ref,
                     gateway.empty() ? "sid has no gateway prefix" : "no live gateway " + gateway};
  if (pending_gone_.contains(gateway)) {
    // Dropped for silence, in its grace (--gateway-gone-after): it may come
    // back with its sockets. Not gone, as far as anyone knows yet.
    report.status = proto::DeliveryReport::REJECTED;
    report.detail = "gateway " + gateway + " is silent: announced gone unless it returns in time";
  } else if (!gateway.empty() && it != peers_.end() && it->second.role == proto::ROLE_GATEWAY) {
    zmq::message_t message{payload.data(), payload.size()};
    auto result = deliver(gateway, message, report);
    if (result == sent::ok) return;
    if (result == sent::full) {
      // A live gateway, behind: not gone (as answer() says of a requester).
      report.status = proto::DeliveryReport::REJECTED;
      report.detail = "the pipe to gateway " + gateway + " is full";
    }
  }
  send_report(std::move(report));
}

void broker::publish(const std::string& topic, std::string_view payload, const char* no_topic) {
  if (topic.empty()) {
    drop(drop_reason::malformed, no_topic);
    return;
  }
  zmq::message_t t{topic.data(), topic.size()};
  zmq::message_t body{payload.data(), payload.size()};
  send_event(t, body);
}

void broker::send_event(zmq::message_t& topic, zmq::message_t& body) {
  apply_subscriptions();
  std::array<char, proto::event_stamp_bytes> stamp;
  auto numbered = streams_.next(topic.to_string_view());
  proto::encode_stamp(numbered.stamp, stamp);
  if (numbered.took_over) metrics_->streams_taken_over.Increment();
  // XPUB never blocks: a subscriber over its HWM loses the event (and
  // finds the gap in the stamps).
  xpub_.send(topic, zmq::send_flags::sndmore | zmq::send_flags::dontwait);
  xpub_.send(body, zmq::send_flags::sndmore | zmq::send_flags::dontwait);
  xpub_.send(zmq::buffer(stamp), zmq::send_flags::dontwait);
  input_.used(xpub_in_);
  ++stats_.events;
  metrics_->events.Increment();
}

void broker::forward_events() {
  // A pair's broker that does not serve forwards nothing: what publishers
  // sent it before it unsubscribed (while it was stopped, say, and the
  // other took over) would reach the gateways late, or twice.
  const bool forward = !pair_ || (pair_->active() && !events_doubtful_);
  for (std::size_t i = 0; i < config_.batch; ++i) {
    zmq::message_t topic;
    if (!xsub_.recv(topic, zmq::recv_flags::dontwait)) return;
    if (!topic.more()) {
      drop(drop_reason::malformed, "event without a body");
      continue;
    }
    zmq::message_t body;
    if (!xsub_.recv(body, zmq::recv_flags::dontwait)) return;
    if (body.more()) {
      zmq::message_t extra;
      while (xsub_.recv(extra, zmq::recv_flags::dontwait) && extra.more()) {
      }
      drop(drop_reason::malformed, "event with extra frames");
      continue;
    }
    if (!forward) {
      drop(drop_reason::standby, "event");
      continue;
    }
    send_event(topic, body);
  }
}

// libzmq applies the subscriptions that reached the XPUB when it processes
// the socket's commands, which a send skips while the socket was used in
// the last millisecond or so: under load, an event published right after a
// gateway's subscription to its room reached this process (the sockets
// API's join answered, say) would be filtered out. Asking for the socket's
// events processes them without that throttle: once per turn that
// publishes (one mailbox check).
void broker::apply_subscriptions() {
  if (subscriptions_applied_) return;
  (void)xpub_.get(zmq::sockopt::events);
  subscriptions_applied_ = true;
}

void broker::drain_subscriptions() {
  // Subscriptions are applied by the XPUB itself; nothing goes upstream
  // because the XSUB already takes everything.
  for (std::size_t i = 0; i < config_.batch; ++i) {
    zmq::message_t msg;
    if (!xpub_.recv(msg, zmq::recv_flags::dontwait)) return;
  }
}

void broker::on_cancel(const std::string& routing_id, const proto::Cancel& cancel) {
  auto requester = table_.requester_of(cancel.id());
  if (requester.empty()) return;  // ended already: nothing to cancel
  if (requester != routing_id) {  // only the asker may give up on a request
    drop(drop_reason::not_requester, cancel.id());
    return;
  }
  std::string worker;
  auto gone = table_.cancel(cancel.id(), &worker);
  if (!gone) return;
  metrics_->count(gone->service, outcome::cancelled).Increment();
  if (!worker.empty()) {
    Envelope env;
    env.mutable_cancel()->set_id(cancel.id());
    env.mutable_cancel()->set_reason(proto::CANCELLED);
    send(worker, env);
  }
}

void broker::fail(const failure& f) {
  metrics_->count(f.work.service, outcome_of(f.code)).Increment();
  if (!f.worker.empty()) {
    Envelope env;
    env.mutable_cancel()->set_id(f.work.id);
    env.mutable_cancel()->set_reason(f.code);
    send(f.worker, env);
  }
  if (!f.work.wants_reply) return;
  std::string message;
  switch (f.code) {
    case proto::UNAVAILABLE:
      // Waited its whole deadline in the queue: for want of any worker, or
      // behind busy ones (an operator reading the second as the first
      // would look for a dead service, not a saturated one).
      message = table_.workers(f.work.service) == 0 ? "no worker for service " + f.work.service
                                                    : "no worker of service " + f.work.service + " was free in time";
      break;
    case proto::TIMEOUT: message = "deadline passed"; break;
    case proto::WORKER_LOST: message = "worker lost " + std::to_string(f.work.attempt) + " times"; break;
    default: message = proto::Code_Name(f.code); break;
  }
  send_reply(f.work.requester, f.work.id, f.code, std::move(message));
}

// A worker's answer to a job's requester. When it cannot be passed on (the
// requester's connection is gone, or its pipe is full) the worker gets a
// delivery report instead: an answer is never dropped in silence. A
// requester the broker dropped for missed heartbeats but whose connection
// is still there is still answered: it may be back (a stall), and its
// sockets may still be waiting.
void broker::answer(const std::string& requester, const std::string& worker, std::string_view id,
                    zmq::message_t& payload) {
  // `id` points into `payload`, which send_to() leaves as it was unless it sent it.
  auto result = parked_.empty() && suspects_.empty() ? send_to(requester, payload) : sent::gone;  // the hot path
  if (result == sent::ok) return;
  undelivered report{worker, proto::DeliveryReport::REQUESTER_GONE, {}, std::string{id},
                     "requester " + requester + " is gone"};
  // A full pipe was tried (and counted) once; a connection gone, or none
  // tried yet, is deliver()'s to park or report.
  if (result != sent::full) result = deliver(requester, payload, report);
  if (result == sent::ok) return;
  if (result == sent::full) {
    report.status = proto::DeliveryReport::REJECTED;
    report.detail = "the pipe to requester " + requester + " is full";
  }
  send_report(std::move(report));
}

// Sends `payload` to `to`, or keeps it (park()) if `to` is a registered
// peer without its connection for the moment; ok then too. Behind what is
// kept for `to` already, so that a peer gets its messages in order. `full`
// or `gone` (counted): not sent, `payload` left, for the caller to report.
broker::sent broker::deliver(std::string_view to, zmq::message_t& payload, const undelivered& report) {
  bool behind = false;
  if (!parked_.empty() || !suspects_.empty()) {
    std::string key{to};
    if (suspects_.contains(key)) {
      behind = true;  // its connection is not known yet (check_stall())
    } else if (parked_.contains(key)) {
      unpark(key);
      behind = parked_.contains(key);  // still: its connection is not back
    }
  }
  auto result = behind ? sent::gone : send_to(to, payload);
  if (result != sent::gone) return result;
  if (park(std::string{to}, payload, report)) return sent::ok;
  drop(drop_reason::unreachable, to);
  return sent::gone;
}

bool broker::park(const std::string& to, zmq::message_t& payload, const undelivered& report) {
  // A job, or a heartbeat, for a peer whose connection is in doubt is kept
  // past max_parked: refused, the job cost its worker (dropped as
  // unreachable, its other jobs run again elsewhere while it still ran
  // them) and a heartbeat's cost nothing but filled the bound for what can
  // be reported. Both are bounded elsewhere: a worker holds at most its
  // capacity of jobs (whose bytes the table keeps anyway), a peer gets a
  // heartbeat a tick, and what is kept goes at the peer's liveness.
  auto kind = proto::kind_of(payload.to_string_view());
  bool bounded = kind != Envelope::kRequest && kind != Envelope::kLifecycle && kind != Envelope::kHeartbeat;
  if ((bounded && parked_bounded_ >= config_.max_parked) || payload.size() > config_.max_parked_bytes - parked_bytes_ ||
      !peers_.contains(to))
    return false;
  auto size = payload.size();
  parked_[to].push_back({std::move(payload), now_, report, bounded});
  parked_bounded_ += bounded;
  set_parked(parked_count_ + 1, parked_bytes_ + size);
  return true;
}

// What is parked now, in messages and bytes, and their gauges.
void broker::set_parked(std::size_t messages, std::size_t bytes) {
  parked_count_ = messages;
  parked_bytes_ = bytes;
  metrics_->parked.Set(static_cast<double>(parked_count_));
  metrics_->parked_bytes.Set(static_cast<double>(parked_bytes_));
}

// A message came from the peer: its connection is back. What was kept for
// it goes now, in order; what still finds no connection stays.
void broker::unpark(const std::string& to) {
  auto it = parked_.find(to);
  if (it == parked_.end() || suspects_.contains(to)) return;
  auto& kept = it->second;
  std::size_t sent_now = 0, bytes = 0;
  while (!kept.empty()) {
    auto size = kept.front().payload.size();  // sent, the payload is empty
    if (send_to(to, kept.front().payload) != sent::ok) break;
    parked_bounded_ -= kept.front().bounded;
    kept.pop_front();
    ++sent_now;
    bytes += size;
  }
  set_parked(parked_count_ - sent_now, parked_bytes_ - bytes);
  metrics_->unparked.Add({{"outcome", "delivered"}}).Increment(static_cast<double>(sent_now));
  if (kept.empty()) parked_.erase(it);  // else its pipe is full, or gone again: the rest waits
  if (sent_now) spdlog::info("{}: {} messages kept while it had no connection delivered", to, sent_now);
}

// Kept past the peer's liveness: it is not coming back on this connection.
void broker::expire_parked(clock::time_point now) {
  std::vector<std::string> stale;
  for (const auto& [to, kept] : parked_)
    if (!kept.empty() && now - kept.front().since >= liveness_window()) stale.push_back(to);
  for (const auto& to : stale) report_parked(to);
}

void broker::report_parked(const std::string& to) {
  auto it = parked_.find(to);
  if (it == parked_.end()) return;
  auto kept = std::move(it->second);
  parked_.erase(it);
  std::size_t bytes = 0;
  for (const auto& k : kept) {
    bytes += k.payload.size();
    parked_bounded_ -= k.bounded;
  }
  set_parked(parked_count_ - kept.size(), parked_bytes_ - bytes);
  metrics_->unparked.Add({{"outcome", "reported"}}).Increment(static_cast<double>(kept.size()));
  for (auto& k : kept) {
    drop(drop_reason::unreachable, to);
    if (!k.report.to.empty()) send_report(std::move(k.report));
  }
}

void broker::remove_peer(const std::string& routing_id, leaving how) {
  auto it = peers_.find(routing_id);
  if (it == peers_.end()) return;
  auto role = it->second.role;
  auto sid_prefix = std::move(it->second.sid_prefix);
  peers_.erase(it);
  suspects_.erase(routing_id);
  report_parked(routing_id);
  if (role == proto::ROLE_WORKER) {
    for (const auto& f : table_.remove_worker(routing_id)) fail(f);
  }
  if (role == proto::ROLE_GATEWAY && !forwards_.empty()) {
    // What was relayed to it will not be answered: each asker hears now
    // what it would hear of a session no live gateway owns. What it asked
    // is answered to nobody.
    std::vector<std::pair<std::string, forward_route>> lost;
    for (auto f = forwards_.begin(); f != forwards_.end();) {
      bool owned = f->second.owner == routing_id;
      if (!owned && f->second.asker != routing_id) {
        ++f;
        continue;
      }
      if (owned) lost.emplace_back(f->first, std::move(f->second));
      f = forwards_.erase(f);
    }
    for (const auto& [id, route] : lost) send(route.asker, forward_refused(id, route.api, route.session, false));
    metrics_->forwards.Set(static_cast<double>(forwards_.size()));
  }
  spdlog::info("{} {} left", proto::Role_Name(role), routing_id);
  if (role != proto::ROLE_GATEWAY || sid_prefix.empty() || how == leaving::replaced) return;
  if (how == leaving::goodbye || config_.gateway_gone_after.count() == 0) {
    announce_gone(sid_prefix, how == leaving::goodbye ? "goodbye" : "silent");
    return;
  }
  if (pending_gone_.size() >= config_.max_peers) {
    // Full (many gateways lost at once): the one due first goes now.
    auto first = std::min_element(pending_gone_.begin(), pending_gone_.end(),
                                  [](const auto& a, const auto& b) { return a.second.due < b.second.due; });
    announce_gone(*take_pending_gone(first->first), "silent");
  }
  pending_gone_.insert_or_assign(routing_id, gone_gateway{std::move(sid_prefix), now_ + config_.gateway_gone_after});
  metrics_->gone_pending.Set(static_cast<double>(pending_gone_.size()));
}

// What the Welcome says a peer may send: --max-message-bytes, less what
// CURVE adds to each frame on the wire (33 bytes in libzmq 4.3; 64 kept),
// which libzmq counts against the bound too.
std::uint64_t broker::max_message_said() const {
  auto margin = config_.curve_secret.empty() ? 0 : 64;
  return static_cast<std::uint64_t>(std::max<std::int64_t>(config_.max_message_bytes - margin, 1));
}

std::string broker::gone_message(const std::string& prefix, const char* reason) {
  Envelope env;
  auto* g = env.mutable_gateway_gone();
  g->set_gateway(std::string{proto::sid_owner(prefix)});
  g->set_sid_prefix(prefix);
  g->set_reason(reason);
  return env.SerializeAsString();
}

// A worker that registers hears again what was announced in the last
// replayed_gone (10 minutes): one that was dropped meanwhile (a pause, a
// partition) and came back keeping its state missed it, and a hook must
// not mind sids it does not know, so the others lose nothing by it.
void broker::replay_gone(const std::string& worker) {
  std::vector<std::string> prefixes;
  announced_gone_.for_each_since(now_ - replayed_gone, [&](const std::string& prefix) { prefixes.push_back(prefix); });
  // The newest max_replayed_gone at most: a gateway in a crash loop under a
  // pinned id makes one a start.
  auto from = prefixes.size() > max_replayed_gone ? prefixes.size() - max_replayed_gone : 0;
  for (auto i = from; i < prefixes.size(); ++i) send(worker, gone_message(prefixes[i], "replayed"));
  if (from < prefixes.size())
    spdlog::info("worker {} heard again the {} gateways announced gone in the last 10 minutes", worker,
                 prefixes.size() - from);
}

// A gateway's Hello: if it was lost to silence and is back with the prefix
// it left with, it still has its sockets: nothing is announced. With
// another, it is a new process under the same id (or one that ended its
// sockets): the old prefix is announced now.
void broker::settle_gone(const std::string& gateway, const std::string& prefix) {
  auto left = take_pending_gone(gateway);
  if (!left) return;
  if (*left != prefix) announce_gone(*left, "restarted");
  else spdlog::info("gateway {} is back before its sockets were announced gone", gateway);
}

// The prefix of a gateway whose announcement waits, no longer waiting.
std::optional<std::string> broker::take_pending_gone(const std::string& gateway) {
  auto it = pending_gone_.find(gateway);
  if (it == pending_gone_.end()) return std::nullopt;
  auto prefix = std::move(it->second.sid_prefix);
  pending_gone_.erase(it);
  metrics_->gone_pending.Set(static_cast<double>(pending_gone_.size()));
  return prefix;
}

void broker::announce_due_gone(clock::time_point now) {
  std::vector<std::string> due;
  for (const auto& [gateway, g] : pending_gone_)
    if (now >= g.due) due.push_back(gateway);
  for (const auto& gateway : due) announce_gone(*take_pending_gone(gateway), "silent");
}

// Every worker hears it (each may keep something per socket: a service's
// workers may share a database, and all of them run the hook, which must
// not mind a socket it does not know). A worker not registered now hears
// it when it registers, within 10 minutes (replay_gone).
void broker::announce_gone(const std::string& prefix, const char* reason) {
  auto bytes = gone_message(prefix, reason);
  std::vector<std::string> workers;
  for (const auto& [id, p] : peers_)
    if (p.role == proto::ROLE_WORKER) workers.push_back(id);
  for (const auto& w : workers) send(w, bytes);
  announced_gone_.remember(prefix, now_);
  metrics_->gateways_gone.Add({{"reason", reason}}).Increment();
  spdlog::warn("gateway {} is gone ({}): told {} workers that the sockets {}* are gone", proto::sid_owner(prefix),
               reason, workers.size(), prefix);
}

Envelope broker::forward_refused(std::string_view forward_id, bool api, bool session, bool busy) const {
  Envelope env;
  auto* a = env.mutable_answer();
  a->set_id(std::string{forward_id});
  a->set_content_type("application/json");
  if (busy) {  // the owner's pipe is full: the session lives on, the request is refused
    a->set_status(503);
    a->set_body(api ? R"({"error":"gateway busy"})" : R"({"code":3,"message":"Bad request"})");
  } else if (!api) {  // Engine.IO's answer
    a->set_status(400);
    a->set_body(R"({"code":1,"message":"Session ID unknown"})");
  } else {  // the HTTP API's: a session's (by its key) or a socket's
    a->set_status(404);
    a->set_body(session ? R"({"error":"unknown session"})" : R"({"error":"unknown sid"})");
  }
  return env;
}

// At the start of each turn: this thread did not run for more than a
// heartbeat interval past its tick (the process was stopped, the host paused
// or starved it). The peers' heartbeats wait unread in the sockets: the
// time away does not count against them, or every peer would be dropped,
// and every worker's jobs run again. At most a whole liveness from now: a
// thread starved on every tick still finds a peer that is really silent
// dead, only later.
// A peer that heard nothing from us for its liveness meanwhile replaced its
// socket, and until its new one takes the peer's id, what we send it goes
// into the old one's pipe and dies there. So every peer is probed (a
// Heartbeat with a number it sends back at once), and what we send it is
// parked until the answer or its Hello comes: either comes on the
// connection that reaches it.
// --- A broker pair (pair.hpp) ---

static_assert(static_cast<int>(pair_fsm::state::primary) == proto::PairState::PRIMARY &&
              static_cast<int>(pair_fsm::state::backup) == proto::PairState::BACKUP &&
              static_cast<int>(pair_fsm::state::active) == proto::PairState::ACTIVE &&
              static_cast<int>(pair_fsm::state::passive) == proto::PairState::PASSIVE);

void broker::subscribe_events(bool on) {
  const char all = on ? 1 : 0;  // XSUB: 1 subscribes, 0 unsubscribes, the topic follows (none: all)
  xsub_.send(zmq::buffer(&all, 1));
}

bool broker::serve_as_pair(std::string_view routing_id, std::string_view job, std::string_view refused) {
  pair_fsm::change c;
  if (pair_->on_client(now_, pair_fsm::wall_clock::now(), c)) {
    on_pair_change(c);
    return true;
  }
  // Told at once, rather than left to find this broker silent: a link that
  // knows the other goes there (Error STANDBY). Not a made-up id: nobody
  // reads that pipe (see on_router_message).
  if (!routing_id.empty() && routing_id.front() != '\0') {
    auto env = error_of(proto::STANDBY,
                        "broker " + config_.id + " is the pair's " + std::string{name_of(pair_->current())} +
                            " broker: the other one serves",
                        std::string{job});
    auto& e = *env.mutable_error();
    if (!refused.empty()) e.set_refused(std::string{refused});
    // When it could take over: not while the other is heard (its state
    // comes every interval, a tick may be an interval late), nor ever for
    // a backup that has not heard an active primary.
    auto heard_ago = now_ - (pair_->peer_expiry() - pair_->silence());
    if (pair_->current() != pair_fsm::state::backup && heard_ago >= 2 * config_.heartbeat_interval) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(pair_->peer_expiry() - now_).count();
      e.set_takeover_ms(static_cast<std::uint32_t>(std::max<std::int64_t>(left, 1)));
    }
    send(routing_id, env);
  }
  drop(drop_reason::standby, routing_id);
  return false;
}

void broker::send_pair_state() {
  proto::PairState state;
  state.set_state(static_cast<proto::PairState::State>(pair_->current()));
  state.set_term(pair_->term());
  state.set_broker_id(config_.id);
  zmq::message_t message{state.ByteSizeLong()};
  state.SerializeWithCachedSizesToArray(static_cast<std::uint8_t*>(message.data()));
  pair_pub_.send(message, zmq::send_flags::dontwait);  // PUB never blocks; a full pipe drops it
  for (auto s : {pair_fsm::state::primary, pair_fsm::state::backup, pair_fsm::state::active,
                 pair_fsm::state::passive})
    metrics_->pair_state.Add({{"state", std::string{name_of(s)}}}).Set(pair_->current() == s ? 1 : 0);
  metrics_->pair_term.Set(static_cast<double>(pair_->term()));
}

void broker::receive_pair() {
  for (std::size_t i = 0; i < config_.batch; ++i) {
    zmq::message_t message;
    if (!pair_sub_.recv(message, zmq::recv_flags::dontwait)) {
      input_.drained(pair_in_);  // its descriptor announces the next one
      return;
    }
    proto::PairState state;
    if (message.more() || !state.ParseFromArray(message.data(), static_cast<int>(message.size()))) {
      while (message.more() && pair_sub_.recv(message, zmq::recv_flags::dontwait)) {
      }
      drop(drop_reason::malformed, "pair state");
      continue;
    }
    if (state.state() < proto::PairState::PRIMARY || state.state() > proto::PairState::PASSIVE) {
      drop(drop_reason::malformed, "pair state");
      continue;
    }
    if (state.broker_id() == config_.id) {
      // Its own state: --pair-connect names this broker's --pair-bind.
      drop(drop_reason::malformed, "pair state of this broker's own id");
      if (log_limit_.allow())
        spdlog::error("broker pair: heard its own state (id {}): --pair-connect must name the other broker", config_.id);
      continue;
    }
    auto theirs = static_cast<pair_fsm::state>(state.state());
    events_doubtful_ = false;  // it said where it stands: stepped down below, or still active
    on_pair_change(pair_->on_peer(theirs, state.term(), now_, pair_fsm::wall_clock::now()));
  }
}

void broker::on_pair_change(const pair_fsm::change& c) {
  if (!c) return;
  if (!c.changed) {  // about the pair's configuration
    if (log_limit_.allow()) spdlog::error("broker pair: {}", c.why);
    return;
  }
  if (c.activated || c.stepped_down) spdlog::warn("broker pair: {} (term {})", c.why, pair_->term());
  else spdlog::info("broker pair: {}", c.why);
  if (c.activated) {
    // What peers sent the other is not here: they learn so from the new
    // incarnation in the Welcome (requests it held end BROKER_LOST).
    incarnation_ = core::draw_incarnation();
    streams_.reset(core::draw_incarnation(), core::draw_incarnation());
    metrics_->pair_activations.Increment();
    subscribe_events(true);
    input_.used(xsub_in_);  // a send: ask the socket before the next wait
  }
  if (c.stepped_down) {
    subscribe_events(false);
    input_.used(xsub_in_);
    forget_everything();
  }
  send_pair_state();  // the other hears at once, not at the next tick
  publish_status(now_);
}

void broker::forget_everything() {
  spdlog::warn("broker pair: forgetting {} peers and {} requests", peers_.size(), table_.in_flight());
  // Straight to each peer's connection (not parked, not held for a suspect):
  // what it would wait for is forgotten below.
  auto standby = error_of(proto::STANDBY, "broker " + config_.id + " stepped down: the other one of the pair serves");
  for (const auto& [id, p] : peers_) {
    auto message = core::message_of(standby);
    send_to(id, message);
  }
  for (const auto& service : table_.services()) metrics_->forget(service);
  table_ = service_table{config_.limits};
  peers_.clear();
  parked_.clear();
  parked_bounded_ = 0;
  set_parked(0, 0);
  forwards_.clear();  // their askers are told STANDBY with the rest, and relay elsewhere
  pending_gone_.clear();  // announced by no one: the other broker never knew them
  metrics_->gone_pending.Set(0);
  metrics_->forwards.Set(0);
  suspects_.clear();
}

void broker::check_stall(clock::time_point now) {
  auto late = now - next_tick_;
  if (next_tick_ == clock::time_point{} || late <= config_.heartbeat_interval) return;
  for (auto& [id, p] : peers_) p.expiry = std::min(p.expiry + late, now + liveness_window());
  for (auto& [to, kept] : parked_)
    for (auto& k : kept) k.since = std::min(k.since + late, now);
  // Nor against a lost gateway's grace: its Hello may wait unread.
  for (auto& [id, g] : pending_gone_) g.due = std::min(g.due + late, now + config_.gateway_gone_after);
  next_tick_ = now;  // the tick is due, and not late
  if (pair_) {
    pair_->away(late, now);  // nor was the other broker silent meanwhile
    // What publishers sent while this one was stopped may have gone to the
    // other too, had it taken over: none goes out until the other is heard
    // (or its silence runs out: then this one is alone).
    events_doubtful_ = pair_->active();
  }
  metrics_->stalls.Increment();
  spdlog::warn("the broker's thread stalled for {} ms: not counted against its peers' heartbeats; probing them",
               std::chrono::duration_cast<std::chrono::milliseconds>(late).count());
  for (const auto& [id, p] : peers_) {
    auto& s = suspects_[id];
    // One that was welcomed on a new socket and has yet to say what it read
    // stays waiting for that: its report comes on the socket the Welcome
    // went to (or its Hello, should it have replaced that one too). The
    // time away is not counted against that wait either: ended now, at the
    // tick this turn, the report would come after it and be ignored, and
    // what died in the peer's old socket never be sent again.
    if (s.probe == 0 && s.since != clock::time_point{}) {
      s.since = std::min(s.since + late, now);
      continue;
    }
    s = {++next_probe_, now};
    Envelope probe;
    probe.mutable_heartbeat()->set_probe(s.probe);
    auto bytes = core::message_of(probe);
    send_to(id, bytes);  // not parked: it finds the connection the peer is on, or none
  }
}

// The peer answered the probe, or said Hello: what waited for it goes now.
void broker::trust(const std::string& who, const char* how) {
  auto s = suspects_.find(who);
  if (s != suspects_.end() && s->second.probe == 0) {
    // The wait for a read report ends (what died was sent again, or no
    // report came): the Welcome said this mark comes (marks_resent), and
    // what the peer read on its new socket before the Welcome waits for it.
    Envelope mark;
    mark.mutable_heartbeat()->set_resent(true);
    auto message = core::message_of(mark);
    if (send_to(who, message) != sent::ok) drop(drop_reason::unreachable, who);
  }
  if (clear_suspicion(who, how) && !parked_.empty()) unpark(who);
}

bool broker::clear_suspicion(const std::string& who, const char* how) {
  auto s = suspects_.find(who);
  if (s == suspects_.end()) return false;
  (s->second.probe == 0 ? metrics_->read_reports : metrics_->probes).Add({{"outcome", how}}).Increment();
  suspects_.erase(s);
  return true;
}

// The peer's Heartbeat.read, after our Welcome to its new socket: what it
// did not read of what we sent it before that Welcome died in a socket it
// replaced. What we still keep of that goes again now, in the order it
// first went, before what waited for the report. None of it reached the
// peer, so none acts twice.
void broker::send_unread(const std::string& to, const proto::ReadReport& read) {
  auto it = peers_.find(to);
  if (it == peers_.end()) return;
  auto& p = it->second;
  std::vector<zmq::message_t> lost;
  p.kept.take_all([&](sent_kept&& e) {
    if (e.where.number > read.read_to() && e.where.number + read.tail() <= p.welcomed_at)
      lost.push_back(std::move(e.message));
  });
  if (!lost.empty())
    spdlog::warn("{}: {} messages sent to it died in a socket it replaced; sending them again", to, lost.size());
  for (auto& message : lost) {
    if (send_to(to, message) == sent::ok) metrics_->sent_again.Increment();
    else drop(drop_reason::unreachable, to);
  }
}

// A peer that says what it read (Heartbeat.peer_read) keeps all it has not
// read, up to --kept-sent; of one that does not (a build before it), a
// heartbeat interval is kept.
void broker::forget_old_sends(peer& p, clock::time_point now) {
  if (p.reports_reads) return;
  p.kept.forget_while([&](const sent_kept& e) { return now - e.where.at > config_.heartbeat_interval; });
}

// The peer's heartbeat: it read everything we sent it up to `read_to`,
// after our Welcome to its Hello `hello` (the socket it is on now): what we
// kept of that can no longer die in a socket it replaces.
void broker::forget_read_sends(const std::string& from, const proto::PeerRead& read) {
  auto it = peers_.find(from);
  if (it == peers_.end() || read.hello() != it->second.hello) return;  // about a socket before
  auto& p = it->second;
  p.reports_reads = true;
  p.kept.forget_while([&](const sent_kept& e) { return e.where.number <= read.read_to(); });
}

void broker::forget_old_sends(clock::time_point now) {
  std::size_t bytes = 0;
  for (auto& [id, p] : peers_) {
    if (!suspects_.contains(id)) forget_old_sends(p, now);
    p.kept.release();  // a peer sent nothing for an interval keeps no slots (up to --kept-sent of them)
    bytes += p.kept.bytes();
  }
  metrics_->kept_sent_bytes.Set(static_cast<double>(bytes));
}

void broker::tick(clock::time_point now) {
  if (!forwards_.empty() && now - forward_sweep_ >= std::chrono::seconds(10)) {
    // An owner that never answers (a build before it answered every one):
    // past any relay's deadline the entry only takes room.
    forward_sweep_ = now;
    std::erase_if(forwards_, [&](const auto& f) { return now - f.second.since > config_.max_timeout + std::chrono::minutes(1); });
    metrics_->forwards.Set(static_cast<double>(forwards_.size()));
  }
  if (pair_) {
    send_pair_state();
    if (events_doubtful_ && now >= pair_->peer_expiry()) events_doubtful_ = false;  // alone
  }
  metrics_->dispatch_batch.flush();
  metrics_->request_batch.flush();
  if (!suspects_.empty()) {
    // No answer to the probe within a liveness, and no Hello: a peer of a
    // build without probes, on the connection it had. What waits goes there.
    std::vector<std::string> quiet;
    for (const auto& [who, s] : suspects_)
      if (now - s.since >= liveness_window()) quiet.push_back(who);
    for (const auto& who : quiet) trust(who, "unanswered");
  }
  if (!parked_.empty()) expire_parked(now);
  if (!pending_gone_.empty()) announce_due_gone(now);
  forget_old_sends(now);
  std::vector<std::string> dead;
  for (const auto& [routing_id, p] : peers_) {
    if (now >= p.expiry) dead.push_back(routing_id);
  }
  for (const auto& routing_id : dead) {
    spdlog::warn("peer {} missed {} heartbeats; dropping it", routing_id, config_.heartbeat_liveness);
    remove_peer(routing_id);
  }
  if (!dead.empty()) dispatch(now);
  // Each says how much of what the peer sent since its Hello we read: it
  // forgets what it kept of that (core::forget_read()).
  Envelope hb;
  auto& beat = *hb.mutable_heartbeat();
  std::size_t counts[4] = {};
  for (const auto& [routing_id, p] : peers_) {
    beat.clear_broker_read();  // a link that does not number its Hellos gets none
    if (p.hello != 0) {
      beat.mutable_broker_read()->set_hello(p.hello);
      beat.mutable_broker_read()->set_count(p.received);
    }
    // One we wait on for its read report is on the connection our Welcome
    // went to: its heartbeat goes there now, as the link's own do, rather
    // than wait with what must follow what is sent again. Held, a peer
    // that never reports (a build before it) heard nothing for its
    // liveness, found us silent and replaced its socket just as the wait
    // ended. A heartbeat acts on nothing what waits says.
    if (auto s = suspects_.find(routing_id); s != suspects_.end() && s->second.probe == 0) {
      auto message = core::message_of(hb);
      if (send_to(routing_id, message) != sent::ok) drop(drop_reason::unreachable, routing_id);
    } else {
      send(routing_id, core::message_of(hb));
    }
    ++counts[std::min<std::size_t>(static_cast<std::size_t>(p.role), 3)];
  }
  for (auto role : {proto::ROLE_GATEWAY, proto::ROLE_WORKER, proto::ROLE_CLIENT}) {
    metrics_->peers.Add({{"role", proto::Role_Name(role)}}).Set(static_cast<double>(counts[role]));
  }
  for (const auto& service : table_.prune()) metrics_->forget(service);
  for (const auto& service : table_.services()) {
    metrics_->queue_depth.Add({{"service", service}}).Set(static_cast<double>(table_.queued(service)));
    metrics_->workers.Add({{"service", service}}).Set(static_cast<double>(table_.workers(service)));
    metrics_->draining.Add({{"service", service}}).Set(static_cast<double>(table_.draining_workers(service)));
  }
  metrics_->in_flight.Set(static_cast<double>(table_.held_slots()));
  metrics_->queued_bytes.Set(static_cast<double>(table_.waiting_bytes()));
  publish_status(now);
  if (auto n = log_limit_.take_suppressed()) spdlog::warn("{} log lines suppressed", n);
  next_tick_ = now + config_.heartbeat_interval;
}

bool broker::send(std::string_view routing_id, std::string_view payload) {
  return send(routing_id, zmq::message_t{payload.data(), payload.size()});
}

// Everything the broker sends a peer comes here (or through deliver() with
// a report to give): for a registered peer without its connection for the
// moment it is kept, in order, as an answer is (park()). Nobody is told if
// it is never delivered: the peer is dropped then, which settles what it
// held (a job goes elsewhere).
bool broker::send(std::string_view routing_id, zmq::message_t&& payload) {
  return deliver(routing_id, payload, {}) == sent::ok;
}

broker::sent broker::send_to(std::string_view routing_id, zmq::message_t& payload) {
  if (local_) {
    switch (local_->send(routing_id, payload)) {
      case core::local_router::send_result::sent: return sent::ok;
      case core::local_router::send_result::full: drop(drop_reason::hwm, routing_id); return sent::full;
      case core::local_router::send_result::unreachable: break;  // not a local peer: the ROUTER's
    }
  }
  input_.used(router_in_);  // every send on the ROUTER comes here
  // Each message to a registered peer is counted, and kept a while unless
  // it is a job (sent again by resend_held), a Recall (made again at each
  // new socket) or says nothing (send_unread()).
  auto kind = proto::kind_of(payload.to_string_view());
  peer* to = nullptr;
  if (kind != Envelope::kWelcome)
    if (auto it = peers_.find(routing_id); it != peers_.end()) to = &it->second;
  bool keep = to && config_.kept_sent > 0 && kind != Envelope::kHeartbeat && kind != Envelope::kRequest &&
              kind != Envelope::kLifecycle && kind != Envelope::kRecall;
  sent_kept kept;
  if (keep) kept.message.copy(payload);  // the bytes are shared: no copy, no allocation
  try {
    if (!router_.send(zmq::buffer(routing_id), zmq::send_flags::sndmore | zmq::send_flags::dontwait)) {
      drop(drop_reason::hwm, routing_id);
      return sent::full;
    }
    router_.send(payload, zmq::send_flags::dontwait);
    if (to) {
      ++to->sent;
      if (keep) {
        kept.where = {to->sent, now_};
        forget_old_sends(*to, now_);
        to->kept.push(std::move(kept));
      }
    }
    return sent::ok;
  } catch (const zmq::error_t& e) {
    // EHOSTUNREACH: the peer's connection is gone (ROUTER_MANDATORY). The
    // caller counts the drop: it may keep the message (park()).
    return sent::gone;
  }
}

bool broker::send(std::string_view routing_id, const Envelope& env) {
  return send(routing_id, core::message_of(env));
}

void broker::send_reply(const std::string& to, const std::string& id, proto::Code code, std::string message) {
  Envelope env;
  auto* r = env.mutable_reply();
  r->set_id(id);
  r->set_code(code);
  r->set_message(std::move(message));
  send(to, env);
}

Envelope broker::error_of(proto::Code code, std::string message, std::string id) {
  Envelope env;
  env.mutable_error()->set_code(code);
  env.mutable_error()->set_message(std::move(message));
  env.mutable_error()->set_id(std::move(id));
  return env;
}

void broker::send_error(const std::string& to, proto::Code code, std::string message, std::string id) {
  send(to, error_of(code, std::move(message), std::move(id)));
}

void broker::send_report(undelivered&& r) {
  send_report(r.to, r.status, std::move(r.sid), std::move(r.ref), std::move(r.detail));
}

void broker::send_report(const std::string& to, proto::DeliveryReport::Status status, std::string sid,
                         std::string ref, std::string detail) {
  metrics_->reports.Add({{"status", proto::DeliveryReport::Status_Name(status)}}).Increment();
  if (to.empty() || !peers_.contains(to)) return;
  Envelope env;
  auto* r = env.mutable_report();
  r->set_status(status);
  r->set_sid(std::move(sid));
  r->set_ref(std::move(ref));
  r->set_detail(std::move(detail));
  r->set_to(to);
  send(to, env);
}

void broker::drop(drop_reason reason, std::string_view detail) {
  ++stats_.dropped;
  metrics_->drop(reason).Increment();
  if (log_limit_.allow())
    spdlog::warn("dropped message ({}): {}", drop_reason_names[static_cast<std::size_t>(reason)],
                 core::printable(detail));
}

}  // namespace sidecast::broker
