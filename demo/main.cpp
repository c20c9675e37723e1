// sidecast: the all-in-one binary. `sidecast demo` runs the broker, a gateway
// and the built-in workers in one process — the same code as the separate
// binaries, with no network between the parts. Requests, replies and
// addressed traffic go over local:// connections (core/local_link.hpp, or
// inproc:// sockets with --link inproc); room events over inproc:// PUB/SUB.
// With --threads 1 the broker and the workers' I/O loop also run on the
// gateway's one I/O thread (core/input_reactor.hpp): a request and its
// answer cross no thread (handlers not marked quick still run on the
// workers' pool).
#include <atomic>

#include <spdlog/spdlog.h>

#include "broker/broker.hpp"
#include "core/config.hpp"
#include "core/curve.hpp"
#include "core/log.hpp"
#include "core/signals.hpp"
#include "gateway/gateway.hpp"
#include "workers/demo/demo.hpp"

namespace {

using namespace sidecast;

int run_demo(gateway::gateway_config gw_config, const workers::builtin_options& builtin, const std::string& link,
             bool own_threads, core::terminate_signals& signals) {
  zmq::context_t context{1};
  auto registry = std::make_shared<prometheus::Registry>();
  broker::broker_config b_config;
  b_config.router_endpoint = "inproc://broker";
  b_config.xsub_endpoint = "inproc://events-in";
  b_config.xpub_endpoint = "inproc://events-out";
  if (link == "local") b_config.local_endpoint = "local://broker";
  const auto& broker_endpoint = link == "local" ? b_config.local_endpoint : b_config.router_endpoint;
  broker::broker b{b_config, context, registry};
  b.bind();

  worker_options w_options;
  w_options.id = "demo-worker";
  w_options.broker = broker_endpoint;
  w_options.publish = b_config.xsub_endpoint;
  worker w{w_options, &context};
  w.on_failure(core::terminate_signals::interrupt);
  std::string services;
  for (const auto& [name, factory] : workers::builtin_services()) {
    w.add(factory(builtin));
    services += (services.empty() ? "" : ", ") + name;
  }

  gw_config.broker = broker_endpoint;
  gw_config.events = b_config.xpub_endpoint;
  gateway::gateway gw{gw_config, context, registry};
  // One gateway thread and local:// links: the broker and the workers' I/O
  // run on it too (core/input_reactor.hpp), with no thread hop on the way
  // of a request and its answer. Otherwise they have threads of their own.
  bool one_thread = gw_config.threads == 1 && link == "local" && !own_threads;
  std::thread broker_thread;
  // The broker's loop cannot fail on a peer's input; should it fail anyway,
  // the demo ends (status 1) rather than serve nothing.
  std::atomic<bool> broker_failed{false};
  auto broker_fails = [&broker_failed] {
    broker_failed = true;
    core::terminate_signals::interrupt();
  };
  if (one_thread) {
    gw.share_thread(
        [&](boost::asio::io_context& io) {
          b.run_on(io, broker_fails);
          w.start_on(io);
        },
        [&] {
          w.stop();
          b.stop();
        });
  } else {
    broker_thread = std::thread{[&b, &broker_fails] {
      try {
        b.run();
      } catch (const std::exception& e) {
        spdlog::critical("broker failed: {}", e.what());
        broker_fails();
      } catch (...) {
        spdlog::critical("broker failed: a non-standard exception");
        broker_fails();
      }
    }};
    w.start();
  }
  gw.on_failure(core::terminate_signals::interrupt);
  try {
    gw.start();
  } catch (...) {
    // Its port taken, say: the broker's thread and the worker's stop
    // before the error is reported (a joinable thread left to the unwinding
    // ended the process with abort, status 134, and no word of why).
    w.stop();
    b.stop();
    if (broker_thread.joinable()) broker_thread.join();
    throw;
  }

  auto hp = core::parse_host_port(gw_config.http);
  spdlog::info("broker  : running in-process ({}), {}", broker_endpoint,
               one_thread ? "on the gateway's thread" : "on a thread of its own");
  spdlog::info("workers : {} (capacity {} each)", services, builtin.capacity);
  spdlog::info("gateway : Socket.IO at /socket.io/, /ws, /api/v1, /metrics");
  spdlog::info("demo    : open http://{}:{}/  (Ctrl-C stops)", hp->host, gw.port());

  auto sig = signals.wait();
  auto failure = gw.failure();
  if (!failure) failure = w.failure();
  if (!failure && broker_failed) failure = "the broker's loop failed";
  if (failure) spdlog::critical("demo failed: {}", *failure);
  else spdlog::info("signal {}: stopping", sig);
  gw.drain(failure ? std::chrono::milliseconds{0} : gw.config().drain_timeout);
  w.stop();
  b.stop();
  if (broker_thread.joinable()) broker_thread.join();
  return failure ? 1 : 0;
}

}  // namespace

int main(int argc, char** argv) {
  core::terminate_signals signals;
  CLI::App app{"sidecast: realtime broker and gateway"};
  app.require_subcommand(1);
  auto* demo = app.add_subcommand("demo", "broker, gateway and the built-in workers in one process");
  auto* keygen = app.add_subcommand("keygen", "print a new CURVE key pair (Z85) for --curve-* flags");
  gateway::gateway_config config;
  config.static_dir = SIDECAST_WEB_DIR "/public";
  config.client_js = SIDECAST_WEB_DIR "/node_modules/socket.io-client/dist/socket.io.min.js";
  workers::builtin_options builtin;
  builtin.capacity = 64;
  std::string log_level = "info";
  std::string link = "local";
  bool own_threads = false;
  gateway::add_options(*demo, config);
  // The demo's gateway reaches its own broker in the process: the flags
  // for another broker's endpoints (a pair's backup too: with local:// it
  // failed at start, with --link inproc it pointed the gateway at an
  // outside broker) and CURVE keys have nothing to set.
  for (const char* name : {"--broker", "--events", "--backup-broker", "--backup-events", "--curve-secret",
                           "--curve-server-key"})
    demo->remove_option(demo->get_option(name));
  workers::add_options(*demo, builtin);
  demo->add_option("--log-level", log_level, "trace, debug, info, warn, error, off")->capture_default_str();
  demo->add_option("--link", link, "How the gateway and the workers reach the broker: local or inproc")
      ->capture_default_str()
      ->check(CLI::IsMember({"local", "inproc"}));
  demo->add_flag("--own-threads", own_threads,
                  "With --threads 1, still run the broker and the workers' I/O on threads of their own "
                  "(by default they share the gateway's thread)")
      ->capture_default_str();
  core::finish_app(*demo);
  if (auto code = core::parse(app, argc, argv)) return *code;
  if (keygen->parsed()) {
    auto [public_key, secret_key] = core::curve_keypair();
    std::printf("public = \"%s\"\nsecret = \"%s\"\n", public_key.c_str(), secret_key.c_str());
    return 0;
  }
  if (!core::init_logging(log_level, "sidecast")) {
    std::fprintf(stderr, "unknown log level '%s'\n", log_level.c_str());
    return 2;
  }
  try {
    return run_demo(config, builtin, link, own_threads, signals);
  } catch (const std::exception& e) {
    spdlog::critical("demo failed: {}", e.what());
    return 1;
  }
}
