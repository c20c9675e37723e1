#include <sched.h>

#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <optional>
#include <thread>

#include <gtest/gtest.h>

#include "core/config.hpp"

namespace sidecast::core {
namespace {

struct args {
  std::vector<std::string> items;
  std::vector<char*> argv() {
    std::vector<char*> out;
    for (auto& s : items) out.push_back(s.data());
    return out;
  }
};

// `toml` written to a file of the test's temporary directory; its path.
std::string toml_file(const std::string& name, const std::string& toml) {
  auto path = std::string(::testing::TempDir()) + "/" + name;
  std::ofstream{path} << toml;
  return path;
}

// `prog --config FILE` (FILE holding `toml`) parsed into an app whose one
// option is --ping-interval.
struct ping_parse {
  int ping = 0;
  std::optional<int> code;  // parse()'s: set when the program is to exit
};
ping_parse parse_ping_file(const std::string& name, const std::string& toml) {
  ping_parse out;
  CLI::App app{"test"};
  app.add_option("--ping-interval", out.ping);
  finish_app(app);
  args a{{"prog", "--config", toml_file(name, toml)}};
  auto argv = a.argv();
  out.code = parse(app, static_cast<int>(argv.size()), argv.data());
  return out;
}

TEST(Config, FlagsEnvAndTomlInOrderOfPrecedence) {
  auto path = toml_file("sidecast-config-test.toml",
                        "ping-interval = 111\nname = \"from-file\"\nlevel = \"file\"\nlist = [\"a\", \"b\"]\n");
  int ping = 0;
  std::string name, level;
  std::vector<std::string> list;
  CLI::App app{"test"};
  app.add_option("--ping-interval", ping);
  app.add_option("--name", name);
  app.add_option("--level", level);
  app.add_option("--list", list);
  finish_app(app);
  ::setenv("SIDECAST_NAME", "from-env", 1);
  ::setenv("SIDECAST_LEVEL", "env", 1);
  args a{{"prog", "--config", path, "--level", "flag"}};
  auto argv = a.argv();
  ASSERT_FALSE(parse(app, static_cast<int>(argv.size()), argv.data()));
  ::unsetenv("SIDECAST_NAME");
  ::unsetenv("SIDECAST_LEVEL");
  EXPECT_EQ(ping, 111);
  EXPECT_EQ(name, "from-env");
  EXPECT_EQ(level, "flag");
  EXPECT_EQ(list, (std::vector<std::string>{"a", "b"}));
}

// A flag that repeats takes a list from its variable in brackets (what
// docs/deployment.md tells); without them the value is one entry.
TEST(Config, AListFromTheEnvironmentIsWrittenInBrackets) {
  for (auto [value, want] : {std::pair<const char*, std::vector<std::string>>{"[/=demo,/chat=chat]", {"/=demo", "/chat=chat"}},
                             {"/=demo,/chat=chat", {"/=demo,/chat=chat"}}}) {
    std::vector<std::string> routes;
    CLI::App app{"test"};
    app.add_option("--route", routes);
    finish_app(app);
    ::setenv("SIDECAST_ROUTE", value, 1);
    args a{{"prog"}};
    auto argv = a.argv();
    auto code = parse(app, static_cast<int>(argv.size()), argv.data());
    ::unsetenv("SIDECAST_ROUTE");
    ASSERT_FALSE(code);
    EXPECT_EQ(routes, want) << value;
  }
}

// An empty SIDECAST_ variable (compose's ${UNSET}) sets nothing in CLI11;
// it must not take the file's value away either.
TEST(Config, AnEmptyVariableLeavesTheFilesValue) {
  ::setenv("SIDECAST_PING_INTERVAL", "", 1);
  auto got = parse_ping_file("sidecast-config-empty-env.toml", "ping-interval = 222\n");
  ::unsetenv("SIDECAST_PING_INTERVAL");
  ASSERT_FALSE(got.code);
  EXPECT_EQ(got.ping, 222);
}

TEST(Config, BadTomlIsAUsageError) {
  auto got = parse_ping_file("sidecast-bad.toml", "ping-interval = = 3\n");
  ASSERT_TRUE(got.code);
  EXPECT_NE(*got.code, 0);
}

TEST(Config, AKeyThatNamesNoFlagIsAUsageError) {
  auto got = parse_ping_file("sidecast-typo.toml", "ping-interval = 3\nping-intervall = 4\n");
  ASSERT_TRUE(got.code) << "the misspelt key was ignored";
  EXPECT_NE(*got.code, 0);
}

// `sidecast demo --config FILE`: CLI11 reads --config for the main app only;
// parse() reads a subcommand's, with the same precedence.
TEST(Config, ASubcommandReadsItsOwnConfigFile) {
  auto path = toml_file("sidecast-sub.toml", "ping-interval = 111\nname = \"from-file\"\nlevel = \"file\"\n");
  int ping = 0;
  std::string name, level;
  CLI::App app{"test"};
  auto* sub = app.add_subcommand("demo");
  sub->add_option("--ping-interval", ping);
  sub->add_option("--name", name);
  sub->add_option("--level", level);
  finish_app(*sub);
  ::setenv("SIDECAST_NAME", "from-env", 1);
  args a{{"prog", "demo", "--config", path, "--level", "flag"}};
  auto argv = a.argv();
  ASSERT_FALSE(parse(app, static_cast<int>(argv.size()), argv.data()));
  ::unsetenv("SIDECAST_NAME");
  EXPECT_EQ(ping, 111);
  EXPECT_EQ(name, "from-env");
  EXPECT_EQ(level, "flag");

  std::ofstream{path} << "ping-intervall = 3\n";
  CLI::App typo{"test"};
  auto* typo_sub = typo.add_subcommand("demo");
  typo_sub->add_option("--ping-interval", ping);
  finish_app(*typo_sub);
  args b{{"prog", "demo", "--config", path}};
  auto argv_b = b.argv();
  auto code = parse(typo, static_cast<int>(argv_b.size()), argv_b.data());
  ASSERT_TRUE(code) << "the misspelt key was ignored";
  EXPECT_NE(*code, 0);
}

TEST(Config, SchedBatchSetsThePolicyOfTheCallingThread) {
  ASSERT_EQ(::sched_getscheduler(0), SCHED_OTHER);
  CLI::App app{"test"};
  finish_app(app);
  args a{{"prog", "--sched-batch"}};
  auto argv = a.argv();
  ASSERT_FALSE(parse(app, static_cast<int>(argv.size()), argv.data()));
  EXPECT_EQ(::sched_getscheduler(0), SCHED_BATCH);
  int inherited = -1;
  std::thread([&] { inherited = ::sched_getscheduler(0); }).join();
  EXPECT_EQ(inherited, SCHED_BATCH);
  sched_param param{};
  ::sched_setscheduler(0, SCHED_OTHER, &param);  // as the other tests expect
}

// --sched-batch=false, SIDECAST_SCHED_BATCH=0, sched-batch = false: off
// (the flag's callback took any value as on).
TEST(Config, SchedBatchFalseLeavesThePolicyAlone) {
  ASSERT_EQ(::sched_getscheduler(0), SCHED_OTHER);
  auto path = toml_file("sidecast-sched-false.toml", "sched-batch = false\n");
  for (auto way : {"flag", "env", "file"}) {
    CLI::App app{"test"};
    finish_app(app);
    args a{{"prog"}};
    if (std::string_view{way} == "flag") a.items.push_back("--sched-batch=false");
    if (std::string_view{way} == "env") ::setenv("SIDECAST_SCHED_BATCH", "0", 1);
    if (std::string_view{way} == "file") a.items.insert(a.items.end(), {"--config", path});
    auto argv = a.argv();
    auto code = parse(app, static_cast<int>(argv.size()), argv.data());
    ::unsetenv("SIDECAST_SCHED_BATCH");
    ASSERT_FALSE(code) << way;
    EXPECT_EQ(::sched_getscheduler(0), SCHED_OTHER) << way;
    sched_param param{};
    ::sched_setscheduler(0, SCHED_OTHER, &param);
  }
}

// Integers are decimal and within their type, from a flag, a variable or
// the file: CLI11 2.1 alone took "-1" and 99999999999999999999 as 2^64-1
// for an unsigned count, "010" as 8 and "0x100" as 256.
TEST(Config, IntegersAreDecimalAndInRange) {
  auto parse_count = [](std::vector<std::string> extra, const char* env = nullptr) {
    std::size_t count = 7;
    int signed_value = 0;
    CLI::App app{"test"};
    app.add_option("--count", count);
    app.add_option("--offset", signed_value);
    finish_app(app);
    if (env) ::setenv("SIDECAST_COUNT", env, 1);
    args a{{"prog"}};
    a.items.insert(a.items.end(), extra.begin(), extra.end());
    auto argv = a.argv();
    auto code = parse(app, static_cast<int>(argv.size()), argv.data());
    ::unsetenv("SIDECAST_COUNT");
    return std::pair{code, count};
  };
  for (const char* bad : {"-1", "99999999999999999999", "18446744073709551616", "010", "0x100", "+5", " 5", "5x", ""}) {
    auto [code, count] = parse_count({"--count", bad});
    EXPECT_TRUE(code) << "'" << bad << "' was taken as " << count;
  }
  EXPECT_TRUE(parse_count({}, "-1").first) << "from the environment";
  EXPECT_TRUE(parse_count({"--config", toml_file("sidecast-negative.toml", "count = -1\n")}).first) << "from a file";
  for (auto [good, want] : {std::pair<const char*, std::size_t>{"0", 0}, {"10", 10}, {"18446744073709551615", SIZE_MAX}}) {
    auto [code, count] = parse_count({"--count", good});
    EXPECT_FALSE(code) << good;
    EXPECT_EQ(count, want) << good;
  }
  EXPECT_FALSE(parse_count({"--offset", "-3"}).first) << "a signed option takes a sign";
  EXPECT_TRUE(parse_count({"--offset", "-03"}).first);
}

// A decimal number in the file keeps every digit (six significant digits
// made 1234567.0 read as 1.23457e+06), and NaN is no number in range.
TEST(Config, DecimalsKeepTheirDigitsAndNaNIsRefused) {
  double rate = 0;
  CLI::App app{"test"};
  app.add_option("--rate", rate)->check(finite_range(0, 1e9));
  finish_app(app);
  args a{{"prog", "--config", toml_file("sidecast-decimal.toml", "rate = 1234567.5\n")}};
  auto argv = a.argv();
  ASSERT_FALSE(parse(app, static_cast<int>(argv.size()), argv.data()));
  EXPECT_EQ(rate, 1234567.5);
  for (const char* bad : {"nan", "inf", "-1", "1e10", "x"}) {
    CLI::App again{"test"};
    again.add_option("--rate", rate)->check(finite_range(0, 1e9));
    finish_app(again);
    args b{{"prog", "--rate", bad}};
    auto argv_b = b.argv();
    EXPECT_TRUE(parse(again, static_cast<int>(argv_b.size()), argv_b.data())) << bad;
  }
}

// SIDECAST_CONFIG names the file when --config is not given (CLI11 2.1
// reads a main app's file before the environment, so it never was); a
// --config on the command line wins, and a missing file is an error.
TEST(Config, SidecastConfigNamesTheFile) {
  auto from_env = toml_file("sidecast-env-config.toml", "ping-interval = 333\n");
  auto given = toml_file("sidecast-given-config.toml", "ping-interval = 444\n");
  auto run = [](std::vector<std::string> extra, const std::string& env) {
    ping_parse out;
    CLI::App app{"test"};
    app.add_option("--ping-interval", out.ping);
    finish_app(app);
    ::setenv("SIDECAST_CONFIG", env.c_str(), 1);
    args a{{"prog"}};
    a.items.insert(a.items.end(), extra.begin(), extra.end());
    auto argv = a.argv();
    out.code = parse(app, static_cast<int>(argv.size()), argv.data());
    ::unsetenv("SIDECAST_CONFIG");
    return out;
  };
  auto got = run({}, from_env);
  ASSERT_FALSE(got.code);
  EXPECT_EQ(got.ping, 333);
  got = run({"--config", given}, from_env);
  ASSERT_FALSE(got.code);
  EXPECT_EQ(got.ping, 444);
  got = run({"--config=" + given}, from_env);
  ASSERT_FALSE(got.code);
  EXPECT_EQ(got.ping, 444);
  got = run({}, std::string(::testing::TempDir()) + "/sidecast-no-such-config.toml");
  ASSERT_TRUE(got.code) << "a missing file named by SIDECAST_CONFIG was ignored";
  EXPECT_NE(*got.code, 0);
}

// A SIDECAST_* variable one or two edits from one of the program's is
// warned of (it would be ignored, its option left at its default); one of
// another program's, far from every one of this one's, is not: compose
// files give several programs one environment.
TEST(Config, AVariableThatNearlyNamesAnOptionIsWarnedOf) {
  CLI::App app{"t", "sidecast-test"};
  std::size_t payload = 0;
  std::string id, broker;
  app.add_option("--max-payload", payload);
  app.add_option("--id", id);
  app.add_option("--broker", broker);
  auto* sub = app.add_subcommand("demo");
  std::string route;
  sub->add_option("--route", route);
  core::finish_app(*sub);
  core::finish_app(app);
  auto warnings = core::near_miss_warnings(
      app, {"SIDECAST_MAX_PAYLAOD", "SIDECAST_MAX_PAYLOAD", "SIDECAST_MAX_PAYLOADS", "SIDECAST_HEALTH_URL",
            "SIDECAST_BACKUP_BROKER", "SIDECAST_IP", "SIDECAST_BROKR", "SIDECAST_ROUT", "SIDECAST_CONFGI",
            "SIDECAST_MAX_PAYL", "OTHER_BROKR"});
  EXPECT_EQ(warnings,
            (std::vector<std::string>{
                "SIDECAST_MAX_PAYLAOD is set, but sidecast-test has no such variable: not SIDECAST_MAX_PAYLOAD "
                "(--max-payload)? It is ignored",
                "SIDECAST_MAX_PAYLOADS is set, but sidecast-test has no such variable: not SIDECAST_MAX_PAYLOAD "
                "(--max-payload)? It is ignored",
                "SIDECAST_IP is set, but sidecast-test has no such variable: not SIDECAST_ID (--id)? It is ignored",
                "SIDECAST_BROKR is set, but sidecast-test has no such variable: not SIDECAST_BROKER (--broker)? It is "
                "ignored",
                "SIDECAST_ROUT is set, but sidecast-test has no such variable: not SIDECAST_ROUTE (--route)? It is "
                "ignored",
                "SIDECAST_CONFGI is set, but sidecast-test has no such variable: not SIDECAST_CONFIG (--config)? It "
                "is ignored",
            }));
}

TEST(Config, HostPort) {
  auto hp = parse_host_port("127.0.0.1:8080");
  ASSERT_TRUE(hp);
  EXPECT_EQ(hp->host, "127.0.0.1");
  EXPECT_EQ(hp->port, 8080);
  EXPECT_EQ(parse_host_port(":9")->host, "0.0.0.0");
  EXPECT_EQ(parse_host_port("[::1]:9")->host, "::1");
  EXPECT_FALSE(parse_host_port("nohost"));
  EXPECT_EQ(parse_host_port("localhost:9")->host, "127.0.0.1");
  EXPECT_FALSE(parse_host_port("example.com:9")) << "a name the listener would not resolve";
  EXPECT_FALSE(parse_host_port("300.1.1.1:9"));
  EXPECT_FALSE(parse_host_port("127.0.0.1:99999"));
  EXPECT_FALSE(parse_host_port("127.0.0.1:12x"));
}

}  // namespace
}  // namespace sidecast::core
