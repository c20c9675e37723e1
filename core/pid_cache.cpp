// getpid() for the servers' executables, answered from a cached value.
//
// libzmq asks getpid() on every mailbox signal and every mailbox wait, to
// notice that it runs in a forked child (signaler.cpp, HAVE_FORK): a send
// that wakes a peer thread, a recv that finds nothing, each ZMQ_EVENTS.
// Since glibc 2.25 getpid() is a system call every time. On the hosts this
// project is measured on (paravirtualised VMs) one costs ≈ 0.95 µs, and the
// split topology made ≈ 1.8 of them per echo: ≈ 30% of its system calls
// (docs/performance-log.md, "getpid").
//
// The executables define getpid() themselves, which the dynamic linker
// binds libzmq's calls to (an executable's definitions come first). The pid
// is read with the system call during static initialisation, and read again
// in the child of every fork() by a pthread_atfork child handler (glibc's own
// cache, up to 2.24, was reset inside fork() itself). If the handler cannot
// be registered, nothing is cached.
//
// Only executables link this, never a library: a cached pid is right only
// for a program that makes processes with fork(), or with posix_spawn, whose
// child uses glibc's internal getpid. A vfork() child that asked would get
// its parent's pid; it never writes the cache (the value is stored only
// during initialisation and by the fork handler, in the child's own memory),
// so the parent's answer stays right. Nothing in Sidecast's servers uses
// vfork(), clone() or a new pid namespace.
#include <pthread.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <unistd.h>

#include <atomic>

namespace {

pid_t kernel_pid() noexcept { return static_cast<pid_t>(::syscall(SYS_getpid)); }

// 0 until initialisation, and for good if the fork handler is missing:
// getpid() asks the kernel then.
std::atomic<pid_t> cached_pid{0};

void read_pid() noexcept { cached_pid.store(kernel_pid(), std::memory_order_relaxed); }

// Before main: a fork() made later, from any thread, runs the handler.
const bool caching = [] {
  if (::pthread_atfork(nullptr, nullptr, read_pid) != 0) return false;
  read_pid();
  return true;
}();

}  // namespace

extern "C" pid_t getpid() noexcept {
  pid_t pid = cached_pid.load(std::memory_order_relaxed);
  return pid != 0 ? pid : kernel_pid();
}
