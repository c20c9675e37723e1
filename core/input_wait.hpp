#pragma once
// Waiting for input on ZeroMQ sockets and plain descriptors, for a loop that
// drains whatever is ready after each wait (recv with dontwait until EAGAIN
// or until its batch is done).
//
// zmq::poll asks every socket for ZMQ_EVENTS once before it blocks and again
// after. In libzmq, asking a socket whose command mailbox is idle costs two
// system calls (getpid, and a poll of the mailbox's eventfd), so a loop over
// three sockets paid about twenty system calls per turn, most of them for
// sockets with no traffic at all. Here only the sockets that may have input
// the mailbox cannot announce are asked: those that were ready last turn
// (the loop may have stopped short of EAGAIN) and those the loop sent on
// since a receive last found them empty (a send processes commands, and may
// take the one announcing new input, after which the socket's ZMQ_FD stays
// quiet; a receive that finds nothing processes them all first). For every
// other socket, its ZMQ_FD becoming readable is the signal, as libzmq
// documents. A loop that makes its sends before the receive that finds the
// socket empty (the broker, the worker) needs no ask at all.
//
// A local:// connection (core/local_link.hpp) plays by the same rules: its
// descriptor announces input once its receive has found it empty, and the
// ask is its has_input().
#include <chrono>
#include <cstddef>
#include <functional>
#include <vector>

#include <poll.h>

#include <zmq.hpp>

namespace sidecast::core {

class input_wait {
 public:
  /// Adds a socket or a descriptor to wait on; returns its index.
  std::size_t add(zmq::socket_ref socket);
  std::size_t add(int fd);
  /// A source whose descriptor behaves as ZMQ_FD does; `ask` tells whether
  /// input waits, as ZMQ_EVENTS does for a socket.
  std::size_t add(int fd, std::function<bool()> ask);

  /// The loop sent on socket `index` since a receive last found it empty:
  /// ask it before the next block.
  void used(std::size_t index) { items_[index].ask = true; }
  /// A receive from socket `index` found it empty (EAGAIN), after every send
  /// on it so far: its descriptor will announce what comes next.
  void drained(std::size_t index) { items_[index].ask = false; }

  /// Blocks until something may be ready, or for at most `timeout`
  /// (negative: no limit). Throws zmq::error_t as zmq::poll does; EINTR
  /// comes back as a turn with nothing ready.
  void wait(std::chrono::milliseconds timeout);

  /// After wait(): socket `index` may have input (receive until EAGAIN), or
  /// descriptor `index` is readable.
  bool ready(std::size_t index) const { return items_[index].ready; }

  // For a loop that an io_context drives instead (core/input_reactor.hpp):
  // wait() is look(), then the descriptors' readiness given to fired().

  /// Clears every ready flag, then asks the sources that must be asked (see
  /// used()); true when one holds input (it is ready).
  bool look();
  /// Descriptor `index` became readable: ready until the next look().
  void fired(std::size_t index);
  std::size_t size() const { return items_.size(); }
  int fd(std::size_t index) const { return fds_[index].fd; }

 private:
  struct item {
    std::function<bool()> has_input;  // empty for a plain descriptor
    bool ask = true;                  // has_input must be asked before blocking
    bool ready = false;
  };
  std::vector<item> items_;
  std::vector<pollfd> fds_;
};

}  // namespace sidecast::core
