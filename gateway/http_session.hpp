#pragma once
// One HTTP connection: reads requests, answers them (Engine.IO polling, the
// HTTP API, metrics, static files) and hands WebSocket upgrades over to a
// ws_conn. Requests on one connection are answered in order.
#include <memory>
#include <string>

#include <boost/asio/ip/tcp.hpp>

namespace sidecast::gateway {

class gateway;

/// Serves the connection on its executor (a coroutine of its own; returns
/// at once). `slot` is the connection's place under the connection limits;
/// it is held until the connection (or the WebSocket it became) closes.
/// `peer`: the client's address when a PROXY header named it (else the
/// socket's); `pending`: bytes already read after that header.
void serve_http(gateway& gw, boost::asio::ip::tcp::socket socket, std::shared_ptr<void> slot, std::string peer = {},
                std::string pending = {});

/// A connection from a balancer of --proxy-protocol-from: reads the PROXY
/// protocol header it may start with (within --idle-timeout), admits the
/// connection under the limits by the client the header names (by the
/// socket's address when none), then serves it. A malformed header closes
/// it (counted `bad_proxy_header`).
void serve_proxied(gateway& gw, boost::asio::ip::tcp::socket socket);

}  // namespace sidecast::gateway
