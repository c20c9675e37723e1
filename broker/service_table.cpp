#include "broker/service_table.hpp"

#include <algorithm>

namespace sidecast::broker {

// Invariant: a worker is in a service's `ready` list exactly when its busy
// count for that service is below its capacity. A job id stays in its
// worker's `held` map until the worker replies or dies, even after the job
// expired or was cancelled, so capacity is only given back when the worker is
// really free.

service_table::admit service_table::submit(job work) {
  if (jobs_.contains(work.id)) return admit::duplicate;
  auto& service = services_[work.service];
  if (service.queue.size() >= limits_.queue_limit) return admit::busy;
  auto id = work.id;
  auto deadline = work.deadline;
  auto [it, inserted] = jobs_.emplace(id, job_entry{std::move(work), {}, {}, {}});
  service.queue.push_back(id);
  it->second.queue_pos = std::prev(service.queue.end());
  it->second.deadline_pos = deadlines_.emplace(deadline, id);
  return admit::queued;
}

void service_table::add_worker(const std::string& worker, const std::string& service,
                               unsigned capacity) {
  capacity = std::max(capacity, 1u);
  auto& w = workers_[worker];
  auto& s = services_[service];
  auto old = w.capacity.find(service);
  unsigned busy = w.busy[service];
  bool was_ready = old != w.capacity.end() && busy < old->second;
  if (old == w.capacity.end()) ++s.worker_count;
  w.capacity[service] = capacity;
  bool now_ready = busy < capacity;
  if (now_ready && !was_ready) s.ready.push_back(worker);
  if (was_ready && !now_ready) s.ready.remove(worker);
}

std::vector<failure> service_table::remove_worker(const std::string& worker) {
  std::vector<failure> failed;
  auto wit = workers_.find(worker);
  if (wit == workers_.end()) return failed;
  for (const auto& [service, capacity] : wit->second.capacity) {
    auto& s = services_[service];
    s.ready.remove(worker);
    --s.worker_count;
  }
  // Requeue at the front in reverse so the oldest job ends up first.
  std::vector<std::string> held;
  for (const auto& [id, service] : wit->second.held) held.push_back(id);
  workers_.erase(wit);
  std::sort(held.begin(), held.end(), [&](const std::string& a, const std::string& b) {
    auto ia = jobs_.find(a), ib = jobs_.find(b);
    auto ra = ia == jobs_.end() ? clock::time_point{} : ia->second.work.received;
    auto rb = ib == jobs_.end() ? clock::time_point{} : ib->second.work.received;
    return ra > rb;
  });
  for (const auto& id : held) {
    auto it = jobs_.find(id);
    if (it == jobs_.end() || it->second.worker != worker) continue;  // expired or cancelled
    auto& entry = it->second;
    --held_count_;
    entry.worker.clear();
    if (entry.work.answered) {  // its requester has its answer: nothing to retry or report
      forget(it);
      continue;
    }
    if (entry.work.attempt >= limits_.max_attempts) {
      failed.push_back({entry.work, proto::WORKER_LOST, {}});
      forget(it);
      continue;
    }
    auto& queue = services_[entry.work.service].queue;
    queue.push_front(id);
    entry.queue_pos = queue.begin();
  }
  return failed;
}

std::vector<assignment> service_table::dispatch() {
  std::vector<assignment> out;
  for (auto& [name, s] : services_) {
    while (!s.queue.empty() && !s.ready.empty()) {
      auto worker = std::move(s.ready.front());
      s.ready.pop_front();
      auto& w = workers_.at(worker);
      auto id = std::move(s.queue.front());
      s.queue.pop_front();
      auto& entry = jobs_.at(id);
      entry.worker = worker;
      entry.queue_pos = {};
      ++entry.work.attempt;
      ++held_count_;
      w.held.emplace(id, name);
      if (++w.busy[name] < w.capacity[name]) s.ready.push_back(worker);
      out.push_back({std::move(worker), &entry.work});
    }
  }
  return out;
}

void service_table::release(worker_entry& w, const std::string& worker, const std::string& service,
                            const std::string& id) {
  w.held.erase(id);
  auto& busy = w.busy[service];
  auto cap = w.capacity.find(service);
  bool was_full = cap != w.capacity.end() && busy >= cap->second;
  if (busy > 0) --busy;
  if (was_full && cap != w.capacity.end() && busy < cap->second)
    services_[service].ready.push_back(worker);
}

std::optional<job> service_table::complete(const std::string& id, const std::string& worker,
                                          bool* held) {
  if (held) *held = false;
  auto wit = workers_.find(worker);
  if (wit == workers_.end()) return std::nullopt;
  auto hit = wit->second.held.find(id);
  if (hit == wit->second.held.end()) return std::nullopt;
  if (held) *held = true;
  auto service = hit->second;
  release(wit->second, worker, service, id);
  auto it = jobs_.find(id);
  if (it == jobs_.end() || it->second.worker != worker) return std::nullopt;
  --held_count_;
  auto done = std::move(it->second.work);
  forget(it);
  return done;
}

const job* service_table::answer_early(const std::string& id, const std::string& worker) {
  auto it = jobs_.find(id);
  if (it == jobs_.end() || it->second.worker != worker || it->second.work.answered) return nullptr;
  auto& entry = it->second;
  entry.work.answered = true;
  deadlines_.erase(entry.deadline_pos);
  entry.deadline_pos = deadlines_.end();
  return &entry.work;
}

std::optional<job> service_table::cancel(const std::string& id, std::string* worker) {
  auto it = jobs_.find(id);
  if (it == jobs_.end()) return std::nullopt;
  auto& entry = it->second;
  if (entry.worker.empty()) {
    services_[entry.work.service].queue.erase(entry.queue_pos);
  } else {
    --held_count_;
    if (worker) *worker = entry.worker;
  }
  auto done = std::move(entry.work);
  forget(it);
  return done;
}

std::vector<failure> service_table::expire(clock::time_point now) {
  std::vector<failure> out;
  while (!deadlines_.empty() && deadlines_.begin()->first <= now) {
    auto it = jobs_.find(deadlines_.begin()->second);
    auto& entry = it->second;
    if (entry.worker.empty()) {
      services_[entry.work.service].queue.erase(entry.queue_pos);
      auto code = entry.work.attempt == 0 ? proto::UNAVAILABLE : proto::TIMEOUT;
      out.push_back({std::move(entry.work), code, {}});
    } else {
      --held_count_;
      out.push_back({std::move(entry.work), proto::TIMEOUT, entry.worker});
    }
    forget(it);
  }
  return out;
}

void service_table::forget(std::unordered_map<std::string, job_entry>::iterator it) {
  if (it->second.deadline_pos != deadlines_.end()) deadlines_.erase(it->second.deadline_pos);
  jobs_.erase(it);
}

std::optional<clock::time_point> service_table::next_deadline() const {
  if (deadlines_.empty()) return std::nullopt;
  return deadlines_.begin()->first;
}

std::size_t service_table::queued(const std::string& service) const {
  auto it = services_.find(service);
  return it == services_.end() ? 0 : it->second.queue.size();
}

std::size_t service_table::workers(const std::string& service) const {
  auto it = services_.find(service);
  return it == services_.end() ? 0 : it->second.worker_count;
}

std::vector<std::string> service_table::services() const {
  std::vector<std::string> names;
  for (const auto& [name, s] : services_) names.push_back(name);
  std::sort(names.begin(), names.end());
  return names;
}

}  // namespace sidecast::broker
