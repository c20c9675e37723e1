#pragma once
#include <CLI/CLI.hpp>

#include "broker/broker.hpp"

namespace sidecast::broker {

/// The broker's flags, shared by sidecast-broker and `sidecast demo`.
void add_options(CLI::App& app, broker_config& config);

}  // namespace sidecast::broker
