#include "bench/loadgen/runtime.hpp"

#include <future>
#include <mutex>

namespace sidecast::bench {

runtime::runtime(runtime_options o) : opt_(std::move(o)) {
  if (opt_.threads == 0) opt_.threads = 1;
  for (unsigned i = 0; i < opt_.threads; ++i) {
    threads_.push_back(std::make_unique<worker_thread>());
    guards_.emplace_back(threads_.back()->ioc.get_executor());
  }
  for (auto& t : threads_) {
    t->thread = std::thread([io = &t->ioc] {
      // Nothing in the scenarios throws on purpose; if something does, the
      // thread goes on serving its other connections.
      for (;;) {
        try {
          io->run();
          return;
        } catch (...) {
        }
      }
    });
  }
}

runtime::~runtime() { shutdown(); }

runtime::connect_result runtime::connect(std::size_t n, std::function<client_handlers(slot&)> handlers,
                                         std::chrono::steady_clock::time_point deadline) {
  make_handlers_ = std::move(handlers);
  slots_.resize(n);
  for (std::size_t i = 0; i < n; ++i) {
    slots_[i].index = i;
    slots_[i].thread = threads_[i % threads_.size()].get();
  }
  auto start = std::chrono::steady_clock::now();
  std::size_t first = std::min(n, std::max<std::size_t>(1, opt_.concurrency));
  for (std::size_t i = 0; i < first; ++i) launch_next();
  while (ready_.load() + failed_.load() < n && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  connect_result r;
  r.ready = ready_.load();
  r.failed = failed_.load();
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::lock_guard lock{error_mutex_};
  r.first_error = first_error_;
  return r;
}

void runtime::launch_next() {
  std::size_t i = next_.fetch_add(1);
  if (i >= slots_.size()) return;
  slot& s = slots_[i];
  asio::post(s.thread->ioc, [this, &s, i] {
    client_handlers h = make_handlers_(s);
    auto user_ready = std::move(h.on_ready);
    auto user_close = std::move(h.on_close);
    h.on_ready = [this, &s, user_ready] {
      ready_.fetch_add(1);
      if (user_ready) user_ready();
      launch_next();
    };
    h.on_close = [this, &s, user_close](std::string_view why) {
      s.thread->closed.add();
      {
        std::lock_guard lock{error_mutex_};
        if (first_error_.empty()) first_error_ = std::string(why);
      }
      if (!s.client->ready()) {
        failed_.fetch_add(1);
        launch_next();
      }
      if (user_close) user_close(why);
    };
    client_options co = opt_.client;
    if (opt_.source_ips > 0)
      co.source = asio::ip::address_v4{static_cast<asio::ip::address_v4::uint_type>(
          (127u << 24) | (2u + static_cast<unsigned>(i % opt_.source_ips)))};
    s.client = opt_.polling ? make_polling_client(s.thread->ioc, std::move(co), std::move(h))
                            : make_ws_client(s.thread->ioc, std::move(co), std::move(h));
    s.client->start();
  });
}

void runtime::for_each_slot(const std::function<void(slot&)>& f) {
  for (auto& s : slots_)
    asio::post(s.thread->ioc, [&s, f] {
      if (s.client) f(s);
    });
}

void runtime::shutdown() {
  if (stopped_) return;
  stopped_ = true;
  // Close on each client's own thread, wait for that, then let the loops end.
  std::vector<std::future<void>> done;
  for (auto& t : threads_) {
    auto p = std::make_shared<std::promise<void>>();
    done.push_back(p->get_future());
    asio::post(t->ioc, [this, tp = t.get(), p] {
      for (auto& s : slots_)
        if (s.thread == tp && s.client) s.client->close();
      p->set_value();
    });
  }
  for (auto& d : done) d.wait_for(std::chrono::seconds(5));
  guards_.clear();
  for (auto& t : threads_) t->ioc.stop();
  for (auto& t : threads_)
    if (t->thread.joinable()) t->thread.join();
  // Clients hold sockets of these io_contexts: drop them before the contexts go.
  for (auto& s : slots_) {
    s.extra.reset();
    s.client.reset();
  }
}

}  // namespace sidecast::bench
