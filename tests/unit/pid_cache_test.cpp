// core/pid_cache.cpp: the executables' getpid() answers from a cache that is
// right in the process and in a forked child, and it is the getpid() that
// libzmq's calls bind to.
#include <dlfcn.h>
#include <gtest/gtest.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <zmq.hpp>

namespace {

pid_t kernel_pid() { return static_cast<pid_t>(::syscall(SYS_getpid)); }

TEST(PidCache, AnswersTheProcessId) {
  EXPECT_EQ(::getpid(), kernel_pid());
  EXPECT_EQ(::getpid(), kernel_pid());  // from the cache, the same
}

TEST(PidCache, AForkedChildGetsItsOwnId) {
  const pid_t parent = ::getpid();
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    // The child's answer: its own id, not the cached parent's.
    const pid_t mine = ::getpid();
    ::_exit(mine == kernel_pid() && mine != parent ? 0 : 1);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0) << "the child got its parent's id";
  EXPECT_EQ(::getpid(), parent);
}

TEST(PidCache, AVforkChildOfAForkedChildLeavesItsParentsAnswerAlone) {
  // A vfork() child shares its parent's memory: were the cache empty in the
  // parent (a fork() child before its first answer), the vfork child's
  // getpid() must not fill it with its own id.
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    const pid_t grandchild = ::vfork();
    if (grandchild == 0) {
      (void)::getpid();
      ::_exit(0);
    }
    int status = 0;
    ::waitpid(grandchild, &status, 0);
    ::_exit(::getpid() == kernel_pid() ? 0 : 1);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0) << "the vfork child's id replaced its parent's";
}

TEST(PidCache, LibzmqIsBoundToIt) {
  // libzmq's calls bind as a lookup from the global scope does: to the
  // executable's definition, if the executable exports one.
  zmq::context_t context;  // libzmq is loaded and in use
  zmq::socket_t socket{context, zmq::socket_type::pair};
  socket.bind("inproc://pid-cache");
  void* bound = ::dlsym(RTLD_DEFAULT, "getpid");
  EXPECT_EQ(bound, reinterpret_cast<void*>(&::getpid));
  void* libc = ::dlsym(RTLD_NEXT, "getpid");
  EXPECT_NE(bound, libc) << "getpid() is libc's: the executable does not export its own";
}

}  // namespace
