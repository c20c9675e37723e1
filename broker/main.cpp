// sidecast-broker: routes requests from gateways to workers and fans room
// events out to gateways.
#include <spdlog/spdlog.h>

#include "broker/options.hpp"
#include "core/admin_http.hpp"
#include "core/config.hpp"
#include "core/log.hpp"
#include "core/open_files.hpp"
#include "core/signals.hpp"

int main(int argc, char** argv) {
  using namespace sidecast;
  core::terminate_signals signals;
  CLI::App app{"sidecast-broker: routes requests to workers and events to gateways"};
  broker::broker_config config;
  std::string http = "127.0.0.1:7780";
  std::size_t admin_max_connections = 64;
  std::string log_level = "info";
  broker::add_options(app, config);
  app.add_option("--http", http, "HOST:PORT for /metrics and /healthz (empty: off)")->capture_default_str();
  core::add_admin_max_connections(app, admin_max_connections);
  app.add_option("--log-level", log_level, "trace, debug, info, warn, error, off")->capture_default_str();
  core::finish_app(app);
  if (auto code = core::parse(app, argc, argv)) return *code;
  if (!core::init_logging(log_level, "broker")) {
    std::fprintf(stderr, "unknown log level '%s'\n", log_level.c_str());
    return 2;
  }
  core::raise_open_files_limit();  // a connection per peer, and the admin port's
  try {
    zmq::context_t context{1};
    auto registry = std::make_shared<prometheus::Registry>();
    broker::broker b{config, context, registry};
    b.bind();
    core::admin_http admin{registry, [&b] { return b.healthy(); }, {}, [&b] { return b.status(); }};
    if (!http.empty()) {
      admin.start(http, admin_max_connections);
      spdlog::info("metrics on http://{}:{}/metrics, status on /status", core::parse_host_port(http)->host,
                   admin.port());
    }
    core::terminate_signals::stop_on_exit end_signals{signals};  // before b goes: on_signal uses it
    signals.start([&b](int sig) {
      spdlog::info("signal {}: stopping", sig);
      b.stop();
    });
    b.run();
    admin.stop();
  } catch (const std::exception& e) {
    spdlog::critical("broker failed: {}", e.what());
    return 1;
  }
  return 0;
}
