#include "core/admin_http.hpp"

#include <cstdint>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/core/tcp_stream.hpp>
#include <boost/beast/http.hpp>
#include <CLI/CLI.hpp>
#include <spdlog/spdlog.h>

#include "core/config.hpp"

namespace sidecast::core {
namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;

namespace {

// What the server answers with, shared by its connections, and their count.
struct pages {
  registry_ptr registry;
  std::function<bool()> healthy;
  std::function<void()> refresh;
  std::function<std::string()> status;
  prometheus::Gauge& connections;
  prometheus::Counter& refused;
  std::size_t max_connections;
};

asio::awaitable<void> serve(tcp::socket socket, std::shared_ptr<const pages> p) {
  p->connections.Increment();
  struct counted {
    prometheus::Gauge& g;
    ~counted() { g.Decrement(); }
  } counted{p->connections};
  beast::tcp_stream stream{std::move(socket)};
  constexpr std::uint32_t header_limit = 8 * 1024;
  // Bounded: Beast keeps a chunk's size line or a trailer until its end,
  // and limits neither (header_limit covers only the header).
  beast::flat_buffer buffer{header_limit + 64 * 1024};
  for (;;) {
    http::request_parser<http::empty_body> parser;
    parser.header_limit(header_limit);
    stream.expires_after(std::chrono::seconds(30));
    auto [ec, n] = co_await http::async_read(stream, buffer, parser,
                                             asio::as_tuple(asio::use_awaitable));
    if (ec) co_return;
    const auto& req = parser.get();
    http::response<http::string_body> res{http::status::ok, req.version()};
    res.keep_alive(req.keep_alive());
    auto target = req.target();
    if (auto q = target.find('?'); q != beast::string_view::npos) target = target.substr(0, q);
    if (req.method() != http::verb::get && req.method() != http::verb::head) {
      res.result(http::status::method_not_allowed);
      res.body() = "method not allowed\n";
    } else if (target == "/metrics") {
      res.set(http::field::content_type, "text/plain; version=0.0.4");
      if (p->refresh) p->refresh();
      res.body() = serialize(*p->registry);
    } else if (target == "/status" && p->status) {
      res.set(http::field::content_type, "application/json");
      res.body() = p->status();
    } else if (target == "/healthz") {
      bool ok = p->healthy();
      res.result(ok ? http::status::ok : http::status::service_unavailable);
      res.set(http::field::content_type, "text/plain");
      res.body() = ok ? "ok\n" : "unhealthy\n";
    } else {
      res.result(http::status::not_found);
      res.body() = "not found\n";
    }
    res.prepare_payload();
    if (req.method() == http::verb::head) res.body().clear();  // its Content-Length stays: what a GET would get
    auto [wec, wn] = co_await http::async_write(stream, res, asio::as_tuple(asio::use_awaitable));
    if (wec || !res.keep_alive()) co_return;
  }
}

asio::awaitable<void> accept_loop(tcp::acceptor acceptor, std::shared_ptr<const pages> p) {
  for (;;) {
    auto [ec, socket] = co_await acceptor.async_accept(asio::as_tuple(asio::use_awaitable));
    if (ec == asio::error::operation_aborted) co_return;
    if (ec) {
      // Out of descriptors (EMFILE) or memory: the connection stays in the
      // listen queue and the next accept fails at once. A pause, not a spin.
      asio::steady_timer pause{acceptor.get_executor(), std::chrono::milliseconds(100)};
      co_await pause.async_wait(asio::as_tuple(asio::use_awaitable));
      continue;
    }
    // The gauge is this thread's own count: every connection starts and
    // ends on it.
    if (p->connections.Value() >= static_cast<double>(p->max_connections)) {
      p->refused.Increment();
      boost::system::error_code ignored;
      socket.close(ignored);
      continue;
    }
    asio::co_spawn(acceptor.get_executor(), serve(std::move(socket), p), asio::detached);
  }
}

}  // namespace

CLI::Option* add_admin_max_connections(CLI::App& app, std::size_t& target) {
  return app.add_option("--admin-max-connections", target,
                        "Connections to the /metrics and /healthz port at once; past it a new one is closed")
      ->capture_default_str()
      ->check(CLI::Range(std::size_t{1}, std::size_t{1} << 16));
}

admin_http::admin_http(registry_ptr registry, std::function<bool()> healthy, std::function<void()> refresh,
                       std::function<std::string()> status)
    : registry_{std::move(registry)},
      healthy_{std::move(healthy)},
      refresh_{std::move(refresh)},
      status_{std::move(status)},
      connections_{gauge(*registry_, "sidecast_admin_connections",
                         "Open connections to the /metrics and /healthz port")},
      refused_{counter(*registry_, "sidecast_admin_connections_refused_total",
                       "Connections to the /metrics and /healthz port closed at once: --admin-max-connections "
                       "already open")} {}

admin_http::~admin_http() { stop(); }

void admin_http::start(const std::string& listen, std::size_t max_connections) {
  auto hp = parse_host_port(listen);
  if (!hp) throw std::invalid_argument("bad HTTP address '" + listen + "' (want HOST:PORT)");
  tcp::endpoint endpoint{asio::ip::make_address(hp->host), hp->port};
  tcp::acceptor acceptor{io_};
  acceptor.open(endpoint.protocol());
  acceptor.set_option(asio::socket_base::reuse_address(true));
  acceptor.bind(endpoint);
  acceptor.listen();
  port_ = acceptor.local_endpoint().port();
  asio::co_spawn(io_, accept_loop(std::move(acceptor), std::make_shared<const pages>(pages{registry_, healthy_, refresh_, status_,
                                                                                 connections_, refused_,
                                                                                 max_connections})),
                 asio::detached);
  thread_ = std::thread([this] {
    try {
      io_.run();
    } catch (const std::exception& e) {
      spdlog::error("admin http stopped: {}", e.what());
    }
  });
}

void admin_http::stop() {
  io_.stop();
  if (thread_.joinable()) thread_.join();
}

}  // namespace sidecast::core
