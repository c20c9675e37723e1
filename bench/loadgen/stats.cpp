#include "bench/loadgen/stats.hpp"

#include <sched.h>
#include <sys/resource.h>
#include <unistd.h>

#include <fstream>
#include <iterator>
#include <sstream>

namespace sidecast::bench {

std::uint64_t histogram::middle(std::size_t i) noexcept {
  if (i < linear_top) return i;
  std::size_t k = i - linear_top;
  unsigned e = static_cast<unsigned>(k >> sub_bits) + 1;
  std::uint64_t sub = (k & ((1u << sub_bits) - 1)) + (1u << sub_bits);
  return (sub << e) + ((1ull << e) >> 1);
}

std::uint64_t histogram::quantile(double q) const noexcept {
  if (total_ == 0) return 0;
  auto rank = static_cast<std::uint64_t>(q * static_cast<double>(total_));
  if (rank >= total_) rank = total_ - 1;
  std::uint64_t seen = 0;
  for (std::size_t i = 0; i < counts_.size(); ++i) {
    seen += counts_[i];
    if (seen > rank) return middle(i);
  }
  return middle(counts_.size() - 1);
}

std::uint64_t self_cpu_us() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  auto us = [](const timeval& t) {
    return static_cast<std::uint64_t>(t.tv_sec) * 1000000u + static_cast<std::uint64_t>(t.tv_usec);
  };
  return us(ru.ru_utime) + us(ru.ru_stime);
}

namespace {

std::string slurp(const std::string& path) {
  std::ifstream f{path};
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

}  // namespace

std::uint64_t procs_cpu_us(const std::vector<int>& pids) {
  static const long ticks = sysconf(_SC_CLK_TCK);
  std::uint64_t total = 0;
  for (int pid : pids) {
    std::string text = slurp("/proc/" + std::to_string(pid) + "/stat");
    // The command name may hold spaces and parentheses: fields restart after the last ')'.
    auto close = text.rfind(')');
    if (close == std::string::npos || close + 2 > text.size()) continue;
    std::istringstream rest{text.substr(close + 2)};
    std::vector<std::string> fields{std::istream_iterator<std::string>(rest), {}};
    if (fields.size() < 13) continue;  // fields[11], [12]: utime, stime (stat fields 14, 15)
    std::uint64_t t = std::stoull(fields[11]) + std::stoull(fields[12]);
    total += t * 1000000u / static_cast<std::uint64_t>(ticks);
  }
  return total;
}

std::uint64_t procs_rss_kib(const std::vector<int>& pids) {
  std::uint64_t total = 0;
  for (int pid : pids) {
    std::istringstream in{slurp("/proc/" + std::to_string(pid) + "/status")};
    for (std::string line; std::getline(in, line);) {
      if (line.rfind("VmRSS:", 0) == 0) {
        total += std::stoull(line.substr(6));
        break;
      }
    }
  }
  return total;
}

std::uint64_t raise_nofile() {
  rlimit r{};
  if (getrlimit(RLIMIT_NOFILE, &r) != 0) return 0;
  if (r.rlim_cur < r.rlim_max) {
    r.rlim_cur = r.rlim_max;
    setrlimit(RLIMIT_NOFILE, &r);
    getrlimit(RLIMIT_NOFILE, &r);
  }
  return r.rlim_cur;
}

unsigned usable_cpus() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof set, &set) != 0) return 1;
  int n = CPU_COUNT(&set);
  return n > 0 ? static_cast<unsigned>(n) : 1u;
}

}  // namespace sidecast::bench
