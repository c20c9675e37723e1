#pragma once
// A mutex-protected FIFO with a hard bound, for handing work between threads.
// The consumer drains it in batches; producers choose to fail or wait when full.
// Items live in a vector that the consumer's batch swaps with, so both keep
// their capacity and a steady flow allocates nothing.
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <vector>
#include <mutex>

namespace sidecast::core {

template <typename T>
class bounded_queue {
 public:
  explicit bounded_queue(std::size_t limit) : limit_{limit} {}

  /// Adds an item unless the queue is full. Returns false when full, and
  /// then leaves `item` untouched so the caller may retry.
  bool try_push(T&& item) {
    std::lock_guard lock{mutex_};
    if (items_.size() >= limit_) return false;
    items_.push_back(std::move(item));
    return true;
  }

  /// Waits up to `timeout` for room. Returns false on timeout or close.
  template <typename Rep, typename Period>
  bool push_wait(T&& item, std::chrono::duration<Rep, Period> timeout) {
    std::unique_lock lock{mutex_};
    if (!room_.wait_for(lock, timeout, [&] { return closed_ || items_.size() < limit_; }) ||
        closed_)
      return false;
    items_.push_back(std::move(item));
    return true;
  }

  /// Moves everything queued into `out` (appending) and wakes blocked producers.
  void drain(std::vector<T>& out) {
    {
      std::lock_guard lock{mutex_};
      if (items_.empty()) return;
      if (out.empty()) {
        out.swap(items_);
      } else {
        for (auto& item : items_) out.push_back(std::move(item));
        items_.clear();
      }
    }
    room_.notify_all();
  }

  /// Fails every waiting and future push.
  void close() {
    {
      std::lock_guard lock{mutex_};
      closed_ = true;
    }
    room_.notify_all();
  }

  std::size_t size() const {
    std::lock_guard lock{mutex_};
    return items_.size();
  }
  std::size_t limit() const { return limit_; }

 private:
  mutable std::mutex mutex_;
  std::condition_variable room_;
  std::vector<T> items_;
  std::size_t limit_;
  bool closed_ = false;
};

}  // namespace sidecast::core
