#include "workers/sdk/metrics.hpp"

#include "core/metrics.hpp"

namespace sidecast {
namespace {

using core::counter;
using core::gauge;

prometheus::Counter& dropped(prometheus::Registry& r, const char* reason) {
  return core::counters(r, "sidecast_worker_dropped_total", "Messages the worker dropped or refused, by reason")
      .Add({{"reason", reason}});
}

// Adds to `c` what `now` has gained over `before`.
void advance(prometheus::Counter& c, std::uint64_t now, std::uint64_t& before) {
  if (now > before) c.Increment(static_cast<double>(now - before));
  before = now;
}

}  // namespace

worker_metrics::worker_metrics(prometheus::Registry& r)
    : requests_{counter(r, "sidecast_worker_requests_total", "Requests and lifecycle events received")},
      replies_{counter(r, "sidecast_worker_replies_total", "Answers sent")},
      cancels_{counter(r, "sidecast_worker_cancels_total", "Cancels received for requests still running")},
      handler_errors_{counter(r, "sidecast_worker_handler_errors_total", "Handlers that threw (answered INTERNAL)")},
      reconnects_{counter(r, "sidecast_worker_reconnects_total", "Broker links replaced after the broker fell silent")},
      outbox_dropped_{dropped(r, "outbox_full")},
      acks_refused_{dropped(r, "pending_acks")},
      requests_refused_{dropped(r, "queue_full")},
      requests_expired_{dropped(r, "expired_waiting")},
      jobs_again_{counter(r, "sidecast_worker_jobs_again_total",
                          "Jobs the broker sent again (after a new socket) that this worker held or answered: "
                          "not run again")},
      replies_resent_{counter(r, "sidecast_worker_replies_resent_total", "Kept answers sent again for those")},
      recalled_{counter(r, "sidecast_worker_answers_recalled_total",
                        "Final answers the broker asked for again after a new socket (Recall): jobs answered "
                        "early or ended while held here, whose answer may have died in the old socket")},
      gateways_gone_{counter(r, "sidecast_worker_gateways_gone_total",
                             "Gateways the broker announced gone (GatewayGone): their sockets' state was handed "
                             "to each service's on_gateway_gone hook")},
      kept_bytes_{gauge(r, "sidecast_worker_kept_reply_bytes",
                        "Bytes of the answers kept to be sent again (bounded by --kept-reply-bytes)")},
      notices_resent_{counter(r, "sidecast_worker_notices_resent_total",
                              "One-way messages (emits to a sid, joins, leaves) that died in a socket the worker "
                              "replaced, sent again")},
      kept_notice_bytes_{gauge(r, "sidecast_worker_kept_notice_bytes",
                               "Bytes of the one-way messages kept to be sent again (bounded by --kept-notice-bytes)")},
      held_{gauge(r, "sidecast_worker_held_messages",
                  "Messages held back while the broker link waits for the Welcome of a new socket, to go after "
                  "those that died in the old one (bounded by --hwm)")},
      connected_{gauge(r, "sidecast_worker_connected", "1 while the broker has welcomed this worker")},
      running_{gauge(r, "sidecast_worker_requests_running", "Requests taken and not yet done with")},
      draining_{gauge(r, "sidecast_worker_draining", "1 once the worker drains (SIGTERM): it takes no new requests")} {}

void worker_metrics::refresh(const worker& w) {
  auto now = w.stats();
  std::lock_guard lock{mutex_};
  advance(requests_, now.requests, seen_.requests);
  advance(replies_, now.replies, seen_.replies);
  advance(cancels_, now.cancels, seen_.cancels);
  advance(handler_errors_, now.handler_errors, seen_.handler_errors);
  advance(reconnects_, now.reconnects, seen_.reconnects);
  advance(outbox_dropped_, now.outbox_dropped, seen_.outbox_dropped);
  advance(acks_refused_, now.acks_refused, seen_.acks_refused);
  advance(requests_refused_, now.requests_refused, seen_.requests_refused);
  advance(requests_expired_, now.requests_expired, seen_.requests_expired);
  advance(jobs_again_, now.jobs_again, seen_.jobs_again);
  advance(replies_resent_, now.replies_resent, seen_.replies_resent);
  advance(recalled_, now.recalled, seen_.recalled);
  advance(gateways_gone_, now.gateways_gone, seen_.gateways_gone);
  advance(notices_resent_, now.notices_resent, seen_.notices_resent);
  kept_bytes_.Set(static_cast<double>(now.kept_bytes));
  kept_notice_bytes_.Set(static_cast<double>(now.kept_notice_bytes));
  held_.Set(static_cast<double>(now.held));
  connected_.Set(w.connected() ? 1 : 0);
  running_.Set(static_cast<double>(now.running));
  draining_.Set(now.draining ? 1 : 0);
}

}  // namespace sidecast
