#pragma once
// A worker's figures (worker_stats) as Prometheus series, for a process
// that serves /metrics (sidecast-worker --http). The SDK counts with plain
// atomics on its hot paths; refresh() copies them into the registry when
// /metrics is asked for, so a worker that nobody scrapes pays nothing.
#include <mutex>

#include <prometheus/counter.h>
#include <prometheus/gauge.h>
#include <prometheus/registry.h>

#include "workers/sdk/worker.hpp"

namespace sidecast {

class worker_metrics {
 public:
  explicit worker_metrics(prometheus::Registry& registry);

  /// Brings the series up to `w`'s figures. Thread-safe.
  void refresh(const worker& w);

 private:
  std::mutex mutex_;
  worker_stats seen_;  // what the counters already hold
  prometheus::Counter& requests_;
  prometheus::Counter& replies_;
  prometheus::Counter& cancels_;
  prometheus::Counter& handler_errors_;
  prometheus::Counter& reconnects_;
  prometheus::Counter& outbox_dropped_;
  prometheus::Counter& acks_refused_;
  prometheus::Counter& requests_refused_;
  prometheus::Counter& requests_expired_;
  prometheus::Counter& jobs_again_;
  prometheus::Counter& replies_resent_;
  prometheus::Counter& recalled_;
  prometheus::Counter& gateways_gone_;
  prometheus::Gauge& kept_bytes_;
  prometheus::Counter& notices_resent_;
  prometheus::Gauge& kept_notice_bytes_;
  prometheus::Gauge& held_;
  prometheus::Gauge& connected_;
  prometheus::Gauge& running_;
  prometheus::Gauge& draining_;
};

}  // namespace sidecast
