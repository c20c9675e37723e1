#pragma once
#include <CLI/CLI.hpp>

#include "broker/broker.hpp"

namespace sidecast::broker {

/// The broker's flags, of sidecast-broker only: `sidecast demo` does not take
/// them (its broker runs with broker_config's defaults).
void add_options(CLI::App& app, broker_config& config);

}  // namespace sidecast::broker
