#pragma once
// local://NAME: the broker and the gateways and workers that share its
// process (`sidecast demo`) exchange messages through lock-free queues
// instead of libzmq's inproc:// transport.
//
// Why: every message that crosses an inproc:// pipe costs libzmq a handful
// of system calls on the receiving thread (a getpid and a poll of the
// socket's command mailbox each time it looks, an eventfd read when it
// finds a command), about sixteen per hop on the path of one ack, and a
// system call costs ≈ 1 µs on the VMs this runs on. Here a hop costs an
// eventfd write and the receiver's read of it, and only when the receiving
// thread is about to sleep or asleep; a busy receiver takes messages with
// no system call at all.
//
// The semantics are those of a DEALER connected to a ROUTER: the router
// sees each connection under the dealer's id (a second connection with the
// same id replaces the first, as ROUTER_HANDOVER does), both directions are
// bounded queues whose overflow is refused at the sender, and a message to
// an id with no connection is refused as unreachable. Names live in one
// table per process, as inproc:// names live in one per ZeroMQ context.
#include <atomic>
#include <cstddef>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include <zmq.hpp>

#include "core/wakeup.hpp"

namespace sidecast::core {

/// True for "local://NAME" endpoints.
bool is_local_endpoint(std::string_view endpoint);

/// What a consumer driven by an io_context (core/input_reactor.hpp) has a
/// producer call instead of writing its eventfd: it schedules the
/// consumer's next turn. Called on the producer's thread.
using ring_hook = std::shared_ptr<const std::function<void()>>;

/// A wake-up that producers ring only when the consumer asked for one: the
/// consumer arms it, then looks at its queues one last time, then waits on
/// fd() (or, hooked, for its hook to be called). Any number of producers,
/// one consumer. What the last look finds need not be a reason to look
/// again: the consumer may take it and wait (the router takes a departed
/// dealer that way); a ring after the arm still wakes it.
class doorbell {
 public:
  int fd() const { return bell_.fd(); }
  /// Producer, after its message is in the queue.
  void ring();
  /// Consumer, before its last look at the queues.
  void arm();
  /// Consumer: from now on a ring calls `hook` instead of writing fd()
  /// (null: fd() again). Any thread. A consumer that sets it looks at its
  /// queues afterwards: a ring that came before may have gone to fd().
  void hook(ring_hook h);

 private:
  enum : int { armed, rung, hooked };  // rung: fd() was written, or is about to be
  // Counting: each ring's write is read back by exactly one read, so a ring
  // that sets `rung` after the consumer's arm keeps its write (see arm()).
  wakeup bell_{wakeup::mode::counting};
  std::atomic<int> state_{armed};  // a new consumer has not looked yet: the first ring wakes it
  unsigned owed_ = 0;              // consumer only: rings it took `rung` from whose writes it has not read
  // Not std::atomic<std::shared_ptr>: libstdc++ 12's load unlocks with a
  // relaxed order, which ThreadSanitizer rightly reports as a race.
  std::mutex hook_mutex_;
  ring_hook hook_;
};

struct local_hub;
struct local_connection;

/// The broker's side: every local connection made to its name.
class local_router {
 public:
  /// Binds `endpoint` ("local://NAME"); throws std::runtime_error when the
  /// name is taken or the endpoint is not local://.
  explicit local_router(std::string_view endpoint);
  ~local_router();
  local_router(const local_router&) = delete;
  local_router& operator=(const local_router&) = delete;

  /// Readable when a connection may have sent something.
  int fd() const;
  /// For the loop's last look before it waits on fd(): true when a message
  /// (or a new or closed connection) waits.
  bool has_input();
  /// The next message from any connection, taking them in turn, and the
  /// connection's id (valid until the next receive()). False when none is
  /// waiting; fd() will then announce the next one.
  bool receive(std::string_view& peer, zmq::message_t& message);

  enum class send_result { sent, full, unreachable };
  /// Takes `message` only when it returns `sent`.
  send_result send(std::string_view peer, zmq::message_t& message);

  std::size_t connections() const { return connections_.size(); }
  /// See doorbell::hook: for messages and connections from now on.
  void hook(ring_hook h);

 private:
  void adopt();      // connections made since the last look
  void drop_gone();  // connections whose dealer went away, once drained

  std::shared_ptr<local_hub> hub_;
  std::vector<std::shared_ptr<local_connection>> connections_;
  std::size_t cursor_ = 0;
};

/// A gateway's or a worker's side: one connection to a local_router.
class local_dealer {
 public:
  /// Connects to the router bound at `endpoint`; nullptr when none is.
  static std::unique_ptr<local_dealer> connect(std::string_view endpoint, std::string id,
                                               std::size_t send_capacity, std::size_t receive_capacity);
  explicit local_dealer(std::shared_ptr<local_connection> connection);
  ~local_dealer();
  local_dealer(const local_dealer&) = delete;
  local_dealer& operator=(const local_dealer&) = delete;

  int fd() const;
  bool has_input();
  /// False when none is waiting; fd() will then announce the next one.
  bool receive(zmq::message_t& message);
  /// Takes `message` unless the queue is full or the router is gone (false).
  bool send(zmq::message_t& message);
  /// See doorbell::hook: for messages from the router from now on.
  void hook(ring_hook h);

 private:
  std::shared_ptr<local_connection> connection_;
};

}  // namespace sidecast::core
