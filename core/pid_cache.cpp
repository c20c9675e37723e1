// getpid() for the servers' executables, answered from a cached value.
//
// libzmq asks getpid() on every mailbox signal and every mailbox wait, to
// notice that it runs in a forked child (signaler.cpp, HAVE_FORK): a send
// that wakes a peer thread, a recv that finds nothing, each ZMQ_EVENTS.
// Since glibc 2.25 getpid() is a system call every time. On the hosts this
// project is measured on (paravirtualised VMs) one costs ≈ 0.95 µs, and the
// split topology made ≈ 1.8 of them per echo: ≈ 30% of its system calls
// (docs/performance.md, "getpid").
//
// The executables define getpid() themselves, which the dynamic linker
// binds libzmq's calls to (an executable's definitions come first). The pid
// is read with the system call once, and read again in the child of every
// fork(): pthread_atfork's child handler forgets it, as glibc's own cache
// did up to 2.24. glibc's internal calls (raise, ...) do not come here.
//
// Only executables link this, never a library: a cached pid is right only
// for a program that makes processes with fork() alone, or with posix_spawn
// and vfork, whose child calls exec before anything asks. Nothing in
// Sidecast's servers uses clone() or joins a new pid namespace.
#include <pthread.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <unistd.h>

#include <atomic>

namespace {

std::atomic<pid_t> cached_pid{0};

void forget_pid() noexcept { cached_pid.store(0, std::memory_order_relaxed); }

// Registered before main: a fork() made later, from any thread, runs it.
const int forget_in_children = ::pthread_atfork(nullptr, nullptr, forget_pid);

}  // namespace

extern "C" pid_t getpid() noexcept {
  pid_t pid = cached_pid.load(std::memory_order_relaxed);
  if (pid != 0) return pid;
  // Several threads may get here at once: each stores the same value.
  pid = static_cast<pid_t>(::syscall(SYS_getpid));
  cached_pid.store(pid, std::memory_order_relaxed);
  return pid;
}
