#pragma once
// The built-in example services, written only against the worker SDK.
#include <functional>
#include <map>
#include <string>

#include "workers/sdk/worker.hpp"

namespace sidecast::workers {

/// The app contract of docs/app-contract.md (DESIGN.md): echo, echo-bin,
/// whoami, join, leave, say -> said, call-me-back, bye; refuses /forbidden.
service demo_service(unsigned capacity);

/// Answers every event with its own arguments (benchmarks, smoke tests).
service echo_service(unsigned capacity);

/// Built-in services by name, for `sidecast-worker --service NAME`.
using service_factory = std::function<service(unsigned capacity)>;
const std::map<std::string, service_factory>& builtin_services();

}  // namespace sidecast::workers
