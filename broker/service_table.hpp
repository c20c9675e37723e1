#pragma once
// All of the broker's routing state for work: per service a bounded queue of
// waiting jobs and the workers with free capacity in LRU order; per job its
// deadline and the worker holding it. Pure logic: no sockets, no clock (the
// caller passes `now`), so it is tested table-driven without I/O.
//
// Built for the hot path (a submit, a dispatch and a completion per request):
// jobs live in reused slots, queues are lists threaded through the slots,
// deadlines an indexed heap over them, and names are looked up in flat hash
// maps, so a request costs no allocation once the table has warmed up.
#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <boost/unordered/unordered_flat_map.hpp>

#include <zmq.hpp>

#include "core/string_hash.hpp"
#include "proto/codec.hpp"

namespace sidecast::broker {

using clock = std::chrono::steady_clock;

/// A Request or a CONNECT/DISCONNECT Lifecycle waiting for or held by a worker.
struct job {
  std::string id;           // globally unique; the idempotency key
  std::string service;
  std::string requester;    // routing id of the peer that sent it
  zmq::message_t payload;   // the serialized envelope as received (sent as refcounted copies)
  bool wants_reply = true;
  bool stale = false;       // the envelope's attempt or timeout_ms is not what the broker enforces
  bool answered = false;    // the worker answered early (partial reply); work goes on
  bool connect = false;     // a Lifecycle CONNECT: its envelope outlives its end (see late_connect)
  bool owed = false;        // the broker's DISCONNECT for a late accept: only for the worker that accepted
  unsigned attempt = 0;     // dispatches so far (--max-attempts bounds them)
  unsigned resent = 0;      // sent again to the same worker on its new socket (see resend_held); the
                            // envelope's attempt is attempt + resent
  clock::time_point received{};
  clock::time_point deadline{};
};

/// A job handed to a worker: the caller sends `work->payload` (rewritten when
/// the timeout or attempt in it no longer hold) to `worker`. Both views stay
/// valid until the next call that changes the table.
struct assignment {
  std::string_view worker;
  job* work;
};

/// A registered worker as the table sees it (for the broker's /status).
struct worker_view {
  struct load {
    std::string service;
    unsigned capacity = 0;
    unsigned busy = 0;  // jobs it holds of the service, ended ones whose answer it owes included
  };
  std::string name;
  bool draining = false;
  std::vector<load> serves;
};

/// A job that ends without a worker's reply.
struct failure {
  job work;
  proto::Code code;
  std::string worker;  // set when a worker held it (it gets a Cancel)
};

struct table_limits {
  std::size_t queue_limit = 10000;  // waiting jobs per service
  std::size_t queue_bytes = 256 << 20;  // bytes of the waiting jobs of every service together
  unsigned max_attempts = 3;        // dispatches before worker_lost
  std::size_t max_services = 1024;  // services known at once (see prune())
  // Jobs one worker may hold of one service: a larger announced capacity
  // is taken as this. Each job it holds keeps its request (and one that
  // ended keeps its slot until the worker answers), so a worker that
  // announced millions and never answered held that many.
  unsigned max_capacity = 10000;
};

class service_table {
 public:
  explicit service_table(table_limits limits) : limits_{limits} {}

  enum class admit { queued, busy, duplicate, id_in_use, no_service };
  /// Queues a job; `busy` when its service's queue is full (or the waiting
  /// jobs of all services hold queue_bytes), `duplicate` when
  /// a job with the same id is queued or held, `id_in_use` when one of that
  /// id ended (expired or was cancelled: it was answered) while its worker
  /// still works on it, `no_service` when it
  /// names a service the table does not know and max_services are known.
  /// (`id_in_use` sets work.service to that job's service.)
  admit submit(job&& work);  // moves from `work` only when queued

  /// A service forgotten to make room for a worker's (see add_worker).
  struct eviction {
    std::string name;             // empty: none
    std::vector<failure> failed;  // its waiting jobs, ended UNAVAILABLE
  };

  /// Registers (or re-registers) a worker serving `service` with `capacity`
  /// jobs at once. When the service is new and max_services are known, a
  /// known one that no worker serves now gives way (one with no job waiting
  /// if there is one; else the one with fewest), told in `evicted`: names
  /// that requests made up, or that lost their workers, never keep a
  /// worker's service out. False (nothing registered) only when a worker
  /// serves every known service.
  bool add_worker(const std::string& worker, const std::string& service, unsigned capacity,
                  eviction* evicted = nullptr);

  /// The worker is stopping: it gets no new job from now on (of any of its
  /// services, and of services it announces later), and does not count in
  /// workers(). What it holds stays its own: answered, expired, or
  /// re-queued by remove_worker as before. False for an unknown worker.
  bool drain_worker(const std::string& worker);
  bool draining(const std::string& worker) const;

  /// Forgets the services no worker has ever served that have no job left
  /// (names requests made up, or asked for before their workers came), so
  /// that such names cannot fill the table; returns their names. A service
  /// that had a worker is kept at 0 workers (its metrics stay, at 0) until
  /// a worker's new service needs its place.
  std::vector<std::string> prune();

  /// Forgets a worker. Jobs it held go back to the front of their queues
  /// (attempts left) or come back as worker_lost failures; so do those
  /// answered early and the broker's owed DISCONNECTs, with wants_reply
  /// false (nobody awaits a reply: they are only counted).
  std::vector<failure> remove_worker(const std::string& worker);

  /// The jobs `worker` holds and has not answered, oldest first, each
  /// counted as sent again (resent + 1, not a dispatch: the attempts left
  /// for a retry elsewhere stay as they were): a worker back on a new
  /// socket may have lost them on the old one, and gets them again. It
  /// keeps them (and their capacity); it runs none twice (the SDKs know
  /// the ids they hold or answered, see docs/protocol.md). Valid until the
  /// next call that changes the table.
  std::vector<job*> resend_held(const std::string& worker);
  /// The ids of the jobs `worker` holds whose final answer is owed but which
  /// resend_held does not send again: answered early, or ended (expired,
  /// cancelled) while it held them. Their final answer may have died in a
  /// socket the worker replaced; the worker is asked for it again (Recall,
  /// docs/protocol.md "Answers owed"), else their capacity is never given
  /// back. Oldest first.
  std::vector<std::string> owed_answers(const std::string& worker) const;

  bool has_worker(const std::string& worker) const { return worker_ids_.contains(worker); }
  bool knows(std::string_view service) const { return service_ids_.contains(service); }

  /// Hands queued jobs to workers with free capacity (LRU among them) until
  /// either runs out.
  const std::vector<assignment>& dispatch();
  /// Whether dispatch() may hand anything out: a job was queued, or a
  /// worker gained free capacity, since the last dispatch(). Lets a caller
  /// dispatch after every message without scanning the services for none.
  bool dispatch_due() const { return dispatch_due_; }

  /// A worker finished a job: frees its capacity and returns the job if it
  /// was still pending. `held` tells whether the worker held the id at all
  /// (false: the id is not one of its jobs, e.g. a client's ack).
  std::optional<job> complete(std::string_view id, std::string_view worker, bool* held = nullptr);

  /// The worker answered a job early and works on: the job keeps its
  /// capacity but loses its deadline, and is not retried if the worker dies
  /// (its requester has its answer). Returns the job, or nullptr if the
  /// worker does not hold it or answered it already.
  const job* answer_early(std::string_view id, std::string_view worker);

  /// A CONNECT that ended (expired, cancelled) while `worker` held it, and
  /// that the worker has not answered: its envelope as received, else
  /// nullptr. A hook that accepts it late holds a socket the client never
  /// got, and is owed a DISCONNECT (see hand_over).
  const zmq::message_t* late_connect(std::string_view id, std::string_view worker) const;
  /// Replaces that ended CONNECT with `next` (its DISCONNECT), held by the
  /// same worker in the capacity the CONNECT took, until it is answered,
  /// expires or the worker is lost. If the worker is lost, `next` goes to
  /// another worker of the service, as any job, unless it is `owed` (the
  /// state it would undo went with its worker): then it is dropped. False
  /// when there is no such CONNECT, or `next`'s id is taken.
  bool hand_over(std::string_view id, std::string_view worker, job&& next);
  /// How many ended CONNECTs wait for their workers' answers: while none
  /// does, a reply need not be looked up for late_connect.
  std::size_t ended_connects() const { return ended_connects_; }

  /// Removes a job whichever state it is in (the requester cancelled).
  /// Returns the worker holding it, if any.
  std::optional<job> cancel(std::string_view id, std::string* worker);

  /// The requester of the job with this id, queued or held (or ended while
  /// its worker still works on it); empty when there is none. Only the
  /// requester may cancel a job, only its holder may answer it.
  std::string_view requester_of(std::string_view id) const;

  /// Jobs whose deadline is at or before `now`: unavailable (still queued,
  /// never dispatched) or timeout (held by a worker, or dispatched before).
  std::vector<failure> expire(clock::time_point now);

  std::optional<clock::time_point> next_deadline() const;

  // Figures for metrics and tests.
  std::size_t queued(const std::string& service) const;
  std::size_t in_flight() const { return held_count_; }
  /// What workers hold: in_flight() and the jobs that ended while held,
  /// whose answers their workers still owe (each takes a slot of capacity).
  std::size_t held_slots() const { return held_count_ + orphaned_count_; }
  std::size_t waiting() const;
  /// Bytes of the waiting jobs' envelopes, every service's (limits queue_bytes).
  std::size_t waiting_bytes() const { return waiting_bytes_; }
  /// Workers that take its jobs (draining ones do not).
  std::size_t workers(const std::string& service) const;
  std::size_t draining_workers(const std::string& service) const;
  /// Jobs `worker` holds, ended ones whose answer it still owes included.
  std::size_t held_by(const std::string& worker) const;
  std::vector<std::string> services() const;
  /// Every registered worker, by name.
  std::vector<worker_view> worker_views() const;

 private:
  static constexpr std::uint32_t none = UINT32_MAX;

  // A job's slot. `orphaned`: the job ended (expired, cancelled) while a
  // worker held it; the slot keeps the worker's capacity taken until it
  // answers or dies, so a worker that ignores Cancel gets no more than it
  // can run.
  enum class slot_state : std::uint8_t { free, queued, held, orphaned };
  struct slot {
    job work;
    slot_state state = slot_state::free;
    std::uint32_t service = none;
    std::uint32_t worker = none;
    std::uint32_t prev = none, next = none;  // queue links (queued)
    std::uint32_t heap_pos = none;           // in deadlines_, or none
    std::uint64_t seq = 0;                   // arrival order
    std::size_t queued_bytes = 0;            // counted in waiting_bytes_ while queued
  };
  struct service_entry {
    std::string name;
    std::uint32_t head = none, tail = none;  // waiting jobs, FIFO
    std::size_t waiting = 0;
    std::deque<std::uint32_t> ready;         // workers with free capacity, LRU first
    std::size_t worker_count = 0;           // registered, draining ones included
    std::size_t draining = 0;               // of those, draining
    bool served = false;                     // a worker has served it
    bool live = true;                        // false: pruned, its index free for reuse
  };
  struct serving {
    std::uint32_t service;
    unsigned capacity;
    unsigned busy;
  };
  struct worker_entry {
    std::string name;  // empty: a free entry
    std::vector<serving> serves;
    bool draining = false;  // never in a ready deque
    serving* find(std::uint32_t service);
  };

  std::uint32_t service_index(const std::string& name);
  // Frees the index of a live service no worker serves (its waiting jobs
  // end UNAVAILABLE, into `evicted`); false when a worker serves them all.
  bool make_room(eviction& evicted);
  void forget_service(std::uint32_t index);
  std::uint32_t new_slot();
  job take_slot(std::uint32_t s);  // frees the slot, returns its job
  job orphan(std::uint32_t s);     // the job ended, the worker still holds it
  void push_back(service_entry& svc, std::uint32_t s);
  void push_front(service_entry& svc, std::uint32_t s);
  void unlink(std::uint32_t s);
  void count_waiting(slot& e);
  void release(std::uint32_t worker, std::uint32_t service);
  std::uint32_t find(std::string_view id) const;
  // The slot of the ended CONNECT `id` that `worker` held, or none.
  std::uint32_t ended_connect(std::string_view id, std::string_view worker) const;

  // The deadline heap: slot indices ordered by work.deadline.
  void heap_push(std::uint32_t s);
  void heap_erase(std::uint32_t s);
  void heap_sift_up(std::size_t pos);
  void heap_sift_down(std::size_t pos);
  bool heap_less(std::size_t a, std::size_t b) const;
  void heap_place(std::size_t pos, std::uint32_t s);

  table_limits limits_;
  std::vector<slot> slots_;
  std::vector<std::uint32_t> free_slots_;
  // Looked up by string_view: no key copies on the hot path.
  using name_map = boost::unordered_flat_map<std::string, std::uint32_t, core::string_hash, std::equal_to<>>;
  name_map ids_;  // job id -> slot
  std::vector<service_entry> services_;
  name_map service_ids_;                    // the live services' indices
  std::vector<std::uint32_t> free_services_;  // indices of pruned services
  std::vector<worker_entry> workers_;
  std::vector<std::uint32_t> free_workers_;
  name_map worker_ids_;
  std::vector<std::uint32_t> deadlines_;
  std::vector<assignment> assigned_;
  std::size_t held_count_ = 0;
  std::size_t orphaned_count_ = 0;  // slots in state orphaned
  std::size_t ended_connects_ = 0;
  std::uint64_t submitted_ = 0;
  std::size_t waiting_bytes_ = 0;
  bool dispatch_due_ = false;
};

}  // namespace sidecast::broker
