#pragma once
// Everything a gateway can be told: endpoints, Engine.IO timings, limits and
// routes. One struct, so tests and `sidecast demo` build gateways in-process
// with inproc:// endpoints.
#include <chrono>
#include <cstddef>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

namespace sidecast::gateway {

/// Which room events the gateway asks the broker for (--room-subscriptions).
enum class room_subscriptions {
  // Every room of each namespace it has a socket in: an event published
  // right after a join needs no subscription of the room's to reach the
  // new member (docs/protocol.md, Topics, says what order is left).
  whole_namespace,
  // Only the rooms its sockets are in: less traffic to a gateway when rooms
  // are spread over many gateways, but a room event can miss a gateway
  // whose subscription to the room is still on its way (after a join that
  // made the room new to it).
  each_room,
};

/// A namespace served by a service.
struct route {
  std::string nsp;
  std::string service;
};

struct gateway_config {
  std::string id;                                 // sid prefix; default "gw-<random>"
  std::string http = "127.0.0.1:8080";            // HOST:PORT to listen on
  std::string broker = "tcp://127.0.0.1:7700";    // the broker's ROUTER
  std::string events = "tcp://127.0.0.1:7702";    // the broker's XPUB
  std::string backup_broker;                      // a broker pair's other ROUTER (empty: one broker)
  std::string backup_events;                      // its XPUB
  unsigned threads = 0;                           // io_context threads; 0: cores
  bool io_uring = true;                           // batch WebSocket reads and writes through io_uring when the kernel allows
  std::chrono::milliseconds ping_interval{25000};
  std::chrono::milliseconds ping_timeout{20000};
  std::chrono::milliseconds connect_timeout{45000};  // an Engine.IO session that joins no namespace by then is closed
  std::chrono::milliseconds upgrade_timeout{10000};  // a WebSocket probe not upgraded by then is dropped, polling goes on
  std::chrono::milliseconds heartbeat_interval{1000};  // to the broker, until its Welcome
  std::size_t max_payload = 1000000;              // maxHttpBufferSize: POST body and WS frame bytes
  std::size_t max_attachments = 10;               // binary attachments per packet
  std::size_t max_namespaces = 32;                // namespaces one connection may join
  std::size_t max_auth_bytes = 8192;              // a CONNECT's auth (kept per socket, sent with each event)
  std::size_t max_rooms = 256;                    // rooms one socket may be in
  std::size_t max_room_bytes = 1024;              // the name of a room a socket joins
  room_subscriptions subscriptions = room_subscriptions::whole_namespace;  // room events asked of the broker
  std::size_t max_recent_unsubscriptions = 65536; // the SUB's unsubscriptions of the last 5 s, remembered
  std::size_t max_pending_acks = 1024;            // events of a connection waiting for their ack (/ws: reply)
  std::size_t max_early_frames = 64;              // /ws frames held while the connect hook runs
  std::size_t max_awaited_acks = 1024;            // workers' emits to a socket waiting for the client's ack
  std::size_t max_connections = 50000;            // open TCP connections
  std::size_t max_connections_per_ip = 1000;      // open TCP connections from one address
  unsigned per_ip_ipv6_prefix = 64;               // the per-address limits count a global IPv6 client by this prefix
  // Balancers (addresses or networks) whose connections may start with a
  // PROXY protocol header (send-proxy / send-proxy-v2): the client it names
  // is the address the per-address limits count. Empty: none.
  std::vector<std::string> proxy_protocol_from;
  std::size_t max_polling_sessions = 50000;       // Engine.IO sessions opened by a polling handshake
  std::size_t max_polling_sessions_per_ip = 1000; // ... from one address
  std::size_t max_header_bytes = 16 * 1024;       // an HTTP request's start line and headers
  double events_per_second = 1000;                // client events per connection, sustained (token bucket)
  double events_burst = 2000;                     // ... and in a burst
  std::size_t outbound_messages = 4096;           // queued frames per connection before it is dropped
  std::size_t outbound_bytes = 8 << 20;           // queued bytes per connection before it is dropped
  std::chrono::milliseconds request_timeout{30000};  // deadline of each event / connect request
  std::chrono::milliseconds idle_timeout{60000};     // HTTP keep-alive connections with no request
  std::chrono::milliseconds drain_timeout{5000};     // on SIGTERM: how long clients get to leave
  std::size_t bridge_queue = 65536;               // commands from sessions to the ZeroMQ thread
  std::size_t max_thread_backlog = 1048576;       // deliveries from the ZeroMQ thread waiting for one I/O thread
  int hwm = 100000;                               // messages queued each way on the broker link and the events SUB
  std::size_t kept_notices = 16384;               // one-way messages to the broker kept (bridge::send_notice)
  std::size_t kept_notice_bytes = 8 << 20;        // ... and their bytes at most
  std::size_t max_unread_bytes = 128 << 20;       // sent to the broker and not yet read by it, before requests get busy
  std::vector<std::string> cors_origins;          // allowed browser origins besides same-origin; "*": any
  std::vector<std::string> routes = {"/=demo", "/custom=demo", "/forbidden=demo", "/chat=chat", "/vm=vm"};  // NSP=SERVICE
  std::vector<std::string> recovery = {"/vm", "/chat"};  // namespaces with connection-state recovery
  std::chrono::milliseconds recovery_window{120000};    // how long a dropped socket waits to be recovered
  std::size_t recovery_buffer = 1000;                   // events kept per socket for replay
  std::size_t recovery_buffer_bytes = 1 << 20;          // ... and their bytes at most
  std::string jwt_audience;                       // non-empty: a token's "aud" must name it
  std::string jwt_issuer;                         // non-empty: a token's "iss" must be it
  bool jwt_allow_no_exp = false;                  // accept tokens without "exp" (they never expire)
  std::chrono::seconds jwt_leeway{30};            // clock skew allowed on "exp" and "nbf"
  bool jwt_end_at_exp = false;                    // end a socket when its connect token expires
  std::vector<std::string> api_keys;              // keys accepted by POST /api/v1/publish
  std::string curve_secret;                       // this gateway's CURVE secret key (Z85)
  std::string curve_server_key;                   // the broker's CURVE public key (Z85)
  std::string jwt_secret;                         // HS256: connects must carry auth.token signed with it
  std::string jwt_public_key;                     // RS256: PEM file of the public key
  std::chrono::milliseconds api_session_ttl{60000};  // an API session not polled this long is closed
  std::size_t api_buffer = 1024;                  // events buffered per API session
  bool engineio_echo = false;                     // serve a bare Engine.IO echo at /engine.io/ (conformance tests)
  std::string static_dir;                         // files served at / (the demo page)
  std::size_t max_static_bytes = 4 << 20;         // a larger file there (or --client-js) is not served: 403
  std::string client_js;                          // socket.io.min.js served at /socket.io/
};

/// Parsed routes; throws std::invalid_argument on a malformed entry.
std::vector<route> parse_routes(const std::vector<std::string>& entries);

/// The gateway's flags, shared by sidecast-gateway and `sidecast demo`.
void add_options(CLI::App& app, gateway_config& config);

}  // namespace sidecast::gateway
