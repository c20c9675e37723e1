#pragma once
// Prometheus helpers over prometheus-cpp.
#include <memory>
#include <string>
#include <vector>

#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

namespace sidecast::core {

using registry_ptr = std::shared_ptr<prometheus::Registry>;

/// The registry in Prometheus text exposition format.
std::string serialize(const prometheus::Registry& registry);

/// A counter or gauge family registered in `r` under `name`, its series
/// added by label values; or its one series without labels.
prometheus::Family<prometheus::Counter>& counters(prometheus::Registry& r, const char* name, const char* help);
prometheus::Family<prometheus::Gauge>& gauges(prometheus::Registry& r, const char* name, const char* help);
prometheus::Counter& counter(prometheus::Registry& r, const char* name, const char* help);
prometheus::Gauge& gauge(prometheus::Registry& r, const char* name, const char* help);

/// Latency buckets in seconds from 50 µs to 10 s.
prometheus::Histogram::BucketBoundaries latency_buckets();
/// A histogram of seconds over latency_buckets(), without labels.
prometheus::Histogram& latency_histogram(prometheus::Registry& r, const char* name, const char* help);

/// A histogram for one thread's hot path: observe() only bumps plain
/// counters; flush() (at most a few times a second) hands them to the shared
/// prometheus histogram in one call, instead of atomics per observation.
class batched_histogram {
 public:
  /// Takes its bucket bounds from `target`.
  explicit batched_histogram(prometheus::Histogram& target);
  void observe(double value) {
    std::size_t i = 0;
    while (i < bounds_.size() && value > bounds_[i]) ++i;
    ++counts_[i];
    sum_ += value;
    pending_ = true;
  }
  void flush();

 private:
  prometheus::Histogram& target_;
  prometheus::Histogram::BucketBoundaries bounds_;
  std::vector<double> counts_;  // bounds_.size() + 1: the last is +Inf
  double sum_ = 0;
  bool pending_ = false;
};

}  // namespace sidecast::core
