#include "core/admin_http.hpp"

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/core/tcp_stream.hpp>
#include <boost/beast/http.hpp>
#include <spdlog/spdlog.h>

#include "core/config.hpp"

namespace sidecast::core {
namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;

namespace {

// What the server answers with, shared by its connections.
struct pages {
  registry_ptr registry;
  std::function<bool()> healthy;
  std::function<void()> refresh;
  std::function<std::string()> status;
};

asio::awaitable<void> serve(tcp::socket socket, std::shared_ptr<const pages> p) {
  beast::tcp_stream stream{std::move(socket)};
  beast::flat_buffer buffer;
  for (;;) {
    http::request_parser<http::empty_body> parser;
    parser.header_limit(8 * 1024);
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
    auto [wec, wn] = co_await http::async_write(stream, res, asio::as_tuple(asio::use_awaitable));
    if (wec || !res.keep_alive()) co_return;
  }
}

asio::awaitable<void> accept_loop(tcp::acceptor acceptor, std::shared_ptr<const pages> p) {
  for (;;) {
    auto [ec, socket] = co_await acceptor.async_accept(asio::as_tuple(asio::use_awaitable));
    if (ec == asio::error::operation_aborted) co_return;
    if (ec) continue;
    asio::co_spawn(acceptor.get_executor(), serve(std::move(socket), p), asio::detached);
  }
}

}  // namespace

admin_http::admin_http(registry_ptr registry, std::function<bool()> healthy, std::function<void()> refresh,
                       std::function<std::string()> status)
    : registry_{std::move(registry)},
      healthy_{std::move(healthy)},
      refresh_{std::move(refresh)},
      status_{std::move(status)} {}

admin_http::~admin_http() { stop(); }

void admin_http::start(const std::string& listen) {
  auto hp = parse_host_port(listen);
  if (!hp) throw std::invalid_argument("bad HTTP address '" + listen + "' (want HOST:PORT)");
  tcp::endpoint endpoint{asio::ip::make_address(hp->host), hp->port};
  tcp::acceptor acceptor{io_};
  acceptor.open(endpoint.protocol());
  acceptor.set_option(asio::socket_base::reuse_address(true));
  acceptor.bind(endpoint);
  acceptor.listen();
  port_ = acceptor.local_endpoint().port();
  asio::co_spawn(io_, accept_loop(std::move(acceptor), std::make_shared<const pages>(pages{registry_, healthy_, refresh_, status_})),
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
