#pragma once
// The built-in example services, written only against the worker SDK.
#include <functional>

#include <CLI/CLI.hpp>
#include <map>
#include <string>

#include "workers/chat/chat.hpp"
#include "workers/sdk/worker.hpp"
#include "workers/vm/vm.hpp"

namespace sidecast::workers {

/// The app contract (docs/services.md, "demo"): echo, echo-bin,
/// whoami, join, leave, say -> said, call-me-back, bye; refuses /forbidden.
service demo_service(unsigned capacity);

/// Answers every event with its own arguments (benchmarks, smoke tests).
service echo_service(unsigned capacity);

/// The app of the official socket.io-protocol test suite (conformance runs).
service protocol_suite_service(unsigned capacity);

/// Settings of the built-in services (flags of sidecast-worker and `sidecast demo`).
struct builtin_options {
  unsigned capacity = 16;
  chat_options chat;
  vm_options vm;
  std::shared_ptr<prometheus::Registry> metrics;  // where services register their own series (may be null)
};

/// The flags for builtin_options: --capacity, --chat-db, --vm-launch-ms, ...
void add_options(CLI::App& app, builtin_options& options);

/// Built-in services by name, for `sidecast-worker --service NAME`.
using service_factory = std::function<service(const builtin_options&)>;
const std::map<std::string, service_factory>& builtin_services();

}  // namespace sidecast::workers
