#pragma once
// A small HTTP server on its own thread for the operator: /metrics (the
// Prometheus registry) and /healthz. Used by processes whose main loop is not
// an Asio loop (the broker, the workers).
#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "core/asio_config.hpp"

#include <boost/asio/io_context.hpp>

#include "core/metrics.hpp"

namespace sidecast::core {

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

  /// Binds "host:port" (port 0 picks one) and starts the thread. Throws on a
  /// bad address or a failed bind: a start-up error.
  void start(const std::string& listen);
  void stop();
  unsigned short port() const { return port_; }

 private:
  registry_ptr registry_;
  std::function<bool()> healthy_;
  std::function<void()> refresh_;
  std::function<std::string()> status_;
  boost::asio::io_context io_{1};
  std::thread thread_;
  unsigned short port_ = 0;
};

}  // namespace sidecast::core
