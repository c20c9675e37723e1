#pragma once
// The gateway's Prometheus metrics. Counters are atomic: any thread may bump them.
#include <atomic>
#include <cstddef>

#include "core/metrics.hpp"

namespace sidecast::gateway {

struct gateway_metrics {
  explicit gateway_metrics(prometheus::Registry& r);

  prometheus::Family<prometheus::Gauge>& connections;    // {transport}
  prometheus::Gauge& polling;
  prometheus::Gauge& websocket;
  prometheus::Gauge& plain_ws;
  prometheus::Gauge& api_sessions;
  prometheus::Family<prometheus::Counter>& messages;     // {direction, face}
  prometheus::Counter& sio_in;
  prometheus::Counter& sio_out;
  prometheus::Counter& ws_in;
  prometheus::Counter& ws_out;
  prometheus::Counter& api_in;
  prometheus::Counter& api_out;
  prometheus::Family<prometheus::Counter>& bytes;        // {direction}
  prometheus::Counter& bytes_in;
  prometheus::Counter& bytes_out;
  prometheus::Family<prometheus::Counter>& dropped;      // {reason}
  prometheus::Counter& slow_consumer;
  prometheus::Counter& bridge_full;
  prometheus::Counter& thread_backlog;  // deliveries refused: --max-thread-backlog waiting for that I/O thread
  prometheus::Counter& broker_link_full;
  prometheus::Counter& broker_unread;  // refused past --max-unread-bytes
  prometheus::Counter& bad_packet;
  prometheus::Counter& refused_origin;
  prometheus::Counter& oversize;
  prometheus::Counter& client_gone;
  prometheus::Counter& api_overflow;
  prometheus::Counter& connection_limit;
  prometheus::Counter& accept_failed;  // accepts that failed (out of descriptors): paused 100 ms
  prometheus::Counter& session_limit;  // polling handshakes over --max-polling-sessions(-per-ip)
  prometheus::Counter& bad_http;     // requests that are not HTTP/1.1 we can parse, or too large a header
  prometheus::Counter& bad_frame;    // WebSocket frames against RFC 6455 (close 1002) or text not UTF-8 (1007)
  prometheus::Counter& ack_limit;    // events refused: --max-pending-acks already waiting for their ack or reply
  prometheus::Counter& undelivered;  // worker events a socket could not take (connecting, recovering, acks full, gone)
  prometheus::Counter& replay_overflow;  // events past --recovery-buffer a client may not have seen
  prometheus::Counter& rate_limited;
  prometheus::Counter& early_frames;  // /ws frames refused before the connect answer: --max-early-frames held
  prometheus::Counter& room_limit;
  prometheus::Counter& long_room;  // joins of a room named longer than --max-room-bytes
  prometheus::Counter& namespace_limit;  // CONNECTs past --max-namespaces
  prometheus::Counter& long_auth;  // connects with an auth longer than --max-auth-bytes
  prometheus::Counter& static_too_large;  // static files not served: past --max-static-bytes
  prometheus::Counter& too_large;  // client events larger than the broker takes (its --max-message-bytes)
  prometheus::Counter& bad_args;   // a worker's event or answer args that are not JSON
  prometheus::Counter& bad_answer;  // a peer gateway's HttpAnswer with a status or content type not written (502)
  prometheus::Counter& bad_event;  // a worker's event with a reserved name or for another namespace
  prometheus::Counter& bad_token;
  prometheus::Counter& bad_proxy_header;  // a trusted balancer's connection with a malformed PROXY header
  prometheus::Counter& forwarded;
  prometheus::Counter& cancelled;  // requests of sockets that ended before their answers (bridge::cancel)
  prometheus::Counter& room_controls;  // room-wide Controls applied (each to every local member)
  prometheus::Counter& unheard;  // room events for a room with no local member (--room-subscriptions namespace)
  prometheus::Counter& events_heard;  // room and broadcast events for topics with local members
  prometheus::Counter& events_lost;   // gaps in the broker's event stamps (proto::event_stamp)
  prometheus::Gauge& recent_unsubscriptions;  // kept by the bridge (--max-recent-unsubscriptions)
  prometheus::Counter& unsubscriptions_forgotten;  // ... forgotten within their 5 s to make room
  prometheus::Counter& api_given_back;  // events a relayed API poll took that its client never got, given back
  prometheus::Counter& recovered;
  prometheus::Counter& ping_timeouts;  // connections closed: no pong (or any frame) within --ping-timeout
  prometheus::Counter& tokens_expired;  // sockets ended at their token's exp (--jwt-end-at-exp)
  prometheus::Gauge& replay_events;  // kept for connection-state recovery
  prometheus::Histogram& ack_latency;
  prometheus::Gauge& rooms;
  prometheus::Gauge& broker_connected;
  prometheus::Counter& broker_restarts;  // a Welcome from a broker other than the one before
  prometheus::Counter& prefixes_gone;    // a Welcome saying the broker announced our sockets gone
  prometheus::Counter& broker_lost;      // requests that broker held, answered BROKER_LOST at once
  prometheus::Counter& resent;           // requests that died in a replaced socket, sent again
  prometheus::Counter& notices_resent;   // one-way messages that did, sent again
  prometheus::Gauge& kept_notice_bytes;  // one-way messages kept for that (--kept-notice-bytes)
  prometheus::Gauge& unread_bytes;       // sent to the broker, not yet read by it (--max-unread-bytes)
  prometheus::Gauge& kept_request_bytes; // requests and forwards kept to send again, as of the last read report
  prometheus::Gauge& held;               // messages held until those go (bridge::hold)
  prometheus::Counter& io_uring_batches;  // WebSocket reads or writes made together in one io_uring_enter
  prometheus::Counter& io_uring_calls;    // ... and the socket calls in them
  // WebSocket connections not finished yet (a close handshake may still
  // run after their session ended): gateway::drain waits for them, so
  // stop() does not cut a close frame short (not exported).
  std::atomic<std::size_t> websockets_open{0};
};

}  // namespace sidecast::gateway
