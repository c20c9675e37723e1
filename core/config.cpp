#include "core/config.hpp"

#include <arpa/inet.h>
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <charconv>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <sstream>

#include <toml++/toml.h>

namespace sidecast::core {
namespace {

std::string scalar_text(const toml::node& node) {
  if (auto s = node.value<std::string>()) return *s;
  if (auto b = node.value_exact<bool>()) return *b ? "true" : "false";
  if (auto i = node.value_exact<std::int64_t>()) return std::to_string(*i);
  if (auto d = node.value_exact<double>()) {
    // Every digit (the shortest text that reads back the same): a stream's
    // six significant digits made 1234567.0 read as 1.23457e+06.
    std::array<char, 64> text;
    auto [end, ec] = std::to_chars(text.data(), text.data() + text.size(), *d);
    return ec == std::errc{} ? std::string(text.data(), end) : std::string{"nan"};
  }
  // Dates and times: their TOML text.
  std::ostringstream out;
  node.visit([&out](const auto& v) {
    if constexpr (toml::is_date<decltype(v)> || toml::is_time<decltype(v)> ||
                  toml::is_date_time<decltype(v)>)
      out << v;
  });
  return out.str();
}

void flatten(const toml::table& table, std::vector<std::string>& parents,
             std::vector<CLI::ConfigItem>& items) {
  for (const auto& [key, node] : table) {
    std::string name{key.str()};
    if (const auto* sub = node.as_table()) {
      parents.push_back(name);
      flatten(*sub, parents, items);
      parents.pop_back();
      continue;
    }
    CLI::ConfigItem item;
    item.parents = parents;
    item.name = name;
    if (const auto* array = node.as_array()) {
      for (const auto& element : *array) item.inputs.push_back(scalar_text(element));
    } else {
      item.inputs.push_back(scalar_text(node));
    }
    items.push_back(std::move(item));
  }
}

// CLI11 2.1 reads integers with strtoull/strtoll in base 0 and checks
// neither sign nor overflow: "-1" and 99999999999999999999 became 2^64-1
// for an unsigned count, "010" was 8 and "0x100" 256. Every integer option
// takes decimal digits only (a '-' where the type is signed), without
// leading zeros, within its type's 64 bits; ranges are checked after.
CLI::Validator decimal_integer(bool is_signed) {
  return CLI::Validator(
      [is_signed](std::string& text) -> std::string {
        std::string_view digits = text;
        if (is_signed && digits.starts_with('-')) digits.remove_prefix(1);
        bool decimal = !digits.empty() && std::all_of(digits.begin(), digits.end(), [](unsigned char c) {
          return c >= '0' && c <= '9';
        });
        if (!decimal || (digits.size() > 1 && digits.front() == '0'))
          return "'" + text + "' is not " + (is_signed ? "an integer" : "a non-negative integer") +
                 " (decimal digits, no leading zeros)";
        std::errc ec;
        if (is_signed) {
          std::int64_t value;
          ec = std::from_chars(text.data(), text.data() + text.size(), value).ec;
        } else {
          std::uint64_t value;
          ec = std::from_chars(text.data(), text.data() + text.size(), value).ec;
        }
        if (ec != std::errc{}) return "'" + text + "' is out of range";
        return {};
      },
      "", "decimal");
}

std::string env_name(std::string long_name) {
  std::transform(long_name.begin(), long_name.end(), long_name.begin(), [](unsigned char c) {
    return c == '-' ? '_' : static_cast<char>(std::toupper(c));
  });
  return "SIDECAST_" + long_name;
}

}  // namespace

std::string toml_config::to_config(const CLI::App* app, bool default_also, bool,
                                   std::string) const {
  toml::table table;
  for (const CLI::Option* opt : app->get_options()) {
    if (opt->get_lnames().empty() || !opt->get_configurable()) continue;
    const auto& name = opt->get_lnames().front();
    if (name == "help" || name == "config") continue;
    std::string value = opt->as<std::string>();
    if (value.empty() && default_also) value = opt->get_default_str();
    if (!value.empty()) table.insert(name, value);
  }
  std::ostringstream out;
  out << table;
  return out.str();
}

std::vector<CLI::ConfigItem> toml_config::from_config(std::istream& input) const {
  std::string text{std::istreambuf_iterator<char>(input), std::istreambuf_iterator<char>()};
  toml::table table;
  try {
    table = toml::parse(text);
  } catch (const toml::parse_error& e) {
    std::ostringstream where;
    where << e.source().begin;
    throw CLI::ConversionError("TOML config: " + std::string(e.description()) + " at " + where.str());
  }
  std::vector<CLI::ConfigItem> result;
  std::vector<std::string> parents;
  flatten(table, parents, result);
  // CLI11 applies a config file before the environment; the environment
  // should win (a container overrides one key of a shared file), so keys
  // whose SIDECAST_ variable is set are left to CLI11's environment step.
  // CLI11 takes no value from an empty variable (compose's ${UNSET}), so
  // neither does this: the file's value stands.
  std::erase_if(result, [](const CLI::ConfigItem& item) {
    const char* value = item.parents.empty() ? std::getenv(env_name(item.name).c_str()) : nullptr;
    return value != nullptr && *value != '\0';
  });
  return result;
}

void finish_app(CLI::App& app) {
  // Before any thread starts (threads inherit the policy of their creator).
  app.add_flag_function(
      "--sched-batch",
      [](std::int64_t on) {
        if (on <= 0) return;  // --sched-batch=false (CLI11 passes -1), SIDECAST_SCHED_BATCH=0
        sched_param param{};
        if (::sched_setscheduler(0, SCHED_BATCH, &param) != 0)
          std::fprintf(stderr, "--sched-batch: %s (running as before)\n", std::strerror(errno));
      },
      "Run every thread under SCHED_BATCH: a thread woken by another does not preempt it, so the threads "
      "a message crosses (HTTP, bridge, broker, worker) each take a batch per turn instead of one message. "
      "About 2x the acks per CPU second when they share a core; rare latency outliers of one scheduler tick");
  for (CLI::Option* opt : app.get_options()) {
    // The type's name, without its validators' descriptions ("UINT:INT in [1 - 10]").
    auto type = opt->get_type_name();
    type.resize(std::min(type.size(), type.find(':')));
    if (type == "INT" || type == "UINT") opt->check(decimal_integer(type == "INT"));
    if (opt->get_lnames().empty() || !opt->get_envname().empty()) continue;
    const auto& name = opt->get_lnames().front();
    if (name == "help") continue;
    opt->envname(env_name(name));
  }
  app.config_formatter(std::make_shared<toml_config>());
  app.set_config("--config", "", "TOML file with the same keys as the long flags")
      ->envname("SIDECAST_CONFIG");
  // A key that names no flag (a typo, a flag of another program) is an
  // error, not a setting silently left at its default.
  app.allow_config_extras(CLI::config_extras_mode::error);
}

namespace {

// Edits between a and b: a letter inserted, deleted, changed, or two
// neighbours swapped (the optimal string alignment distance).
std::size_t edits(std::string_view a, std::string_view b) {
  std::vector<std::vector<std::size_t>> d(a.size() + 1, std::vector<std::size_t>(b.size() + 1));
  for (std::size_t i = 0; i <= a.size(); ++i) d[i][0] = i;
  for (std::size_t j = 0; j <= b.size(); ++j) d[0][j] = j;
  for (std::size_t i = 1; i <= a.size(); ++i)
    for (std::size_t j = 1; j <= b.size(); ++j) {
      std::size_t cost = a[i - 1] == b[j - 1] ? 0 : 1;
      d[i][j] = std::min({d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost});
      if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1]) d[i][j] = std::min(d[i][j], d[i - 2][j - 2] + 1);
    }
  return d[a.size()][b.size()];
}

void env_names(const CLI::App& app, std::vector<std::pair<std::string, std::string>>& out) {
  for (const CLI::Option* opt : app.get_options())
    if (!opt->get_envname().empty()) out.emplace_back(opt->get_envname(), opt->get_name());
  for (const CLI::App* sub : app.get_subcommands({})) env_names(*sub, out);
}

}  // namespace

// Variables of one Sidecast program that are near misses of another's:
// an environment shared by both (compose's anchors) sets them on purpose.
// Python ConfigVariablesTest finds every such pair among the three
// programs' --help and checks that it is listed here.
constexpr std::array<std::string_view, 2> shared_near_misses = {"SIDECAST_ROUTE", "SIDECAST_ROUTER"};

std::vector<std::string> near_miss_warnings(const CLI::App& app, const std::vector<std::string>& names) {
  std::vector<std::pair<std::string, std::string>> known;  // (variable, option)
  env_names(app, known);
  constexpr std::string_view prefix = "SIDECAST_";
  const auto& path = app.get_name();  // argv[0], once parsed
  auto program = path.substr(path.find_last_of('/') + 1);
  std::vector<std::string> warnings;
  for (const auto& name : names) {
    if (!name.starts_with(prefix)) continue;
    if (std::any_of(known.begin(), known.end(), [&](const auto& k) { return k.first == name; })) continue;
    if (std::find(shared_near_misses.begin(), shared_near_misses.end(), name) != shared_near_misses.end()) continue;
    std::string_view rest = std::string_view{name}.substr(prefix.size());
    std::size_t allowed = rest.size() >= 8 ? 2 : 1;
    const std::pair<std::string, std::string>* best = nullptr;
    std::size_t best_edits = allowed + 1;
    for (const auto& k : known)
      if (auto e = edits(rest, std::string_view{k.first}.substr(prefix.size())); e < best_edits) {
        best_edits = e;
        best = &k;
      }
    if (best != nullptr)
      warnings.push_back(name + " is set, but " + program + " has no such variable: not " + best->first +
                         " (" + best->second + ")? It is ignored");
  }
  return warnings;
}

std::optional<int> parse(CLI::App& app, int argc, char** argv) {
  // CLI11 2.1 reads a main app's config file before the environment, so a
  // file named only by SIDECAST_CONFIG was never read (a subcommand's is
  // read below, after both): it is given as --config unless that is.
  std::vector<const char*> args(argv, argv + argc);
  const char* config_env = std::getenv("SIDECAST_CONFIG");
  if (auto* config = app.get_config_ptr(); config != nullptr && config_env != nullptr && *config_env != '\0') {
    bool given = std::any_of(args.begin() + std::min(argc, 1), args.end(), [](std::string_view a) {
      return a == "--config" || a.starts_with("--config=");
    });
    if (!given) args.insert(args.begin() + std::min(argc, 1), {"--config", config_env});
  }
  try {
    app.parse(static_cast<int>(args.size()), args.data());
    // CLI11 2.1 reads --config for the main app only. A subcommand's own
    // (`sidecast demo --config FILE`) is read here, with the same rules:
    // what flags and the environment gave is kept, unknown keys are errors.
    for (CLI::App* sub : app.get_subcommands()) {
      auto* config = sub->get_config_ptr();
      if (config == nullptr || config->count() == 0) continue;
      auto path = config->as<std::string>();
      std::ifstream file{path};
      if (!file) throw CLI::FileError::Missing(path);
      sub->parse_from_stream(file);
    }
    std::vector<std::string> set;
    for (char** e = environ; e != nullptr && *e != nullptr; ++e)
      if (std::string_view entry{*e}; entry.starts_with("SIDECAST_")) set.emplace_back(entry.substr(0, entry.find('=')));
    for (const auto& warning : near_miss_warnings(app, set)) std::fprintf(stderr, "warning: %s\n", warning.c_str());
  } catch (const CLI::ParseError& e) {
    // CLI11 words an unknown key as if the file did not parse.
    constexpr std::string_view extras = "INI was not able to parse ";
    if (std::string_view what = e.what(); what.starts_with(extras)) {
      std::fprintf(stderr, "config file: no flag --%s (a key is a long flag without its dashes)\n",
                   std::string{what.substr(extras.size())}.c_str());
      return e.get_exit_code();
    }
    return app.exit(e);
  }
  return std::nullopt;
}

CLI::Validator finite_range(double least, double most) {
  return CLI::Validator(
      [least, most](std::string& text) -> std::string {
        double value = 0;
        auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
        if (ec != std::errc{} || end != text.data() + text.size() || !std::isfinite(value))
          return "'" + text + "' is not a number";
        if (value < least || value > most)
          return "'" + text + "' is not in [" + CLI::detail::to_string(least) + " - " + CLI::detail::to_string(most) + "]";
        return {};
      },
      "in [" + CLI::detail::to_string(least) + " - " + CLI::detail::to_string(most) + "]", "finite_range");
}

CLI::Option* add_millis(CLI::App& app, const std::string& name, std::chrono::milliseconds& target,
                        const std::string& help, std::int64_t least) {
  return app
      .add_option_function<std::int64_t>(
          name, [&target](std::int64_t ms) { target = std::chrono::milliseconds(ms); }, help)
      ->default_str(std::to_string(target.count()))
      ->check(CLI::Range(least, std::int64_t{86400000}));
}

std::optional<host_port> parse_host_port(const std::string& text) {
  auto colon = text.rfind(':');
  if (colon == std::string::npos || colon + 1 >= text.size()) return std::nullopt;
  host_port hp;
  hp.host = text.substr(0, colon);
  if (hp.host.size() >= 2 && hp.host.front() == '[' && hp.host.back() == ']')
    hp.host = hp.host.substr(1, hp.host.size() - 2);
  if (hp.host.empty()) hp.host = "0.0.0.0";
  // A numeric address (the listeners do not resolve names): "localhost" is
  // taken as 127.0.0.1, any other name refused here, with the flag named by
  // the caller, rather than as "Invalid argument" when it binds.
  if (hp.host == "localhost") hp.host = "127.0.0.1";
  std::array<unsigned char, 16> ignored;
  if (::inet_pton(AF_INET, hp.host.c_str(), ignored.data()) != 1 &&
      ::inet_pton(AF_INET6, hp.host.c_str(), ignored.data()) != 1)
    return std::nullopt;
  unsigned port = 0;
  const char* first = text.data() + colon + 1;
  const char* last = text.data() + text.size();
  auto [ptr, ec] = std::from_chars(first, last, port);
  if (ec != std::errc{} || ptr != last || port > 65535) return std::nullopt;
  hp.port = static_cast<unsigned short>(port);
  return hp;
}

}  // namespace sidecast::core
