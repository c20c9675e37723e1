#include "gateway/metrics.hpp"

namespace sidecast::gateway {
namespace {

prometheus::Family<prometheus::Counter>& counter(prometheus::Registry& r, const char* name, const char* help) {
  return prometheus::BuildCounter().Name(name).Help(help).Register(r);
}

}  // namespace

gateway_metrics::gateway_metrics(prometheus::Registry& r)
    : connections{prometheus::BuildGauge()
                      .Name("sidecast_gateway_connections")
                      .Help("Open client connections, by transport")
                      .Register(r)},
      polling{connections.Add({{"transport", "polling"}})},
      websocket{connections.Add({{"transport", "websocket"}})},
      plain_ws{connections.Add({{"transport", "ws"}})},
      api_sessions{connections.Add({{"transport", "api"}})},
      messages{counter(r, "sidecast_gateway_messages_total", "Messages to and from clients, by direction and face")},
      sio_in{messages.Add({{"direction", "in"}, {"face", "socketio"}})},
      sio_out{messages.Add({{"direction", "out"}, {"face", "socketio"}})},
      ws_in{messages.Add({{"direction", "in"}, {"face", "ws"}})},
      ws_out{messages.Add({{"direction", "out"}, {"face", "ws"}})},
      api_in{messages.Add({{"direction", "in"}, {"face", "api"}})},
      api_out{messages.Add({{"direction", "out"}, {"face", "api"}})},
      bytes{counter(r, "sidecast_gateway_bytes_total", "Bytes of client traffic, by direction")},
      bytes_in{bytes.Add({{"direction", "in"}})},
      bytes_out{bytes.Add({{"direction", "out"}})},
      dropped{counter(r, "sidecast_gateway_dropped_total", "Connections, messages or requests dropped, by reason")},
      slow_consumer{dropped.Add({{"reason", "slow_consumer"}})},
      bridge_full{dropped.Add({{"reason", "bridge_full"}})},
      thread_backlog{dropped.Add({{"reason", "thread_backlog"}})},
      broker_link_full{dropped.Add({{"reason", "broker_link_full"}})},
      bad_packet{dropped.Add({{"reason", "bad_packet"}})},
      refused_origin{dropped.Add({{"reason", "refused_origin"}})},
      oversize{dropped.Add({{"reason", "oversize"}})},
      client_gone{dropped.Add({{"reason", "client_gone"}})},
      api_overflow{dropped.Add({{"reason", "api_buffer_full"}})},
      connection_limit{dropped.Add({{"reason", "connection_limit"}})},
      session_limit{dropped.Add({{"reason", "session_limit"}})},
      bad_http{dropped.Add({{"reason", "bad_http"}})},
      bad_frame{dropped.Add({{"reason", "bad_frame"}})},
      ack_limit{dropped.Add({{"reason", "ack_limit"}})},
      undelivered{dropped.Add({{"reason", "undelivered"}})},
      replay_overflow{dropped.Add({{"reason", "replay_overflow"}})},
      rate_limited{dropped.Add({{"reason", "rate_limited"}})},
      room_limit{dropped.Add({{"reason", "room_limit"}})},
      namespace_limit{dropped.Add({{"reason", "namespace_limit"}})},
      bad_args{dropped.Add({{"reason", "bad_args"}})},
      bad_answer{dropped.Add({{"reason", "bad_answer"}})},
      bad_event{dropped.Add({{"reason", "bad_event"}})},
      bad_token{dropped.Add({{"reason", "bad_token"}})},
      bad_proxy_header{dropped.Add({{"reason", "bad_proxy_header"}})},
      forwarded{counter(r, "sidecast_gateway_forwarded_total",
                        "Polling and HTTP API requests for another gateway's sid, relayed through the broker")
                    .Add({})},
      recovered{counter(r, "sidecast_gateway_recovered_total",
                        "Sockets recovered after a dropped transport (connection-state recovery)")
                    .Add({})},
      replay_events{prometheus::BuildGauge()
                        .Name("sidecast_gateway_replay_events")
                        .Help("Events kept for connection-state recovery that the clients may not have seen "
                              "(bound per socket: --recovery-buffer)")
                        .Register(r)
                        .Add({})},
      ack_latency{prometheus::BuildHistogram()
                      .Name("sidecast_gateway_ack_seconds")
                      .Help("Time from a client's event to its ack")
                      .Register(r)
                      .Add({}, core::latency_buckets())},
      rooms{prometheus::BuildGauge().Name("sidecast_gateway_rooms").Help("Rooms with local members").Register(r).Add({})},
      broker_connected{prometheus::BuildGauge()
                           .Name("sidecast_gateway_broker_connected")
                           .Help("1 while the broker has welcomed this gateway")
                           .Register(r)
                           .Add({})},
      broker_restarts{counter(r, "sidecast_gateway_broker_restarts_total",
                              "Welcomes from a broker other than the one before (a restarted broker)")
                          .Add({})},
      broker_lost{counter(r, "sidecast_gateway_broker_lost_total",
                          "Requests the previous broker held when a new one welcomed this gateway, "
                          "answered BROKER_LOST at once rather than at their deadline")
                      .Add({})},
      resent{counter(r, "sidecast_gateway_requests_resent_total",
                     "Requests and forwards the broker never read (they died in a socket to it that the gateway "
                     "replaced after its silence), sent again on the new socket")
                 .Add({})},
      notices_resent{counter(r, "sidecast_gateway_notices_resent_total",
                             "Messages nobody answers (DISCONNECT notices, events without an ack, acks, publishes) "
                             "the broker never read, sent again on the new socket")
                         .Add({})},
      kept_notice_bytes{prometheus::BuildGauge()
                            .Name("sidecast_gateway_kept_notice_bytes")
                            .Help("Bytes of the one-way messages kept to send again should they die in a socket "
                                  "to the broker the gateway replaces (--kept-notices, --kept-notice-bytes)")
                            .Register(r)
                            .Add({})},
      held{prometheus::BuildGauge()
               .Name("sidecast_gateway_broker_link_held")
               .Help("Messages to the broker held back while its link waits for the Welcome of a new socket, to "
                     "go after those that died in the old one (at most --hwm)")
               .Register(r)
               .Add({})},
      io_uring_batches{counter(r, "sidecast_gateway_io_uring_batches_total",
                               "Batches of WebSocket reads or writes made in one io_uring_enter (--io-uring)")
                           .Add({})},
      io_uring_calls{counter(r, "sidecast_gateway_io_uring_calls_total",
                             "Socket calls (recv, sendmsg) made in those batches")
                         .Add({})} {}

}  // namespace sidecast::gateway
