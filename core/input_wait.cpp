#include "core/input_wait.hpp"

#include <cerrno>

namespace sidecast::core {

std::size_t input_wait::add(zmq::socket_ref socket) {
  return add(socket.get(zmq::sockopt::fd), [socket] { return (socket.get(zmq::sockopt::events) & ZMQ_POLLIN) != 0; });
}

std::size_t input_wait::add(int fd) { return add(fd, nullptr); }

std::size_t input_wait::add(int fd, std::function<bool()> ask) {
  bool asks = static_cast<bool>(ask);
  items_.push_back({std::move(ask), asks, false});
  fds_.push_back({fd, POLLIN, 0});
  return items_.size() - 1;
}

bool input_wait::look() {
  bool any = false;
  for (auto& it : items_) {
    it.ready = false;
    if (!it.has_input || !it.ask) continue;
    it.ask = false;
    if (it.has_input()) it.ready = it.ask = any = true;  // it may still have input after this turn
  }
  return any;
}

void input_wait::fired(std::size_t index) {
  auto& it = items_[index];
  it.ready = true;
  if (it.has_input) it.ask = true;  // it may still have input after this turn
}

void input_wait::wait(std::chrono::milliseconds timeout) {
  // With input in hand, only look at the descriptors; otherwise block.
  bool any = look();
  int ms = any ? 0 : timeout.count() < 0 ? -1 : static_cast<int>(timeout.count());
  int n = ::poll(fds_.data(), fds_.size(), ms);
  if (n < 0) {
    if (errno == EINTR) return;
    throw zmq::error_t{};
  }
  for (std::size_t i = 0; i < items_.size(); ++i)
    if (fds_[i].revents & (POLLIN | POLLERR | POLLHUP)) fired(i);
}

}  // namespace sidecast::core
