#pragma once
// An eventfd that one thread waits on (next to its sockets, core/input_wait) and
// any thread signals. Signals coalesce: one wake-up may cover many.
namespace sidecast::core {

class wakeup {
 public:
  /// coalescing: one drain() takes every signal so far. counting: one
  /// drain() takes one signal; fd() stays readable while any is left.
  enum class mode { coalescing, counting };
  explicit wakeup(mode m = mode::coalescing);
  ~wakeup();
  wakeup(const wakeup&) = delete;
  wakeup& operator=(const wakeup&) = delete;

  int fd() const { return fd_; }
  /// Thread-safe, never blocks.
  void signal();
  /// Called by the polling thread when fd() is readable; false when
  /// nothing had been signalled.
  bool drain();

 private:
  int fd_;
};

}  // namespace sidecast::core
