#include "gateway/http_session.hpp"

#include <algorithm>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <iterator>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/websocket/rfc6455.hpp>
#include <boost/url/parse.hpp>
#include <spdlog/spdlog.h>

#include "core/log.hpp"
#include "core/metrics.hpp"
#include "gateway/api.hpp"
#include "gateway/codec/engineio.hpp"
#include "gateway/codec/proxy_protocol.hpp"
#include "gateway/codec/socketio.hpp"
#include "gateway/eio_session.hpp"
#include "gateway/gateway.hpp"
#include "gateway/ws_session.hpp"
#include <boost/json.hpp>

namespace sidecast::gateway {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
namespace urls = boost::urls;
using request = http::request<http::string_body>;
using response = http::response<http::string_body>;

namespace {

constexpr auto use = asio::as_tuple(asio::use_awaitable);

http_answer eio_error(engineio::error_code code, unsigned status = 400) {
  return {status, "application/json", std::string{engineio::error_body(code)}};
}

// While the gateway drains, nothing new opens on it (a session, a
// WebSocket): the client tries again, through the balancer, elsewhere.
http_answer shutting_down() {
  return {503, "application/json", R"({"code":3,"message":"Server shutting down"})"};
}

std::string_view content_type_for(std::string_view path) {
  auto dot = path.rfind('.');
  auto ext = dot == std::string_view::npos ? std::string_view{} : path.substr(dot);
  static constexpr std::pair<std::string_view, std::string_view> types[] = {
      {".html", "text/html; charset=UTF-8"},      {".htm", "text/html; charset=UTF-8"},
      {".js", "text/javascript; charset=UTF-8"},  {".mjs", "text/javascript; charset=UTF-8"},
      {".css", "text/css; charset=UTF-8"},        {".json", "application/json"},
      {".map", "application/json"},               {".txt", "text/plain; charset=UTF-8"},
      {".wasm", "application/wasm"},              {".png", "image/png"},
      {".jpg", "image/jpeg"},                     {".jpeg", "image/jpeg"},
      {".gif", "image/gif"},                      {".webp", "image/webp"},
      {".avif", "image/avif"},                    {".svg", "image/svg+xml"},
      {".ico", "image/x-icon"},                   {".woff", "font/woff"},
      {".woff2", "font/woff2"},                   {".ttf", "font/ttf"},
      {".otf", "font/otf"},                       {".pdf", "application/pdf"},
      {".xml", "application/xml"},                {".webmanifest", "application/manifest+json"},
  };
  for (const auto& [e, type] : types)
    if (beast::iequals(ext, e)) return type;
  return "application/octet-stream";
}

// What a static file's GET (or HEAD) gets: its contents, or, past
// --max-static-bytes, a refusal. Read on the I/O thread, so bounded: a
// file of hundreds of megabytes held every connection of the thread while
// it was read, and a copy of it per request.
struct file_answer {
  std::string body;
  std::uint64_t size = 0;
  bool too_large = false;
};

// A regular file's contents (for a HEAD only its size); nullopt for anything else (a
// directory, a FIFO that would block the thread, a device) or a path with a
// NUL (which would name a shorter path than the one checked).
std::optional<file_answer> read_file(const std::string& path, std::size_t limit, bool head) {
  std::error_code ec;
  if (path.find('\0') != std::string::npos || !std::filesystem::is_regular_file(path, ec)) return std::nullopt;
  std::ifstream f{path, std::ios::binary | std::ios::ate};
  if (!f) return std::nullopt;
  auto size = static_cast<std::size_t>(f.tellg());
  if (size > limit) return file_answer{.too_large = true};
  file_answer out;
  out.size = size;
  if (head) return out;
  out.body.resize(size);
  f.seekg(0);
  if (!f.read(out.body.data(), static_cast<std::streamsize>(size))) return std::nullopt;
  return out;
}

// read_file(), of a file whose real path (symbolic links followed) is
// under `root`'s: a link in the served directory that leads out of it
// serves nothing.
std::optional<file_answer> read_file_beneath(const std::string& root, const std::string& path, std::size_t limit,
                                             bool head) {
  if (path.find('\0') != std::string::npos) return std::nullopt;  // it would name a shorter path
  std::error_code ec;
  auto base = std::filesystem::canonical(root, ec);
  if (ec) return std::nullopt;
  auto real = std::filesystem::canonical(path, ec);
  if (ec) return std::nullopt;
  auto inside = real.lexically_relative(base);
  if (inside.empty() || *inside.begin() == "..") return std::nullopt;
  return read_file(real.string(), limit, head);
}

// The Origin's "host[:port]" part, or empty when it has none.
std::string_view origin_authority(std::string_view origin) {
  auto scheme = origin.find("://");
  return scheme == std::string_view::npos ? std::string_view{} : origin.substr(scheme + 3);
}

// A browser's Origin that is the gateway's own (its host equals the Host
// we were reached on) or listed by name in --cors-origin.
bool origin_named(const gateway_config& c, const request& req) {
  auto origin = req[http::field::origin];
  auto host = req[http::field::host];
  return std::find(c.cors_origins.begin(), c.cors_origins.end(), origin) != c.cors_origins.end() ||
         (!host.empty() && origin_authority(origin) == host);
}

// Browsers send Origin; a request without one (curl, Node, Python clients)
// is allowed. A named origin is allowed; any other only with '*'.
bool origin_allowed(const gateway_config& c, const request& req) {
  if (req[http::field::origin].empty() || origin_named(c, req)) return true;
  return std::find(c.cors_origins.begin(), c.cors_origins.end(), "*") != c.cors_origins.end();
}

// A refused origin is counted, and logged at most so often: it is a
// peer's input, as free to send as any other.
void note_refused_origin(gateway& gw, const request& req, std::string_view what) {
  gw.metrics().refused_origin.Increment();
  static thread_local core::log_limiter log_limit;
  if (log_limit.allow()) spdlog::warn("refused {}origin {}", what, core::printable(req[http::field::origin]));
}

// A listed origin (or the gateway's own) is named, with credentials; one
// allowed only by `--cors-origin '*'` gets a literal "*" and none (as the
// Node server's `origin: "*"`): every site's pages may read the answers,
// but never with the cookies or credentials a proxy in front may rely on.
void add_cors(const gateway_config& c, const request& req, response& res) {
  auto origin = req[http::field::origin];
  if (origin.empty()) return;
  if (!origin_named(c, req)) {
    res.set(http::field::access_control_allow_origin, "*");
    return;
  }
  res.set(http::field::access_control_allow_origin, origin);
  res.set(http::field::access_control_allow_credentials, "true");
  res.set(http::field::vary, "Origin");
}

// The Date header's value (RFC 9110 6.6.1), made once a second per thread.
const std::string& http_date() {
  thread_local std::time_t made = 0;
  thread_local std::string text;
  auto now = std::time(nullptr);
  if (now != made) {
    std::tm tm{};
    ::gmtime_r(&now, &tm);
    char buf[64];
    text.assign(buf, std::strftime(buf, sizeof buf, "%a, %d %b %Y %H:%M:%S GMT", &tm));
    made = now;
  }
  return text;
}

response make_response(const request& req, http_answer a) {
  response res{static_cast<http::status>(a.status), req.version()};
  res.set(http::field::server, "sidecast");
  res.set(http::field::date, http_date());
  res.set(http::field::cache_control, "no-store");
  res.set("X-Content-Type-Options", "nosniff");
  if (!a.allow.empty()) res.set(http::field::allow, a.allow);
  // RFC 9110, 15.5.2: a 401 names the scheme that would do (the API key
  // as a bearer token; X-API-Key does too).
  if (a.status == 401) res.set(http::field::www_authenticate, R"(Bearer realm="sidecast")");
  res.keep_alive(req.keep_alive());
  if (a.status == 204) return res;  // no body, so no Content-Type or Content-Length (RFC 9110 8.6, 15.3.5)
  res.set(http::field::content_type, a.content_type);
  if (a.head_length) {
    res.content_length(*a.head_length);  // what the GET would carry
    return res;
  }
  res.body() = std::move(a.body);
  res.prepare_payload();
  return res;
}

// Runs `f(session, slot)` on the Engine.IO session's executor; the caller
// waits on the slot. (A plain function: GCC 12 mishandles lambda temporaries
// inside co_await expressions.)
template <typename F>
std::shared_ptr<reply_slot> on_session(std::shared_ptr<eio_session> session, asio::any_io_executor ex, F f) {
  auto slot = std::make_shared<reply_slot>(ex);
  asio::post(session->executor(), [session, slot, f = std::move(f)]() mutable { f(*session, slot); });
  return slot;
}

asio::awaitable<http_answer> engine_io(gateway& gw, request& req, const urls::params_view& params, bool echo,
                                       const std::string& peer) {
  auto get = [&](std::string_view key) -> std::optional<std::string> {
    auto it = params.find(key);
    if (it == params.end()) return std::nullopt;
    return std::string{(*it).value};
  };
  if (get("EIO") != "4") co_return eio_error(engineio::error_code::unsupported_protocol_version);
  auto transport = get("transport");
  if (transport != "polling" && transport != "websocket") co_return eio_error(engineio::error_code::transport_unknown);
  if (transport == "websocket") co_return eio_error(engineio::error_code::bad_request);  // not an upgrade
  auto sid = get("sid");
  if (!sid) {
    if (req.method() != http::verb::get) co_return eio_error(engineio::error_code::bad_handshake_method);
    if (gw.draining()) co_return shutting_down();
    // A session outlives the request that opened it (until its ping
    // timeout), so one keep-alive connection could open them without end:
    // each takes a slot of its own.
    auto place = gw.polling_sessions().admit(peer);
    if (!place) {
      gw.metrics().session_limit.Increment();
      co_return eio_error(engineio::error_code::bad_request, 503);
    }
    auto ex = co_await asio::this_coro::executor;
    auto session = std::make_shared<eio_session>(gw, ex, gw.new_sid(), echo);
    session->hold(std::move(place));
    gw.add_session(session->sid(), session);
    auto slot = std::make_shared<reply_slot>(ex);
    session->open_polling(slot);
    co_return co_await slot->wait();
  }
  auto ex = co_await asio::this_coro::executor;
  if (!gw.owner_elsewhere(*sid).empty()) {
    // Another gateway's session (a balancer that ignores the sid): ask the
    // owner through the broker and relay its answer.
    if (req.method() != http::verb::get && req.method() != http::verb::post)
      co_return eio_error(engineio::error_code::bad_request);
    proto::HttpForward f;
    f.set_sid(*sid);
    f.set_method(req.method() == http::verb::post ? "POST" : "GET");
    f.set_body(std::move(req.body()));
    auto slot = std::make_shared<reply_slot>(ex);
    const auto& c = gw.config();
    // A GET waits for the owner's events: a drain here asks the owner to
    // answer it now, and waits for that answer (gateway::drain).
    auto relaying = req.method() == http::verb::get ? gw.relaying_get(*sid) : nullptr;
    if (!gw.link().forward(std::move(f), slot, c.ping_interval + c.ping_timeout + std::chrono::seconds(5)))
      co_return http_answer{503, "application/json", R"({"code":3,"message":"Bad request"})"};
    gw.metrics().forwarded.Increment();
    co_return co_await slot->wait();
  }
  auto session = gw.find_session(*sid);
  if (!session) co_return eio_error(engineio::error_code::session_id_unknown);
  std::shared_ptr<reply_slot> slot;
  if (req.method() == http::verb::get) {
    slot = on_session(session, ex, [](eio_session& s, std::shared_ptr<reply_slot> r) { s.poll(std::move(r)); });
  } else if (req.method() == http::verb::post) {
    slot = on_session(session, ex, [body = std::move(req.body())](eio_session& s, std::shared_ptr<reply_slot> r) mutable {
      s.post(std::move(body), std::move(r));
    });
  } else {
    co_return eio_error(engineio::error_code::bad_request);
  }
  co_return co_await slot->wait();
}

// A file found: refused past --max-static-bytes, else its answer (a HEAD's
// with the length alone).
http_answer file_served(gateway& gw, file_answer file, std::string content_type, bool head) {
  if (file.too_large) {
    gw.metrics().static_too_large.Increment();
    return {403, "text/plain", "the file is larger than the gateway serves (--max-static-bytes)\n"};
  }
  http_answer a{200, std::move(content_type), std::move(file.body)};
  if (head) a.head_length = file.size;
  return a;
}

asio::awaitable<http_answer> static_file(gateway& gw, std::string_view path, bool head) {
  const auto& c = gw.config();
  if (path == "/socket.io/socket.io.min.js" || path == "/socket.io/socket.io.js") {
    if (c.client_js.empty()) co_return http_answer{404, "text/plain", "no client configured (--client-js)\n"};
    auto file = read_file(c.client_js, c.max_static_bytes, head);
    if (!file) co_return http_answer{404, "text/plain", "client file missing\n"};
    co_return file_served(gw, std::move(*file), "text/javascript; charset=UTF-8", head);
  }
  // No segment that starts with a dot: not "..", nor a hidden file (.git,
  // .env); but /.well-known/ (RFC 8615: ACME challenges, security.txt).
  constexpr std::string_view well_known = "/.well-known/";
  auto rest = path.starts_with(well_known) ? path.substr(well_known.size() - 1) : path;
  if (c.static_dir.empty() || rest.find("/.") != std::string_view::npos || path.find('\\') != std::string_view::npos)
    co_return http_answer{404, "text/plain", "not found\n"};
  std::string file = c.static_dir + std::string{path};
  if (path.ends_with('/')) file += "index.html";
  auto found = read_file_beneath(c.static_dir, file, c.max_static_bytes, head);
  if (!found) co_return http_answer{404, "text/plain", "not found\n"};
  co_return file_served(gw, std::move(*found), std::string{content_type_for(file)}, head);
}

asio::awaitable<response> handle(gateway& gw, request& req, const std::string& peer) {
  auto target = urls::parse_origin_form(req.target());  // absolute form was rewritten (origin_form)
  if (!target) co_return make_response(req, {400, "text/plain", "bad request target\n"});
  auto path = std::string{target->path()};
  bool echo = gw.config().engineio_echo && (path == "/engine.io/" || path == "/engine.io");
  bool eio = path == "/socket.io/" || path == "/socket.io" || echo;
  // What a browser page may call from another origin (--cors-origin): the
  // Engine.IO transport and the HTTP API.
  bool api = path.starts_with("/api/v1/");
  bool cors = eio || api;
  if (cors && !origin_allowed(gw.config(), req)) {
    note_refused_origin(gw, req, "");
    co_return make_response(req, eio ? eio_error(engineio::error_code::forbidden, 403)
                                     : http_answer{403, "application/json", R"({"error":"origin not allowed"})"});
  }
  if (cors && req.method() == http::verb::options) {
    auto res = make_response(req, {204, "text/plain", ""});
    add_cors(gw.config(), req, res);
    res.set(http::field::access_control_allow_methods, eio ? "GET, POST, OPTIONS" : "GET, POST, DELETE, OPTIONS");
    auto asked = req[http::field::access_control_request_headers];
    res.set(http::field::access_control_allow_headers, asked.empty() ? "content-type" : asked);
    res.set(http::field::access_control_max_age, "86400");
    co_return res;
  }
  http_answer answer;
  if (eio) {
    auto params = target->params();
    answer = co_await engine_io(gw, req, params, echo, peer);
  } else if (path.starts_with("/api/v1/")) {
    auto params = target->params();
    answer = co_await gw.api().handle(req, path, params, peer);
  } else if (req.method() != http::verb::get && req.method() != http::verb::head) {
    answer = {405, "text/plain", "method not allowed\n", "GET, HEAD"};
  } else if (path == "/metrics") {
    answer = {200, "text/plain; version=0.0.4", core::serialize(*gw.registry())};
  } else if (path == "/healthz") {
    bool ok = gw.healthy();
    answer = {ok ? 200u : 503u, "text/plain", ok ? "ok\n" : "broker not connected\n"};
  } else {
    answer = co_await static_file(gw, path, req.method() == http::verb::head);
  }
  auto res = make_response(req, std::move(answer));
  if (cors) add_cors(gw.config(), req, res);
  co_return res;
}

// `/ws?nsp=/chat&auth={...}`: one plain WebSocket in one namespace.
std::optional<http_answer> upgrade_plain(gateway& gw, beast::tcp_stream& stream, request& req, std::string nsp,
                                         std::string auth, const ws_limits& limits, std::shared_ptr<void> slot) {
  const auto* service = gw.service_for(nsp);
  if (!service) return http_answer{404, "application/json", R"({"message":"Invalid namespace"})"};
  if (auth.size() > gw.config().max_auth_bytes) {
    gw.metrics().long_auth.Increment();
    return http_answer{400, "application/json", R"j({"message":"auth too large (--max-auth-bytes)"})j"};
  }
  boost::system::error_code ec;
  auto parsed = socketio::parse_json(auth, ec);
  if (ec || !parsed.is_object()) return http_answer{400, "application/json", R"({"message":"auth must be a JSON object"})"};
  auto ws = std::make_shared<ws_conn>(std::move(stream), limits, gw.metrics(), std::move(slot));
  auto session = std::make_shared<ws_session>(gw, ws, std::move(nsp), *service, std::move(auth));
  // The connect hook runs once the handshake is done: Beast refuses an
  // upgrade without a Sec-WebSocket-Key or of another version (400), and
  // no service should hear of a client that never connected.
  ws->accept(
      std::move(req), [session](std::string data, bool binary) { session->on_message(std::move(data), binary); },
      [session] { session->on_closed(); }, [session] { session->start(); });
  return std::nullopt;
}

// Takes the connection over for a WebSocket: an Engine.IO session (direct or
// an upgrade of a polling one). Returns an error answer when refused.
std::optional<http_answer> upgrade(gateway& gw, beast::tcp_stream& stream, request& req, std::shared_ptr<void> slot) {
  auto target = urls::parse_origin_form(req.target());
  if (!target) return http_answer{400, "text/plain", "bad request target\n"};
  auto path = target->path();
  bool plain = path == "/ws";
  bool echo = gw.config().engineio_echo && (path == "/engine.io/" || path == "/engine.io");
  if (!plain && !echo && path != "/socket.io/" && path != "/socket.io")
    return http_answer{404, "text/plain", "not found\n"};
  if (!origin_allowed(gw.config(), req)) {
    note_refused_origin(gw, req, "WebSocket ");
    return eio_error(engineio::error_code::forbidden, 403);
  }
  auto params = target->params();
  auto get = [&](std::string_view key) -> std::optional<std::string> {
    auto it = params.find(key);
    if (it == params.end()) return std::nullopt;
    return std::string{(*it).value};
  };
  // An upgrade of a polling session goes on: its session closes with the rest.
  if (gw.draining() && (plain || !get("sid"))) return shutting_down();
  const auto& c = gw.config();
  ws_limits limits{c.max_payload, c.outbound_messages, c.outbound_bytes};
  if (plain) return upgrade_plain(gw, stream, req, get("nsp").value_or("/"), get("auth").value_or("{}"), limits, slot);
  if (get("EIO") != "4") return eio_error(engineio::error_code::unsupported_protocol_version);
  if (get("transport") != "websocket") return eio_error(engineio::error_code::transport_unknown);
  std::shared_ptr<eio_session> session;
  bool direct = false;
  if (auto sid = get("sid")) {
    session = gw.find_session(*sid);
    if (!session) return eio_error(engineio::error_code::session_id_unknown);
    if (!session->claim_websocket()) {
      // A second WebSocket for the sid: accepted, then closed at once, as the
      // reference server does (clients see a close, not a failed handshake).
      auto extra = std::make_shared<ws_conn>(std::move(stream), limits, gw.metrics(), std::move(slot));
      extra->accept(std::move(req), [](std::string, bool) {}, [] {});
      extra->close();
      return std::nullopt;
    }
  } else {
    session = std::make_shared<eio_session>(gw, stream.get_executor(), gw.new_sid(), echo);
    session->claim_websocket();
    gw.add_session(session->sid(), session);
    direct = true;
  }
  // The connection lives on its session's thread: a polling session's
  // upgrade may arrive on another thread's connection, and its frames would
  // otherwise each cross threads, queued there without a bound while this
  // thread read on.
  bool moved = session->executor() != stream.get_executor();
  auto ws = std::make_shared<ws_conn>(std::move(stream), session->executor(), limits, gw.metrics(), std::move(slot));
  // Posted before accept(), so the session knows the socket before its first frame.
  asio::post(session->executor(), [session, ws, direct] {
    if (direct) session->open_websocket(ws);
    else session->upgrade(ws);
  });
  auto accept = [session, ws, req = std::move(req)]() mutable {
    const ws_conn* raw = ws.get();
    ws->accept(
        std::move(req), [session, raw](std::string data, bool binary) { session->on_ws_message(raw, std::move(data), binary); },
        [session, raw] { session->on_ws_closed(raw); });
  };
  if (moved) {
    asio::post(session->executor(), std::move(accept));
  } else {
    accept();
  }
  return std::nullopt;
}

// A request the parser could not take whole, answered in words before the
// connection closes (counted): too large a body (413, in the HTTP API's
// error format for its paths, else Engine.IO's), too large a header (431),
// not HTTP we can parse (400: a bad start line, header, chunk). Nothing for
// success, for a client that went away, or for a timeout.
// A request whose framing the gateway cannot trust (RFC 9112), refused and
// its connection closed: a Transfer-Encoding not ending in chunked (6.3: its
// body's length cannot be told; read as no body, its bytes would be taken
// for the next request, smuggled past a proxy that reads them as this one's
// body) or in HTTP/1.0 (6.1); a coding before chunked (6.1: 501, as the
// gateway decodes none: a gzip body was read as plain); two Hosts (3.2).
std::optional<http_answer> framing_refusal(const request& req, bool chunked) {
  // Two Hosts are refused in any version (3.2): which one names the
  // target depends on who reads it. A missing one in HTTP/1.1 is taken:
  // haproxy's `option httpchk GET /healthz HTTP/1.1` sends none.
  if (req.count(http::field::host) > 1)
    return http_answer{400, "text/plain", "bad request: more than one Host\n"};
  if (req.count(http::field::transfer_encoding) > 0) {
    if (!chunked || req.version() < 11)
      return http_answer{400, "text/plain", "bad request: a Transfer-Encoding the gateway cannot frame\n"};
    auto coding = req[http::field::transfer_encoding];  // Beast trims the spaces around a value
    if (coding.find(',') != beast::string_view::npos || !beast::iequals(coding, "chunked"))
      return http_answer{501, "text/plain", "the gateway decodes no transfer coding but chunked\n"};
  }
  return std::nullopt;
}

// A target in absolute form (RFC 9112 3.2.2: what a client speaking to a
// proxy sends) rewritten in origin form, so that every path below (the
// static files' dot-segment rule, upgrades, relayed API requests, the
// long-poll watch) reads one form. Only http(s) or ws(s) with an
// authority; a path that does not start with '/' is refused (`http:.env`
// would name a hidden file).
bool origin_form(request& req) {
  auto target = req.target();
  if (target.starts_with('/')) return true;
  auto uri = urls::parse_absolute_uri(target);
  if (!uri || !uri->has_authority()) return false;
  auto scheme = uri->scheme_id();
  if (scheme != urls::scheme::http && scheme != urls::scheme::https && scheme != urls::scheme::ws &&
      scheme != urls::scheme::wss)
    return false;
  auto path = uri->encoded_path();
  if (!path.empty() && !path.starts_with('/')) return false;
  std::string rewritten = path.empty() ? std::string{"/"} : std::string{path};
  if (uri->has_query()) rewritten += "?" + std::string{uri->encoded_query()};
  req.target(rewritten);
  return true;
}

std::optional<http_answer> refusal_for(const beast::error_code& ec, std::string_view target, gateway_metrics& metrics) {
  if (ec == http::error::body_limit) {
    metrics.oversize.Increment();
    if (target.starts_with("/api/v1/")) return http_answer{413, "application/json", R"({"error":"payload too large"})"};
    return http_answer{413, "application/json", R"({"code":3,"message":"Payload too large"})"};
  }
  if (ec.category() != http::make_error_code(http::error::bad_method).category() ||
      ec == http::error::end_of_stream || ec == http::error::partial_message)
    return std::nullopt;
  metrics.bad_http.Increment();
  if (ec == http::error::header_limit) return http_answer{431, "text/plain", "request header fields too large\n"};
  if (ec == http::error::buffer_overflow)
    return http_answer{400, "text/plain", "bad request: a chunk's size line or trailer is too long\n"};
  return http_answer{400, "text/plain", "bad request: " + ec.message() + "\n"};
}

// A long-poll GET may wait a long time (an HTTP API poll up to a minute,
// an Engine.IO poll up to a ping interval): while it waits, its connection
// is watched. An API client that gives up does not take its events with
// it (they wait for its next poll); an Engine.IO session whose poll's
// connection closed ends at once, as the reference server's does ("poll
// connection closed prematurely"), rather than flush its packets into a
// closed socket and wait out its ping timeout.
enum class long_poll { none, api, engine_io };

long_poll long_poll_of(const request& req) {
  if (req.method() != http::verb::get) return long_poll::none;
  // Decoded, as handle() routes it: ".../event%73" is served as a poll.
  auto target = urls::parse_origin_form(req.target());
  if (!target) return long_poll::none;
  std::string path = target->path();  // an Engine.IO poll's fits the string itself (no allocation)
  if (path.starts_with("/api/v1/sessions/")) return path.ends_with("/events") ? long_poll::api : long_poll::none;
  bool eio = path == "/socket.io/" || path == "/socket.io" || path == "/engine.io/" || path == "/engine.io";
  return eio && target->params().contains("sid") ? long_poll::engine_io : long_poll::none;
}

// The sid an Engine.IO request names, or nullopt.
std::optional<std::string> query_sid(const request& req) {
  auto target = urls::parse_origin_form(req.target());
  if (!target) return std::nullopt;
  auto params = target->params();
  auto it = params.find("sid");
  if (it == params.end()) return std::nullopt;
  return std::string{(*it).value};
}

// A connection's watch for its long-polls (long_poll_of). Its coroutine
// runs with its cancellation slot bound to `cancel`: a client that leaves
// while a poll waits emits it, so the poll's reply_slot::wait() abandons
// its slot. One per connection; per poll, one peek at the socket.
struct connection_watch {
  asio::cancellation_signal cancel;
  bool waiting = false;  // a long-poll waits (the connection's thread only)
  bool left = false;     // its client left meanwhile
  char peeked = 0;
};

// Watches `socket` while `w->waiting`: a FIN, a reset or an error means
// the client left; data (a pipelined request, read after the answer) ends
// the watch. A receive with MSG_PEEK, not an async_wait: Asio tries a
// receive at once (one recv that finds nothing) where a wait would re-arm
// the descriptor with an epoll_ctl, the dearer call. The serving coroutine
// clears `waiting` (and cancels the receive) before it goes on, so a
// completion that comes later touches nothing.
void watch_departure(asio::ip::tcp::socket& socket, const std::shared_ptr<connection_watch>& w) {
  socket.async_receive(asio::buffer(&w->peeked, 1), asio::socket_base::message_peek,
                       [w](boost::system::error_code ec, std::size_t n) {
                         if (!w->waiting || ec == asio::error::operation_aborted) return;  // answered meanwhile
                         if (!ec && n > 0) return;  // a pipelined request
                         w->left = true;            // FIN (eof), a reset, or the connection failed
                         w->cancel.emit(asio::cancellation_type::terminal);
                       });
}

// After refusing a request whose body is still arriving, or answering one
// with Connection: close: stop sending and read (and discard) a bounded
// amount for at most `wait`, so closing does not reset the connection
// before the client has read the answer.
asio::awaitable<void> linger(beast::tcp_stream& stream, std::size_t budget,
                             std::chrono::milliseconds wait = std::chrono::seconds(2)) {
  boost::system::error_code ignored;
  stream.socket().shutdown(asio::ip::tcp::socket::shutdown_send, ignored);
  // What is read is dropped: one buffer per thread, not one per lingering
  // connection's coroutine frame (each read fills it on this thread).
  thread_local std::array<char, 16384> sink;
  std::size_t drained = 0;
  // One deadline for all of it: a client trickling bytes cannot hold the
  // connection (and its place under the limits) longer.
  stream.expires_after(wait);
  while (drained < 2 * budget) {
    auto [ec, n] = co_await stream.async_read_some(asio::buffer(sink), use);
    if (ec) break;
    drained += n;
  }
}

// Before closing after an answer: closed at once with bytes of the client's
// unread (in the buffer, or waiting in the kernel), the kernel would send a
// reset, which can destroy the answer on its way (RFC 9112 9.6); then a
// half close, what is still coming dropped for at most 500 ms. Only then:
// a lingering connection holds its places under the limits, and a client
// that reads its answer and goes would find its place still taken.
asio::awaitable<void> close_after_answer(beast::tcp_stream& stream, const beast::flat_buffer& buffer,
                                         std::size_t budget) {
  boost::system::error_code ec;
  if (buffer.size() > 0 || stream.socket().available(ec) > 0)
    co_await linger(stream, budget, std::chrono::milliseconds(500));
}

// What a connection's read buffer holds past --max-header-bytes: a read's
// worth (Beast reads up to 64 KiB at a time) of body or pipelined requests.
constexpr std::size_t read_slack = 64 * 1024;

asio::awaitable<void> serve(gateway& gw, asio::ip::tcp::socket socket, std::shared_ptr<void> slot,
                            std::shared_ptr<connection_watch> watch, std::string named_peer, std::string pending) {
  boost::system::error_code peer_ec;
  const auto peer = named_peer.empty() ? socket.remote_endpoint(peer_ec).address().to_string() : std::move(named_peer);
  beast::tcp_stream stream{std::move(socket)};
  const auto& c = gw.config();
  // Bounded: the parser takes a body's bytes out of it as they come, but
  // keeps a chunk's size line or a trailer until its end, and limits
  // neither (a chunk extension of a gigabyte would all be kept here).
  beast::flat_buffer buffer{c.max_header_bytes + read_slack};
  buffer.commit(asio::buffer_copy(buffer.prepare(pending.size()), asio::buffer(pending)));
  for (;;) {
    http::request_parser<http::string_body> parser;
    parser.header_limit(static_cast<std::uint32_t>(c.max_header_bytes));
    parser.body_limit(c.max_payload);
    stream.expires_after(c.idle_timeout);
    beast::error_code ec;
    std::tie(ec, std::ignore) = co_await http::async_read_header(stream, buffer, parser, use);
    std::optional<http_answer> framing;
    if (!ec) framing = framing_refusal(parser.get(), parser.chunked());
    if (!ec && !framing && !origin_form(parser.get()))
      framing = http_answer{400, "text/plain", "bad request target\n"};
    if (!ec && !framing && !parser.is_done() && parser.get().version() >= 11 &&
        beast::iequals(parser.get()[http::field::expect], "100-continue")) {
      // A client that waits to be told to send its body (curl does for
      // more than 1 KB): told at once, rather than left to its own timeout.
      // (A body past --max-payload was refused with the header: 413.)
      http::response<http::empty_body> go_on{http::status::continue_, 11};
      std::tie(ec, std::ignore) = co_await http::async_write(stream, go_on, use);
    }
    if (!ec && !framing && !parser.is_done())
      std::tie(ec, std::ignore) = co_await http::async_read(stream, buffer, parser, use);
    std::string_view target{parser.get().target()};  // what the start line named (empty before it)
    if (framing) gw.metrics().bad_http.Increment();
    if (auto refusal = framing ? framing : refusal_for(ec, target, gw.metrics())) {
      // The header as far as it was read: its Origin, for a page allowed to
      // read this gateway's answers (a 413 without CORS headers reads as a
      // network error in its browser).
      const auto& partial = parser.get();
      request req;
      req.version(11);
      auto res = make_response(req, std::move(*refusal));
      if (!partial[http::field::origin].empty() && origin_allowed(c, partial)) add_cors(c, partial, res);
      res.keep_alive(false);
      co_await http::async_write(stream, res, use);
      co_await linger(stream, ec == http::error::body_limit ? c.max_payload : c.max_header_bytes);
      co_return;
    }
    if (ec) co_return;  // the client went away, or stayed silent past --idle-timeout
    auto req = parser.release();
    stream.expires_never();
    if (beast::websocket::is_upgrade(req)) {
      auto refused = upgrade(gw, stream, req, slot);
      if (!refused) co_return;  // the ws_conn owns the connection now
      auto res = make_response(req, *refused);
      res.keep_alive(false);
      stream.expires_after(c.idle_timeout);
      auto [wec, wn] = co_await http::async_write(stream, res, use);
      if (!wec) co_await close_after_answer(stream, buffer, c.max_header_bytes);
      co_return;
    }
    // Not when the client pipelined a request after this one (in `buffer`,
    // read already): a client with more to ask has not left, even if it
    // then closed its sending side.
    auto poll = buffer.size() == 0 ? long_poll_of(req) : long_poll::none;
    if (poll != long_poll::none) {
      watch->waiting = true;
      watch_departure(stream.socket(), watch);
    }
    response res = co_await handle(gw, req, peer);
    if (poll != long_poll::none) {
      watch->waiting = false;
      boost::system::error_code ignored;
      stream.socket().cancel(ignored);  // the watch's receive, the only operation on it now
      if (watch->left) {
        // Gone: the poll's slot was abandoned. An API session keeps its
        // events for the next poll (a peer gateway that owns it hears so
        // from api::relay); an Engine.IO session ends, here or on its owner.
        if (poll == long_poll::engine_io)
          if (auto sid = query_sid(req)) gw.poll_abandoned(*sid);
        co_return;
      }
    }
    if (req.method() == http::verb::head) res.body().clear();
    if (gw.draining()) res.keep_alive(false);  // its next request goes elsewhere
    // A client that asks and never reads must not hold its connection (and
    // an answer of up to --max-payload) for ever: the write gets as long
    // as an idle connection does.
    stream.expires_after(c.idle_timeout);
    auto [wec, wn] = co_await http::async_write(stream, res, use);
    if (wec) co_return;
    if (!res.keep_alive()) {
      co_await close_after_answer(stream, buffer, c.max_header_bytes);
      co_return;
    }
  }
}

}  // namespace

namespace {

asio::awaitable<void> read_proxy_header(gateway& gw, asio::ip::tcp::socket socket) {
  beast::tcp_stream stream{std::move(socket)};
  boost::system::error_code peer_ec;
  auto balancer = stream.socket().remote_endpoint(peer_ec).address().to_string();
  // Until its header names a client, the connection is the balancer's: it
  // counts under --max-connections and the balancer's own address.
  auto slot = gw.connections().admit(balancer);
  if (!slot) {
    gw.metrics().connection_limit.Increment();
    co_return;
  }
  stream.expires_after(gw.config().idle_timeout);
  std::string bytes;
  std::array<char, 512> chunk;
  for (;;) {
    auto [ec, n] = co_await stream.async_read_some(asio::buffer(chunk), use);
    if (ec) co_return;  // it closed, or stayed silent past --idle-timeout
    bytes.append(chunk.data(), n);
    auto parsed = proxy_protocol::parse(bytes);
    std::size_t header_size = 0;
    std::string client;
    if (!parsed && parsed.error() == proxy_protocol::error::not_proxy) {
      client = balancer;  // no header: a request of the balancer's own (a health check, ...)
    } else if (!parsed) {
      gw.metrics().bad_proxy_header.Increment();
      thread_local core::log_limiter log_limit;  // one per I/O thread
      if (log_limit.allow()) spdlog::warn("closed a connection from {}: {}", balancer, parsed.error().message());
      co_return;
    } else if (!*parsed) {
      continue;  // more of the header to come (bounded: parse refuses one past max_header_bytes)
    } else {
      header_size = (*parsed)->size;
      client = (*parsed)->client.empty() ? balancer : std::move((*parsed)->client);
    }
    if (client != balancer) {
      slot.reset();  // given back first: the client's may be the last place
      slot = gw.connections().admit(client);
      if (!slot) {
        gw.metrics().connection_limit.Increment();
        co_return;
      }
    }
    stream.expires_never();
    serve_http(gw, stream.release_socket(), std::move(slot), std::move(client), bytes.substr(header_size));
    co_return;
  }
}

}  // namespace

void serve_proxied(gateway& gw, asio::ip::tcp::socket socket) {
  auto ex = socket.get_executor();
  asio::co_spawn(ex, read_proxy_header(gw, std::move(socket)), [](std::exception_ptr e) {
    if (!e) return;
    try {
      std::rethrow_exception(e);
    } catch (const std::exception& error) {
      spdlog::error("reading a PROXY header failed: {}", error.what());
    }
  });
}

void serve_http(gateway& gw, asio::ip::tcp::socket socket, std::shared_ptr<void> slot, std::string peer,
                std::string pending) {
  auto ex = socket.get_executor();
  auto watch = std::make_shared<connection_watch>();
  auto& cancel = watch->cancel;
  asio::co_spawn(ex, serve(gw, std::move(socket), std::move(slot), watch, std::move(peer), std::move(pending)),
                 asio::bind_cancellation_slot(cancel.slot(), [watch](std::exception_ptr e) {
                   if (!e) return;
                   try {
                     std::rethrow_exception(e);
                   } catch (const std::exception& error) {
                     spdlog::error("http session failed: {}", error.what());
                   }
                 }));
}

}  // namespace sidecast::gateway
