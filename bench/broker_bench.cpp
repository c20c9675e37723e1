// sidecast-bench-broker: request round trips through a sidecast-broker (to
// 1..N echo workers) next to a raw libzmq ROUTER echo, the floor.
//
//   sidecast-bench-broker echo-server --bind tcp://127.0.0.1:7800
//   sidecast-bench-broker client --connect tcp://127.0.0.1:7800 --raw
//   sidecast-bench-broker client --connect tcp://127.0.0.1:7700 --workers 2
//
// bench/run-broker starts the servers pinned to CPU 0 and prints the table.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <sstream>
#include <thread>
#include <unordered_map>
#include <vector>

#include <CLI/CLI.hpp>
#include <zmq.hpp>

#include "proto/codec.hpp"
#include "workers/demo/demo.hpp"

namespace {

using namespace std::chrono_literals;
using clock_type = std::chrono::steady_clock;
using sidecast::proto::Envelope;

// CPU seconds (user + system) a process has used, from /proc.
double cpu_seconds(int pid) {
  std::ifstream f{"/proc/" + std::to_string(pid) + "/stat"};
  std::string text{std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
  auto close = text.rfind(')');
  if (close == std::string::npos) return 0;
  std::istringstream rest{text.substr(close + 2)};
  std::vector<std::string> fields{std::istream_iterator<std::string>(rest), {}};
  if (fields.size() < 13) return 0;
  return (std::stod(fields[11]) + std::stod(fields[12])) / static_cast<double>(sysconf(_SC_CLK_TCK));
}

int echo_server(const std::string& bind) {
  zmq::context_t ctx{1};
  zmq::socket_t router{ctx, zmq::socket_type::router};
  router.set(zmq::sockopt::sndhwm, 0);
  router.set(zmq::sockopt::rcvhwm, 0);
  router.bind(bind);
  for (;;) {
    zmq::message_t id, payload;
    if (!router.recv(id) || !router.recv(payload)) continue;
    router.send(id, zmq::send_flags::sndmore);
    router.send(payload, zmq::send_flags::none);
  }
}

// A worker that answers every request at once, on its own thread, without
// the SDK's thread pool: it measures the broker, not the handler machinery.
void raw_worker(zmq::context_t& ctx, const std::string& endpoint, const std::string& id,
                std::atomic<bool>& stop) {
  zmq::socket_t s{ctx, zmq::socket_type::dealer};
  s.set(zmq::sockopt::routing_id, id);
  s.set(zmq::sockopt::linger, 0);
  s.set(zmq::sockopt::sndhwm, 0);
  s.set(zmq::sockopt::rcvhwm, 0);
  s.connect(endpoint);
  Envelope hello;
  hello.mutable_hello()->set_id(id);
  hello.mutable_hello()->set_role(sidecast::proto::ROLE_WORKER);
  hello.mutable_hello()->set_protocol_version(sidecast::proto::protocol_version);
  auto* svc = hello.mutable_hello()->add_services();
  svc->set_name("echo");
  svc->set_capacity(100000);
  s.send(zmq::buffer(sidecast::proto::encode(hello)));
  auto last_heartbeat = clock_type::now();
  while (!stop) {
    zmq::pollitem_t item{s.handle(), 0, ZMQ_POLLIN, 0};
    zmq::poll(&item, 1, 100ms);
    if (clock_type::now() - last_heartbeat > 500ms) {
      Envelope hb;
      hb.mutable_heartbeat();
      s.send(zmq::buffer(sidecast::proto::encode(hb)), zmq::send_flags::dontwait);
      last_heartbeat = clock_type::now();
    }
    if (!(item.revents & ZMQ_POLLIN)) continue;
    zmq::message_t msg;
    while (s.recv(msg, zmq::recv_flags::dontwait)) {
      auto env = sidecast::proto::decode(msg.to_string_view());
      if (!env || !env->has_request()) continue;
      Envelope reply;
      reply.mutable_reply()->set_id(env->request().id());
      reply.mutable_reply()->set_args(env->request().args());
      s.send(zmq::buffer(sidecast::proto::encode(reply)), zmq::send_flags::none);
    }
  }
}

struct result {
  double p50_us = 0, p99_us = 0, rate = 0, server_cpu_us = 0;
};

double percentile(std::vector<double>& v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<std::size_t>(p * static_cast<double>(v.size())))];
}

int client(const std::string& endpoint, bool raw, unsigned workers, bool sdk_workers, std::size_t samples,
           std::size_t requests, std::size_t window, int server_pid, const std::string& label) {
  zmq::context_t ctx{1};
  std::atomic<bool> stop{false};
  std::vector<std::thread> raw_threads;
  std::vector<std::unique_ptr<sidecast::worker>> sdk;
  if (!raw) {
    for (unsigned i = 0; i < workers; ++i) {
      auto id = "bench-w" + std::to_string(i);
      if (sdk_workers) {
        sidecast::worker_options o;
        o.id = id;
        o.broker = endpoint;
        o.publish.clear();
        o.threads = 2;
        auto w = std::make_unique<sidecast::worker>(o, &ctx);
        w->add(sidecast::workers::echo_service(10000));
        w->start();
        sdk.push_back(std::move(w));
      } else {
        raw_threads.emplace_back([&ctx, &endpoint, id, &stop] { raw_worker(ctx, endpoint, id, stop); });
      }
    }
  }
  zmq::socket_t s{ctx, zmq::socket_type::dealer};
  s.set(zmq::sockopt::routing_id, std::string{"bench-client"});
  s.set(zmq::sockopt::linger, 0);
  s.set(zmq::sockopt::sndhwm, 0);
  s.set(zmq::sockopt::rcvhwm, 0);
  s.connect(endpoint);
  if (!raw) {
    Envelope hello;
    hello.mutable_hello()->set_id("bench-client");
    hello.mutable_hello()->set_role(sidecast::proto::ROLE_CLIENT);
    hello.mutable_hello()->set_protocol_version(sidecast::proto::protocol_version);
    s.send(zmq::buffer(sidecast::proto::encode(hello)));
  }
  std::uint64_t next = 0;
  auto make = [&] {
    Envelope env;
    auto* r = env.mutable_request();
    r->set_id("bench-client:" + std::to_string(++next));
    r->set_service("echo");
    r->set_event("echo");
    r->set_args(R"(["hello",1])");
    r->set_wants_reply(true);
    r->set_timeout_ms(30000);
    r->set_attempt(1);
    return sidecast::proto::encode(env);
  };
  // Welcome and heartbeats from the broker are not replies.
  auto is_reply = [&](const zmq::message_t& msg) {
    if (raw) return true;
    auto env = sidecast::proto::decode(msg.to_string_view());
    return env && env->has_reply() && env->reply().code() == sidecast::proto::OK;
  };
  // Receives one reply; false after 5 s without one.
  auto receive_reply = [&]() {
    for (;;) {
      zmq::pollitem_t item{s.handle(), 0, ZMQ_POLLIN, 0};
      zmq::poll(&item, 1, 5000ms);
      if (!(item.revents & ZMQ_POLLIN)) return false;
      zmq::message_t msg;
      if (!s.recv(msg)) return false;
      if (is_reply(msg)) return true;
    }
  };
  // Warm up until every worker is registered (a reply comes back).
  auto warm_until = clock_type::now() + 10s;
  for (int ok = 0; ok < 200 && clock_type::now() < warm_until;) {
    s.send(zmq::buffer(make()));
    if (receive_reply()) ++ok;
  }
  std::this_thread::sleep_for(200ms);
  result r;
  std::vector<double> rtts;
  rtts.reserve(samples);
  for (std::size_t i = 0; i < samples; ++i) {
    auto payload = make();
    auto t0 = clock_type::now();
    s.send(zmq::buffer(payload));
    if (!receive_reply()) {
      std::fprintf(stderr, "%s: reply lost in the latency phase\n", label.c_str());
      return 1;
    }
    rtts.push_back(std::chrono::duration<double, std::micro>(clock_type::now() - t0).count());
  }
  r.p50_us = percentile(rtts, 0.50);
  r.p99_us = percentile(rtts, 0.99);

  double cpu0 = server_pid > 0 ? cpu_seconds(server_pid) : 0;
  auto t0 = clock_type::now();
  std::size_t sent = 0, received = 0;
  while (received < requests) {
    while (sent < requests && sent - received < window) {
      s.send(zmq::buffer(make()));
      ++sent;
    }
    if (!receive_reply()) {
      std::fprintf(stderr, "%s: %zu replies lost in the throughput phase\n", label.c_str(), sent - received);
      return 1;
    }
    ++received;
    zmq::message_t msg;
    while (received < sent && s.recv(msg, zmq::recv_flags::dontwait)) received += is_reply(msg);
  }
  double secs = std::chrono::duration<double>(clock_type::now() - t0).count();
  r.rate = static_cast<double>(requests) / secs;
  if (server_pid > 0) r.server_cpu_us = (cpu_seconds(server_pid) - cpu0) * 1e6 / static_cast<double>(requests);
  std::printf(
      "{\"bench\":\"broker\",\"case\":\"%s\",\"p50_us\":%.1f,\"p99_us\":%.1f,\"req_per_s\":%.0f,"
      "\"server_cpu_us_per_req\":%.2f,\"samples\":%zu,\"requests\":%zu,\"window\":%zu}\n",
      label.c_str(), r.p50_us, r.p99_us, r.rate, r.server_cpu_us, samples, requests, window);
  stop = true;
  for (auto& t : raw_threads) t.join();
  for (auto& w : sdk) w->stop();
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"sidecast-bench-broker: broker round trips vs raw libzmq"};
  app.require_subcommand(1);
  std::string bind = "tcp://127.0.0.1:7800";
  auto* server = app.add_subcommand("echo-server", "a raw ROUTER echo (the floor)");
  server->add_option("--bind", bind)->capture_default_str();
  std::string connect = "tcp://127.0.0.1:7700", label;
  bool raw = false, sdk_workers = false;
  unsigned workers = 1;
  std::size_t samples = 5000, requests = 200000, window = 1000;
  int server_pid = 0;
  auto* cli = app.add_subcommand("client", "measures latency and pipelined throughput");
  cli->add_option("--connect", connect)->capture_default_str();
  cli->add_flag("--raw", raw, "talk to echo-server instead of a broker");
  cli->add_option("--workers", workers, "echo workers behind the broker")->capture_default_str();
  cli->add_flag("--sdk", sdk_workers, "use SDK workers (thread pool) instead of raw loops");
  cli->add_option("--samples", samples, "sequential round trips for latency")->capture_default_str();
  cli->add_option("--requests", requests, "pipelined requests for throughput")->capture_default_str();
  cli->add_option("--window", window, "requests in flight when pipelining")->capture_default_str();
  cli->add_option("--server-pid", server_pid, "pid whose CPU time is reported per request");
  cli->add_option("--label", label, "case name in the output");
  CLI11_PARSE(app, argc, argv);
  if (server->parsed()) return echo_server(bind);
  if (label.empty()) label = raw ? "raw" : "broker-" + std::to_string(workers) + "w";
  return client(connect, raw, workers, sdk_workers, samples, requests, window, server_pid, label);
}
