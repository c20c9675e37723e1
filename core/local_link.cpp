#include "core/local_link.hpp"

#include <algorithm>
#include <mutex>
#include <stdexcept>
#include <unordered_map>

#include "core/message_queue.hpp"

namespace sidecast::core {

namespace {

constexpr std::string_view scheme = "local://";

std::string name_of(std::string_view endpoint) {
  if (!is_local_endpoint(endpoint) || endpoint.size() == scheme.size())
    throw std::runtime_error("not a local:// endpoint: " + std::string{endpoint});
  return std::string{endpoint.substr(scheme.size())};
}

}  // namespace

bool is_local_endpoint(std::string_view endpoint) { return endpoint.starts_with(scheme); }

void doorbell::ring() {
  // Pairs with the fence in arm(): either this sees the consumer armed, or
  // the consumer's last look sees what was just queued.
  std::atomic_thread_fence(std::memory_order_seq_cst);
  if (state_.load(std::memory_order_relaxed) != armed) return;
  // The state says which way the ring went: only a written eventfd is read
  // back by arm().
  ring_hook h;
  {
    std::lock_guard lock{hook_mutex_};  // only when the consumer was armed: once per sleep
    h = hook_;
  }
  int expected = armed;
  if (!state_.compare_exchange_strong(expected, h ? hooked : rung, std::memory_order_acq_rel)) return;
  if (h) {
    (*h)();
  } else {
    bell_.signal();
  }
}

void doorbell::hook(ring_hook h) {
  std::lock_guard lock{hook_mutex_};
  hook_ = std::move(h);
}

void doorbell::arm() {
  // Each `rung` taken here stands for one write, landed or about to land:
  // read exactly that many, now or on a later arm. A coalescing read would
  // also take the write of a ring that set `rung` again between the
  // exchange and the read; the consumer would then sleep with the state
  // saying "written" and nothing to read, and every later ring would see
  // `rung` and write nothing. That lost wake-up is what the local_link
  // stress test caught about once in 200 runs (a departed dealer's ring was
  // the one read); tests/integration/local_link_test.cpp's Doorbell test
  // catches it every run with a coalescing read.
  if (state_.exchange(armed, std::memory_order_acq_rel) == rung) ++owed_;
  while (owed_ > 0 && bell_.drain()) --owed_;
  std::atomic_thread_fence(std::memory_order_seq_cst);
}

// What a name binds: the router's doorbell, and the connections made since
// the router last looked.
struct local_hub {
  doorbell bell;
  std::atomic<bool> closed{false};
  std::atomic<bool> has_pending{false};  // a connection waits in `pending`
  std::atomic<bool> has_gone{false};     // a dealer went away
  std::mutex mutex;  // guards pending; taken once per connection, never per message
  std::vector<std::shared_ptr<local_connection>> pending;
};

struct local_connection {
  local_connection(std::string dealer_id, std::size_t up_capacity, std::size_t down_capacity,
                   std::shared_ptr<local_hub> router_hub)
      : id{std::move(dealer_id)}, up{up_capacity}, down{down_capacity}, hub{std::move(router_hub)} {}
  const std::string id;
  message_queue up;    // dealer → router
  message_queue down;  // router → dealer
  doorbell bell;       // the dealer's
  std::shared_ptr<local_hub> hub;
  std::atomic<bool> dealer_gone{false};
};

namespace {

// The names bound in this process.
struct registry {
  std::mutex mutex;
  std::unordered_map<std::string, std::weak_ptr<local_hub>> hubs;

  static registry& instance() {
    static registry r;
    return r;
  }
};

}  // namespace

local_router::local_router(std::string_view endpoint) {
  auto name = name_of(endpoint);
  auto& r = registry::instance();
  std::lock_guard lock{r.mutex};
  auto& slot = r.hubs[name];
  if (!slot.expired()) throw std::runtime_error("local endpoint already bound: " + std::string{endpoint});
  hub_ = std::make_shared<local_hub>();
  slot = hub_;
}

local_router::~local_router() {
  hub_->closed = true;
  {
    auto& r = registry::instance();
    std::lock_guard lock{r.mutex};
    for (auto it = r.hubs.begin(); it != r.hubs.end(); ++it) {
      if (it->second.lock() == hub_) {
        r.hubs.erase(it);
        break;
      }
    }
  }
  adopt();
  for (auto& c : connections_) c->bell.ring();
}

int local_router::fd() const { return hub_->bell.fd(); }

void local_router::hook(ring_hook h) { hub_->bell.hook(std::move(h)); }

void local_router::adopt() {
  // A load first: this runs for every message, and an exchange would write
  // the flag's cache line each time.
  if (!hub_->has_pending.load(std::memory_order_acquire) ||
      !hub_->has_pending.exchange(false, std::memory_order_acq_rel))
    return;
  std::vector<std::shared_ptr<local_connection>> fresh;
  {
    std::lock_guard lock{hub_->mutex};
    fresh.swap(hub_->pending);
  }
  for (auto& c : fresh) {
    // A new connection under a known id replaces the old one.
    auto same = std::find_if(connections_.begin(), connections_.end(), [&](const auto& o) { return o->id == c->id; });
    if (same != connections_.end())
      *same = std::move(c);
    else
      connections_.push_back(std::move(c));
  }
}

bool local_router::has_input() {
  hub_->bell.arm();
  if (hub_->has_pending.load(std::memory_order_acquire) || hub_->has_gone.load(std::memory_order_acquire)) return true;
  return std::any_of(connections_.begin(), connections_.end(), [](const auto& c) { return !c->up.empty(); });
}

void local_router::drop_gone() {
  if (!hub_->has_gone.load(std::memory_order_acquire) || !hub_->has_gone.exchange(false, std::memory_order_acq_rel))
    return;
  // A dealer that is gone leaves once what it sent has been taken; until
  // then the flag stays up, so the next look tries again.
  std::erase_if(connections_, [](const auto& c) {
    return c->dealer_gone.load(std::memory_order_acquire) && c->up.empty();
  });
  if (std::any_of(connections_.begin(), connections_.end(),
                  [](const auto& c) { return c->dealer_gone.load(std::memory_order_acquire); }))
    hub_->has_gone.store(true, std::memory_order_release);
}

bool local_router::receive(std::string_view& peer, zmq::message_t& message) {
  for (int look = 0; look < 2; ++look) {
    adopt();
    drop_gone();
    auto n = connections_.size();
    for (std::size_t k = 0; k < n; ++k) {
      auto& c = connections_[(cursor_ + k) % n];
      if (c->up.pop(message)) {
        cursor_ = (cursor_ + k + 1) % n;
        peer = c->id;
        return true;
      }
    }
    if (look == 0) hub_->bell.arm();  // then one last look
  }
  return false;
}

local_router::send_result local_router::send(std::string_view peer, zmq::message_t& message) {
  for (auto& c : connections_) {
    if (c->id != peer) continue;
    if (c->dealer_gone.load(std::memory_order_acquire)) return send_result::unreachable;
    if (!c->down.push(message)) return send_result::full;
    c->bell.ring();
    return send_result::sent;
  }
  return send_result::unreachable;
}

std::unique_ptr<local_dealer> local_dealer::connect(std::string_view endpoint, std::string id,
                                                    std::size_t send_capacity, std::size_t receive_capacity) {
  auto name = name_of(endpoint);
  std::shared_ptr<local_hub> hub;
  {
    auto& r = registry::instance();
    std::lock_guard lock{r.mutex};
    if (auto it = r.hubs.find(name); it != r.hubs.end()) hub = it->second.lock();
  }
  if (!hub || hub->closed) return nullptr;
  auto connection = std::make_shared<local_connection>(std::move(id), send_capacity, receive_capacity, hub);
  {
    std::lock_guard lock{hub->mutex};
    hub->pending.push_back(connection);
  }
  hub->has_pending.store(true, std::memory_order_release);
  hub->bell.ring();
  return std::make_unique<local_dealer>(std::move(connection));
}

local_dealer::local_dealer(std::shared_ptr<local_connection> connection) : connection_{std::move(connection)} {}

local_dealer::~local_dealer() {
  connection_->dealer_gone.store(true, std::memory_order_release);
  connection_->hub->has_gone.store(true, std::memory_order_release);
  connection_->hub->bell.ring();
}

int local_dealer::fd() const { return connection_->bell.fd(); }

void local_dealer::hook(ring_hook h) { connection_->bell.hook(std::move(h)); }

bool local_dealer::has_input() {
  connection_->bell.arm();
  return !connection_->down.empty();
}

bool local_dealer::receive(zmq::message_t& message) {
  if (connection_->down.pop(message)) return true;
  connection_->bell.arm();  // then one last look
  return connection_->down.pop(message);
}

bool local_dealer::send(zmq::message_t& message) {
  auto& hub = *connection_->hub;
  if (hub.closed.load(std::memory_order_acquire) || !connection_->up.push(message)) return false;
  hub.bell.ring();
  return true;
}

}  // namespace sidecast::core
