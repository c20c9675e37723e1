#pragma once
// A small HTTP server on its own thread for the operator: /metrics (the
// Prometheus registry) and /healthz. Used by processes whose main loop is not
// an Asio loop (the broker, the workers). At most --admin-max-connections
// connections at once, so a flood of them cannot take the file descriptors
// the process's ZeroMQ sockets need: past it a new one takes the place of
// the oldest idle one (counted), so idle connections held open by a peer
// cannot keep a health check out; with every one answering a request the
// new one is closed at once (counted).
#include <atomic>
#include <cstddef>
#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "core/asio_config.hpp"

#include <boost/asio/io_context.hpp>

#include "core/metrics.hpp"

namespace CLI {
class App;
class Option;
}  // namespace CLI

namespace sidecast::core {

/// The --admin-max-connections flag, for each process that serves one.
CLI::Option* add_admin_max_connections(CLI::App& app, std::size_t& target);

class admin_http {
 public:
  /// `healthy` is called on the server's thread; it must be thread-safe. So
  /// is `refresh`, called there before each /metrics answer: for figures
  /// kept elsewhere that are copied into the registry when asked for.
  /// `status`, when given, answers /status (JSON), also on that thread.
  admin_http(registry_ptr registry, std::function<bool()> healthy, std::function<void()> refresh = {},
             std::function<std::string()> status = {});
  ~admin_http();
  admin_http(const admin_http&) = delete;
  admin_http& operator=(const admin_http&) = delete;

  /// Binds "host:port" (port 0 picks one) and starts the thread, serving at
  /// most `max_connections` at once. Throws on a bad address or a failed
  /// bind: a start-up error.
  void start(const std::string& listen, std::size_t max_connections = 64);
  void stop();
  unsigned short port() const { return port_; }

 private:
  registry_ptr registry_;
  std::function<bool()> healthy_;
  std::function<void()> refresh_;
  std::function<std::string()> status_;
  prometheus::Gauge& connections_;
  prometheus::Counter& refused_;
  prometheus::Counter& evicted_;
  boost::asio::io_context io_{1};
  std::thread thread_;
  unsigned short port_ = 0;
};

}  // namespace sidecast::core
