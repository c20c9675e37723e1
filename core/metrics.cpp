#include "core/metrics.hpp"

#include <algorithm>

#include <prometheus/text_serializer.h>

namespace sidecast::core {

std::string serialize(const prometheus::Registry& registry) {
  return prometheus::TextSerializer{}.Serialize(registry.Collect());
}

prometheus::Family<prometheus::Counter>& counters(prometheus::Registry& r, const char* name, const char* help) {
  return prometheus::BuildCounter().Name(name).Help(help).Register(r);
}

prometheus::Family<prometheus::Gauge>& gauges(prometheus::Registry& r, const char* name, const char* help) {
  return prometheus::BuildGauge().Name(name).Help(help).Register(r);
}

prometheus::Counter& counter(prometheus::Registry& r, const char* name, const char* help) {
  return counters(r, name, help).Add({});
}

prometheus::Gauge& gauge(prometheus::Registry& r, const char* name, const char* help) {
  return gauges(r, name, help).Add({});
}

prometheus::Histogram::BucketBoundaries latency_buckets() {
  return {0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
          0.025,   0.05,   0.1,     0.25,   0.5,   1.0,    2.5,    10.0};
}

prometheus::Histogram& latency_histogram(prometheus::Registry& r, const char* name, const char* help) {
  return prometheus::BuildHistogram().Name(name).Help(help).Register(r).Add({}, latency_buckets());
}

batched_histogram::batched_histogram(prometheus::Histogram& target) : target_{target} {
  const auto buckets = target.Collect().histogram.bucket;  // the last one is +Inf
  for (std::size_t i = 0; i + 1 < buckets.size(); ++i) bounds_.push_back(buckets[i].upper_bound);
  counts_.assign(bounds_.size() + 1, 0.0);
}

void batched_histogram::flush() {
  if (!pending_) return;
  target_.ObserveMultiple(counts_, sum_);
  std::fill(counts_.begin(), counts_.end(), 0.0);
  sum_ = 0;
  pending_ = false;
}

}  // namespace sidecast::core
