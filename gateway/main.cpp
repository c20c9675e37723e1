// sidecast-gateway: Socket.IO, /ws and HTTP for browsers, bridged to a broker.
#include <spdlog/spdlog.h>

#include "core/config.hpp"
#include "core/log.hpp"
#include "core/signals.hpp"
#include "gateway/gateway.hpp"

int main(int argc, char** argv) {
  using namespace sidecast;
  core::terminate_signals signals;
  CLI::App app{"sidecast-gateway: Socket.IO v4, /ws and HTTP for browsers, bridged to a sidecast-broker"};
  gateway::gateway_config config;
  // Defaults for running from a source tree; deployments pass their own paths.
  config.static_dir = SIDECAST_WEB_DIR "/public";
  config.client_js = SIDECAST_WEB_DIR "/node_modules/socket.io-client/dist/socket.io.min.js";
  std::string log_level = "info";
  gateway::add_options(app, config);
  app.add_option("--log-level", log_level, "trace, debug, info, warn, error, off")->capture_default_str();
  core::finish_app(app);
  if (auto code = core::parse(app, argc, argv)) return *code;
  if (!core::init_logging(log_level, "gateway")) {
    std::fprintf(stderr, "unknown log level '%s'\n", log_level.c_str());
    return 2;
  }
  try {
    zmq::context_t context{1};
    auto registry = std::make_shared<prometheus::Registry>();
    gateway::gateway gw{config, context, registry};
    gw.on_failure(core::terminate_signals::interrupt);
    gw.start();
    auto sig = signals.wait();
    if (auto why = gw.failure()) {
      gw.stop();
      spdlog::critical("gateway failed: {}", *why);
      return 1;
    }
    spdlog::info("signal {}: stopping", sig);
    gw.drain(gw.config().drain_timeout);
  } catch (const std::exception& e) {
    spdlog::critical("gateway failed: {}", e.what());
    return 1;
  }
  return 0;
}
