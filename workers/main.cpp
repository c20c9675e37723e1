// sidecast-worker: hosts the built-in services (demo, echo, ...) behind a broker.
#include <thread>

#include <spdlog/spdlog.h>

#include "core/admin_http.hpp"
#include "core/config.hpp"
#include "core/log.hpp"
#include "core/signals.hpp"
#include "workers/demo/demo.hpp"
#include "workers/sdk/metrics.hpp"

int main(int argc, char** argv) {
  using namespace sidecast;
  core::terminate_signals signals;
  CLI::App app{"sidecast-worker: serves built-in services behind a sidecast-broker"};
  worker_options options;
  std::vector<std::string> services;
  workers::builtin_options builtin;
  std::string log_level = "info";
  std::string http;
  std::size_t admin_max_connections = 64;
  std::string names;
  std::chrono::milliseconds drain_timeout{10000};
  for (const auto& [name, factory] : workers::builtin_services()) names += (names.empty() ? "" : ", ") + name;
  app.add_option("--service", services, "Service to serve (repeatable): " + names)->required();
  workers::add_options(app, builtin);
  app.add_option("--id", options.id, "Worker id (default w-<host>-<pid>)");
  app.add_option("--broker", options.broker, "Broker ROUTER endpoint")->capture_default_str();
  app.add_option("--publish", options.publish, "Broker XSUB endpoint for room events")->capture_default_str();
  auto* backup = app.add_option("--backup-broker", options.backup_broker,
                                "The other broker of a primary/backup pair (its ROUTER): the worker uses the "
                                "active one of the two");
  app.add_option("--backup-publish", options.backup_publish, "The other broker's XSUB endpoint")->needs(backup);
  backup->needs("--backup-publish");
  core::add_millis(app, "--heartbeat-interval", options.heartbeat_interval,
                   "Heartbeat interval until the broker's Welcome, ms");
  app.add_option("--threads", options.threads, "Handler threads (0: total capacity)")
      ->capture_default_str()
      ->check(CLI::Range(0u, 1024u));
  app.add_option("--outbox-limit", options.outbox_limit,
                 "Messages handlers may queue for sending (their replies never wait for room)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  app.add_option("--queue-limit", options.queue_limit,
                 "Requests that may wait for a handler thread; past it a request is answered BUSY")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  core::add_millis(app, "--outbox-wait", options.outbox_wait,
                   "How long a handler that finds the outbox full waits for room before the message is dropped, ms");
  app.add_option("--pending-acks-limit", options.pending_acks_limit,
                 "Emits that may wait for a client's ack at once; emit_with_ack past it is refused")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  app.add_option("--kept-replies", options.kept_replies,
                 "Answers kept after they are sent, so that a job the broker sends again after a reconnect is "
                 "answered again instead of run twice (0: none)")
      ->capture_default_str();
  app.add_option("--kept-reply-bytes", options.kept_reply_bytes, "Bytes those kept answers may hold")
      ->capture_default_str();
  app.add_option("--kept-notices", options.kept_notices,
                 "One-way messages (emits to a sid, joins, leaves) kept after they are sent until the broker says it "
                 "read them, so that those that die in a socket the worker replaces are sent again (0: none)")
      ->capture_default_str();
  app.add_option("--kept-notice-bytes", options.kept_notice_bytes, "Bytes those kept messages may hold")
      ->capture_default_str();
  app.add_option("--hwm", options.hwm, "High-water mark of the broker link (each way) and the PUB socket, messages; also what is held while the "
                 "link waits for the broker's Welcome of a new socket")
      ->capture_default_str()
      ->check(CLI::Range(1, 10000000));
  core::add_millis(app, "--drain-timeout", drain_timeout,
                   "On SIGTERM or SIGINT: take no new requests, give those running this long to finish, then stop "
                   "(what still runs goes to another worker, unless it was acked already: an acked job, such as a "
                   "VM launch, is not run again, and its client hears no more of it), ms");
  // One without the other would be ignored: plain text, silently.
  auto* curve_secret = app.add_option("--curve-secret", options.curve_secret, "This worker's CURVE secret key (Z85)");
  app.add_option("--curve-server-key", options.curve_server_key, "The broker's CURVE public key (Z85)")
      ->needs(curve_secret);
  curve_secret->needs("--curve-server-key");
  app.add_option("--http", http, "Serve /metrics and /healthz on HOST:PORT (empty: not at all)")->capture_default_str();
  core::add_admin_max_connections(app, admin_max_connections);
  app.add_option("--log-level", log_level, "trace, debug, info, warn, error, off")->capture_default_str();
  core::finish_app(app);
  if (auto code = core::parse(app, argc, argv)) return *code;
  if (!core::init_logging(log_level, "worker")) {
    std::fprintf(stderr, "unknown log level '%s'\n", log_level.c_str());
    return 2;
  }
  if (!options.id.empty() && !proto::valid_peer_id(options.id)) {
    spdlog::critical("worker id '{}' must be 1-64 characters without '.' or ':'", options.id);
    return 2;
  }
  try {
    auto registry = std::make_shared<prometheus::Registry>();
    builtin.metrics = registry;
    worker w{options};
    for (const auto& name : services) {
      auto it = workers::builtin_services().find(name);
      if (it == workers::builtin_services().end()) {
        spdlog::critical("unknown service '{}' (known: {})", name, names);
        return 2;
      }
      w.add(it->second(builtin));
    }
    // The first signal drains (on a thread of its own, so that this one
    // hears a second signal, which stops at once).
    std::thread drainer;
    struct join_on_exit {
      std::thread& t;
      ~join_on_exit() {
        if (t.joinable()) t.join();
      }
    } end_drainer{drainer};  // before w goes: it uses it
    core::terminate_signals::stop_on_exit end_signals{signals};  // before w goes: on_signal uses it
    signals.start([&w, &drainer, drain_timeout](int sig) {
      if (drainer.joinable()) {
        spdlog::info("signal {} again: stopping now", sig);
        w.stop();
        return;
      }
      spdlog::info("signal {}: draining (up to {} ms), then stopping; another signal stops at once", sig,
                   drain_timeout.count());
      drainer = std::thread([&w, drain_timeout] { w.drain(drain_timeout); });
    });
    worker_metrics metrics{*registry};
    // /healthz: 200 while the broker has welcomed this worker.
    core::admin_http admin{registry, [&w] { return w.connected(); }, [&] { metrics.refresh(w); }};
    if (!http.empty()) {
      admin.start(http, admin_max_connections);
      spdlog::info("metrics on http://{}:{}/metrics", core::parse_host_port(http)->host, admin.port());
    }
    spdlog::info("worker {} serving {} via {}", w.id(), fmt::join(services, ", "), options.broker);
    w.run();
    admin.stop();
    if (auto why = w.failure()) {
      w.stop();
      spdlog::critical("worker failed: {}", *why);
      return 1;
    }
  } catch (const std::exception& e) {
    spdlog::critical("worker failed: {}", e.what());
    return 1;
  }
  return 0;
}
