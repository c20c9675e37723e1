#pragma once
// One HTTP connection: reads requests, answers them (Engine.IO polling, the
// HTTP API, metrics, static files) and hands WebSocket upgrades over to a
// ws_conn. Requests on one connection are answered in order.
#include <memory>

#include <boost/asio/ip/tcp.hpp>

namespace sidecast::gateway {

class gateway;

/// Serves the connection on its executor (a coroutine of its own; returns
/// at once). `slot` is the connection's place under the connection limits;
/// it is held until the connection (or the WebSocket it became) closes.
void serve_http(gateway& gw, boost::asio::ip::tcp::socket socket, std::shared_ptr<void> slot);

}  // namespace sidecast::gateway
