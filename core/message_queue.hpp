#pragma once
// A bounded queue of ZeroMQ messages from one thread to one other, without a
// lock or a system call: the pipe under a local:// connection
// (core/local_link.hpp), as libzmq's ypipe is the one under inproc://.
//
// Slots live in chunks of 256, allocated as the queue grows and handed back
// (one spare kept) as it drains, so a queue bounded at 100,000 messages costs
// one chunk while it is short. push and pop each touch one atomic the other
// side writes, and read it only when their cached copy says full or empty.
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <new>

#include <zmq.hpp>

namespace sidecast::core {

class message_queue {
 public:
  explicit message_queue(std::size_t capacity) : capacity_{capacity == 0 ? 1 : capacity} {
    head_chunk_ = tail_chunk_ = new chunk;
  }
  ~message_queue() {
    zmq::message_t discard;
    while (pop(discard)) {
    }
    delete head_chunk_;
    delete spare_.load(std::memory_order_acquire);
  }
  message_queue(const message_queue&) = delete;
  message_queue& operator=(const message_queue&) = delete;

  std::size_t capacity() const { return capacity_; }

  /// Producer only. Takes `message` (leaving it empty) unless the queue
  /// holds capacity() messages already; then false, and `message` is kept.
  bool push(zmq::message_t& message) {
    auto tail = tail_.load(std::memory_order_relaxed);
    if (tail - head_cache_ >= capacity_) {
      head_cache_ = head_.load(std::memory_order_acquire);
      if (tail - head_cache_ >= capacity_) return false;
    }
    auto slot = tail % chunk::size;
    if (slot == 0 && tail != 0) {
      auto* next = spare_.exchange(nullptr, std::memory_order_acquire);
      if (!next) next = new chunk;
      next->next.store(nullptr, std::memory_order_relaxed);
      tail_chunk_->next.store(next, std::memory_order_release);
      tail_chunk_ = next;
    }
    new (tail_chunk_->raw(slot)) zmq::message_t{std::move(message)};
    tail_.store(tail + 1, std::memory_order_release);
    return true;
  }

  /// Consumer only. The oldest message, or false when none is there.
  bool pop(zmq::message_t& message) {
    auto head = head_.load(std::memory_order_relaxed);
    if (head == tail_cache_) {
      tail_cache_ = tail_.load(std::memory_order_acquire);
      if (head == tail_cache_) return false;
    }
    auto slot = head % chunk::size;
    if (slot == 0 && head != 0) {
      // The producer linked the next chunk before it published this slot,
      // and writes only there now: the old one is free to reuse.
      auto* old = head_chunk_;
      head_chunk_ = old->next.load(std::memory_order_acquire);
      delete spare_.exchange(old, std::memory_order_acq_rel);
    }
    auto* m = head_chunk_->at(slot);
    message = std::move(*m);
    m->~message_t();
    head_.store(head + 1, std::memory_order_release);
    return true;
  }

  /// Either side: nothing is waiting. Exact only for the consumer; a
  /// producer's answer may be stale by the time it returns.
  bool empty() const {
    return head_.load(std::memory_order_acquire) == tail_.load(std::memory_order_acquire);
  }

 private:
  struct chunk {
    static constexpr std::size_t size = 256;
    alignas(zmq::message_t) std::byte storage[size * sizeof(zmq::message_t)];
    std::atomic<chunk*> next{nullptr};
    void* raw(std::uint64_t slot) { return storage + slot * sizeof(zmq::message_t); }
    zmq::message_t* at(std::uint64_t slot) { return std::launder(static_cast<zmq::message_t*>(raw(slot))); }
  };

  const std::size_t capacity_;
  std::atomic<chunk*> spare_{nullptr};
  // The producer's side, then the consumer's, each on its own cache line.
  alignas(64) std::atomic<std::uint64_t> tail_{0};
  chunk* tail_chunk_;
  std::uint64_t head_cache_ = 0;
  alignas(64) std::atomic<std::uint64_t> head_{0};
  chunk* head_chunk_;
  std::uint64_t tail_cache_ = 0;
};

}  // namespace sidecast::core
