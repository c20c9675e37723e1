#include "core/random.hpp"

#include <sys/random.h>

#include <array>
#include <cerrno>
#include <cstring>
#include <system_error>

namespace sidecast::core {

namespace {

struct random_buffer {
  std::array<std::uint8_t, 512> bytes{};
  std::size_t used = bytes.size();

  void refill() {
    std::size_t filled = 0;
    while (filled < bytes.size()) {
      auto n = ::getrandom(bytes.data() + filled, bytes.size() - filled, 0);
      if (n < 0) {
        if (errno == EINTR) continue;
        throw std::system_error(errno, std::generic_category(), "getrandom");
      }
      filled += static_cast<std::size_t>(n);
    }
    used = 0;
  }

  ~random_buffer() { explicit_bzero(bytes.data(), bytes.size()); }
};

}  // namespace

void secure_random(std::span<std::uint8_t> out) {
  thread_local random_buffer buffer;
  while (!out.empty()) {
    if (buffer.used == buffer.bytes.size()) buffer.refill();
    auto n = std::min(out.size(), buffer.bytes.size() - buffer.used);
    std::memcpy(out.data(), buffer.bytes.data() + buffer.used, n);
    // Bytes handed out are not left behind for a later reader of memory.
    std::memset(buffer.bytes.data() + buffer.used, 0, n);
    buffer.used += n;
    out = out.subspan(n);
  }
}

std::string random_token(std::size_t n) {
  static constexpr char alphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
  std::string out(n, ' ');
  secure_random({reinterpret_cast<std::uint8_t*>(out.data()), n});
  for (auto& c : out) c = alphabet[static_cast<std::uint8_t>(c) & 63];  // 64 divides 256: uniform
  return out;
}

}  // namespace sidecast::core
