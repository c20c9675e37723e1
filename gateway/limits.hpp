#pragma once
// Admission limits: a token bucket for client events, and the count of open
// connections in all and per address.
#include <algorithm>
#include <chrono>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>

namespace sidecast::gateway {

/// `rate` tokens per second up to `burst`; rate 0 means no limit. One per
/// connection, used on its thread only.
class token_bucket {
 public:
  token_bucket(double rate, double burst) : rate_{rate}, burst_{std::max(burst, 1.0)}, tokens_{burst_} {}

  bool take(std::chrono::steady_clock::time_point now = std::chrono::steady_clock::now()) {
    if (rate_ <= 0) return true;
    auto elapsed = std::chrono::duration<double>(now - last_).count();
    last_ = now;
    tokens_ = std::min(burst_, tokens_ + elapsed * rate_);
    if (tokens_ < 1) return false;
    tokens_ -= 1;
    return true;
  }

 private:
  double rate_, burst_, tokens_;
  std::chrono::steady_clock::time_point last_ = std::chrono::steady_clock::now();
};

/// Counts open connections; admit() hands out a slot that gives itself back
/// when the last owner drops it (the HTTP session, then its WebSocket).
class connection_limits {
 public:
  connection_limits(std::size_t total, std::size_t per_address) : total_{total}, per_address_{per_address} {}

  std::shared_ptr<void> admit(const std::string& address) {
    std::lock_guard lock{mutex_};
    auto& mine = by_address_[address];
    if (open_ >= total_ || mine >= per_address_) {
      if (mine == 0) by_address_.erase(address);
      return nullptr;
    }
    ++open_;
    ++mine;
    return std::shared_ptr<void>(static_cast<void*>(this), [this, address](void*) { release(address); });
  }

  std::size_t open() {
    std::lock_guard lock{mutex_};
    return open_;
  }

 private:
  void release(const std::string& address) {
    std::lock_guard lock{mutex_};
    --open_;
    if (auto it = by_address_.find(address); it != by_address_.end() && --it->second == 0) by_address_.erase(it);
  }

  std::mutex mutex_;
  std::size_t total_, per_address_, open_ = 0;
  std::unordered_map<std::string, std::size_t> by_address_;
};

}  // namespace sidecast::gateway
