#include "core/open_files.hpp"

#include <sys/resource.h>

#include <spdlog/spdlog.h>

namespace sidecast::core {

std::uint64_t raise_open_files_limit() {
  rlimit limit{};
  if (::getrlimit(RLIMIT_NOFILE, &limit) != 0) return 0;
  if (limit.rlim_cur < limit.rlim_max) {
    auto before = limit.rlim_cur;
    limit.rlim_cur = limit.rlim_max;
    if (::setrlimit(RLIMIT_NOFILE, &limit) != 0) return before;
    spdlog::debug("open files: soft limit raised from {} to {}", before, limit.rlim_cur);
  }
  return limit.rlim_cur == RLIM_INFINITY ? UINT64_MAX : limit.rlim_cur;
}

}  // namespace sidecast::core
