#include "core/signals.hpp"

#include <pthread.h>
#include <signal.h>
#include <unistd.h>

namespace sidecast::core {
namespace {

sigset_t terminate_set() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGUSR1);  // used only to release the waiting thread
  return set;
}

}  // namespace

terminate_signals::terminate_signals() {
  auto set = terminate_set();
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  signal(SIGPIPE, SIG_IGN);
}

terminate_signals::~terminate_signals() { stop(); }

void terminate_signals::stop() {
  if (thread_.joinable()) {
    pthread_kill(thread_.native_handle(), SIGUSR1);
    thread_.join();
  }
}

int terminate_signals::wait() {
  auto set = terminate_set();
  sigdelset(&set, SIGUSR1);
  int sig = 0;
  while (sigwait(&set, &sig) != 0) {
  }
  return sig;
}

void terminate_signals::interrupt() { ::kill(::getpid(), SIGTERM); }

void terminate_signals::start(std::function<void(int)> on_signal) {
  thread_ = std::thread([on_signal = std::move(on_signal)] {
    auto set = terminate_set();
    int sig = 0;
    for (;;) {
      if (sigwait(&set, &sig) != 0) continue;
      if (sig == SIGUSR1) return;  // stop()
      on_signal(sig);
    }
  });
}

}  // namespace sidecast::core
