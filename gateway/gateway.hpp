#pragma once
// The gateway: N io_context threads serving HTTP, Engine.IO/Socket.IO, /ws
// and the HTTP API, plus the bridge thread that talks to the broker. This
// object is the only state shared by sessions (like Beast's shared_state):
// config, routes, metrics, the bridge and the Engine.IO sid registry.
#include <atomic>
#include <list>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <unordered_map>
#include <vector>

#include <functional>

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/steady_timer.hpp>
#include <zmq.hpp>

#include "core/metrics.hpp"
#include "gateway/bridge.hpp"
#include "gateway/config.hpp"
#include "gateway/jwt.hpp"
#include "gateway/limits.hpp"
#include "gateway/metrics.hpp"

namespace sidecast::gateway {

class eio_session;
class api;
class client_socket;

class gateway {
 public:
  gateway(gateway_config config, zmq::context_t& context, core::registry_ptr registry);
  ~gateway();
  gateway(const gateway&) = delete;
  gateway& operator=(const gateway&) = delete;

  /// Binds the HTTP port and starts every thread. Throws on a bad config or a
  /// failed bind (start-up errors).
  void start();
  /// Before start(): other loops share the first I/O thread (`sidecast demo
  /// --threads 1` runs its broker and workers there). start() calls
  /// `attach` with that thread's io_context before the thread starts;
  /// stop() calls `detach` once every I/O thread has stopped, before the
  /// io_contexts go.
  void share_thread(std::function<void(boost::asio::io_context&)> attach, std::function<void()> detach);
  void stop();
  /// Graceful shutdown: stops accepting and opening sessions, closes every
  /// Engine.IO session's transport (clients reconnect elsewhere) and ends
  /// every other socket, waits up to `limit` for them to go and for their
  /// services to hear so, then stop(). Call from outside the I/O threads.
  void drain(std::chrono::milliseconds limit);
  unsigned short port() const { return port_; }
  bool draining() const { return draining_; }
  bool healthy() const;
  /// Why the gateway cannot serve (its bridge to the broker failed to
  /// open), once it failed; `on_failure` is called then, on the bridge's
  /// thread (set it before start(): a main stops the process with it).
  std::optional<std::string> failure() const;
  void on_failure(std::function<void()> handler) { failure_handler_ = std::move(handler); }

  const gateway_config& config() const { return config_; }
  class bridge& link() { return *bridge_; }
  gateway_metrics& metrics() { return metrics_; }
  /// Slots for Engine.IO sessions opened by a polling handshake.
  connection_limits& polling_sessions() { return polling_sessions_; }
  /// Open connections, in all and per address (--max-connections, --max-connections-per-ip).
  connection_limits& connections() { return limits_; }
  const core::registry_ptr& registry() const { return registry_; }
  class api& api() { return *api_; }
  const jwt::verifier& tokens() const { return tokens_; }

  /// The service for a namespace, or nullptr when it has no route.
  const std::string* service_for(const std::string& nsp) const;
  /// A fresh "<sid prefix><random>" id; the prefix is "<gateway id>.<tag>",
  /// the tag drawn at start and again when the broker announced the
  /// gateway's sockets gone (renew_sid_prefix()).
  std::string new_sid();

  // Engine.IO sessions by sid (any thread).
  void add_session(const std::string& sid, std::weak_ptr<eio_session> session);
  void remove_session(const std::string& sid);
  std::shared_ptr<eio_session> find_session(const std::string& sid);
  /// The client of a polling GET for `sid` left while it waited: its
  /// session ends (eio_session::poll_abandoned), here or, through the
  /// broker, on the gateway that owns it (a forward with method GONE).
  void poll_abandoned(const std::string& sid);
  /// For a sid of another gateway (else false): tells it, through the
  /// broker, that the client of the long-poll it relayed left (an
  /// HttpForward with method GONE; `target`: an API request's, `forward`:
  /// the id of the forward of that request).
  bool report_gone(std::string_view sid, std::string target = {}, std::string forward = {});
  /// An Engine.IO polling GET this gateway relays to the owner of `sid`
  /// (another gateway), known while it waits: a drain asks the owner to
  /// answer it now (release_relayed_gets()) rather than cut it. Returns
  /// what ends the registration when it goes.
  std::shared_ptr<void> relaying_get(const std::string& sid);
  /// gateway::drain: each relayed GET not asked yet is released by its
  /// owner (an HttpForward with method RELEASE: it answers the GET now, a
  /// noop if it has nothing), so its client polls again, through the
  /// balancer, elsewhere, and its session goes on.
  void release_relayed_gets();
  /// Relayed GETs waiting for their owners' answers (any thread).
  std::size_t relayed_gets() const;
  /// The gateway that owns `sid` when it is another one, whose requests for
  /// it go through the broker (HttpForward); empty for a sid of this one, of
  /// no gateway, or that no gateway could have issued (not UTF-8, an owner
  /// that is no peer id): those are served here, as unknown.
  std::string_view owner_elsewhere(std::string_view sid) const;
  std::size_t session_count();

  boost::asio::io_context& next_context();

  // Sockets waiting to be recovered (Socket.IO connection-state recovery), by pid.
  void park(const std::string& pid, std::shared_ptr<client_socket> socket);
  /// Takes a parked socket; nullptr when unknown or already taken/expired.
  /// With `nsp`, only one in that namespace (one look: a socket of another
  /// namespace is never out of the table, where its expiry would miss it).
  /// With `token_subject`, only one whose connect's token had that subject.
  std::shared_ptr<client_socket> unpark(const std::string& pid, std::string_view nsp = {},
                                        const std::string* token_subject = nullptr);
  bool recovery_for(const std::string& nsp) const;

 private:
  void do_accept();
  // drain(): every session and socket is told to end; with a `prefix`,
  // those whose sid begins with it.
  void close_all(const std::string& prefix = {}, const char* reason = "server shutting down");
  std::string renew_sid_prefix(const std::string& old);
  void serve_forwarded(proto::HttpForward request);

  gateway_config config_;
  zmq::context_t& zmq_;
  core::registry_ptr registry_;
  gateway_metrics metrics_;
  std::vector<route> routes_;
  std::unique_ptr<class bridge> bridge_;
  std::unique_ptr<class api> api_;
  std::vector<std::unique_ptr<boost::asio::io_context>> contexts_;
  std::function<void(boost::asio::io_context&)> attach_;  // share_thread()
  std::function<void()> detach_;
  std::vector<boost::asio::executor_work_guard<boost::asio::io_context::executor_type>> guards_;
  std::vector<std::thread> threads_;
  std::optional<boost::asio::ip::tcp::acceptor> acceptor_;
  std::optional<boost::asio::steady_timer> accept_pause_;  // after a failed accept (out of descriptors)
  std::atomic<std::size_t> next_context_{0};
  unsigned short port_ = 0;
  std::atomic<bool> draining_{false};
  mutable std::mutex sid_prefix_mutex_;
  std::string sid_prefix_;  // new_sid()
  connection_limits limits_;
  network_set proxies_;  // --proxy-protocol-from
  connection_limits polling_sessions_;  // sessions from a polling handshake (they outlive its connection)
  jwt::verifier tokens_;

  mutable std::mutex failure_mutex_;
  std::optional<std::string> failure_;
  std::function<void()> failure_handler_;

  std::mutex parked_mutex_;
  std::unordered_map<std::string, std::shared_ptr<client_socket>> parked_;
  std::mutex sessions_mutex_;
  std::unordered_map<std::string, std::weak_ptr<eio_session>> sessions_;
  // relaying_get(): each relayed GET's sid, and whether its owner was asked
  // to release it.
  mutable std::mutex relayed_gets_mutex_;
  std::list<std::pair<std::string, bool>> relayed_gets_;
};

}  // namespace sidecast::gateway
