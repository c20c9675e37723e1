// The scenarios of sidecast-bench. Each opens its connections through a
// runtime, runs a warm-up, a measured window and a drain, and returns one
// result as a JSON object (every figure in it measured in this run).
#pragma once

#include <chrono>
#include <cstddef>
#include <string>
#include <vector>

#include <boost/json/object.hpp>

#include "bench/loadgen/runtime.hpp"

namespace sidecast::bench {

struct scenario_options {
  std::string scenario;  // fanout, echo, connections, polling
  std::string label;     // names the server in the output
  std::size_t connections = 0;    // echo / polling / connections
  std::size_t subscribers = 1000;  // fanout
  std::size_t publishers = 1;      // fanout
  std::size_t window = 0;          // outstanding acked events per publisher / connection
  double rate = 0;                 // events/s in all (0: closed loop)
  std::size_t size = 16;           // text bytes per event
  std::uint64_t max_lag = 0;       // fanout closed loop: deliveries in flight (0: window × subscribers)
  double warmup_s = 1;
  double duration_s = 5;
  double drain_s = 3;
  double hold_s = 0;  // connections: 0 → three ping intervals + 1 s
  std::vector<int> server_pids;
  std::chrono::steady_clock::time_point deadline;  // the global --timeout
  std::string room = "bench";
};

// Throws std::runtime_error when the set-up fails (connections refused,
// joins unanswered) or the deadline passes.
boost::json::object run_fanout(runtime& rt, const scenario_options& o);
boost::json::object run_echo(runtime& rt, const scenario_options& o);  // also `polling`
boost::json::object run_connections(runtime& rt, const scenario_options& o);

}  // namespace sidecast::bench
