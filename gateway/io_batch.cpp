#include "gateway/io_batch.hpp"

#include <liburing.h>

#include <cerrno>
#include <cstring>

namespace sidecast::gateway {

namespace {

constexpr int enter_retries = 64;  // io_uring_enter answering EINTR / EAGAIN / EBUSY, in a row

long direct(int fd, bool send, int flags, void* data, std::size_t size, const msghdr* msg) {
  for (;;) {
    auto n = send ? ::sendmsg(fd, msg, flags | MSG_DONTWAIT) : ::recv(fd, data, size, flags | MSG_DONTWAIT);
    if (n >= 0) return n;
    if (errno != EINTR) return -errno;
  }
}

}  // namespace

io_batch::io_batch(bool use_ring) : want_ring_{use_ring} {
  calls_.reserve(capacity);
  results_.reserve(capacity);
  done_.reserve(capacity);
}

io_batch::~io_batch() {
  if (ring_) io_uring_queue_exit(ring_.get());
}

void io_batch::recv(int fd, void* data, std::size_t size) {
  calls_.push_back({.fd = fd, .send = false, .flags = 0, .data = data, .size = size, .msg = nullptr});
}

void io_batch::sendmsg(int fd, const msghdr* msg, int flags) {
  calls_.push_back({.fd = fd, .send = true, .flags = flags, .data = nullptr, .size = 0, .msg = msg});
}

std::span<const long> io_batch::run() {
  // Whatever happens, these calls are not made again by a later run().
  struct clear_calls {
    std::vector<call>& calls;
    ~clear_calls() { calls.clear(); }
  } clear{calls_};
  const auto n = calls_.size();
  // The only steps that may throw (allocation) come before any call is
  // made: past them nothing throws, so a caller never loses the results of
  // calls the kernel made (bytes read, or sent).
  results_.assign(n, 0);
  done_.assign(n, false);
  if (n > 1 && n <= capacity && want_ring_ && !tried_) {
    try {
      open_ring();  // marks the ring tried first, and sets ring_ last
    } catch (const std::exception&) {
      // No ring (no memory for it): the calls are made one by one.
    }
  }
  // One call gains nothing from the ring: it would be one entry either way.
  // More than the ring holds (the callers stop at capacity) are made one
  // by one rather than left without a submission entry.
  if (n > 1 && n <= capacity && ring_) {
    if (!run_ring()) run_direct();
  } else {
    run_direct();
  }
  return results_;
}

void io_batch::discard() noexcept { calls_.clear(); }

bool io_batch::open_ring() {
  tried_ = true;
  auto ring = std::make_unique<io_uring>();
  // Completions are reaped only by this thread, while it waits in run():
  // the kernel need not interrupt it to post them (6.1+). Older kernels
  // refuse the flags; plain rings work the same here, a little dearer.
  io_uring_params params{};
  params.flags = IORING_SETUP_SUBMIT_ALL | IORING_SETUP_COOP_TASKRUN | IORING_SETUP_SINGLE_ISSUER |
                 IORING_SETUP_DEFER_TASKRUN;
  int rc = io_uring_queue_init_params(capacity, ring.get(), &params);
  if (rc == -EINVAL) {
    params = {};
    rc = io_uring_queue_init_params(capacity, ring.get(), &params);
  }
  if (rc < 0) {
    ring_error_ = std::string("io_uring_queue_init: ") + std::strerror(-rc);
    return false;
  }
  // A kernel before 5.6 has rings but not these two operations: each call
  // would fail with EINVAL, and its connection with it.
  io_uring_probe* probe = io_uring_get_probe_ring(ring.get());
  bool supported = probe && io_uring_opcode_supported(probe, IORING_OP_RECV) &&
                   io_uring_opcode_supported(probe, IORING_OP_SENDMSG);
  if (probe) io_uring_free_probe(probe);
  if (!supported) {
    io_uring_queue_exit(ring.get());
    ring_error_ = "this kernel's io_uring has no recv or sendmsg";
    return false;
  }
  ring_ = std::move(ring);
  return true;
}

void io_batch::drop_ring(const char* what, int error) noexcept {
  // Every call carried MSG_DONTWAIT, so none is still in flight.
  io_uring_queue_exit(ring_.get());
  ring_.reset();
  try {
    ring_error_ = std::string(what) + ": " + std::strerror(error);
  } catch (...) {
    ring_error_.clear();  // no memory for the reason; the ring is gone all the same
  }
}

bool io_batch::run_ring() {
  auto* ring = ring_.get();
  const auto n = calls_.size();
  for (std::size_t i = 0; i < n; ++i) {
    const auto& c = calls_[i];
    io_uring_sqe* sqe = io_uring_get_sqe(ring);  // never null: n <= capacity (run()), and each run() empties the ring
    if (c.send)
      io_uring_prep_sendmsg(sqe, c.fd, c.msg, static_cast<unsigned>(c.flags | MSG_DONTWAIT));
    else
      io_uring_prep_recv(sqe, c.fd, c.data, c.size, c.flags | MSG_DONTWAIT);
    io_uring_sqe_set_data64(sqe, i);
  }
  std::size_t got = 0;
  int failures = 0;
  while (got < n) {
    int rc = io_uring_submit_and_wait(ring, static_cast<unsigned>(n - got));
    unsigned head;
    unsigned seen = 0;
    io_uring_cqe* cqe;
    io_uring_for_each_cqe(ring, head, cqe) {
      ++seen;
      auto i = io_uring_cqe_get_data64(cqe);
      if (i >= n || done_[i]) continue;  // not one of ours: cannot happen
      results_[i] = cqe->res;
      done_[i] = true;
      ++got;
    }
    io_uring_cq_advance(ring, seen);
    if (rc >= 0 || seen > 0) {
      failures = 0;
      continue;
    }
    if ((rc == -EINTR || rc == -EAGAIN || rc == -EBUSY) && ++failures < enter_retries) continue;
    // The ring failed. Calls the kernel never took can still be made
    // directly; a call it took and never answered may have happened, so
    // making it again could send bytes twice: it fails instead, and its
    // connection ends.
    const auto untaken = io_uring_sq_ready(ring);
    drop_ring("io_uring_enter", -rc);
    for (std::size_t i = 0; i < n; ++i) {
      if (done_[i] || i >= n - untaken) continue;
      results_[i] = -EIO;
      done_[i] = true;
    }
    return false;
  }
  ++ring_batches_;
  ring_calls_ += n;
  return true;
}

void io_batch::run_direct() {
  for (std::size_t i = 0; i < calls_.size(); ++i) {
    if (done_[i]) continue;
    const auto& c = calls_[i];
    results_[i] = direct(c.fd, c.send, c.flags, c.data, c.size, c.msg);
    done_[i] = true;
  }
}

}  // namespace sidecast::gateway
