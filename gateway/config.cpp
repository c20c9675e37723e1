#include "gateway/config.hpp"

#include <limits>
#include <map>
#include <stdexcept>

#include "core/config.hpp"
#include "gateway/codec/socketio.hpp"
#include "gateway/limits.hpp"

namespace sidecast::gateway {

std::vector<route> parse_routes(const std::vector<std::string>& entries) {
  std::vector<route> out;
  for (const auto& e : entries) {
    auto eq = e.find('=');
    if (eq == std::string::npos || eq == 0 || eq + 1 == e.size())
      throw std::invalid_argument("route '" + e + "' is not NSP=SERVICE");
    route r{e.substr(0, eq), e.substr(eq + 1)};
    if (!socketio::valid_namespace(r.nsp))
      throw std::invalid_argument("route '" + e + "': bad namespace");
    // A list given as one value (SIDECAST_ROUTE="/=demo,/chat=chat" is one
    // entry: a list in the environment is written [a,b]).
    if (r.service.find_first_of(",= \t") != std::string::npos)
      throw std::invalid_argument("route '" + e + "': a service name has no ',', '=' or space (several routes "
                                  "from SIDECAST_ROUTE are written [/=demo,/chat=chat])");
    out.push_back(std::move(r));
  }
  return out;
}

void add_options(CLI::App& app, gateway_config& c) {
  // A count limit of 0 would refuse everything (or, for --api-buffer, drop
  // from an empty queue): each must be at least 1.
  const auto at_least_one = CLI::Range(std::size_t{1}, std::numeric_limits<std::size_t>::max());
  app.add_option("--gateway-id", c.id, "Gateway id, the prefix of every sid it issues (default gw-<random>; '_' becomes '-')");
  app.add_option("--http", c.http, "HOST:PORT to serve HTTP and WebSocket on")->capture_default_str();
  app.add_option("--broker", c.broker, "Broker ROUTER endpoint")->capture_default_str();
  app.add_option("--events", c.events, "Broker XPUB endpoint (room events)")->capture_default_str();
  auto* backup = app.add_option("--backup-broker", c.backup_broker,
                                "The other broker of a primary/backup pair (its ROUTER): the gateway uses the "
                                "active one of the two");
  app.add_option("--backup-events", c.backup_events, "The other broker's XPUB endpoint")->needs(backup);
  backup->needs("--backup-events");
  app.add_option("--threads", c.threads, "I/O threads, one io_context each (0: cores)")
      ->capture_default_str()
      ->check(CLI::Range(0u, 1024u));
  app.add_option("--io-uring", c.io_uring,
                 "Make the reads and writes of WebSocket connections that are ready together in one io_uring_enter "
                 "(falls back to one system call each where the kernel or a seccomp profile forbids io_uring)")
      ->capture_default_str();
  core::add_millis(app, "--ping-interval", c.ping_interval, "Engine.IO ping interval, ms");
  core::add_millis(app, "--ping-timeout", c.ping_timeout, "Engine.IO ping timeout, ms");
  core::add_millis(app, "--upgrade-timeout", c.upgrade_timeout,
                   "A polling session's WebSocket probe that has not upgraded by then (no \"5\") is closed, and "
                   "polling delivers again (Engine.IO's upgradeTimeout), ms");
  core::add_millis(app, "--connect-timeout", c.connect_timeout,
                   "Close a connection that has joined no namespace after this long, ms (as Socket.IO's connectTimeout)");
  core::add_millis(app, "--gateway-heartbeat", c.heartbeat_interval, "Heartbeat to the broker until its Welcome, ms");
  app.add_option("--max-payload", c.max_payload,
                 "Largest POST body / WebSocket frame, bytes (maxHttpBufferSize); each binary attachment is at "
                 "most this too")
      ->capture_default_str()
      ->check(CLI::Range(std::size_t{1}, std::size_t{1} << 30));
  app.add_option("--max-attachments", c.max_attachments, "Binary attachments per Socket.IO packet")
      ->capture_default_str()
      ->check(CLI::Range(std::size_t{0}, std::size_t{1024}));
  app.add_option("--max-pending-acks", c.max_pending_acks,
                 "Events of one socket (a Socket.IO namespace socket, a /ws connection, an API session) that may "
                 "wait for their ack (/ws: their reply); past it an event is answered busy, in its place among "
                 "the acks")
      ->capture_default_str()
      ->check(CLI::Range(std::size_t{1}, std::size_t{1} << 20));
  app.add_option("--max-early-frames", c.max_early_frames,
                 "Frames a /ws client sends before its connect is answered that wait for the answer (a client "
                 "that sends at once on open); past it a frame is answered 'not connected yet'")
      ->capture_default_str()
      ->check(CLI::Range(std::size_t{0}, std::size_t{1} << 16));
  app.add_option("--max-awaited-acks", c.max_awaited_acks,
                 "Workers' emits to one Socket.IO socket that may wait for the client's ack; past it the oldest "
                 "is answered TIMEOUT to its worker")
      ->capture_default_str()
      ->check(at_least_one);
  app.add_option("--max-namespaces", c.max_namespaces, "Namespaces one connection may join")
      ->capture_default_str()
      ->check(at_least_one);
  app.add_option("--max-auth-bytes", c.max_auth_bytes,
                 "Largest auth a socket may connect with (a Socket.IO CONNECT's, /ws's auth=, an API session's): "
                 "kept for the socket's life and sent with each of its events")
      ->capture_default_str()
      ->check(at_least_one);
  app.add_option("--max-rooms", c.max_rooms, "Rooms one socket may be in")->capture_default_str()
      ->check(at_least_one);
  app.add_option("--max-room-bytes", c.max_room_bytes,
                 "Longest room name a socket may join (the gateway keeps each room's name once, however many "
                 "members it has)")
      ->capture_default_str()
      ->check(at_least_one);
  // A string checked by name: CheckedTransformer would take the enum's
  // numbers ("0", "1") too.
  app.add_option_function<std::string>(
         "--room-subscriptions",
         [&c](const std::string& v) {
           c.subscriptions = v == "room" ? room_subscriptions::each_room : room_subscriptions::whole_namespace;
         },
         "Room events to ask the broker for: `namespace`, every room of each namespace with a local socket "
         "(an event sent right after a join finds the new member unless it overtakes the join on its way); "
         "`room`, only the rooms with a local member (less traffic when rooms are spread over many gateways, "
         "but an event published as a join makes a room new to this gateway can miss it)")
      ->check(CLI::IsMember({"namespace", "room"}))
      ->option_text("namespace|room [namespace] (Env:SIDECAST_ROOM_SUBSCRIPTIONS)")
      ->default_str("namespace");
  app.add_option("--max-recent-unsubscriptions", c.max_recent_unsubscriptions,
                 "Room and namespace unsubscriptions of the last 5 s remembered, so that a gap in a topic's events "
                 "soon after it is subscribed again is not counted lost; past it the oldest is forgotten")
      ->capture_default_str()
      ->check(at_least_one);
  app.add_option("--max-connections", c.max_connections, "Open TCP connections, in all")->capture_default_str()
      ->check(at_least_one);
  app.add_option("--max-polling-sessions", c.max_polling_sessions,
                 "Engine.IO sessions opened by a polling handshake, in all (each lives on after its request)")
      ->capture_default_str()
      ->check(at_least_one);
  app.add_option("--max-polling-sessions-per-ip", c.max_polling_sessions_per_ip,
                 "Engine.IO sessions opened by a polling handshake from one address")
      ->capture_default_str()
      ->check(at_least_one);
  app.add_option("--max-header-bytes", c.max_header_bytes,
                 "Bytes of an HTTP request's start line and headers; more is answered 431")
      ->capture_default_str()
      ->check(CLI::Range(std::size_t{1024}, std::size_t{1} << 20));
  app.add_option("--max-connections-per-ip", c.max_connections_per_ip, "Open TCP connections from one address")
      ->capture_default_str()
      ->check(at_least_one);
  app.add_option("--per-ip-ipv6-prefix", c.per_ip_ipv6_prefix,
                 "The per-address limits (--max-connections-per-ip, --max-polling-sessions-per-ip) count a global "
                 "IPv6 client by its network of this length, what one host or site is given (128: each address; "
                 "unique-local, link-local and NAT64 64:ff9b::/96 clients are counted by their whole address, the "
                 "last as the IPv4 one it carries)")
      ->capture_default_str()
      ->check(CLI::Range(16u, 128u));
  app.add_option("--proxy-protocol-from", c.proxy_protocol_from,
                 "Balancers (addresses or networks: 10.0.0.1, 10.0.0.0/8, fd00::/8) whose connections may start with "
                 "a PROXY protocol header, v1 or v2 (haproxy: send-proxy, send-proxy-v2): the per-address limits then "
                 "count the client it names (repeatable). Others' connections are served as they come")
      ->check([](const std::string& entry) {
        return network_set::parse({entry}) ? std::string{} : "not an address or network: " + entry;
      });
  app.add_option("--events-per-second", c.events_per_second,
                 "Client events per connection per second, sustained (token bucket; 0: no limit)")
      ->capture_default_str()
      ->check(core::finite_range(0, 1e9));
  app.add_option("--events-burst", c.events_burst, "Client events per connection in a burst")->capture_default_str()
      ->check(core::finite_range(1, 1e9));
  app.add_option("--outbound-messages", c.outbound_messages,
                 "Frames queued for one connection before it is dropped as too slow")
      ->capture_default_str()
      ->check(at_least_one);
  app.add_option("--outbound-bytes", c.outbound_bytes,
                 "Bytes queued for one connection before it is dropped as too slow")
      ->capture_default_str()
      ->check(at_least_one);
  core::add_millis(app, "--request-timeout", c.request_timeout, "Deadline of each event and connect, ms");
  core::add_millis(app, "--idle-timeout", c.idle_timeout, "Close idle HTTP keep-alive connections after, ms");
  core::add_millis(app, "--drain-timeout", c.drain_timeout,
                   "On SIGTERM: close client transports, wait this long for them to go, then exit, ms");
  app.add_option("--bridge-queue", c.bridge_queue, "Commands queued from sessions to the ZeroMQ thread")
      ->capture_default_str()
      ->check(at_least_one);
  app.add_option("--max-thread-backlog", c.max_thread_backlog,
                 "Deliveries (sockets reached) from the ZeroMQ thread waiting for one I/O thread; past it they are dropped")
      ->capture_default_str()
      ->check(at_least_one);
  app.add_option("--kept-notices", c.kept_notices,
                 "Messages the gateway sent the broker that nobody answers (DISCONNECT notices, events without an "
                 "ack, acks, publishes) kept until the broker says it read them, to send again those that die in a "
                 "socket it replaces; 0: none kept")
      ->capture_default_str();
  app.add_option("--kept-notice-bytes", c.kept_notice_bytes, "... and their bytes at most")->capture_default_str();
  app.add_option("--max-unread-bytes", c.max_unread_bytes,
                 "Bytes sent to the broker that it has not said it read (its heartbeats say, each interval); past "
                 "it an event or connect is answered busy at once, so that a stalled broker cannot pile them up "
                 "here. Also caps what the gateway sends it per heartbeat interval")
      ->capture_default_str()
      ->check(CLI::Range(std::size_t{1} << 16, std::size_t{1} << 32));  // what the link's checkpoints cover
  app.add_option("--hwm", c.hwm, "High-water mark of the broker link (each way) and the events socket, messages")
      ->capture_default_str()
      ->check(CLI::Range(1, 10000000));
  app.add_option("--cors-origin", c.cors_origins,
                 "Browser origin allowed besides the gateway's own (repeatable; '*' allows any)");
  app.add_option("--route", c.routes, "Namespace served by a service, NSP=SERVICE (repeatable)")
      ->capture_default_str();
  app.add_option("--recovery", c.recovery,
                 "Namespace with Socket.IO connection-state recovery (repeatable; every event then carries an offset)")
      ->capture_default_str();
  core::add_millis(app, "--recovery-window", c.recovery_window, "How long a dropped socket can be recovered, ms");
  app.add_option("--recovery-buffer", c.recovery_buffer, "Events kept per recoverable socket for replay")
      ->capture_default_str()
      ->check(at_least_one);
  app.add_option("--recovery-buffer-bytes", c.recovery_buffer_bytes,
                 "... and their bytes at most (an event several sockets keep counts in each)")
      ->capture_default_str()
      ->check(at_least_one);
  // One without the other would be ignored: plain text, silently.
  auto* curve_secret = app.add_option("--curve-secret", c.curve_secret, "This gateway's CURVE secret key (Z85)");
  app.add_option("--curve-server-key", c.curve_server_key, "The broker's CURVE public key (Z85)")
      ->needs(curve_secret);
  curve_secret->needs("--curve-server-key");
  app.add_option("--jwt-secret", c.jwt_secret,
                 "HS256 secret: every connect must carry auth.token, a JWT signed with it (its sub is the user)");
  app.add_option("--jwt-public-key", c.jwt_public_key, "RS256: PEM file with the public key that signs connect tokens")
      ->check(CLI::ExistingFile);
  app.add_option("--jwt-audience", c.jwt_audience, "A connect token's aud must name this (empty: not checked)");
  app.add_option("--jwt-issuer", c.jwt_issuer, "A connect token's iss must be this (empty: not checked)");
  app.add_option_function<std::int64_t>(
         "--jwt-leeway", [&c](std::int64_t s) { c.jwt_leeway = std::chrono::seconds(s); },
         "Clock skew allowed on a token's exp and nbf, seconds [30]")
      ->check(CLI::Range(std::int64_t{0}, std::int64_t{3600}));
  app.add_flag("--jwt-end-at-exp", c.jwt_end_at_exp,
               "End a socket when its connect token expires (exp + --jwt-leeway): a server disconnect, the "
               "service told 'token expired'; the client connects again with a fresh token");
  app.add_flag("--jwt-allow-no-exp", c.jwt_allow_no_exp,
               "Accept connect tokens without exp (by default refused: such a token never expires)");
  app.add_option("--api-key", c.api_keys,
                 "Key of the server-side API: publish, sockets and rooms (repeatable; none: those are off)");
  core::add_millis(app, "--api-session-ttl", c.api_session_ttl, "Close API sessions not polled for, ms");
  app.add_option("--api-buffer", c.api_buffer, "Events buffered per API session")->capture_default_str()
      ->check(at_least_one);
  app.add_flag("--engineio-echo", c.engineio_echo,
               "Also serve a bare Engine.IO endpoint at /engine.io/ that echoes every message (for the official "
               "engine.io-protocol test suite)");
  app.add_option("--static-dir", c.static_dir, "Directory served at / (the demo page)");
  app.add_option("--max-static-bytes", c.max_static_bytes,
                 "Largest file served from --static-dir (and --client-js), read whole on the I/O thread; a larger "
                 "one gets 403 (serve large assets from a CDN or a web server)")
      ->capture_default_str()
      ->check(CLI::Range(std::size_t{1}, std::size_t{1} << 30));
  app.add_option("--client-js", c.client_js, "socket.io.min.js served at /socket.io/socket.io.min.js");
}

}  // namespace sidecast::gateway
