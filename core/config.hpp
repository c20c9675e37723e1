#pragma once
// Command-line setup shared by every binary: flags, SIDECAST_* environment
// variables and a TOML file, in that order of precedence.
#include <chrono>
#include <optional>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

namespace sidecast::core {

/// Reads TOML (via toml++) for CLI11. Keys are flag names without dashes
/// (`ping-interval = 25000`); tables become dotted parents.
class toml_config : public CLI::Config {
 public:
  std::string to_config(const CLI::App* app, bool default_also, bool write_description,
                        std::string prefix) const override;
  std::vector<CLI::ConfigItem> from_config(std::istream& input) const override;
};

/// Adds `--config FILE` (TOML) and gives every long option that has none an
/// environment variable: `--ping-interval` -> `SIDECAST_PING_INTERVAL`.
/// Call after all options are defined.
void finish_app(CLI::App& app);

/// Parses argv; returns an exit code when the program should stop now
/// (--help, or a usage error already printed). Warns on stderr of each
/// SIDECAST_* variable set that is a near miss of one of the app's
/// (near_miss_warnings()).
std::optional<int> parse(CLI::App& app, int argc, char** argv);

/// For each name in `names` ("SIDECAST_..." variables set) that is none of
/// the variables of `app`'s options (and its subcommands') but one or two
/// edits from one (a letter left out, added, changed, or two swapped; one
/// edit for a name of under 8 letters), a warning naming both: it would
/// otherwise be ignored in silence, its option left at its default. Other
/// names are left alone: a deployment may set one environment for several
/// programs, each taking its own.
std::vector<std::string> near_miss_warnings(const CLI::App& app, const std::vector<std::string>& names);

/// A number from `least` to `most`; NaN and infinities are refused (a
/// CLI::Range lets NaN through: every comparison with it is false).
CLI::Validator finite_range(double least, double most);

/// Adds an option taking milliseconds into a std::chrono field, from
/// `least` (1 unless 0 means something) to a day.
CLI::Option* add_millis(CLI::App& app, const std::string& name, std::chrono::milliseconds& target,
                        const std::string& help, std::int64_t least = 1);

/// Splits "host:port" (port required; the host a numeric IPv4 or IPv6
/// address, "[::1]" too, "localhost" for 127.0.0.1, empty for 0.0.0.0).
/// Returns nullopt when malformed.
struct host_port {
  std::string host;
  unsigned short port = 0;
};
std::optional<host_port> parse_host_port(const std::string& text);

}  // namespace sidecast::core
