#include <gtest/gtest.h>

#include "core/metrics.hpp"

namespace sidecast::core {
namespace {

TEST(BatchedHistogram, PublishesOnFlushWithPrometheusBuckets) {
  prometheus::Registry registry;
  const prometheus::Histogram::BucketBoundaries bounds{0.001, 0.01};
  auto& h = prometheus::BuildHistogram().Name("t_seconds").Help("t").Register(registry).Add({}, bounds);
  batched_histogram batch{h};
  for (double v : {0.0005, 0.001, 0.005, 0.01, 0.5}) batch.observe(v);
  EXPECT_EQ(h.Collect().histogram.sample_count, 0u) << "nothing published before flush()";
  batch.flush();
  auto m = h.Collect().histogram;
  EXPECT_EQ(m.sample_count, 5u);
  EXPECT_DOUBLE_EQ(m.sample_sum, 0.5165);
  ASSERT_EQ(m.bucket.size(), 3u);
  EXPECT_EQ(m.bucket[0].cumulative_count, 2u) << "le 0.001 includes 0.001 itself";
  EXPECT_EQ(m.bucket[1].cumulative_count, 4u);
  EXPECT_EQ(m.bucket[2].cumulative_count, 5u);
  batch.flush();
  EXPECT_EQ(h.Collect().histogram.sample_count, 5u) << "a flush with nothing new adds nothing";
}

}  // namespace
}  // namespace sidecast::core
