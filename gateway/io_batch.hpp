#pragma once
// Non-blocking socket calls made in batches: many recv / sendmsg calls for
// one io_uring_enter.
//
// Why: on the VMs we measure on, entering the kernel is dear (≈ 1 µs for a
// null system call), and an echo costs its connection one recv and one
// sendmsg. When a batch of connections is ready at once, io_uring makes all
// their calls in one entry: bench/run measured ≈ 2.8 µs less CPU per
// recv + sendmsg pair (docs/performance-log.md).
//
// Nothing here is asynchronous. Every call carries MSG_DONTWAIT, so the
// kernel completes it during the submission (data, or -EAGAIN at once), and
// run() waits for all of them before it returns: a batch behaves exactly
// like the same calls made one after another, and the caller's edge-triggered
// bookkeeping stays as it was.
//
// Without io_uring (an old kernel, a container whose seccomp profile forbids
// it, `--io-uring false`, or a ring that failed) run() makes the same calls
// one by one. One batch belongs to one thread.
#include <sys/socket.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

struct io_uring;

namespace sidecast::gateway {

class io_batch {
 public:
  /// Calls per run(); queue no more than this before running.
  static constexpr std::size_t capacity = 256;

  /// `use_ring`: try io_uring (set up on first use, on the calling thread).
  explicit io_batch(bool use_ring);
  io_batch(const io_batch&) = delete;
  io_batch& operator=(const io_batch&) = delete;
  ~io_batch();

  /// Queues recv(fd, data, size, MSG_DONTWAIT).
  void recv(int fd, void* data, std::size_t size);
  /// Queues sendmsg(fd, msg, flags | MSG_DONTWAIT); `msg` and what it points
  /// to must stay valid until run() returns.
  void sendmsg(int fd, const msghdr* msg, int flags);
  std::size_t size() const { return calls_.size(); }

  /// Makes the queued calls. Element i is what the i-th call returned: a
  /// byte count, or -errno. Valid until the next call queued. It throws
  /// (std::bad_alloc) only before making any call; either way the queue is
  /// empty afterwards.
  std::span<const long> run();
  /// Forgets the queued calls without making them (a caller whose batch
  /// failed before run()).
  void discard() noexcept;

  /// True while calls go through io_uring (false before the first run()).
  bool using_ring() const { return ring_ != nullptr; }
  /// False once it is known that calls will not go through io_uring: worth
  /// gathering them into batches only while this holds.
  bool may_use_ring() const { return want_ring_ && (!tried_ || ring_); }
  /// Why io_uring is not used, when it was wanted and could not be (empty otherwise).
  const std::string& ring_error() const { return ring_error_; }
  /// Batches made through io_uring, and the socket calls in them.
  std::uint64_t ring_batches() const { return ring_batches_; }
  std::uint64_t ring_calls() const { return ring_calls_; }

 private:
  struct call {
    int fd;
    bool send;
    int flags;
    void* data;          // recv
    std::size_t size;    // recv
    const msghdr* msg;   // sendmsg
  };

  bool open_ring();
  void drop_ring(const char* what, int error) noexcept;
  bool run_ring();
  void run_direct();

  std::vector<call> calls_;
  std::vector<long> results_;
  std::vector<bool> done_;
  std::unique_ptr<io_uring> ring_;
  bool want_ring_;
  bool tried_ = false;
  std::string ring_error_;
  std::uint64_t ring_batches_ = 0;
  std::uint64_t ring_calls_ = 0;
};

}  // namespace sidecast::gateway
