#pragma once
// Prometheus helpers over prometheus-cpp.
#include <memory>
#include <string>

#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

namespace sidecast::core {

using registry_ptr = std::shared_ptr<prometheus::Registry>;

/// The registry in Prometheus text exposition format.
std::string serialize(const prometheus::Registry& registry);

/// Latency buckets in seconds from 50 µs to 10 s.
prometheus::Histogram::BucketBoundaries latency_buckets();

}  // namespace sidecast::core
