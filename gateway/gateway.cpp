#include "gateway/gateway.hpp"

#include <fstream>
#include <iterator>

#include <boost/asio/detached.hpp>
#include <spdlog/spdlog.h>

#include "core/config.hpp"
#include "core/log.hpp"
#include "core/open_files.hpp"
#include "core/peer_link.hpp"
#include "core/random.hpp"
#include "core/utf8.hpp"
#include "gateway/api.hpp"
#include "gateway/client_socket.hpp"
#include "gateway/eio_session.hpp"
#include "gateway/http_session.hpp"

namespace sidecast::gateway {

namespace asio = boost::asio;

namespace {

// Characters of the sid prefix's tag (new_sid()): 48 random bits.
constexpr std::size_t sid_tag_chars = 8;

jwt::keys token_keys(const gateway_config& c) {
  jwt::keys k;
  k.hs256_secret = c.jwt_secret;
  k.audience = c.jwt_audience;
  k.issuer = c.jwt_issuer;
  k.require_exp = !c.jwt_allow_no_exp;
  k.leeway = c.jwt_leeway;
  if (c.jwt_end_at_exp && c.jwt_secret.empty() && c.jwt_public_key.empty())
    throw std::invalid_argument("--jwt-end-at-exp needs --jwt-secret or --jwt-public-key: it ends sockets at their "
                                "token's exp");
  // RFC 7518 3.2: an HS256 key at least as long as the hash (32 bytes); a
  // short one can be guessed offline from any token a client holds.
  if (!c.jwt_secret.empty() && c.jwt_secret.size() < 32)
    spdlog::warn("--jwt-secret is {} bytes: use at least 32 random bytes (RFC 7518 3.2)", c.jwt_secret.size());
  if (!c.jwt_public_key.empty()) {
    std::ifstream f{c.jwt_public_key};
    if (!f) throw std::invalid_argument("cannot read --jwt-public-key " + c.jwt_public_key);
    k.rs256_public_pem.assign(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
  }
  return k;
}

}  // namespace

gateway::gateway(gateway_config config, zmq::context_t& context, core::registry_ptr registry)
    : config_{std::move(config)},
      zmq_{context},
      registry_{std::move(registry)},
      metrics_{*registry_},
      limits_{config_.max_connections, config_.max_connections_per_ip, config_.per_ip_ipv6_prefix},
      polling_sessions_{config_.max_polling_sessions, config_.max_polling_sessions_per_ip, config_.per_ip_ipv6_prefix},
      tokens_{token_keys(config_)} {
  bool drawn_id = config_.id.empty();
  if (drawn_id) config_.id = "gw-" + core::random_token(6);
  if (config_.id.find('_') != std::string::npos) {
    // '_' becomes '-' (compose v1's container names, project_gw_1, taken
    // as ids): said, since a balancer routing by the sid's prefix needs the
    // id it sees in the sids (haproxy: backend gw_<id>).
    // A drawn one (random_token's alphabet has '_') is nobody's to route by.
    auto given = config_.id;
    std::replace(config_.id.begin(), config_.id.end(), '_', '-');
    if (!drawn_id)
      spdlog::warn("gateway id '{}' is used as '{}': '_' becomes '-' (route sids to '{}')", given, config_.id,
                   config_.id);
  }
  if (!proto::valid_peer_id(config_.id))
    throw std::invalid_argument("gateway id '" + config_.id + "' must be 1-64 characters without '.' or ':'");
  routes_ = parse_routes(config_.routes);
  sid_prefix_ = config_.id + "." + core::random_token(sid_tag_chars);
  if (auto proxies = network_set::parse(config_.proxy_protocol_from)) proxies_ = std::move(*proxies);
  else throw std::invalid_argument("--proxy-protocol-from takes addresses and networks (10.0.0.0/8)");
  if (config_.threads == 0) config_.threads = std::max(1u, std::thread::hardware_concurrency());
  // Request ids are "<gateway id>:<n>" and must not repeat from one start
  // to the next: the broker may still hold a job of the last start's (a
  // new request of its id would be dropped as its duplicate, and the old
  // answer given to it), and a worker keeps its last answers to send again.
  // A drawn id is new at each start; under a pinned one n starts at a
  // random point below 2^40 (eight base-36 digits: an id of up to six
  // characters, its colon and n stay within std::string's 15 inline bytes;
  // a new start's ids meet an old one's still held with a chance of about
  // the requests of a minute over 2^40).
  bridge_ = std::make_unique<class bridge>(config_, zmq_, metrics_, drawn_id ? 0 : core::draw_incarnation() >> 24,
                                           sid_prefix_);
  api_ = std::make_unique<class api>(*this);
  bridge_->on_forward([this](proto::HttpForward f) { serve_forwarded(std::move(f)); });
  bridge_->on_prefix_gone([this](const std::string& old) { return renew_sid_prefix(old); });
  bridge_->on_failure([this](const std::string& why) {
    {
      std::lock_guard lock{failure_mutex_};
      failure_ = "the bridge to the broker failed: " + why;
    }
    if (failure_handler_) failure_handler_();
  });
}

std::optional<std::string> gateway::failure() const {
  std::lock_guard lock{failure_mutex_};
  return failure_;
}

std::string_view gateway::owner_elsewhere(std::string_view sid) const {
  auto owner = proto::sid_owner(sid);
  if (owner == config_.id || !proto::valid_peer_id(owner) || !core::valid_utf8(sid)) return {};
  return owner;
}

bool gateway::report_gone(std::string_view sid, std::string target, std::string forward) {
  if (owner_elsewhere(sid).empty()) return false;
  proto::HttpForward f;
  f.set_sid(std::string{sid});
  f.set_method("GONE");
  f.set_target(std::move(target));
  f.set_gone(std::move(forward));
  auto ignored = std::make_shared<reply_slot>(contexts_.front()->get_executor(), [](http_answer) {});
  bridge_->forward(std::move(f), std::move(ignored), std::chrono::seconds(5));
  return true;
}

std::shared_ptr<void> gateway::relaying_get(const std::string& sid) {
  std::list<std::pair<std::string, bool>>::iterator it;
  {
    std::lock_guard lock{relayed_gets_mutex_};
    it = relayed_gets_.emplace(relayed_gets_.end(), sid, false);
  }
  return std::shared_ptr<void>(nullptr, [this, it](void*) {
    std::lock_guard lock{relayed_gets_mutex_};
    relayed_gets_.erase(it);
  });
}

std::size_t gateway::relayed_gets() const {
  std::lock_guard lock{relayed_gets_mutex_};
  return relayed_gets_.size();
}

void gateway::release_relayed_gets() {
  std::vector<std::string> asked;
  {
    std::lock_guard lock{relayed_gets_mutex_};
    for (auto& [sid, released] : relayed_gets_)
      if (!std::exchange(released, true)) asked.push_back(sid);
  }
  for (auto& sid : asked) {
    proto::HttpForward f;
    f.set_sid(std::move(sid));
    f.set_method("RELEASE");
    auto ignored = std::make_shared<reply_slot>(contexts_.front()->get_executor(), [](http_answer) {});
    bridge_->forward(std::move(f), std::move(ignored), std::chrono::seconds(5));
  }
}

void gateway::poll_abandoned(const std::string& sid) {
  if (report_gone(sid)) return;
  if (auto session = find_session(sid)) asio::post(session->executor(), [session] { session->poll_abandoned(); });
}

void gateway::serve_forwarded(proto::HttpForward f) {
  auto answer = [this, id = f.id()](http_answer a) {
    proto::Envelope env;
    auto* out = env.mutable_answer();
    out->set_id(id);
    out->set_status(a.status);
    out->set_content_type(std::move(a.content_type));
    out->set_body(std::move(a.body));
    out->set_allow(std::move(a.allow));
    // Owed, as a DISCONNECT notice is: one per relayed request this gateway
    // took, whose client would otherwise wait out the relay's timeout.
    bridge_->send_owed(env);
  };
  if (!f.target().empty()) return api_->serve_forwarded(std::move(f), std::move(answer));  // the HTTP API's
  auto session = find_session(f.sid());
  if (!session) {
    answer({400, "application/json", R"({"code":1,"message":"Session ID unknown"})"});
    return;
  }
  const auto& method = f.method();
  if (method != "GET" && method != "POST" && method != "GONE" && method != "RELEASE") {
    answer({400, "application/json", R"({"code":3,"message":"Bad request"})"});
    return;
  }
  auto slot = std::make_shared<reply_slot>(session->executor(), answer);
  auto served = bridge_->hand_to(io_executor_of(session->executor()), [session, slot, f = std::move(f)]() mutable {
    if (f.method() == "POST") {
      session->post(std::move(*f.mutable_body()), slot);
    } else if (f.method() == "GET") {
      session->poll(slot);
    } else if (f.method() == "RELEASE") {  // the asking gateway drains: its GET is answered now
      session->release_poll();
      slot->complete({200, "text/plain; charset=UTF-8", "ok"});
    } else {  // GONE: the asking gateway's client left its GET
      session->poll_abandoned();
      slot->complete({200, "text/plain; charset=UTF-8", "ok"});
    }
  });
  // Its thread is behind (--max-thread-backlog): what an Engine.IO server says to a request it cannot serve.
  if (!served) answer({503, "application/json", R"({"code":3,"message":"Bad request"})"});
}

void run_logging_errors(asio::io_context& context, const char* what) {
  core::log_limiter log_limit;  // a failure at each turn must not flood the log
  for (;;) {
    try {
      context.run();
      return;
    } catch (const std::exception& e) {
      if (log_limit.allow()) spdlog::error("{}: {}", what, e.what());
    }
  }
}

gateway::~gateway() { stop(); }

void gateway::start() {
  auto hp = core::parse_host_port(config_.http);
  if (!hp)
    throw std::invalid_argument("bad --http '" + config_.http +
                                "' (want a numeric address and a port: 127.0.0.1:8080, [::1]:8080, :8080)");
  for (unsigned i = 0; i < config_.threads; ++i) {
    contexts_.push_back(std::make_unique<asio::io_context>(1));
    guards_.push_back(asio::make_work_guard(*contexts_.back()));
    configure_ws_loop(*contexts_.back(), config_.io_uring, metrics_);
  }
  asio::ip::tcp::endpoint endpoint{asio::ip::make_address(hp->host), hp->port};
  acceptor_.emplace(*contexts_.front());
  acceptor_->open(endpoint.protocol());
  acceptor_->set_option(asio::socket_base::reuse_address(true));
  acceptor_->bind(endpoint);
  acceptor_->listen(asio::socket_base::max_listen_connections);
  port_ = acceptor_->local_endpoint().port();
  accept_pause_.emplace(*contexts_.front());
  // A descriptor per connection, a few more per thread and ZeroMQ socket.
  if (auto open_files = core::raise_open_files_limit(); open_files < config_.max_connections + 64)
    spdlog::warn("gateway: the process may open {} files, fewer than --max-connections {} and some 64 more: "
                 "past them new connections wait in the listen queue (raise the limit: ulimit -n, LimitNOFILE=)",
                 open_files, config_.max_connections);
  // One I/O thread: the bridge shares it (no thread hop between a session and the broker link).
  bridge_->start(config_.threads == 1 ? contexts_.front().get() : nullptr);
  if (attach_) attach_(*contexts_.front());
  do_accept();
  for (auto& ctx : contexts_) {
    threads_.emplace_back([&ctx] { run_logging_errors(*ctx, "gateway I/O thread"); });
  }
  spdlog::info("gateway {} serving http://{}:{} with {} threads, broker {}{}{}", config_.id, hp->host, port_,
               config_.threads, config_.broker, config_.backup_broker.empty() ? "" : " (backup ",
               config_.backup_broker.empty() ? "" : config_.backup_broker + ")");
}

void gateway::do_accept() {
  auto& ctx = next_context();
  acceptor_->async_accept(ctx, [this](boost::system::error_code ec, asio::ip::tcp::socket socket) {
    if (ec == asio::error::operation_aborted) return;
    if (!ec) {
      boost::system::error_code peer_ec;
      auto peer = socket.remote_endpoint(peer_ec);
      if (!peer_ec && !proxies_.empty() && proxies_.contains(peer.address())) {
        // A balancer: the client it may name in a PROXY header is the
        // address the limits count (serve_proxied admits it).
        socket.set_option(asio::ip::tcp::no_delay(true));
        serve_proxied(*this, std::move(socket));
        do_accept();
        return;
      }
      auto slot = peer_ec ? nullptr : limits_.admit(peer.address().to_string());
      if (!slot) {
        // Over a connection limit: closed at once, counted.
        metrics_.connection_limit.Increment();
        socket.close(peer_ec);
        do_accept();
        return;
      }
      socket.set_option(asio::ip::tcp::no_delay(true));
      serve_http(*this, std::move(socket), std::move(slot));
      do_accept();
      return;
    }
    if (!acceptor_->is_open()) return;  // closed by drain() or stop()
    // Out of descriptors (EMFILE, ENFILE) or memory: the connection stays
    // in the listen queue and the next accept fails at once. A pause, not
    // a spin that takes the I/O thread from every other connection.
    metrics_.accept_failed.Increment();
    // A line a minute at most: out of descriptors, it fails every 100 ms
    // for as long as that lasts (counted in accept_failures_total).
    thread_local core::log_limiter log_limit{1, std::chrono::minutes(1)};
    if (log_limit.allow()) {
      spdlog::warn("gateway: accept failed: {}; accepting again every 100 ms (said once a minute; "
                   "sidecast_gateway_accept_failures_total counts each)",
                   ec.message());
    }
    accept_pause_->expires_after(std::chrono::milliseconds(100));
    accept_pause_->async_wait([this](boost::system::error_code wait_ec) {
      if (!wait_ec && acceptor_->is_open()) do_accept();
    });
  });
}

void gateway::stop() {
  if (contexts_.empty()) return;
  if (acceptor_) {
    asio::post(acceptor_->get_executor(), [this] {
      boost::system::error_code ignored;
      acceptor_->close(ignored);
    });
  }
  for (auto& g : guards_) g.reset();
  for (auto& ctx : contexts_) ctx->stop();
  for (auto& t : threads_)
    if (t.joinable()) t.join();
  threads_.clear();
  bridge_->stop();
  {
    std::lock_guard lock{sessions_mutex_};
    sessions_.clear();
  }
  {
    std::lock_guard lock{parked_mutex_};
    parked_.clear();
  }
  acceptor_.reset();
  accept_pause_.reset();
  guards_.clear();
  if (detach_) {
    detach_();
    detach_ = nullptr;
  }
  contexts_.clear();
}

void gateway::share_thread(std::function<void(asio::io_context&)> attach, std::function<void()> detach) {
  attach_ = std::move(attach);
  detach_ = std::move(detach);
}

void gateway::drain(std::chrono::milliseconds limit) {
  if (contexts_.empty()) return;
  draining_ = true;  // from here nothing new opens (http_session.cpp, api.cpp) or is parked
  asio::post(acceptor_->get_executor(), [this] {
    boost::system::error_code ignored;
    acceptor_->close(ignored);
  });
  spdlog::info("draining {} sessions and {} sockets (up to {} ms)", session_count(), bridge_->members(), limit.count());
  api_->end_relayed_polls();  // a gateway with no client of its own may still relay polls
  release_relayed_gets();
  auto until = std::chrono::steady_clock::now() + limit;
  // Every socket, its CONNECT still in its service's hook included, until
  // its service has its DISCONNECT; the WebSockets' close handshakes (up to
  // 2 s each after their close); and the API sessions it closed with events
  // their clients had not polled, until their next poll takes them (on a
  // connection the client kept, or relayed by a peer gateway: the listener
  // is closed).
  // And the Engine.IO GETs it relays for other gateways' sessions, until
  // their owners answer them (release_relayed_gets()).
  auto busy = [this] {
    return session_count() > 0 || bridge_->members() > 0 || bridge_->connects_awaited() > 0 ||
           metrics_.websockets_open.load(std::memory_order_relaxed) > 0 || api_->owing() > 0 ||
           relayed_gets() > 0;
  };
  // Swept again while they last: one that began as the drain did (a request
  // already past its check, a recovery already under way) is closed too.
  auto next_sweep = std::chrono::steady_clock::now();
  while (busy() && std::chrono::steady_clock::now() < until) {
    if (std::chrono::steady_clock::now() >= next_sweep) {
      close_all();
      api_->end_relayed_polls();
      release_relayed_gets();  // one relayed since
      next_sweep += std::chrono::milliseconds(250);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  if (busy())
    spdlog::warn("drain: {} sessions, {} sockets, {} connects and {} API sessions' last events left at the deadline",
                 session_count(), bridge_->members(), bridge_->connects_awaited(), api_->owing());
  // Let the last close frames and poll answers leave.
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  stop();
}

void gateway::close_all(const std::string& prefix, const char* reason) {
  std::vector<std::shared_ptr<eio_session>> open;
  {
    std::lock_guard lock{sessions_mutex_};
    for (auto& [sid, weak] : sessions_)
      if (auto s = weak.lock(); s && sid.starts_with(prefix)) open.push_back(std::move(s));
  }
  // A closed transport (not a Socket.IO disconnect) makes clients reconnect,
  // through the balancer, to another gateway.
  for (auto& s : open) asio::post(s->executor(), [s, reason] { s->close(reason); });
  // Then every other socket: /ws connections, API sessions (their polls get
  // 410) and sockets parked for recovery; each service gets its DISCONNECT.
  bridge_->shut_down_all(prefix);
}

// On the bridge thread: the broker told the workers that the sockets of
// `old` are gone (Welcome.prefix_gone). New sids take a new prefix first,
// then every socket of the old one ends (its client reconnects and starts
// afresh; a session opened meanwhile has the new one and stays).
std::string gateway::renew_sid_prefix(const std::string& old) {
  std::string renewed;
  {
    std::lock_guard lock{sid_prefix_mutex_};
    sid_prefix_ = config_.id + "." + core::random_token(sid_tag_chars);
    renewed = sid_prefix_;
  }
  spdlog::warn("the broker announced the sockets of {} gone (this gateway was silent too long): ending them; "
               "new sids begin {}",
               old, renewed);
  close_all(old, "the broker announced this gateway gone");
  return renewed;
}

bool gateway::healthy() const { return !draining_ && bridge_->connected(); }

const std::string* gateway::service_for(const std::string& nsp) const {
  for (const auto& r : routes_)
    if (r.nsp == nsp) return &r.service;
  return nullptr;
}

// 22 characters: 132 bits from the kernel's secure generator. A sid is a
// credential (an Engine.IO session's, an API session's path) and a pid
// recovers a socket: a client that saw many must not guess the next (a
// seeded Mersenne Twister, as before, gives its state away after a few
// hundred).
// The prefix's tag (sid_tag_chars) tells one start of a gateway from
// another under a pinned --gateway-id: what the broker announces gone
// (GatewayGone) names one start's sockets, never the next one's.
std::string gateway::new_sid() {
  std::lock_guard lock{sid_prefix_mutex_};
  return sid_prefix_ + core::random_token(22);
}

void gateway::add_session(const std::string& sid, std::weak_ptr<eio_session> session) {
  std::lock_guard lock{sessions_mutex_};
  sessions_[sid] = std::move(session);
}

void gateway::remove_session(const std::string& sid) {
  std::lock_guard lock{sessions_mutex_};
  sessions_.erase(sid);
}

std::shared_ptr<eio_session> gateway::find_session(const std::string& sid) {
  std::lock_guard lock{sessions_mutex_};
  auto it = sessions_.find(sid);
  return it == sessions_.end() ? nullptr : it->second.lock();
}

std::size_t gateway::session_count() {
  std::lock_guard lock{sessions_mutex_};
  return sessions_.size();
}

void gateway::park(const std::string& pid, std::shared_ptr<client_socket> socket) {
  std::lock_guard lock{parked_mutex_};
  parked_[pid] = std::move(socket);
}

std::shared_ptr<client_socket> gateway::unpark(const std::string& pid, std::string_view nsp,
                                               const std::string* token_subject) {
  std::lock_guard lock{parked_mutex_};
  auto it = parked_.find(pid);
  if (it == parked_.end() || (!nsp.empty() && it->second->nsp() != nsp)) return nullptr;
  if (token_subject && it->second->token_subject() != *token_subject) return nullptr;
  auto socket = std::move(it->second);
  parked_.erase(it);
  return socket;
}

bool gateway::recovery_for(const std::string& nsp) const {
  return std::find(config_.recovery.begin(), config_.recovery.end(), nsp) != config_.recovery.end();
}

asio::io_context& gateway::next_context() { return *contexts_[next_context_++ % contexts_.size()]; }

}  // namespace sidecast::gateway
