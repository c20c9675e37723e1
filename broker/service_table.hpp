#pragma once
// All of the broker's routing state for work: per service a bounded queue of
// waiting jobs and the workers with free capacity in LRU order; per job its
// deadline and the worker holding it. Pure logic: no sockets, no clock (the
// caller passes `now`), so it is tested table-driven without I/O.
#include <chrono>
#include <cstdint>
#include <list>
#include <map>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "proto/codec.hpp"

namespace sidecast::broker {

using clock = std::chrono::steady_clock;

/// A Request or a CONNECT/DISCONNECT Lifecycle waiting for or held by a worker.
struct job {
  std::string id;           // globally unique; the idempotency key
  std::string service;
  std::string requester;    // routing id of the peer that sent it
  std::string payload;      // the serialized envelope as received
  bool wants_reply = true;
  bool answered = false;    // the worker answered early (partial reply); work goes on
  unsigned attempt = 0;     // dispatches so far
  clock::time_point received{};
  clock::time_point deadline{};
};

/// A job handed to a worker: the caller sends `job.payload` (rewritten when
/// `stale` says the timeout or attempt in it no longer hold) to `worker`.
struct assignment {
  std::string worker;
  const job* work;
};

/// A job that ends without a worker's reply.
struct failure {
  job work;
  proto::Code code;
  std::string worker;  // set when a worker held it (it gets a Cancel)
};

struct table_limits {
  std::size_t queue_limit = 10000;  // waiting jobs per service
  unsigned max_attempts = 3;        // dispatches before worker_lost
};

class service_table {
 public:
  explicit service_table(table_limits limits) : limits_{limits} {}

  enum class admit { queued, busy, duplicate };
  /// Queues a job; `busy` when its service's queue is full, `duplicate` when
  /// a job with the same id is already queued or held.
  admit submit(job work);

  /// Registers (or re-registers) a worker serving `service` with `capacity`
  /// jobs at once.
  void add_worker(const std::string& worker, const std::string& service, unsigned capacity);

  /// Forgets a worker. Jobs it held go back to the front of their queues
  /// (attempts left) or come back as worker_lost failures.
  std::vector<failure> remove_worker(const std::string& worker);

  bool has_worker(const std::string& worker) const { return workers_.contains(worker); }

  /// Hands queued jobs to workers with free capacity (LRU among them) until
  /// either runs out. Pointers in the result stay valid until the next call
  /// that changes the table.
  std::vector<assignment> dispatch();

  /// A worker finished a job: frees its capacity and returns the job if it
  /// was still pending. `held` tells whether the worker held the id at all
  /// (false: the id is not one of its jobs, e.g. a client's ack).
  std::optional<job> complete(const std::string& id, const std::string& worker,
                              bool* held = nullptr);

  /// The worker answered a job early and works on: the job keeps its
  /// capacity but loses its deadline, and is not retried if the worker dies
  /// (its requester has its answer). Returns the job, or nullptr if the
  /// worker does not hold it or answered it already.
  const job* answer_early(const std::string& id, const std::string& worker);

  /// Removes a job whichever state it is in (the requester cancelled).
  /// Returns the worker holding it, if any.
  std::optional<job> cancel(const std::string& id, std::string* worker);

  /// Jobs whose deadline is at or before `now`: unavailable (still queued,
  /// never dispatched) or timeout (held by a worker, or dispatched before).
  std::vector<failure> expire(clock::time_point now);

  std::optional<clock::time_point> next_deadline() const;

  // Figures for metrics and tests.
  std::size_t queued(const std::string& service) const;
  std::size_t in_flight() const { return held_count_; }
  std::size_t waiting() const { return jobs_.size() - held_count_; }
  std::size_t workers(const std::string& service) const;
  std::vector<std::string> services() const;

 private:
  struct job_entry {
    job work;
    std::string worker;  // empty while queued
    std::list<std::string>::iterator queue_pos;
    std::multimap<clock::time_point, std::string>::iterator deadline_pos;
  };
  struct worker_entry {
    std::unordered_map<std::string, unsigned> capacity;  // per service
    std::unordered_map<std::string, unsigned> busy;      // per service
    std::unordered_map<std::string, std::string> held;   // job id -> service
  };
  struct service_entry {
    std::list<std::string> queue;  // waiting job ids, FIFO
    std::list<std::string> ready;  // workers with free capacity, LRU first
    std::size_t worker_count = 0;
  };

  void mark_ready(const std::string& worker, const std::string& service);
  void release(worker_entry& w, const std::string& worker, const std::string& service,
               const std::string& id);
  void forget(std::unordered_map<std::string, job_entry>::iterator it);

  table_limits limits_;
  std::unordered_map<std::string, job_entry> jobs_;
  std::unordered_map<std::string, service_entry> services_;
  std::unordered_map<std::string, worker_entry> workers_;
  std::multimap<clock::time_point, std::string> deadlines_;
  std::size_t held_count_ = 0;
};

}  // namespace sidecast::broker
