// Measurement helpers for sidecast-bench: a small log-linear latency
// histogram, and CPU / memory readings of this process and of the server's.
#pragma once

#include <array>
#include <bit>
#include <cstdint>
#include <string>
#include <vector>

namespace sidecast::bench {

// HdrHistogram-style buckets: exact below 128 ns, then 64 linear sub-buckets
// per power of two (relative error under 1.6%), up to 2^40 ns (≈ 18 min);
// larger values land in the last bucket. Fixed size, no allocation per
// record, merged by adding counts: one per thread, summed at the end.
class histogram {
 public:
  void record(std::uint64_t ns) noexcept {
    ++counts_[index(ns)];
    ++total_;
  }
  void merge(const histogram& other) noexcept {
    for (std::size_t i = 0; i < counts_.size(); ++i) counts_[i] += other.counts_[i];
    total_ += other.total_;
  }
  std::uint64_t count() const noexcept { return total_; }
  // The value at quantile q (0..1), the middle of its bucket, in ns; 0 when empty.
  std::uint64_t quantile(double q) const noexcept;

 private:
  static constexpr unsigned sub_bits = 6;                        // 64 sub-buckets per octave
  static constexpr std::uint64_t linear_top = 2ull << sub_bits;  // exact below 128
  static constexpr unsigned max_exp = 40 - sub_bits;
  static constexpr std::size_t buckets = linear_top + max_exp * (1u << sub_bits);

  static std::size_t index(std::uint64_t v) noexcept {
    if (v < linear_top) return static_cast<std::size_t>(v);
    unsigned e = static_cast<unsigned>(std::bit_width(v)) - 1 - sub_bits;  // v >> e in [64, 128)
    if (e > max_exp) return buckets - 1;
    return linear_top + (e - 1) * (1u << sub_bits) + static_cast<std::size_t>((v >> e) - (1u << sub_bits));
  }
  static std::uint64_t middle(std::size_t i) noexcept;

  std::array<std::uint64_t, buckets> counts_{};
  std::uint64_t total_ = 0;
};

// User + system CPU time of this process, µs (getrusage).
std::uint64_t self_cpu_us();

// User + system CPU time of the given processes (all their threads), µs, from
// /proc/PID/stat (clock-tick resolution, usually 10 ms). Missing PIDs count 0.
std::uint64_t procs_cpu_us(const std::vector<int>& pids);

// Resident set size of the given processes, KiB, from /proc/PID/status VmRSS.
std::uint64_t procs_rss_kib(const std::vector<int>& pids);

// Raises RLIMIT_NOFILE's soft limit to its hard limit; returns the new soft limit.
std::uint64_t raise_nofile();

// CPUs this process may run on (sched_getaffinity), at least 1.
unsigned usable_cpus();

}  // namespace sidecast::bench
