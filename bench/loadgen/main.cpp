// sidecast-bench: a Socket.IO v4 load generator for any server that
// implements the app contract of docs/services.md (echo, join, say → said).
//
//   sidecast-bench --scenario fanout --server 127.0.0.1:8080 --server-pid PID
//   sidecast-bench --scenario echo --connections 100
//   sidecast-bench --scenario echo --connections 1 --rate 500      # latency at a fixed rate
//   sidecast-bench --scenario connections --connections 10000 --hold 35
//   sidecast-bench --scenario polling --connections 100
//
// One JSON object per result on stdout (one line, nothing else on stdout);
// the same figures as a readable table on stderr. See docs/benchmarks.md.
#include <cstdio>
#include <iostream>
#include <stdexcept>

#include <CLI/CLI.hpp>
#include <boost/asio/ip/address.hpp>
#include <boost/json.hpp>

#include "bench/loadgen/runtime.hpp"
#include "bench/loadgen/scenarios.hpp"

namespace {

using namespace sidecast::bench;

void print_table(const boost::json::object& r) {
  std::fprintf(stderr, "---- %s / %s\n", r.at("scenario").as_string().c_str(), r.at("label").as_string().c_str());
  for (const auto& kv : r) {
    if (kv.key() == "scenario" || kv.key() == "label") continue;
    std::string v;
    if (kv.value().is_string()) {
      v = kv.value().as_string();
    } else if (kv.value().is_double()) {
      char buf[64];
      std::snprintf(buf, sizeof buf, "%.3f", kv.value().as_double());
      v = buf;
      while (v.back() == '0') v.pop_back();
      if (v.back() == '.') v.pop_back();
    } else {
      v = boost::json::serialize(kv.value());
    }
    std::fprintf(stderr, "  %-26s %s\n", std::string(kv.key()).c_str(), v.c_str());
  }
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"sidecast-bench: Socket.IO v4 load generator (fanout, echo, connections, polling)"};
  scenario_options o;
  std::string server = "127.0.0.1:8080";
  unsigned threads = 0;
  unsigned source_ips = 253;
  std::size_t concurrency = 200;
  double timeout_s = 300;
  bool quiet = false;
  app.add_option("--scenario", o.scenario, "fanout, echo, connections or polling")
      ->required()
      ->check(CLI::IsMember({"fanout", "echo", "connections", "polling"}));
  app.add_option("--server", server, "Server HOST:PORT (IPv4)")->capture_default_str();
  app.add_option("--label", o.label, "Name of the server in the output");
  app.add_option("--server-pid", o.server_pids,
                 "Server process to measure (CPU from /proc/PID/stat, RSS from /proc/PID/status); repeatable, summed");
  app.add_option("--threads", threads, "Generator threads, one io_context each (0: the CPUs this process may use)")
      ->capture_default_str();
  app.add_option("--connections", o.connections, "echo/polling: connections (100); connections: idle connections (10000)");
  app.add_option("--subscribers", o.subscribers, "fanout: subscribers in the room")->capture_default_str();
  app.add_option("--publishers", o.publishers, "fanout: publishers")->capture_default_str();
  app.add_option("--window", o.window,
                 "Acked events outstanding per publisher (fanout: 8) or per connection (echo: 1); 64 with --rate");
  app.add_option("--rate", o.rate, "Events per second in all, at a fixed rate (0: closed loop)")->capture_default_str();
  app.add_option("--size", o.size, "Text bytes per say / echo")->capture_default_str();
  app.add_option("--max-lag", o.max_lag,
                 "fanout closed loop: deliveries owed to subscribers before publishers wait (0: window × subscribers)")
      ->capture_default_str();
  app.add_option("--warmup", o.warmup_s, "Seconds of load before the measured window")->capture_default_str();
  app.add_option("--duration", o.duration_s, "Seconds measured")->capture_default_str();
  app.add_option("--drain", o.drain_s, "Seconds to wait for messages sent in the window")->capture_default_str();
  app.add_option("--hold", o.hold_s, "connections: seconds to hold them idle (0: three ping intervals + 1 s)")
      ->capture_default_str();
  app.add_option("--concurrency", concurrency, "Connection attempts in flight")->capture_default_str();
  app.add_option("--source-ips", source_ips,
                 "Bind connections round-robin to 127.0.0.2 .. 127.0.0.(1+N), so no source address runs out of "
                 "ports or hits a per-address limit (0: do not bind)")
      ->capture_default_str()
      ->check(CLI::Range(0u, 253u));
  app.add_option("--room", o.room, "fanout: the room")->capture_default_str();
  app.add_option("--timeout", timeout_s, "Give up (exit 1) after this many seconds in all")->capture_default_str();
  app.add_flag("--quiet", quiet, "No table on stderr");
  bool beast_ws = false;
  app.add_flag("--beast-websocket", beast_ws,
               "WebSocket through beast::websocket::stream rather than the generator's own framing (a cross-check; "
               "costs the generator more CPU per message)");
  CLI11_PARSE(app, argc, argv);

  if (o.label.empty()) o.label = server;
  o.deadline = std::chrono::steady_clock::now() + std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                                                       std::chrono::duration<double>(timeout_s));
  std::uint64_t nofile = raise_nofile();

  runtime_options ro;
  ro.threads = threads ? threads : usable_cpus();
  ro.source_ips = source_ips;
  ro.concurrency = concurrency;
  ro.polling = o.scenario == "polling";
  ro.client.beast_websocket = beast_ws;
  try {
    auto colon = server.rfind(':');
    if (colon == std::string::npos) throw std::invalid_argument("--server wants HOST:PORT");
    ro.client.server = {boost::asio::ip::make_address_v4(server.substr(0, colon)),
                        static_cast<unsigned short>(std::stoul(server.substr(colon + 1)))};
    ro.client.host_header = server;
  } catch (const std::exception& e) {
    std::cerr << "sidecast-bench: bad --server " << server << ": " << e.what() << "\n";
    return 2;
  }

  boost::json::object result;
  try {
    runtime rt{ro};
    if (o.scenario == "fanout")
      result = run_fanout(rt, o);
    else if (o.scenario == "connections")
      result = run_connections(rt, o);
    else
      result = run_echo(rt, o);
  } catch (const std::exception& e) {
    boost::json::object err{{"scenario", o.scenario}, {"label", o.label}, {"error", e.what()}};
    std::cout << boost::json::serialize(err) << std::endl;
    std::cerr << "sidecast-bench: " << e.what() << "\n";
    return 1;
  }
  result["transport"] = o.scenario == "polling" ? "polling" : beast_ws ? "websocket-beast" : "websocket";
  result["nofile"] = nofile;
  std::cout << boost::json::serialize(result) << std::endl;
  if (!quiet) print_table(result);
  return 0;
}
