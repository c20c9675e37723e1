#include "bench/loadgen/scenarios.hpp"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <future>
#include <stdexcept>
#include <thread>
#include <utility>

#include <boost/asio/steady_timer.hpp>
#include <boost/json/serialize.hpp>
#include <boost/json/value.hpp>

#include "gateway/codec/socketio.hpp"

namespace sidecast::bench {

namespace sio = gateway::socketio;
using namespace std::chrono_literals;
using steady = std::chrono::steady_clock;

namespace {

constexpr std::int64_t never = INT64_MAX;

// When the measured window starts and ends (steady ns), and whether senders
// must stop. Set by the main thread, read by every generator thread.
struct phase {
  std::atomic<std::int64_t> start{never};
  std::atomic<std::int64_t> end{never};
  std::atomic<bool> stop{false};

  bool in_window(std::int64_t t) const noexcept {
    return t >= start.load(std::memory_order_relaxed) && t < end.load(std::memory_order_relaxed);
  }
};

// What every send that expects an ack records: its time (returned, with
// the ack id it takes) by ack id, and the counts.
struct outgoing {
  std::int64_t ts;
  std::uint64_t id;
};

outgoing note_send(slot& s, const phase& ph) {
  outgoing out{steady_now_ns(), s.next_id++};
  s.sent_at[out.id % s.sent_at.size()] = out.ts;
  ++s.outstanding;
  s.thread->sent.add();
  if (ph.in_window(out.ts)) s.thread->sent_cohort.add();
  return out;
}

// CPU of the server(s) and of this process, and the wall time, at a moment.
struct sample {
  std::int64_t wall_ns = steady_now_ns();
  std::uint64_t server_cpu_us = 0;
  std::uint64_t gen_cpu_us = 0;
  static sample take(const std::vector<int>& pids) {
    sample s;
    s.server_cpu_us = procs_cpu_us(pids);
    s.gen_cpu_us = self_cpu_us();
    s.wall_ns = steady_now_ns();
    return s;
  }
};

void check_deadline(const scenario_options& o, const char* what) {
  if (steady::now() >= o.deadline) throw std::runtime_error(std::string("--timeout reached while ") + what);
}

// Sleeps up to `seconds`, never past the global deadline.
void sleep_bounded(const scenario_options& o, double seconds) {
  auto until = std::min(steady::now() + std::chrono::duration_cast<steady::duration>(
                                            std::chrono::duration<double>(seconds)),
                        o.deadline);
  std::this_thread::sleep_until(until);
  check_deadline(o, "running");
}

// Lets the load warm up, then opens the measured window for --duration and
// closes it, telling the senders to stop. Returns the samples at its edges;
// the closing one carries the window's end as its wall time.
std::pair<sample, sample> measure_window(const scenario_options& o, phase& ph) {
  sleep_bounded(o, o.warmup_s);
  sample a = sample::take(o.server_pids);
  ph.start.store(a.wall_ns);
  sleep_bounded(o, o.duration_s);
  std::int64_t end = steady_now_ns();
  ph.end.store(end);
  sample b = sample::take(o.server_pids);
  b.wall_ns = end;
  ph.stop.store(true);
  return {a, b};
}

// Waits until pred() or `seconds` pass (or the deadline). Returns pred().
template <class Pred>
bool wait_for(const scenario_options& o, double seconds, Pred pred) {
  auto until = std::min(steady::now() + std::chrono::duration_cast<steady::duration>(
                                            std::chrono::duration<double>(seconds)),
                        o.deadline);
  while (!pred() && steady::now() < until) std::this_thread::sleep_for(2ms);
  return pred();
}

template <class F>
std::uint64_t sum(runtime& rt, F field) {
  std::uint64_t n = 0;
  for (auto& t : rt.threads()) n += field(*t).get();
  return n;
}

// One message's latency, sent at `ts`: to the time its bytes reached the
// socket (the figure the tables quote), and to the time the generator's
// thread got to it (which adds the generator's own queueing).
void record_latency(worker_thread& t, std::int64_t ts, std::int64_t arrived, std::int64_t now) {
  t.latency.record(static_cast<std::uint64_t>(std::max<std::int64_t>(0, arrived - ts)));
  t.read_latency.record(static_cast<std::uint64_t>(std::max<std::int64_t>(0, now - ts)));
}

histogram merged(runtime& rt, histogram worker_thread::*field) {
  histogram h;
  for (auto& t : rt.threads()) h.merge((*t).*field);
  return h;
}

double round1(double v) { return std::round(v * 10) / 10; }
double round3(double v) { return std::round(v * 1000) / 1000; }

// What was expected and what arrived, and what the generator had to refuse or skip.
void add_outcome(boost::json::object& r, runtime& rt, std::uint64_t exp, std::uint64_t got) {
  r["expected"] = exp;
  r["received"] = got;
  r["loss"] = exp > got ? exp - got : 0;
  r["rejected"] = sum(rt, [](worker_thread& t) -> counter& { return t.rejected; });
  r["skipped"] = sum(rt, [](worker_thread& t) -> counter& { return t.skipped; });
}

// Common fields: the window's length, CPU figures per message, percentiles.
void add_common(boost::json::object& r, runtime& rt, const scenario_options& o, const sample& a, const sample& b,
                std::uint64_t messages, const char* per) {
  double secs = static_cast<double>(b.wall_ns - a.wall_ns) / 1e9;
  double srv = static_cast<double>(b.server_cpu_us - a.server_cpu_us);
  double gen = static_cast<double>(b.gen_cpu_us - a.gen_cpu_us);
  r["window_s"] = round3(secs);
  if (!o.server_pids.empty()) {
    r["server_cpu_pct"] = round1(srv / (secs * 1e4));
    r[std::string("server_cpu_us_per_") + per] = messages ? round3(srv / static_cast<double>(messages)) : 0.0;
  }
  r["gen_cpu_pct"] = round1(gen / (secs * 1e4));
  r[std::string("gen_cpu_us_per_") + per] = messages ? round3(gen / static_cast<double>(messages)) : 0.0;
  r["gen_threads"] = rt.threads().size();
  histogram h = merged(rt, &worker_thread::latency);
  r["samples"] = h.count();
  r["p50_us"] = round1(static_cast<double>(h.quantile(0.5)) / 1e3);
  r["p99_us"] = round1(static_cast<double>(h.quantile(0.99)) / 1e3);
  r["p999_us"] = round1(static_cast<double>(h.quantile(0.999)) / 1e3);
  histogram read = merged(rt, &worker_thread::read_latency);
  r["read_p50_us"] = round1(static_cast<double>(read.quantile(0.5)) / 1e3);
  r["read_p99_us"] = round1(static_cast<double>(read.quantile(0.99)) / 1e3);
  r["read_p999_us"] = round1(static_cast<double>(read.quantile(0.999)) / 1e3);
  r["closed"] = sum(rt, [](worker_thread& t) -> counter& { return t.closed; });
}

std::string padding(std::size_t size, std::size_t used) { return std::string(size > used ? size - used : 0, 'x'); }

// Fixed-rate sending for one slot: every tick, send what is due since t0 at
// `per_s` events per second, as long as fewer than `window` are outstanding
// (what cannot be sent is counted as skipped, not sent late).
struct rate_state {
  explicit rate_state(asio::io_context& ioc) : timer(ioc) {}
  asio::steady_timer timer;
  std::int64_t t0 = 0;
  std::uint64_t due_sent = 0;
};

void rate_tick(slot& s, const std::shared_ptr<rate_state>& st, double per_s, std::size_t window, const phase& ph,
               const std::function<void(slot&)>& send_one) {
  if (ph.stop.load(std::memory_order_relaxed) || s.client->closed()) return;
  auto due = static_cast<std::uint64_t>(static_cast<double>(steady_now_ns() - st->t0) / 1e9 * per_s);
  while (st->due_sent < due) {
    ++st->due_sent;
    if (s.outstanding < window)
      send_one(s);
    else
      s.thread->skipped.add();
  }
  auto next_ns = static_cast<std::int64_t>(static_cast<double>(st->due_sent + 1) * 1e9 / per_s);
  st->timer.expires_at(steady::time_point{std::chrono::nanoseconds(st->t0 + next_ns)});
  st->timer.async_wait([&s, st, per_s, window, &ph, send_one](boost::system::error_code ec) {
    if (!ec) rate_tick(s, st, per_s, window, ph, send_one);
  });
}

void start_rate(slot& s, double per_s, std::size_t window, const phase& ph, std::function<void(slot&)> send_one) {
  auto st = std::make_shared<rate_state>(s.thread->ioc);
  st->t0 = steady_now_ns();
  s.extra = st;
  rate_tick(s, st, per_s, window, ph, send_one);
}

bool is_error_ack(std::string_view args) { return args.rfind("[{\"error\"", 0) == 0; }

// Declared after a scenario's locals, so it is destroyed first: the
// generator threads stop before anything their handlers refer to goes.
struct stop_threads_first {
  runtime& rt;
  ~stop_threads_first() { rt.shutdown(); }
};

}  // namespace

// ------------------------------------------------------------------ fanout

boost::json::object run_fanout(runtime& rt, const scenario_options& o) {
  const std::size_t subs = o.subscribers, pubs = std::max<std::size_t>(1, o.publishers);
  const std::size_t window = o.window ? o.window : (o.rate > 0 ? 64 : 8);
  const std::uint64_t max_lag = o.max_lag ? o.max_lag : window * subs;
  phase ph;
  std::atomic<std::size_t> joined{0};
  const std::string room_json = boost::json::serialize(boost::json::value(o.room));
  const std::string join_packet =
      sio::encode(sio::packet{sio::packet_type::event, "/", std::uint64_t{0}, "[\"join\"," + room_json + "]", 0});

  // Deliveries still owed to subscribers that are connected; the closed loop
  // keeps this under max_lag, so a slow generator cannot make the server drop
  // subscribers as slow consumers.
  auto lag = [&rt, subs] {
    std::uint64_t sent = 0, rejected = 0, received = 0, closed = 0;
    for (auto& t : rt.threads()) {
      sent += t->sent.get();
      rejected += t->rejected.get();
      received += t->received.get();
      closed += t->closed.get();
    }
    std::uint64_t alive = subs > closed ? subs - closed : 0;
    std::uint64_t owed = (sent - std::min(sent, rejected)) * alive;
    return owed > received ? owed - received : 0;
  };

  std::function<void(slot&)> send_say = [&](slot& s) {
    auto [ts, id] = note_send(s, ph);
    std::string text = std::to_string(ts);
    text += ' ';
    text += padding(o.size, text.size());
    std::string args = "[\"say\",{\"room\":" + room_json + ",\"text\":\"" + text + "\"}]";
    s.client->send(sio::encode(sio::packet{sio::packet_type::event, "/", id, std::move(args), 0}));
  };

  // Closed loop: keep `window` says outstanding while the lag allows; when
  // it does not, look again shortly.
  std::function<void(slot&)> pump = [&](slot& s) {
    if (ph.stop.load(std::memory_order_relaxed) || s.client->closed()) return;
    while (s.outstanding < window) {
      if (lag() >= max_lag) {
        auto st = std::static_pointer_cast<asio::steady_timer>(s.extra);
        st->expires_after(200us);
        st->async_wait([&s, &pump](boost::system::error_code ec) {
          if (!ec) pump(s);
        });
        return;
      }
      send_say(s);
    }
  };

  stop_threads_first guard{rt};
  auto res = rt.connect(subs + pubs, [&](slot& s) {
    client_handlers h;
    if (s.index < subs) {
      h.on_ready = [&s, &join_packet = join_packet] { s.client->send(join_packet); };
      h.on_ack = [&joined](std::uint64_t, std::string_view) { joined.fetch_add(1); };
      h.on_event = [&s, &ph](std::string_view args) {
        if (args.rfind("[\"said\"", 0) != 0) return;
        auto at = args.find("\"text\":\"");
        if (at == std::string_view::npos) return;
        std::int64_t ts = 0;
        const char* b = args.data() + at + 8;
        std::from_chars(b, args.data() + args.size(), ts);
        std::int64_t now = steady_now_ns();
        worker_thread& t = *s.thread;
        t.received.add();
        if (ph.in_window(now)) t.in_window.add();
        if (ph.in_window(ts)) {
          t.cohort.add();
          record_latency(t, ts, s.client->arrived_ns(), now);
        }
      };
    } else {
      s.sent_at.assign(window, 0);
      s.extra = std::make_shared<asio::steady_timer>(s.thread->ioc);
      h.on_ack = [&s, &ph, &pump, rate = o.rate](std::uint64_t id, std::string_view args) {
        if (s.outstanding) --s.outstanding;
        std::int64_t ts = s.sent_at[id % s.sent_at.size()];
        if (args.rfind("[true", 0) != 0) {
          s.thread->rejected.add();
          if (ph.in_window(ts)) s.thread->rejected_cohort.add();
        }
        if (rate <= 0) pump(s);
      };
    }
    return h;
  }, o.deadline);
  if (res.ready < subs + pubs)
    throw std::runtime_error("fanout: " + std::to_string(res.ready) + " of " + std::to_string(subs + pubs) +
                             " connections ready; first error: " + res.first_error);
  if (!wait_for(o, 30, [&] { return joined.load() >= subs; }))
    throw std::runtime_error("fanout: only " + std::to_string(joined.load()) + " of " + std::to_string(subs) +
                             " subscribers joined");

  std::vector<slot*> publishers;
  for (std::size_t i = subs; i < subs + pubs; ++i) publishers.push_back(&rt.slots()[i]);
  for (slot* p : publishers)
    asio::post(p->thread->ioc, [p, &o, &pump, &send_say, &ph, window, pubs] {
      if (o.rate > 0)
        start_rate(*p, o.rate / static_cast<double>(pubs), window, ph, send_say);
      else
        pump(*p);
    });

  auto [a, b] = measure_window(o, ph);

  // Drain: wait for the deliveries owed for says sent in the window.
  auto expected = [&] {
    std::uint64_t sent = sum(rt, [](worker_thread& t) -> counter& { return t.sent_cohort; });
    std::uint64_t rej = sum(rt, [](worker_thread& t) -> counter& { return t.rejected_cohort; });
    return (sent - std::min(sent, rej)) * subs;
  };
  auto received = [&] { return sum(rt, [](worker_thread& t) -> counter& { return t.cohort; }); };
  wait_for(o, o.drain_s, [&] { return received() >= expected(); });
  // Let outstanding acks land so the rejected count is complete.
  wait_for(o, 1.0, [&] {
    std::size_t out = 0;
    for (slot* p : publishers) out += p->outstanding;  // racy read of a plain counter: only a hint
    return out == 0;
  });

  boost::json::object r;
  r["scenario"] = "fanout";
  r["label"] = o.label;
  r["mode"] = o.rate > 0 ? "rate" : "closed";
  if (o.rate > 0) r["rate"] = o.rate;
  r["subscribers"] = subs;
  r["publishers"] = pubs;
  r["window"] = window;
  r["size"] = o.size;
  std::uint64_t in_win = sum(rt, [](worker_thread& t) -> counter& { return t.in_window; });
  std::uint64_t exp = expected(), got = received();
  std::uint64_t sent_win = sum(rt, [](worker_thread& t) -> counter& { return t.sent_cohort; });
  double secs = static_cast<double>(b.wall_ns - a.wall_ns) / 1e9;
  r["deliveries_per_s"] = static_cast<std::int64_t>(std::round(static_cast<double>(in_win) / secs));
  r["says_per_s"] = static_cast<std::int64_t>(std::round(static_cast<double>(sent_win) / secs));
  add_outcome(r, rt, exp, got);
  add_common(r, rt, o, a, b, in_win, "delivery");
  return r;
}

// ------------------------------------------------------- echo and polling

boost::json::object run_echo(runtime& rt, const scenario_options& o) {
  const std::size_t conns = o.connections ? o.connections : 100;
  const std::size_t window = o.window ? o.window : (o.rate > 0 ? 64 : 1);
  phase ph;
  const std::string args = "[\"echo\",\"" + padding(o.size, 0) + "\"]";

  std::function<void(slot&)> send_echo = [&](slot& s) {
    auto id = note_send(s, ph).id;
    s.client->send(sio::encode(sio::packet{sio::packet_type::event, "/", id, args, 0}));
  };
  std::function<void(slot&)> pump = [&](slot& s) {
    while (!ph.stop.load(std::memory_order_relaxed) && !s.client->closed() && s.outstanding < window) send_echo(s);
  };

  stop_threads_first guard{rt};
  auto res = rt.connect(conns, [&](slot& s) {
    s.sent_at.assign(window, 0);
    client_handlers h;
    h.on_ack = [&s, &ph, &pump, rate = o.rate](std::uint64_t id, std::string_view reply) {
      std::int64_t now = steady_now_ns();
      if (s.outstanding) --s.outstanding;
      std::int64_t ts = s.sent_at[id % s.sent_at.size()];
      worker_thread& t = *s.thread;
      if (is_error_ack(reply)) {
        t.rejected.add();
        if (ph.in_window(ts)) t.rejected_cohort.add();
      } else {
        t.received.add();
        if (ph.in_window(now)) t.in_window.add();
        if (ph.in_window(ts)) {
          t.cohort.add();
          record_latency(t, ts, s.client->arrived_ns(), now);
        }
      }
      if (rate <= 0) pump(s);
    };
    return h;
  }, o.deadline);
  if (res.ready < conns)
    throw std::runtime_error(o.scenario + ": " + std::to_string(res.ready) + " of " + std::to_string(conns) +
                             " connections ready; first error: " + res.first_error);

  const double per_conn = o.rate / static_cast<double>(conns);
  rt.for_each_slot([&, per_conn](slot& s) {
    if (o.rate > 0)
      start_rate(s, per_conn, window, ph, send_echo);
    else
      pump(s);
  });

  auto [a, b] = measure_window(o, ph);

  auto expected = [&] {
    return sum(rt, [](worker_thread& t) -> counter& { return t.sent_cohort; }) -
           sum(rt, [](worker_thread& t) -> counter& { return t.rejected_cohort; });
  };
  auto received = [&] { return sum(rt, [](worker_thread& t) -> counter& { return t.cohort; }); };
  wait_for(o, o.drain_s, [&] { return received() >= expected(); });

  boost::json::object r;
  r["scenario"] = o.scenario;
  r["label"] = o.label;
  r["mode"] = o.rate > 0 ? "rate" : "closed";
  if (o.rate > 0) r["rate"] = o.rate;
  r["connections"] = conns;
  r["window"] = window;
  r["size"] = o.size;
  std::uint64_t in_win = sum(rt, [](worker_thread& t) -> counter& { return t.in_window; });
  double secs = static_cast<double>(b.wall_ns - a.wall_ns) / 1e9;
  r["acks_per_s"] = static_cast<std::int64_t>(std::round(static_cast<double>(in_win) / secs));
  add_outcome(r, rt, expected(), received());
  add_common(r, rt, o, a, b, in_win, "ack");
  return r;
}

// ------------------------------------------------------------ connections

boost::json::object run_connections(runtime& rt, const scenario_options& o) {
  const std::size_t n = o.connections ? o.connections : 10000;
  std::atomic<std::size_t> verified{0};
  auto check_packet = sio::encode(sio::packet{sio::packet_type::event, "/", std::uint64_t{1}, "[\"echo\",\"ok\"]", 0});

  std::atomic<std::size_t> alive{0};
  std::atomic<std::uint64_t> min_pings{UINT64_MAX};
  std::atomic<std::size_t> visited{0};
  stop_threads_first guard{rt};
  std::uint64_t rss_before = procs_rss_kib(o.server_pids);
  sample s0 = sample::take(o.server_pids);
  auto res = rt.connect(n, [&](slot&) {
    client_handlers h;
    h.on_ack = [&verified](std::uint64_t id, std::string_view reply) {
      if (id == 1 && !is_error_ack(reply)) verified.fetch_add(1);
    };
    return h;
  }, o.deadline);
  sample s1 = sample::take(o.server_pids);
  std::uint64_t rss_connected = procs_rss_kib(o.server_pids);
  if (res.ready == 0) throw std::runtime_error("connections: none connected; first error: " + res.first_error);

  unsigned interval_ms = 0;
  {
    std::promise<unsigned> p;
    auto f = p.get_future();
    slot* first = nullptr;
    for (auto& s : rt.slots())
      if (s.client && s.client->ready()) {
        first = &s;
        break;
      }
    if (first) {
      asio::post(first->thread->ioc, [first, &p] { p.set_value(first->client->ping_interval_ms()); });
      interval_ms = f.get();
    }
  }
  double hold = o.hold_s > 0 ? o.hold_s : (interval_ms ? 3.0 * interval_ms / 1000.0 + 1.0 : 10.0);
  std::uint64_t closed_before_hold = sum(rt, [](worker_thread& t) -> counter& { return t.closed; });
  sample h0 = sample::take(o.server_pids);
  sleep_bounded(o, hold);
  sample h1 = sample::take(o.server_pids);
  // Idle connections after several ping rounds: the figure per connection.
  // (After the echo check below, the server also holds whatever its request
  // path kept from answering every connection at once.)
  std::uint64_t rss_held = procs_rss_kib(o.server_pids);
  std::uint64_t closed_after_hold = sum(rt, [](worker_thread& t) -> counter& { return t.closed; });

  // Every connection still there must answer an echo.
  for (auto& slot_ref : rt.slots())
    asio::post(slot_ref.thread->ioc, [&, sp = &slot_ref] {
    slot& s = *sp;
    if (s.client && s.client->ready() && !s.client->closed()) {
      alive.fetch_add(1);
      std::uint64_t p = s.client->pings(), cur = min_pings.load();
      while (p < cur && !min_pings.compare_exchange_weak(cur, p)) {
      }
      s.client->send(check_packet);
    }
    visited.fetch_add(1);
    });
  wait_for(o, 10, [&] { return visited.load() >= rt.slots().size(); });
  wait_for(o, 10, [&] { return verified.load() >= alive.load(); });
  std::uint64_t rss_after = procs_rss_kib(o.server_pids);

  boost::json::object r;
  r["scenario"] = "connections";
  r["label"] = o.label;
  r["connections"] = n;
  r["connected"] = res.ready;
  r["failed"] = res.failed;
  if (!res.first_error.empty()) r["first_error"] = res.first_error;
  r["connect_s"] = round3(res.seconds);
  r["connects_per_s"] = static_cast<std::int64_t>(std::round(static_cast<double>(res.ready) / res.seconds));
  r["ping_interval_ms"] = interval_ms;
  r["hold_s"] = round3(hold);
  r["dropped_in_hold"] = closed_after_hold - closed_before_hold;
  r["alive_after_hold"] = alive.load();
  r["verified"] = verified.load();
  r["min_pings"] = min_pings.load() == UINT64_MAX ? 0 : min_pings.load();
  r["gen_cpu_us_per_connect"] =
      res.ready ? round1(static_cast<double>(s1.gen_cpu_us - s0.gen_cpu_us) / static_cast<double>(res.ready)) : 0.0;
  r["gen_threads"] = rt.threads().size();
  if (!o.server_pids.empty()) {
    r["server_rss_before_kib"] = rss_before;
    r["server_rss_connected_kib"] = rss_connected;
    r["server_rss_held_kib"] = rss_held;
    r["server_rss_after_kib"] = rss_after;
    std::size_t held = std::max<std::size_t>(1, verified.load());
    r["rss_per_conn_bytes"] = static_cast<std::int64_t>(std::round(static_cast<double>(rss_held > rss_before ? rss_held - rss_before : 0) *
                                         1024.0 / static_cast<double>(held)));
    r["server_cpu_us_per_connect"] =
        res.ready ? round1(static_cast<double>(s1.server_cpu_us - s0.server_cpu_us) / static_cast<double>(res.ready))
                  : 0.0;
    double hold_secs = static_cast<double>(h1.wall_ns - h0.wall_ns) / 1e9;
    r["server_idle_cpu_pct"] = round1(static_cast<double>(h1.server_cpu_us - h0.server_cpu_us) / (hold_secs * 1e4));
  }
  r["closed"] = sum(rt, [](worker_thread& t) -> counter& { return t.closed; });
  return r;
}

}  // namespace sidecast::bench
