#include "gateway/metrics.hpp"

namespace sidecast::gateway {

gateway_metrics::gateway_metrics(prometheus::Registry& r)
    : connections{core::gauges(r, "sidecast_gateway_connections", "Open client connections, by transport")},
      polling{connections.Add({{"transport", "polling"}})},
      websocket{connections.Add({{"transport", "websocket"}})},
      plain_ws{connections.Add({{"transport", "ws"}})},
      api_sessions{connections.Add({{"transport", "api"}})},
      messages{
          core::counters(r, "sidecast_gateway_messages_total", "Messages to and from clients, by direction and face")},
      sio_in{messages.Add({{"direction", "in"}, {"face", "socketio"}})},
      sio_out{messages.Add({{"direction", "out"}, {"face", "socketio"}})},
      ws_in{messages.Add({{"direction", "in"}, {"face", "ws"}})},
      ws_out{messages.Add({{"direction", "out"}, {"face", "ws"}})},
      api_in{messages.Add({{"direction", "in"}, {"face", "api"}})},
      api_out{messages.Add({{"direction", "out"}, {"face", "api"}})},
      bytes{core::counters(r, "sidecast_gateway_bytes_total", "Bytes of client traffic, by direction")},
      bytes_in{bytes.Add({{"direction", "in"}})},
      bytes_out{bytes.Add({{"direction", "out"}})},
      dropped{
          core::counters(r, "sidecast_gateway_dropped_total", "Connections, messages or requests dropped, by reason")},
      slow_consumer{dropped.Add({{"reason", "slow_consumer"}})},
      bridge_full{dropped.Add({{"reason", "bridge_full"}})},
      thread_backlog{dropped.Add({{"reason", "thread_backlog"}})},
      broker_link_full{dropped.Add({{"reason", "broker_link_full"}})},
      broker_unread{dropped.Add({{"reason", "broker_unread"}})},
      bad_packet{dropped.Add({{"reason", "bad_packet"}})},
      refused_origin{dropped.Add({{"reason", "refused_origin"}})},
      oversize{dropped.Add({{"reason", "oversize"}})},
      client_gone{dropped.Add({{"reason", "client_gone"}})},
      api_overflow{dropped.Add({{"reason", "api_buffer_full"}})},
      connection_limit{dropped.Add({{"reason", "connection_limit"}})},
      accept_failed{core::counter(r, "sidecast_gateway_accept_failures_total",
                                  "Accepts that failed (the process out of file descriptors, or memory): the "
                                  "gateway waits 100 ms before accepting again")},
      session_limit{dropped.Add({{"reason", "session_limit"}})},
      bad_http{dropped.Add({{"reason", "bad_http"}})},
      bad_frame{dropped.Add({{"reason", "bad_frame"}})},
      ack_limit{dropped.Add({{"reason", "ack_limit"}})},
      undelivered{dropped.Add({{"reason", "undelivered"}})},
      replay_overflow{dropped.Add({{"reason", "replay_overflow"}})},
      rate_limited{dropped.Add({{"reason", "rate_limited"}})},
      early_frames{dropped.Add({{"reason", "early_frames"}})},
      room_limit{dropped.Add({{"reason", "room_limit"}})},
      long_room{dropped.Add({{"reason", "long_room"}})},
      namespace_limit{dropped.Add({{"reason", "namespace_limit"}})},
      long_auth{dropped.Add({{"reason", "long_auth"}})},
      static_too_large{dropped.Add({{"reason", "static_too_large"}})},
      too_large{dropped.Add({{"reason", "too_large"}})},
      bad_args{dropped.Add({{"reason", "bad_args"}})},
      bad_answer{dropped.Add({{"reason", "bad_answer"}})},
      bad_event{dropped.Add({{"reason", "bad_event"}})},
      bad_token{dropped.Add({{"reason", "bad_token"}})},
      bad_proxy_header{dropped.Add({{"reason", "bad_proxy_header"}})},
      forwarded{core::counter(r, "sidecast_gateway_forwarded_total",
                              "Polling and HTTP API requests for another gateway's sid, relayed through the broker")},
      cancelled{core::counter(r, "sidecast_gateway_requests_cancelled_total",
                              "Client events awaiting their answer when their socket ended, cancelled at the broker "
                              "(one still queued does not run; a running handler sees its cancel token)")},
      room_controls{core::counter(r, "sidecast_gateway_room_controls_total",
                                  "Room-wide joins, leaves and disconnects applied to this gateway's members")},
      unheard{core::counter(r, "sidecast_gateway_room_events_unheard_total",
                            "Room events and room-wide controls for a room with no local member, dropped (with "
                            "--room-subscriptions namespace every room of a namespace reaches every gateway with a "
                            "socket in it; with room, those on a subscription on its way out)")},
      events_heard{core::counter(r, "sidecast_gateway_events_heard_total",
                                 "Room and broadcast events (and room-wide controls) from the broker for rooms "
                                 "and namespaces with local members")},
      events_lost{core::counter(r, "sidecast_gateway_events_lost_total",
                                "Room and broadcast events for topics with local members that the broker "
                                "published but never reached this gateway: the gaps in their numbers (the "
                                "broker's XPUB queue for this gateway past its --hwm, or a reconnect)")},
      recent_unsubscriptions{core::gauge(r, "sidecast_gateway_recent_unsubscriptions",
                                         "Room and namespace unsubscriptions of the last 5 s that the gateway "
                                         "remembers (--max-recent-unsubscriptions)")},
      unsubscriptions_forgotten{core::counter(r, "sidecast_gateway_unsubscriptions_forgotten_total",
                                              "Unsubscriptions forgotten within their 5 s to keep "
                                              "--max-recent-unsubscriptions: a gap in such a topic's events soon "
                                              "after it is subscribed again is then counted lost")},
      api_given_back{core::counter(r, "sidecast_gateway_api_events_given_back_total",
                                   "Events an API session's poll relayed by a peer gateway took, whose client had "
                                   "left there: kept, in front, for its next poll")},
      recovered{core::counter(r, "sidecast_gateway_recovered_total",
                              "Sockets recovered after a dropped transport (connection-state recovery)")},
      ping_timeouts{core::counter(r, "sidecast_gateway_ping_timeouts_total",
                                  "Connections closed because their client answered no ping within --ping-timeout "
                                  "(Engine.IO sessions and /ws connections)")},
      tokens_expired{core::counter(r, "sidecast_gateway_tokens_expired_total",
                                   "Sockets ended because the token their connect carried expired (--jwt-end-at-exp)")},
      replay_events{core::gauge(r, "sidecast_gateway_replay_events",
                                "Events kept for connection-state recovery that the clients may not have seen (bound "
                                "per socket: --recovery-buffer)")},
      ack_latency{core::latency_histogram(r, "sidecast_gateway_ack_seconds", "Time from a client's event to its ack")},
      rooms{core::gauge(r, "sidecast_gateway_rooms", "Rooms with local members")},
      broker_connected{
          core::gauge(r, "sidecast_gateway_broker_connected", "1 while the broker has welcomed this gateway")},
      broker_restarts{core::counter(r, "sidecast_gateway_broker_restarts_total",
                                    "Welcomes from a broker other than the one before (a restarted broker)")},
      prefixes_gone{core::counter(r, "sidecast_gateway_prefixes_gone_total",
                                  "Welcomes that said the broker had announced this gateway's sockets gone (it was "
                                  "silent past the broker's --gateway-gone-after): its sockets ended and its sids "
                                  "took a new prefix")},
      broker_lost{core::counter(r, "sidecast_gateway_broker_lost_total",
                                "Requests the previous broker held when a new one welcomed this gateway, "
                                "answered BROKER_LOST at once rather than at their deadline")},
      resent{core::counter(r, "sidecast_gateway_requests_resent_total",
                           "Requests and forwards the broker never read (they died in a socket to it that the gateway "
                           "replaced after its silence), sent again on the new socket")},
      notices_resent{
          core::counter(r, "sidecast_gateway_notices_resent_total",
                        "Messages nobody answers (DISCONNECT notices, events without an ack, acks, publishes) "
                        "the broker never read, sent again on the new socket")},
      kept_notice_bytes{core::gauge(r, "sidecast_gateway_kept_notice_bytes",
                                    "Bytes of the one-way messages kept to send again should they die in a socket to "
                                    "the broker the gateway replaces (--kept-notices, --kept-notice-bytes)")},
      unread_bytes{core::gauge(r, "sidecast_gateway_broker_unread_bytes",
                               "Bytes sent to the broker on the link's current socket that its heartbeats have not "
                               "said it read, to within 64 KiB over (--max-unread-bytes)")},
      kept_request_bytes{core::gauge(r, "sidecast_gateway_kept_request_bytes",
                                     "Bytes of requests and forwards awaiting their answer that the gateway keeps to "
                                     "send again should they die in a socket to the broker it replaces (those the "
                                     "broker has not said it read), as of the broker's last read report")},
      held{core::gauge(r, "sidecast_gateway_broker_link_held",
                       "Messages to the broker held back while its link waits for the Welcome of a new socket, to go "
                       "after those that died in the old one (at most --hwm)")},
      io_uring_batches{core::counter(r, "sidecast_gateway_io_uring_batches_total",
                                     "Batches of WebSocket reads or writes made in one io_uring_enter (--io-uring)")},
      io_uring_calls{core::counter(r, "sidecast_gateway_io_uring_calls_total",
                                   "Socket calls (recv, sendmsg) made in those batches")} {}

}  // namespace sidecast::gateway
