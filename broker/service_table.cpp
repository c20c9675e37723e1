#include "broker/service_table.hpp"

#include <algorithm>
#include <utility>

namespace sidecast::broker {

// Invariants: a worker is in a service's `ready` deque exactly when it is
// not draining and its busy count for that service is below its capacity. A slot stays taken while
// its job is queued, held, or orphaned (ended while a worker held it), so
// capacity is only given back when the worker really is free; its id stays
// in `ids_` as long.

service_table::serving* service_table::worker_entry::find(std::uint32_t service) {
  for (auto& s : serves)
    if (s.service == service) return &s;
  return nullptr;
}

std::uint32_t service_table::service_index(const std::string& name) {
  if (auto it = service_ids_.find(name); it != service_ids_.end()) return it->second;
  if (service_ids_.size() >= limits_.max_services) return none;
  std::uint32_t index;
  if (free_services_.empty()) {
    index = static_cast<std::uint32_t>(services_.size());
    services_.push_back(service_entry{.name = name});
  } else {
    index = free_services_.back();
    free_services_.pop_back();
    services_[index] = service_entry{.name = name};
  }
  service_ids_.emplace(name, index);
  return index;
}

void service_table::forget_service(std::uint32_t si) {
  auto& svc = services_[si];
  service_ids_.erase(svc.name);
  svc = service_entry{.live = false};
  free_services_.push_back(si);
}

std::vector<std::string> service_table::prune() {
  std::vector<std::string> gone;
  for (std::uint32_t si = 0; si < services_.size(); ++si) {
    auto& svc = services_[si];
    // Never served: no worker holds or held a job of it, so no slot or
    // worker refers to the index once its queue is empty.
    if (!svc.live || svc.served || svc.waiting > 0) continue;
    gone.push_back(svc.name);
    forget_service(si);
  }
  return gone;
}

bool service_table::make_room(eviction& evicted) {
  // No worker serves it: remove_worker has requeued or ended every job a
  // worker held of it, so only its queue refers to its index.
  std::uint32_t pick = none;
  for (std::uint32_t si = 0; si < services_.size(); ++si) {
    const auto& svc = services_[si];
    if (!svc.live || svc.worker_count > 0) continue;
    if (pick == none || svc.waiting < services_[pick].waiting) pick = si;
    if (svc.waiting == 0) break;
  }
  if (pick == none) return false;
  auto& svc = services_[pick];
  while (svc.head != none) {
    auto s = svc.head;
    unlink(s);
    evicted.failed.push_back({take_slot(s), proto::UNAVAILABLE, {}});
  }
  evicted.name = svc.name;
  forget_service(pick);
  return true;
}

std::uint32_t service_table::find(std::string_view id) const {
  auto it = ids_.find(id);
  return it == ids_.end() ? none : it->second;
}

std::uint32_t service_table::new_slot() {
  if (!free_slots_.empty()) {
    auto s = free_slots_.back();
    free_slots_.pop_back();
    return s;
  }
  slots_.emplace_back();
  return static_cast<std::uint32_t>(slots_.size() - 1);
}

job service_table::take_slot(std::uint32_t s) {
  auto& e = slots_[s];
  if (e.state == slot_state::orphaned) {
    --orphaned_count_;
    if (e.work.connect) --ended_connects_;
  }
  if (e.heap_pos != none) heap_erase(s);
  ids_.erase(e.work.id);
  job work = std::move(e.work);
  e.work = job{};
  e.state = slot_state::free;
  e.worker = none;
  free_slots_.push_back(s);
  return work;
}

job service_table::orphan(std::uint32_t s) {
  auto& e = slots_[s];
  e.state = slot_state::orphaned;
  ++orphaned_count_;
  job work = std::move(e.work);
  e.work = job{};
  e.work.id = work.id;  // the slot keeps the id until the worker answers
  if (work.connect) {   // and a CONNECT's envelope (late_connect); shared, not copied
    e.work.connect = true;
    e.work.payload.copy(work.payload);
    ++ended_connects_;
  }
  return work;
}

// ---- the queues: doubly linked through the slots ----

void service_table::push_back(service_entry& svc, std::uint32_t s) {
  auto& e = slots_[s];
  e.prev = svc.tail;
  e.next = none;
  (svc.tail == none ? svc.head : slots_[svc.tail].next) = s;
  svc.tail = s;
  ++svc.waiting;
  count_waiting(e);
  e.state = slot_state::queued;
  dispatch_due_ = true;
}

void service_table::push_front(service_entry& svc, std::uint32_t s) {
  auto& e = slots_[s];
  e.prev = none;
  e.next = svc.head;
  (svc.head == none ? svc.tail : slots_[svc.head].prev) = s;
  svc.head = s;
  ++svc.waiting;
  count_waiting(e);
  e.state = slot_state::queued;
  dispatch_due_ = true;
}

void service_table::unlink(std::uint32_t s) {
  auto& e = slots_[s];
  auto& svc = services_[e.service];
  (e.prev == none ? svc.head : slots_[e.prev].next) = e.next;
  (e.next == none ? svc.tail : slots_[e.next].prev) = e.prev;
  e.prev = e.next = none;
  --svc.waiting;
  waiting_bytes_ -= e.queued_bytes;
  e.queued_bytes = 0;
}

void service_table::count_waiting(slot& e) {
  e.queued_bytes = e.work.payload.size();
  waiting_bytes_ += e.queued_bytes;
}

// ---- the deadline heap: a binary min-heap of slots that know their place ----

bool service_table::heap_less(std::size_t a, std::size_t b) const {
  return slots_[deadlines_[a]].work.deadline < slots_[deadlines_[b]].work.deadline;
}

void service_table::heap_place(std::size_t pos, std::uint32_t s) {
  deadlines_[pos] = s;
  slots_[s].heap_pos = static_cast<std::uint32_t>(pos);
}

void service_table::heap_sift_up(std::size_t pos) {
  while (pos > 0) {
    auto parent = (pos - 1) / 2;
    if (!heap_less(pos, parent)) break;
    auto child = deadlines_[pos];
    heap_place(pos, deadlines_[parent]);
    heap_place(parent, child);
    pos = parent;
  }
}

void service_table::heap_sift_down(std::size_t pos) {
  for (;;) {
    auto smallest = pos, left = 2 * pos + 1, right = left + 1;
    if (left < deadlines_.size() && heap_less(left, smallest)) smallest = left;
    if (right < deadlines_.size() && heap_less(right, smallest)) smallest = right;
    if (smallest == pos) return;
    auto here = deadlines_[pos];
    heap_place(pos, deadlines_[smallest]);
    heap_place(smallest, here);
    pos = smallest;
  }
}

void service_table::heap_push(std::uint32_t s) {
  deadlines_.push_back(s);
  heap_place(deadlines_.size() - 1, s);
  heap_sift_up(deadlines_.size() - 1);
}

void service_table::heap_erase(std::uint32_t s) {
  std::size_t pos = slots_[s].heap_pos;
  slots_[s].heap_pos = none;
  auto last = deadlines_.back();
  deadlines_.pop_back();
  if (pos == deadlines_.size()) return;  // it was the last one
  heap_place(pos, last);
  heap_sift_up(pos);
  heap_sift_down(slots_[last].heap_pos);
}

// ---- the operations ----

service_table::admit service_table::submit(job&& work) {
  if (auto it = ids_.find(work.id); it != ids_.end()) {
    const auto& e = slots_[it->second];
    if (e.state != slot_state::orphaned) return admit::duplicate;
    // Counted under the service of the job that holds the id, not a name
    // the retry says (which could make a metric series of anything).
    work.service = services_[e.service].name;
    return admit::id_in_use;
  }
  auto service = service_index(work.service);
  if (service == none) return admit::no_service;
  auto& svc = services_[service];
  // The bytes bound holds back only a service that has jobs waiting
  // already: one saturated service's backlog does not make every other
  // (whose job would go to a worker now) busy. Past it by at most one job
  // per service.
  if (svc.waiting >= limits_.queue_limit ||
      (svc.waiting > 0 && waiting_bytes_ + work.payload.size() > limits_.queue_bytes))
    return admit::busy;
  auto s = new_slot();
  ids_.emplace(work.id, s);
  auto& e = slots_[s];
  e.work = std::move(work);
  e.service = service;
  e.seq = ++submitted_;
  push_back(svc, s);
  heap_push(s);
  return admit::queued;
}

bool service_table::add_worker(const std::string& worker, const std::string& service, unsigned capacity,
                               eviction* evicted) {
  capacity = std::clamp(capacity, 1u, std::max(limits_.max_capacity, 1u));
  auto si = service_index(service);
  if (si == none) {
    eviction room;
    if (!make_room(room)) return false;
    si = service_index(service);
    if (evicted) *evicted = std::move(room);
  }
  auto [wit, inserted] = worker_ids_.try_emplace(worker, none);
  if (inserted) {
    if (free_workers_.empty()) {
      wit->second = static_cast<std::uint32_t>(workers_.size());
      workers_.emplace_back();
    } else {
      wit->second = free_workers_.back();
      free_workers_.pop_back();
    }
    workers_[wit->second].name = worker;
  }
  auto w = wit->second;
  auto& svc = services_[si];
  svc.served = true;
  auto* serves = workers_[w].find(si);
  bool was_ready = serves && serves->busy < serves->capacity;
  bool draining = workers_[w].draining;
  if (!serves) {
    ++svc.worker_count;
    if (draining) ++svc.draining;
    serves = &workers_[w].serves.emplace_back(serving{si, capacity, 0});
  }
  was_ready = was_ready && !draining;
  serves->capacity = capacity;
  bool now_ready = serves->busy < capacity && !draining;
  if (now_ready && !was_ready) {
    svc.ready.push_back(w);
    dispatch_due_ = true;
  }
  if (was_ready && !now_ready) std::erase(svc.ready, w);
  return true;
}

bool service_table::drain_worker(const std::string& worker) {
  auto wit = worker_ids_.find(worker);
  if (wit == worker_ids_.end()) return false;
  auto& entry = workers_[wit->second];
  if (entry.draining) return true;
  entry.draining = true;
  for (const auto& serves : entry.serves) {
    auto& svc = services_[serves.service];
    std::erase(svc.ready, wit->second);
    ++svc.draining;
  }
  return true;
}

bool service_table::draining(const std::string& worker) const {
  auto wit = worker_ids_.find(worker);
  return wit != worker_ids_.end() && workers_[wit->second].draining;
}

std::size_t service_table::held_by(const std::string& worker) const {
  auto wit = worker_ids_.find(worker);
  if (wit == worker_ids_.end()) return 0;
  return static_cast<std::size_t>(std::count_if(slots_.begin(), slots_.end(), [w = wit->second](const slot& e) {
    return e.worker == w && (e.state == slot_state::held || e.state == slot_state::orphaned);
  }));
}

std::vector<failure> service_table::remove_worker(const std::string& worker) {
  std::vector<failure> failed;
  auto wit = worker_ids_.find(worker);
  if (wit == worker_ids_.end()) return failed;
  auto w = wit->second;
  worker_ids_.erase(wit);
  for (const auto& serves : workers_[w].serves) {
    auto& svc = services_[serves.service];
    std::erase(svc.ready, w);
    --svc.worker_count;
    if (workers_[w].draining) --svc.draining;
  }
  workers_[w] = worker_entry{};
  free_workers_.push_back(w);

  std::vector<std::uint32_t> held;
  for (std::uint32_t s = 0; s < slots_.size(); ++s) {
    auto& e = slots_[s];
    if (e.worker != w) continue;
    if (e.state == slot_state::orphaned) {
      take_slot(s);
      continue;
    }
    --held_count_;
    e.worker = none;
    if (e.work.answered || e.work.owed) {
      // Answered: its requester has its answer, nothing to retry or report.
      // Owed: the state it would undo went with its worker. Either still
      // ends (worker_lost in the metrics, as every dispatch has one end),
      // with no reply to send.
      auto work = take_slot(s);
      work.wants_reply = false;
      failed.push_back({std::move(work), proto::WORKER_LOST, {}});
    } else if (e.work.attempt >= limits_.max_attempts) {
      failed.push_back({take_slot(s), proto::WORKER_LOST, {}});
    } else {
      held.push_back(s);
    }
  }
  // Back to the front of their queues, the oldest first.
  std::sort(held.begin(), held.end(), [&](std::uint32_t a, std::uint32_t b) { return slots_[a].seq > slots_[b].seq; });
  for (auto s : held) push_front(services_[slots_[s].service], s);
  return failed;
}

std::vector<job*> service_table::resend_held(const std::string& worker) {
  std::vector<job*> again;
  auto wit = worker_ids_.find(worker);
  if (wit == worker_ids_.end()) return again;
  std::vector<std::uint32_t> held;
  for (std::uint32_t s = 0; s < slots_.size(); ++s) {
    const auto& e = slots_[s];
    if (e.worker == wit->second && e.state == slot_state::held && !e.work.answered) held.push_back(s);
  }
  std::sort(held.begin(), held.end(), [&](std::uint32_t a, std::uint32_t b) { return slots_[a].seq < slots_[b].seq; });
  for (auto s : held) {
    ++slots_[s].work.resent;
    again.push_back(&slots_[s].work);
  }
  return again;
}

std::vector<std::string> service_table::owed_answers(const std::string& worker) const {
  std::vector<std::string> ids;
  auto wit = worker_ids_.find(worker);
  if (wit == worker_ids_.end()) return ids;
  std::vector<std::uint32_t> owed;
  for (std::uint32_t s = 0; s < slots_.size(); ++s) {
    const auto& e = slots_[s];
    if (e.worker != wit->second) continue;
    if ((e.state == slot_state::held && e.work.answered) || e.state == slot_state::orphaned) owed.push_back(s);
  }
  std::sort(owed.begin(), owed.end(), [&](std::uint32_t a, std::uint32_t b) { return slots_[a].seq < slots_[b].seq; });
  for (auto s : owed) ids.push_back(slots_[s].work.id);
  return ids;
}

const std::vector<assignment>& service_table::dispatch() {
  assigned_.clear();
  dispatch_due_ = false;
  for (std::uint32_t si = 0; si < services_.size(); ++si) {
    auto& svc = services_[si];
    while (svc.head != none && !svc.ready.empty()) {
      auto w = svc.ready.front();
      svc.ready.pop_front();
      auto s = svc.head;
      unlink(s);
      auto& e = slots_[s];
      e.state = slot_state::held;
      e.worker = w;
      ++e.work.attempt;
      ++held_count_;
      auto* serves = workers_[w].find(si);
      if (++serves->busy < serves->capacity) svc.ready.push_back(w);
      assigned_.push_back({workers_[w].name, &e.work});
    }
  }
  return assigned_;
}

void service_table::release(std::uint32_t worker, std::uint32_t service) {
  auto* serves = workers_[worker].find(service);
  if (!serves || serves->busy == 0) return;
  bool was_full = serves->busy >= serves->capacity;
  --serves->busy;
  if (was_full && serves->busy < serves->capacity && !workers_[worker].draining) {
    services_[service].ready.push_back(worker);
    dispatch_due_ = true;
  }
}

std::optional<job> service_table::complete(std::string_view id, std::string_view worker, bool* held) {
  if (held) *held = false;
  auto s = find(id);
  if (s == none) return std::nullopt;
  auto& e = slots_[s];
  if (e.worker == none || workers_[e.worker].name != worker) return std::nullopt;
  if (held) *held = true;
  release(e.worker, e.service);
  bool live = e.state == slot_state::held;
  auto work = take_slot(s);
  if (!live) return std::nullopt;  // it expired or was cancelled meanwhile
  --held_count_;
  return work;
}

const job* service_table::answer_early(std::string_view id, std::string_view worker) {
  auto s = find(id);
  if (s == none) return nullptr;
  auto& e = slots_[s];
  if (e.state != slot_state::held || workers_[e.worker].name != worker || e.work.answered) return nullptr;
  e.work.answered = true;
  if (e.heap_pos != none) heap_erase(s);
  // Never retried now, so the bytes are not needed: a received message may
  // share (and pin) libzmq's whole receive buffer for as long as it lives.
  e.work.payload = zmq::message_t{};
  return &e.work;
}

std::uint32_t service_table::ended_connect(std::string_view id, std::string_view worker) const {
  auto s = find(id);
  if (s == none) return none;
  const auto& e = slots_[s];
  return e.state == slot_state::orphaned && e.work.connect && workers_[e.worker].name == worker ? s : none;
}

const zmq::message_t* service_table::late_connect(std::string_view id, std::string_view worker) const {
  auto s = ended_connect(id, worker);
  return s == none ? nullptr : &slots_[s].work.payload;
}

bool service_table::hand_over(std::string_view id, std::string_view worker, job&& next) {
  auto s = ended_connect(id, worker);
  if (s == none || ids_.contains(next.id)) return false;
  auto& e = slots_[s];
  ids_.erase(e.work.id);
  --ended_connects_;
  --orphaned_count_;  // held again, by its DISCONNECT
  e.work = std::move(next);
  e.work.attempt = 1;
  ids_.emplace(e.work.id, s);
  e.state = slot_state::held;
  ++held_count_;
  heap_push(s);
  return true;
}

std::optional<job> service_table::cancel(std::string_view id, std::string* worker) {
  auto s = find(id);
  if (s == none) return std::nullopt;
  auto& e = slots_[s];
  switch (e.state) {
    case slot_state::queued:
      unlink(s);
      return take_slot(s);
    case slot_state::held: {
      --held_count_;
      if (worker) *worker = workers_[e.worker].name;
      if (e.heap_pos != none) heap_erase(s);
      return orphan(s);
    }
    default: return std::nullopt;
  }
}

std::string_view service_table::requester_of(std::string_view id) const {
  auto s = find(id);
  return s == none ? std::string_view{} : std::string_view{slots_[s].work.requester};
}

std::vector<failure> service_table::expire(clock::time_point now) {
  std::vector<failure> out;
  while (!deadlines_.empty() && slots_[deadlines_.front()].work.deadline <= now) {
    auto s = deadlines_.front();
    heap_erase(s);
    auto& e = slots_[s];
    if (e.state == slot_state::queued) {
      unlink(s);
      auto code = e.work.attempt == 0 ? proto::UNAVAILABLE : proto::TIMEOUT;
      out.push_back({take_slot(s), code, {}});
    } else {
      --held_count_;
      auto worker = workers_[e.worker].name;
      out.push_back({orphan(s), proto::TIMEOUT, std::move(worker)});
    }
  }
  return out;
}

std::optional<clock::time_point> service_table::next_deadline() const {
  if (deadlines_.empty()) return std::nullopt;
  return slots_[deadlines_.front()].work.deadline;
}

std::size_t service_table::queued(const std::string& service) const {
  auto it = service_ids_.find(service);
  return it == service_ids_.end() ? 0 : services_[it->second].waiting;
}

std::size_t service_table::waiting() const {
  std::size_t n = 0;
  for (const auto& svc : services_) n += svc.waiting;
  return n;
}

std::size_t service_table::workers(const std::string& service) const {
  auto it = service_ids_.find(service);
  if (it == service_ids_.end()) return 0;
  const auto& svc = services_[it->second];
  return svc.worker_count - svc.draining;
}

std::size_t service_table::draining_workers(const std::string& service) const {
  auto it = service_ids_.find(service);
  return it == service_ids_.end() ? 0 : services_[it->second].draining;
}

std::vector<worker_view> service_table::worker_views() const {
  std::vector<worker_view> out;
  out.reserve(worker_ids_.size());
  for (const auto& [name, w] : worker_ids_) {
    auto& v = out.emplace_back(worker_view{.name = name, .draining = workers_[w].draining});
    for (const auto& s : workers_[w].serves) v.serves.push_back({services_[s.service].name, s.capacity, s.busy});
  }
  std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a.name < b.name; });
  return out;
}

std::vector<std::string> service_table::services() const {
  std::vector<std::string> names;
  for (const auto& svc : services_)
    if (svc.live) names.push_back(svc.name);
  std::sort(names.begin(), names.end());
  return names;
}

}  // namespace sidecast::broker
