#pragma once
// SIGINT/SIGTERM handling for process mains: block the signals in every
// thread (construct this before starting any), and handle them on one
// dedicated thread that calls back with ordinary code, not a signal handler.
#include <functional>
#include <thread>

namespace sidecast::core {

class terminate_signals {
 public:
  terminate_signals();
  ~terminate_signals();
  terminate_signals(const terminate_signals&) = delete;
  terminate_signals& operator=(const terminate_signals&) = delete;

  /// Starts the waiting thread; `on_signal` runs on it for every signal
  /// (a second one may mean "now": see sidecast-worker's drain).
  void start(std::function<void(int)> on_signal);
  /// Ends the waiting thread, waiting for an `on_signal` under way. Call it
  /// before destroying what `on_signal` uses (the destructor does too).
  void stop();

  /// Calls stop() when it leaves scope, however the scope is left: declare
  /// one after what `on_signal` uses, so the thread ends before those go.
  struct stop_on_exit {
    terminate_signals& signals;
    ~stop_on_exit() { signals.stop(); }
  };
  /// Blocks the calling thread until SIGINT or SIGTERM; returns the signal.
  /// For mains whose work runs on other threads.
  int wait();
  /// From any thread: SIGTERM to this process, so wait() (or the thread of
  /// start()) returns as on a real one; for a part that failed for good.
  static void interrupt();

 private:
  std::thread thread_;
};

}  // namespace sidecast::core
