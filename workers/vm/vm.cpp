#include "workers/vm/vm.hpp"

#include <atomic>
#include <mutex>
#include <random>
#include <set>
#include <unordered_map>

#include <boost/json.hpp>

#include "core/utf8.hpp"

namespace sidecast::workers {
namespace json = boost::json;

namespace {

constexpr int steps = 10;  // progress events per VM, 10% each
// A VM's name, in characters: each progress event carries it (and the
// final answer once per VM), so a long one would be sent a few hundred times.
constexpr std::size_t max_name_chars = 64;

struct task {
  std::string owner;  // the sid that launched it: only it may cancel
  std::atomic<bool> cancelled{false};
};

// Tasks running in this worker, by id, so cancel_vm can reach them.
struct registry {
  std::mutex mutex;
  std::unordered_map<std::string, std::shared_ptr<task>> tasks;
};

const char* state_at(int step) {
  if (step == 0) return "queued";
  if (step <= 4) return "provisioning";
  if (step < steps) return "booting";
  return "running";
}

std::string random_id(std::mt19937_64& rng) {
  static constexpr char hex[] = "0123456789abcdef";
  std::string id = "t-";
  for (int i = 0; i < 12; ++i) id += hex[rng() % 16];
  return id;
}

void open_vm(request req, const vm_options& options, registry& reg) {
  thread_local std::mt19937_64 rng{std::random_device{}()};
  // Arguments that do not parse (a lone surrogate, say) are refused: read
  // as none (request::args()), they launched the default VM.
  auto parsed = req.parsed_args();
  if (!parsed) {
    req.fail(proto::BAD_REQUEST, "the arguments are not JSON");
    return;
  }
  const auto& args = *parsed;
  const json::object* spec = !args.empty() && args[0].is_object() ? &args[0].as_object() : nullptr;
  std::int64_t count = 1;
  std::string name = "vm";
  if (spec) {
    if (auto* c = spec->if_contains("count")) count = c->is_int64() ? c->as_int64() : -1;
    if (auto* n = spec->if_contains("name")) {
      if (!n->is_string()) {
        req.fail(proto::BAD_REQUEST, "name must be a string of at most " + std::to_string(max_name_chars) +
                                         " characters");
        return;
      }
      name = std::string{n->as_string()};
    }
  }
  if (count < 1 || count > static_cast<std::int64_t>(options.max_count)) {
    req.fail(proto::BAD_REQUEST, "count must be 1.." + std::to_string(options.max_count));
    return;
  }
  if (core::code_points(name) > max_name_chars) {
    req.fail(proto::BAD_REQUEST, "name must be at most " + std::to_string(max_name_chars) + " characters");
    return;
  }
  auto id = random_id(rng);
  auto t = std::make_shared<task>();
  t->owner = req.sid();
  {
    std::lock_guard lock{reg.mutex};
    reg.tasks.emplace(id, t);
  }
  req.ack(json::serialize(json::array{json::object{{"task_id", id}}}));

  // Each VM fails at a random step with probability failure_rate.
  std::uniform_real_distribution<double> chance{0.0, 1.0};
  std::uniform_int_distribution<int> fail_step{2, steps - 1};
  struct vm {
    std::string name;
    int fails_at;  // step at which it fails, or steps + 1
    std::string state = "queued";
    int percent = 0;
    bool done = false;
  };
  std::vector<vm> vms;
  for (std::int64_t i = 0; i < count; ++i)
    vms.push_back({name + "-" + std::to_string(i + 1), chance(rng) < options.failure_rate ? fail_step(rng) : steps + 1});

  auto progress = [&](const vm& v) {
    req.emit("vm_progress", json::serialize(json::array{json::object{
                                {"task_id", id}, {"vm", v.name}, {"state", v.state}, {"percent", v.percent}}}));
  };
  auto step_time = options.launch_time / steps;
  bool cancelled = false;
  for (int step = 0; step <= steps && !cancelled; ++step) {
    if (step > 0) {
      // Sleep in slices so a cancel_vm takes effect quickly.
      for (auto left = step_time; left.count() > 0 && !cancelled; left -= std::chrono::milliseconds(50)) {
        if (!req.cancel().sleep_for(std::min(left, std::chrono::milliseconds(50))) || t->cancelled) cancelled = true;
      }
      if (cancelled) break;
    }
    for (auto& v : vms) {
      if (v.done) continue;
      if (step == v.fails_at) {
        v.state = "failed";
        v.done = true;
      } else {
        v.state = state_at(step);
        v.percent = step * 100 / steps;
        v.done = step == steps;
      }
      progress(v);
    }
  }
  {
    // Ended: a cancel_vm from here on finds no task (cancelled: false); one
    // that found it after the last look above said true, so the task ends
    // cancelled, each VM in the state it reached.
    std::lock_guard lock{reg.mutex};
    reg.tasks.erase(id);
    if (t->cancelled) cancelled = true;
  }
  json::array data;
  int failed = 0;
  for (auto& v : vms) {
    if (!v.done) {
      v.state = "cancelled";
      v.done = true;
      progress(v);
    }
    json::object o{{"vm", v.name}, {"state", v.state}};
    if (v.state == "running") o["ip"] = "10.0." + std::to_string(rng() % 250) + "." + std::to_string(2 + rng() % 250);
    failed += v.state == "failed";
    data.push_back(std::move(o));
  }
  req.emit("vm_response", json::serialize(json::array{json::object{
                              {"task_id", id}, {"data", std::move(data)}, {"failed", failed}, {"cancelled", cancelled},
                              {"worker", req.worker_id()}}}));
}

void cancel_vm(request req, registry& reg) {
  auto args = req.args();
  std::string id;
  if (!args.empty() && args[0].is_object())
    if (auto* v = args[0].as_object().if_contains("task_id"); v && v->is_string()) id = std::string{v->as_string()};
  bool found = false;
  {
    std::lock_guard lock{reg.mutex};
    auto it = reg.tasks.find(id);
    if (it != reg.tasks.end() && it->second->owner == req.sid()) {
      it->second->cancelled = true;
      found = true;
    }
  }
  req.reply(json::serialize(json::array{json::object{{"task_id", id}, {"cancelled", found}}}));
}

}  // namespace

service vm_service(unsigned capacity, vm_options options) {
  auto reg = std::make_shared<registry>();
  return service{"vm", capacity}
      .on("open_vm", [options, reg](request r) { open_vm(std::move(r), options, *reg); })
      .on("cancel_vm", [reg](request r) { cancel_vm(std::move(r), *reg); })
      // A socket that is gone reads no progress: its tasks (on this worker)
      // end, and give their capacity back.
      .on_disconnect([reg](request r) {
        std::lock_guard lock{reg->mutex};
        for (auto& [id, t] : reg->tasks)
          if (t->owner == r.sid()) t->cancelled = true;
      })
      // So are the tasks of every socket of a gateway the broker lost: no
      // DISCONNECT comes for those.
      .on_gateway_gone([reg](const gateway_gone& g) {
        std::lock_guard lock{reg->mutex};
        for (auto& [id, t] : reg->tasks)
          if (g.owns(t->owner)) t->cancelled = true;
      })
      // And of a socket whose DISCONNECT died with the broker that held it:
      // after a Welcome from a broker that did not know this worker (see
      // service::on_welcome), each socket with a task is checked.
      .on_welcome([reg](const welcome& w) {
        std::set<std::string> owners;
        {
          std::lock_guard lock{reg->mutex};
          for (const auto& [id, t] : reg->tasks)
            if (!t->cancelled) owners.insert(t->owner);
        }
        for (const auto& sid : owners)
          w.check_socket("", sid, [reg, sid](socket_state state) {
            if (state != socket_state::gone && state != socket_state::no_gateway) return;
            std::lock_guard lock{reg->mutex};
            for (auto& [id, t] : reg->tasks)
              if (t->owner == sid) t->cancelled = true;
          });
      });
}

}  // namespace sidecast::workers
