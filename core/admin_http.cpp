#include "core/admin_http.hpp"

#include <array>
#include <cstdint>
#include <list>
#include <optional>

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

// The open connections, oldest first: when --admin-max-connections are
// open, a new one takes the place of the oldest that waits for a request
// (a health check is not refused because a peer holds idle connections).
// Only the server's thread touches it.
struct open_connections {
  struct entry {
    beast::tcp_stream* stream;
    bool busy;  // a request is being answered: not taken
  };
  std::list<entry> list;

  // Closes the oldest idle one; false when every one is busy.
  bool evict_idle() {
    for (auto it = list.begin(); it != list.end(); ++it) {
      if (it->busy) continue;
      it->stream->close();  // its read ends: serve() removes it
      it->busy = true;      // not taken twice
      return true;
    }
    return false;
  }
};

// What the server answers with, shared by its connections, and their count.
struct pages {
  registry_ptr registry;
  std::function<bool()> healthy;
  std::function<void()> refresh;
  std::function<std::string()> status;
  prometheus::Gauge& connections;
  prometheus::Counter& refused;
  prometheus::Counter& evicted;
  std::size_t max_connections;
  std::shared_ptr<open_connections> open = std::make_shared<open_connections>();
};

http::response<http::string_body> answer(const pages& p, const http::request<http::string_body>& req) {
  http::response<http::string_body> res{http::status::ok, req.version()};
  res.set(http::field::server, "sidecast");
  res.set(http::field::content_type, "text/plain");
  res.keep_alive(req.keep_alive());
  auto target = req.target();
  if (auto q = target.find('?'); q != beast::string_view::npos) target = target.substr(0, q);
  // Absolute form (RFC 9112 3.2.2), as a client speaking to a proxy sends it.
  if (!target.starts_with('/')) {
    if (auto scheme = target.find("://"); scheme != beast::string_view::npos) {
      auto path = target.find('/', scheme + 3);
      target = path == beast::string_view::npos ? beast::string_view{"/"} : target.substr(path);
    }
  }
  bool known = target == "/metrics" || target == "/healthz" || (target == "/status" && p.status);
  if (!known) {
    res.result(http::status::not_found);
    res.body() = "not found\n";
  } else if (req.method() != http::verb::get && req.method() != http::verb::head) {
    res.result(http::status::method_not_allowed);
    res.set(http::field::allow, "GET, HEAD");
    res.body() = "method not allowed\n";
  } else if (target == "/metrics") {
    res.set(http::field::content_type, "text/plain; version=0.0.4");
    if (p.refresh) p.refresh();
    res.body() = serialize(*p.registry);
  } else if (target == "/status") {
    res.set(http::field::content_type, "application/json");
    res.body() = p.status();
  } else {
    bool ok = p.healthy();
    res.result(ok ? http::status::ok : http::status::service_unavailable);
    res.body() = ok ? "ok\n" : "unhealthy\n";
  }
  res.prepare_payload();
  if (req.method() == http::verb::head) res.body().clear();  // its Content-Length stays: what a GET would get
  return res;
}

// An answer the parser's error calls for (a header or body past its limit,
// malformed input), sent before the connection is closed.
std::optional<http::response<http::string_body>> refusal(const boost::system::error_code& ec) {
  http::status status;
  if (ec == http::error::end_of_stream || ec == http::error::partial_message) return std::nullopt;  // it left
  if (ec == http::error::header_limit) status = http::status::request_header_fields_too_large;
  else if (ec == http::error::body_limit || ec == http::error::buffer_overflow) status = http::status::payload_too_large;
  else if (ec.category() == http::make_error_code(http::error::bad_target).category()) status = http::status::bad_request;
  else return std::nullopt;  // the peer left, or the deadline passed
  http::response<http::string_body> res{status, 11};
  res.set(http::field::server, "sidecast");
  res.set(http::field::content_type, "text/plain");
  res.keep_alive(false);
  res.body() = std::string{http::obsolete_reason(status)} + "\n";
  res.prepare_payload();
  return res;
}

asio::awaitable<void> serve(tcp::socket socket, std::shared_ptr<const pages> p) {
  beast::tcp_stream stream{std::move(socket)};
  p->connections.Increment();
  auto open = p->open;
  auto self = open->list.insert(open->list.end(), {&stream, false});
  struct counted {
    prometheus::Gauge& g;
    open_connections& open;
    std::list<open_connections::entry>::iterator self;
    ~counted() {
      g.Decrement();
      open.list.erase(self);
    }
  } counted{p->connections, *open, self};
  constexpr std::uint32_t header_limit = 8 * 1024;
  constexpr std::uint64_t body_limit = 4 * 1024;  // read and ignored: no page takes a body
  // Bounded: Beast keeps a chunk's size line or a trailer until its end,
  // and limits neither (header_limit covers only the header).
  beast::flat_buffer buffer{header_limit + 64 * 1024};
  for (;;) {
    http::request_parser<http::string_body> parser;
    parser.header_limit(header_limit);
    parser.body_limit(body_limit);
    stream.expires_after(std::chrono::seconds(30));
    auto [ec, n] = co_await http::async_read(stream, buffer, parser, asio::as_tuple(asio::use_awaitable));
    if (ec) {
      if (auto res = refusal(ec); res && stream.socket().is_open()) {
        auto [wec, wn] = co_await http::async_write(stream, *res, asio::as_tuple(asio::use_awaitable));
        if (!wec) {
          // Closed with the rest of the request unread, the kernel would
          // send a reset, which can destroy the answer on its way: a half
          // close, then at most 64 KiB or 2 s of what is still coming.
          boost::system::error_code ignored;
          stream.socket().shutdown(tcp::socket::shutdown_send, ignored);
          stream.expires_after(std::chrono::seconds(2));
          std::array<char, 4096> sink;
          for (std::size_t drained = 0; drained < 64 * 1024;) {
            auto [rec, got] = co_await stream.async_read_some(asio::buffer(sink), asio::as_tuple(asio::use_awaitable));
            if (rec) break;
            drained += got;
          }
        }
      }
      co_return;
    }
    self->busy = true;
    auto res = answer(*p, parser.get());
    auto [wec, wn] = co_await http::async_write(stream, res, asio::as_tuple(asio::use_awaitable));
    if (wec || !res.keep_alive()) co_return;
    self->busy = false;
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
    // The list is this thread's own: every connection starts and ends on it.
    // Full: the oldest idle one gives way (its descriptor is closed now, so
    // the count of descriptors stays bounded); all busy: the new one goes.
    if (p->open->list.size() >= p->max_connections) {
      if (p->open->evict_idle()) {
        p->evicted.Increment();
      } else {
        p->refused.Increment();
        boost::system::error_code ignored;
        socket.close(ignored);
        continue;
      }
    }
    asio::co_spawn(acceptor.get_executor(), serve(std::move(socket), p), asio::detached);
  }
}

}  // namespace

CLI::Option* add_admin_max_connections(CLI::App& app, std::size_t& target) {
  return app.add_option("--admin-max-connections", target,
                        "Connections to the /metrics and /healthz port at once; past it a new one takes the oldest "
                        "idle one's place (closed at once when every one is answering a request)")
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
                       "already open, each answering a request")},
      evicted_{counter(*registry_, "sidecast_admin_connections_evicted_total",
                       "Idle connections to the /metrics and /healthz port closed to make room for a new one "
                       "(--admin-max-connections were open)")} {}

admin_http::~admin_http() { stop(); }

void admin_http::start(const std::string& listen, std::size_t max_connections) {
  auto hp = parse_host_port(listen);
  if (!hp)
    throw std::invalid_argument("bad --http '" + listen +
                                "' (want a numeric address and a port: 127.0.0.1:7780, [::1]:7780, :7780)");
  tcp::endpoint endpoint{asio::ip::make_address(hp->host), hp->port};
  tcp::acceptor acceptor{io_};
  acceptor.open(endpoint.protocol());
  acceptor.set_option(asio::socket_base::reuse_address(true));
  acceptor.bind(endpoint);
  acceptor.listen();
  port_ = acceptor.local_endpoint().port();
  asio::co_spawn(io_, accept_loop(std::move(acceptor), std::make_shared<const pages>(pages{registry_, healthy_, refresh_, status_,
                                                                                 connections_, refused_, evicted_,
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
