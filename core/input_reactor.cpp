#include "core/input_reactor.hpp"

#include <atomic>
#include <cerrno>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <system_error>

#include <unistd.h>

#include <boost/asio/post.hpp>
#include <spdlog/spdlog.h>

namespace sidecast::core {

namespace asio = boost::asio;

// The runs of ring_posters rung on the context's own thread (see
// ring_poster). One per io_context, used from its thread only.
class turn_runner : public asio::execution_context::service {
 public:
  using key_type = turn_runner;
  static inline asio::execution_context::id id;

  explicit turn_runner(asio::execution_context& context)
      : service{context}, context_{static_cast<asio::io_context&>(context)} {}

  void add(std::shared_ptr<ring_poster> poster) {
    due_.push_back(std::move(poster));
    if (!posted_ && !running_) post();
  }

 private:
  void post() {
    posted_ = true;
    asio::post(context_, [this] { drain(); });
  }

  // What is due, and what those runs make due, in order; after a bounded
  // number of rounds the rest waits for the next pass, so the context's
  // sockets and timers are never starved by a loop of hops.
  void drain() {
    posted_ = false;
    running_ = true;
    for (int round = 0; round < 16 && !due_.empty(); ++round) {
      batch_.swap(due_);
      for (auto& poster : batch_) {
        try {
          poster->run();
        } catch (const std::exception& e) {
          spdlog::error("a local:// turn failed: {}", e.what());  // the others still run
        } catch (...) {
          spdlog::error("a local:// turn failed: a non-standard exception");
        }
      }
      batch_.clear();
    }
    running_ = false;
    if (!due_.empty()) post();
  }

  void shutdown() override {
    due_.clear();
    batch_.clear();
  }

  asio::io_context& context_;
  std::vector<std::shared_ptr<ring_poster>> due_, batch_;
  bool posted_ = false;
  bool running_ = false;
};

std::shared_ptr<ring_poster> ring_poster::make(asio::io_context& context, rung_fn on_rung) {
  return std::make_shared<ring_poster>(context, std::move(on_rung));
}

ring_poster::ring_poster(asio::io_context& context, rung_fn on_rung)
    : context_{&context}, runner_{asio::use_service<turn_runner>(context)}, on_rung_{std::move(on_rung)} {}

ring_hook ring_poster::hook(unsigned bit) {
  if (bit >= 64) throw std::invalid_argument{"ring_poster::hook: bit past 63"};
  return std::make_shared<const std::function<void()>>([self = shared_from_this(), bit] { self->ring(bit); });
}

void ring_poster::close() {
  std::lock_guard lock{mutex_};
  context_ = nullptr;
  on_rung_ = nullptr;
}

void ring_poster::ring(unsigned bit) {
  bits_.fetch_or(std::uint64_t{1} << bit, std::memory_order_acq_rel);
  if (posted_.exchange(true, std::memory_order_acq_rel)) return;  // a run is coming
  std::lock_guard lock{mutex_};
  if (!context_) return;  // closed
  if (context_->get_executor().running_in_this_thread()) {
    runner_.add(shared_from_this());
  } else {
    asio::post(*context_, [self = shared_from_this()] { self->run(); });
  }
}

void ring_poster::run() {
  posted_.store(false, std::memory_order_release);  // a ring from now on posts again
  auto bits = bits_.exchange(0, std::memory_order_acq_rel);
  if (on_rung_) on_rung_(bits);
}

input_reactor::input_reactor(asio::io_context& context, input_wait& input, std::function<void()> turn,
                             std::string name)
    : context_{context},
      input_{input},
      turn_{std::move(turn)},
      name_{std::move(name)},
      poster_{ring_poster::make(context, [this](std::uint64_t bits) { rung(bits); })},
      schedule_{poster_->hook(turn_bit)},
      timer_rang_{poster_->hook(timer_bit)},
      timer_{context} {}

input_reactor::~input_reactor() {
  poster_->close();  // what is still posted or queued finds it closed
  release_waits();
}

ring_hook input_reactor::poker(unsigned index) {
  if (index >= timer_bit) throw std::invalid_argument{"input_reactor::poker: index past 61"};
  return poster_->hook(index);
}

// Every turn comes through the poster: a source's descriptor or hook, the
// timer, or next() finding input. So turns coalesce, a turn scheduled on
// the context's own thread joins its turn_runner, and nothing that is
// still queued when the reactor goes can reach it.
void input_reactor::rung(std::uint64_t bits) {
  if (bits & (std::uint64_t{1} << timer_bit)) timer_pending_ = false;
  for (std::size_t i = 0; i < input_.size() && i < timer_bit; ++i)
    if (bits & (std::uint64_t{1} << i)) input_.fired(i);
  run_turn();
}

void input_reactor::release_waits() {
  waits_.clear();  // before their descriptors close
  for (int fd : fds_)
    if (fd >= 0) ::close(fd);
  fds_.clear();
}

void input_reactor::watch() {
  release_waits();
  waits_.resize(input_.size());
  fds_.assign(input_.size(), -1);
  for (std::size_t i = 0; i < input_.size(); ++i) {
    if (input_.fd(i) < 0) continue;
    // A dup of its own: the source may close or replace its descriptor
    // (a reconnect) before this stops waiting on it.
    int fd = ::dup(input_.fd(i));
    if (fd < 0) throw std::system_error{errno, std::generic_category(), name_ + ": dup"};
    fds_[i] = fd;
    waits_[i] = std::make_unique<edge_wait>(context_, fd, [this, i](boost::system::error_code ec) {
      if (ec) return;
      waits_[i]->wait();  // before this handler returns (see edge_wait)
      input_.fired(i);
      (*schedule_)();
    });
    waits_[i]->wait();
  }
}

void input_reactor::next(time_point deadline) {
  if (input_.look()) {
    (*schedule_)();
    return;
  }
  // A later deadline keeps the earlier wait: that turn comes early and
  // sets the later one (no timer update, and no system call, per turn).
  if (timer_pending_ && timer_at_ <= deadline) return;
  timer_at_ = deadline;
  timer_pending_ = true;
  timer_.expires_at(deadline);  // cancels the earlier wait
  timer_.async_wait([rang = timer_rang_](boost::system::error_code ec) {
    if (!ec) (*rang)();  // else replaced by a nearer deadline, or the reactor is gone
  });
}

void input_reactor::run_turn() {
  if (failed_) return;
  try {
    turn_();
  } catch (const std::exception& e) {
    failed_ = true;  // no more turns, as a thread of its own would have ended
    spdlog::critical("{} failed: {}", name_, e.what());
    if (failure_handler_) failure_handler_(e.what());
  } catch (...) {
    failed_ = true;
    spdlog::critical("{} failed: a non-standard exception", name_);
    if (failure_handler_) failure_handler_("a non-standard exception");
  }
}

}  // namespace sidecast::core
