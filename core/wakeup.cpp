#include "core/wakeup.hpp"

#include <sys/eventfd.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <system_error>

namespace sidecast::core {

wakeup::wakeup(mode m) : fd_{::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC | (m == mode::counting ? EFD_SEMAPHORE : 0))} {
  if (fd_ < 0) throw std::system_error(errno, std::generic_category(), "eventfd");
}

wakeup::~wakeup() { ::close(fd_); }

void wakeup::signal() {
  std::uint64_t one = 1;
  // EAGAIN means the counter is saturated: a wake-up is pending anyway.
  [[maybe_unused]] auto n = ::write(fd_, &one, sizeof one);
}

bool wakeup::drain() {
  std::uint64_t value;
  return ::read(fd_, &value, sizeof value) == sizeof value;
}

}  // namespace sidecast::core
