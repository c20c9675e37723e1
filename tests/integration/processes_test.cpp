// Faults that need real processes: a worker SIGKILLed mid-request and a
// broker killed and restarted. The binaries run over tcp loopback; the test
// plays the client.
#include <sys/resource.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <csignal>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>

#include <boost/json.hpp>
#include <gtest/gtest.h>

#include "core/peer_link.hpp"
#include "tests/integration/harness.hpp"

namespace sidecast::test {
namespace {

struct ports {
  int router = free_port(), xsub = free_port(), xpub = free_port(), http = free_port();
  std::string endpoint(int port) const { return "tcp://127.0.0.1:" + std::to_string(port); }
};

std::vector<std::string> broker_args(const ports& p, const std::string& heartbeat_ms = "100") {
  return {"--router", p.endpoint(p.router), "--xsub", p.endpoint(p.xsub), "--xpub", p.endpoint(p.xpub),
          "--http", "127.0.0.1:" + std::to_string(p.http), "--heartbeat-interval", heartbeat_ms,
          "--log-level", "warn"};
}

std::vector<std::string> worker_args(const ports& p, const std::string& id) {
  return {"--service", "echo", "--capacity", "1", "--id", id, "--broker", p.endpoint(p.router),
          "--publish", p.endpoint(p.xsub), "--heartbeat-interval", "100", "--log-level", "warn"};
}

// The value of one series of the broker's /metrics (its name and labels as
// printed), or nullopt while it has none.
std::optional<double> scrape(int http_port, const std::string& series) {
  auto body = http_get(http_port, "/metrics").second;
  auto at = body.find("\n" + series + " ");
  if (at == std::string::npos) return std::nullopt;
  return std::stod(body.substr(at + series.size() + 2));
}

// True once the echo service answers (its workers registered), within 5 s.
bool echo_served(peer& client) {
  return eventually([&] {
    auto r = client.call("echo", "x", "[]", 300ms);
    return r && r->code() == proto::OK;
  });
}

TEST(Processes, WorkerKilledMidRequestCompletesOnTheOther) {
  ports p;
  child broker{"sidecast-broker", broker_args(p)};
  child a{"sidecast-worker", worker_args(p, "wa")};
  child b{"sidecast-worker", worker_args(p, "wb")};
  ASSERT_TRUE(broker.running() && a.running() && b.running());
  zmq::context_t ctx{1};
  peer client{ctx, p.endpoint(p.router), "c1"};
  ASSERT_TRUE(client.hello());
  ASSERT_TRUE(echo_served(client));
  ASSERT_TRUE(eventually([&] { return scrape(p.http, R"(sidecast_broker_workers{service="echo"})") == 2.0; }))
      << "both workers never registered";
  const std::string dispatched = R"(sidecast_broker_requests_total{outcome="dispatched",service="echo"})";
  auto before = scrape(p.http, dispatched);
  ASSERT_TRUE(before);
  // Capacity 1 each: the two slow requests land on different workers.
  auto first = client.submit("echo", "delay", "[1500,\"first\"]", 10s);
  auto second = client.submit("echo", "delay", "[1500,\"second\"]", 10s);
  ASSERT_TRUE(eventually([&] { return scrape(p.http, "sidecast_broker_in_flight") == 2.0; }))
      << "the two requests were never held at once";
  a.kill(SIGKILL);
  std::set<std::string> ids{first, second};
  while (!ids.empty()) {
    auto env = client.next(Envelope::kReply, 8s);
    ASSERT_TRUE(env) << "a request was lost with the worker";
    EXPECT_EQ(env->reply().code(), proto::OK) << env->reply().message();
    ids.erase(env->reply().id());
  }
  // Two requests, three dispatches: the killed worker's went to the other.
  EXPECT_EQ(scrape(p.http, dispatched), *before + 3);
}

// SIGTERM drains a worker: the broker gives it nothing new (it counts as
// draining, not as a worker of its service), the request it holds finishes
// there and is answered (dispatched once: nothing was retried), and the
// process exits 0 once it is done, well before --drain-timeout.
TEST(Processes, SigtermDrainsAWorkerWhoseRequestFinishesThere) {
  ports p;
  child broker{"sidecast-broker", broker_args(p)};
  child a{"sidecast-worker", worker_args(p, "wa")};
  child b{"sidecast-worker", worker_args(p, "wb")};
  zmq::context_t ctx{1};
  peer client{ctx, p.endpoint(p.router), "c1"};
  ASSERT_TRUE(client.hello());
  ASSERT_TRUE(echo_served(client));
  ASSERT_TRUE(eventually([&] { return scrape(p.http, R"(sidecast_broker_workers{service="echo"})") == 2.0; }));
  const std::string dispatched = R"(sidecast_broker_requests_total{outcome="dispatched",service="echo"})";
  auto before = scrape(p.http, dispatched);
  ASSERT_TRUE(before);
  auto first = client.submit("echo", "delay", "[1500,\"first\"]", 10s);
  auto second = client.submit("echo", "delay", "[1500,\"second\"]", 10s);
  ASSERT_TRUE(eventually([&] { return scrape(p.http, "sidecast_broker_in_flight") == 2.0; }));
  auto signalled = std::chrono::steady_clock::now();
  ASSERT_EQ(::kill(a.pid(), SIGTERM), 0);
  EXPECT_TRUE(eventually([&] { return scrape(p.http, R"(sidecast_broker_draining_workers{service="echo"})") == 1.0 &&
                                      scrape(p.http, R"(sidecast_broker_workers{service="echo"})") == 1.0; }))
      << "the broker never counted the worker as draining";
  // /status names it, and what it holds.
  auto page = boost::json::parse(http_get(p.http, "/status").second).as_object();
  std::map<std::string, boost::json::object> peers;
  for (const auto& v : page.at("peers").as_array()) peers[std::string{v.at("id").as_string()}] = v.as_object();
  ASSERT_TRUE(peers.contains("wa") && peers.contains("wb") && peers.contains("c1")) << boost::json::serialize(page);
  EXPECT_EQ(peers["wa"].at("role"), "worker");
  EXPECT_EQ(peers["wa"].at("draining"), true);
  EXPECT_EQ(peers["wa"].at("services"), boost::json::parse(R"([{"service":"echo","capacity":1,"busy":1}])"));
  EXPECT_EQ(peers["wb"].at("draining"), false);
  EXPECT_EQ(peers["c1"].at("role"), "client");
  EXPECT_FALSE(peers["c1"].contains("draining"));
  EXPECT_EQ(page.at("services"), boost::json::parse(R"([{"name":"echo","workers":1,"draining":1,"queued":0}])"));
  std::map<std::string, std::string> answers;
  while (answers.size() < 2) {
    auto env = client.next(Envelope::kReply, 8s);
    ASSERT_TRUE(env) << "a request was lost with the draining worker";
    EXPECT_EQ(env->reply().code(), proto::OK) << env->reply().message();
    answers[env->reply().id()] = env->reply().args();
  }
  EXPECT_EQ(answers[first], R"(["first"])");
  EXPECT_EQ(answers[second], R"(["second"])");
  auto status = a.wait_exit(5s);
  ASSERT_TRUE(status) << "the drained worker did not exit";
  EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) == 0) << "wait status " << *status;
  EXPECT_LT(std::chrono::steady_clock::now() - signalled, 5s) << "it waited for --drain-timeout, not for its request";
  EXPECT_EQ(scrape(p.http, dispatched), *before + 2) << "a request was dispatched again";
  // Gone from the broker; the other worker serves.
  EXPECT_TRUE(eventually([&] { return scrape(p.http, R"(sidecast_broker_draining_workers{service="echo"})") == 0.0; }));
  auto r = client.call("echo", "x", "[3]", 2s);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->args(), "[3]");
}

// A second SIGTERM does not wait for the drain: the worker stops at once,
// and the request it held goes to the other worker.
TEST(Processes, ASecondSigtermStopsADrainingWorkerAtOnce) {
  ports p;
  child broker{"sidecast-broker", broker_args(p)};
  child a{"sidecast-worker", worker_args(p, "wa")};
  zmq::context_t ctx{1};
  peer client{ctx, p.endpoint(p.router), "c1"};
  ASSERT_TRUE(client.hello());
  ASSERT_TRUE(echo_served(client));
  auto held = client.submit("echo", "delay", "[4000,\"long\"]", 20s);
  ASSERT_TRUE(eventually([&] { return scrape(p.http, "sidecast_broker_in_flight") == 1.0; }));
  child b{"sidecast-worker", worker_args(p, "wb")};
  ASSERT_TRUE(eventually([&] { return scrape(p.http, R"(sidecast_broker_workers{service="echo"})") == 2.0; }));
  ASSERT_EQ(::kill(a.pid(), SIGTERM), 0);
  ASSERT_TRUE(eventually([&] { return scrape(p.http, R"(sidecast_broker_draining_workers{service="echo"})") == 1.0; }));
  auto again = std::chrono::steady_clock::now();
  ASSERT_EQ(::kill(a.pid(), SIGTERM), 0);
  auto status = a.wait_exit(5s);
  ASSERT_TRUE(status) << "a second SIGTERM did not stop the draining worker";
  EXPECT_LT(std::chrono::steady_clock::now() - again, 2s) << "it waited for its request";
  EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) == 0) << "wait status " << *status;
  // Its second attempt, on wb (another 4 s).
  auto reply = client.next(Envelope::kReply, 8s);
  ASSERT_TRUE(reply) << "the request was lost with the stopped worker";
  EXPECT_EQ(reply->reply().id(), held);
  EXPECT_EQ(reply->reply().code(), proto::OK) << reply->reply().message();
  EXPECT_EQ(reply->reply().args(), R"(["long"])");
}

TEST(Processes, BrokerRestartWorkersReannounceAndTrafficFlows) {
  ports p;
  auto broker = std::make_unique<child>("sidecast-broker", broker_args(p));
  child w{"sidecast-worker", worker_args(p, "wr")};
  zmq::context_t ctx{1};
  peer client{ctx, p.endpoint(p.router), "c1"};
  ASSERT_TRUE(client.hello());
  ASSERT_TRUE(echo_served(client));
  broker->kill(SIGKILL);
  broker = std::make_unique<child>("sidecast-broker", broker_args(p));
  // The worker and the client reconnect by themselves; the broker asks both
  // to announce again.
  ASSERT_TRUE(eventually(
      [&] {
        auto r = client.call("echo", "x", "[2]", 300ms);
        return r && r->code() == proto::OK && r->args() == "[2]";
      },
      10s))
      << "traffic did not resume after the broker restart";
  EXPECT_EQ(broker->kill(SIGTERM), 0) << "SIGTERM is a clean exit";
}

// What a gateway's link learns from a restarted broker: a Welcome of
// another incarnation, with the first Hello since the last Welcome as the
// line below which what it sent went to the broker that is gone; and, in
// Error NOT_REGISTERED, the id of each request the new broker took before
// that Hello, which it serves all the same (bridge::fail_lost_to_restart).
TEST(Processes, ARestartedBrokerIsANewIncarnationAndNamesTheRequestsItTookBeforeHello) {
  ports p;
  auto broker = std::make_unique<child>("sidecast-broker", broker_args(p));
  zmq::context_t ctx{1};
  core::peer_link_options o;
  o.endpoint = p.endpoint(p.router);
  o.id = "gw1";
  o.role = proto::ROLE_GATEWAY;
  core::peer_link link{ctx, o};
  std::vector<Envelope> got;  // what the link hands the application
  auto pump = [&] {
    while (auto env = link.receive()) got.push_back(std::move(*env));
  };
  ASSERT_TRUE(eventually([&] { return pump(), link.welcomed(); })) << "no Welcome from the first broker";
  auto request = [&](const std::string& id) {
    Envelope env;
    auto* r = env.mutable_request();
    r->set_id(id);
    r->set_service("echo");  // no worker yet: the broker keeps it
    r->set_event("echo");
    r->set_args("[1]");
    r->set_wants_reply(true);
    r->set_timeout_ms(10000);
    EXPECT_TRUE(link.send(env));
    return link.epoch();
  };
  auto lost_epoch = request("gw1:1");
  EXPECT_EQ(link.broker_restarts(), 0u);

  broker->kill(SIGKILL);
  broker = std::make_unique<child>("sidecast-broker", broker_args(p));
  // The first message the new broker gets from us (the link sends nothing
  // unless tick() is called): taken, and named.
  auto kept_epoch = request("gw1:2");
  EXPECT_EQ(kept_epoch, lost_epoch) << "no Hello between the two: only the broker can tell them apart";
  ASSERT_TRUE(eventually([&] { return pump(), link.broker_restarts() == 1 && link.welcomed(); }))
      << "no Welcome from the new broker, or not seen as a new one";
  EXPECT_GT(link.lost_below(), lost_epoch);
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].error().code(), proto::NOT_REGISTERED);
  EXPECT_EQ(got[0].error().id(), "gw1:2");

  // The new broker serves it once a worker comes; gw1:1 died with the old one.
  child w{"sidecast-worker", worker_args(p, "wr")};
  got.clear();
  ASSERT_TRUE(eventually([&] { return pump(), !got.empty(); }, 5s)) << "gw1:2 was not served";
  ASSERT_TRUE(got[0].has_reply());
  EXPECT_EQ(got[0].reply().id(), "gw1:2");
  EXPECT_EQ(got[0].reply().code(), proto::OK) << got[0].reply().message();

  // A broker away past the liveness (3 × 100 ms, the broker's): the link,
  // ticked on time, replaces its socket at each tick that finds it silent,
  // and what waited in a replaced socket died there, so the line moves up
  // to the newest socket's Hello. (A tick that comes late is the caller's
  // own stall, not the broker's silence: it replaces nothing.)
  broker->kill(SIGKILL);
  auto replace_socket = [&] {
    auto reconnects = link.stats().reconnects;
    EXPECT_TRUE(eventually([&] {
      if (auto now = std::chrono::steady_clock::now(); now >= link.next_tick()) link.tick(now);
      return link.stats().reconnects > reconnects;
    }, 3s));
    EXPECT_EQ(link.stats().reconnects, reconnects + 1);
  };
  request("gw1:3");  // in the socket of the killed broker
  replace_socket();
  request("gw1:4");  // in a socket the next tick replaces
  replace_socket();
  auto last_epoch = request("gw1:5");
  broker = std::make_unique<child>("sidecast-broker", broker_args(p));
  got.clear();
  ASSERT_TRUE(eventually([&] { return pump(), link.broker_restarts() == 2 && !got.empty(); }, 5s))
      << "no Welcome from the third broker, or gw1:5 was not served";
  EXPECT_EQ(link.lost_below(), last_epoch) << "gw1:4 died with the second socket";
  ASSERT_TRUE(got[0].has_reply()) << got[0].DebugString();
  EXPECT_EQ(got[0].reply().id(), "gw1:5");
  EXPECT_EQ(broker->kill(SIGTERM), 0);
}

// A frame may declare any length; past --max-message-bytes libzmq drops
// the sender's connection instead of taking it in. The peer reconnects and
// is served as before; the big request never reached a worker.
TEST(Processes, AMessagePastTheSizeBoundIsNotTakenIn) {
  ports p;
  auto args = broker_args(p);
  args.insert(args.end(), {"--max-message-bytes", "4096"});
  child broker{"sidecast-broker", args};
  child w{"sidecast-worker", worker_args(p, "wz")};
  zmq::context_t ctx{1};
  peer client{ctx, p.endpoint(p.router), "cz"};
  ASSERT_TRUE(client.hello());
  ASSERT_TRUE(echo_served(client));
  client.submit("echo", "x", "[\"" + std::string(8192, 'a') + "\"]", 5s);
  EXPECT_FALSE(client.next(Envelope::kReply, 1500ms)) << "the oversize request was served";
  EXPECT_TRUE(echo_served(client)) << "the peer was not served after its connection was dropped";
}

// An endpoint libzmq refuses (here an address that cannot be) ends the
// process with status 1; the gateway and the worker used to log it and stay
// up, serving nothing, with only their health check to tell.
TEST(Processes, AnEndpointThatCannotBeUsedEndsTheProcess) {
  const std::string bad = "tcp://256.1.1.1:notaport";
  child w{"sidecast-worker", {"--service", "echo", "--broker", bad, "--log-level", "off"}};
  child gw{"sidecast-gateway", {"--broker", bad, "--events", bad, "--http", "127.0.0.1:0", "--log-level", "off"}};
  for (auto* c : {&w, &gw}) {
    auto status = c->wait_exit(10s);
    ASSERT_TRUE(status) << "still running";
    EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) == 1) << "wait status " << *status;
  }
}

// `sidecast demo` whose HTTP port is taken ends with status 1 and says why;
// it aborted (status 134, "terminate called without an active exception")
// with the broker's thread still running as the error unwound.
TEST(Processes, ADemoWhosePortIsTakenSaysSoAndExits) {
  int taken = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof addr;
  ASSERT_EQ(::bind(taken, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  ASSERT_EQ(::listen(taken, 1), 0);
  ASSERT_EQ(::getsockname(taken, reinterpret_cast<sockaddr*>(&addr), &len), 0);
  auto http = "127.0.0.1:" + std::to_string(ntohs(addr.sin_port));
  for (const char* threads : {"1", "2"}) {
    child demo{"sidecast", {"demo", "--http", http, "--threads", threads, "--chat-db", ":memory:", "--log-level", "off"}};
    auto status = demo.wait_exit(10s);
    ASSERT_TRUE(status) << "still running with --threads " << threads;
    EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) == 1) << "--threads " << threads << ": wait status " << *status;
  }
  ::close(taken);
}

TEST(Processes, BrokerMetricsAndHealth) {
  ports p;
  child broker{"sidecast-broker", broker_args(p)};
  child w{"sidecast-worker", worker_args(p, "wm")};
  zmq::context_t ctx{1};
  peer client{ctx, p.endpoint(p.router), "c1"};
  ASSERT_TRUE(client.hello());
  ASSERT_TRUE(echo_served(client));
  for (int i = 0; i < 3; ++i) ASSERT_EQ(client.call("echo", "x", "[]")->code(), proto::OK);
  client.send_raw("garbage");
  ASSERT_TRUE(eventually([&] { return http_get(p.http, "/healthz").first == 200; }));
  std::string metrics;
  // Gauges are refreshed every heartbeat tick: wait for one.
  auto has = [&](const std::string& line) { return metrics.find(line) != std::string::npos; };
  EXPECT_TRUE(eventually([&] {
    metrics = http_get(p.http, "/metrics").second;
    return has(R"(sidecast_broker_dropped_total{reason="malformed"} 1)") &&
           has(R"(sidecast_broker_workers{service="echo"} 1)");
  })) << metrics;
  EXPECT_TRUE(has(R"(sidecast_broker_requests_total{outcome="ok",service="echo"})"));
  EXPECT_TRUE(has("sidecast_broker_dispatch_seconds_bucket"));
  EXPECT_EQ(http_get(p.http, "/nope").first, 404);
}

// The admin port holds at most --admin-max-connections at once: past it a
// new connection takes the place of the oldest idle one, so a peer holding
// idle connections cannot keep a health check out (it did: every probe was
// refused while 64 idle ones were held, in a review).
TEST(Processes, TheAdminPortHoldsItsBoundOfConnections) {
  ports p;
  auto args = broker_args(p);
  args.insert(args.end(), {"--admin-max-connections", "3"});
  child broker{"sidecast-broker", args};
  ASSERT_TRUE(eventually([&] { return http_get(p.http, "/healthz").first == 200; }));
  int first = connect_to(p.http);
  int second = connect_to(p.http);
  ASSERT_GE(first, 0);
  ASSERT_GE(second, 0);
  // Both held once the server counts them (with the scrape's own: 3, the
  // bound, which the scrape's connection reaches without passing it).
  ASSERT_TRUE(eventually([&] { return scrape(p.http, "sidecast_admin_connections") == 3.0; }));
  int third = connect_to(p.http);
  ASSERT_GE(third, 0);
  ASSERT_TRUE(eventually([&] { return scrape(p.http, "sidecast_admin_connections_evicted_total") == 1.0; }))
      << "the third idle connection took no one's place";
  timeval two{2, 0};
  ::setsockopt(first, SOL_SOCKET, SO_RCVTIMEO, &two, sizeof two);
  char byte;
  EXPECT_EQ(::recv(first, &byte, 1, 0), 0) << "the oldest idle connection is still open";
  EXPECT_EQ(http_get(p.http, "/healthz").first, 200) << "a health check kept out by idle connections";
  EXPECT_EQ(scrape(p.http, "sidecast_admin_connections_refused_total"), 0.0);
  EXPECT_LE(scrape(p.http, "sidecast_admin_connections").value_or(99.0), 3.0);
  for (int fd : {first, second, third}) ::close(fd);
}

// What the admin port does not serve gets an answer, not a silent close:
// 405 with Allow for another method (a body read and ignored), 404 for
// another path, 431 for a header past its bound; a GET in absolute form
// (RFC 9112 3.2.2) is served.
TEST(Processes, TheAdminPortAnswersWhatItDoesNotServe) {
  ports p;
  child broker{"sidecast-broker", broker_args(p)};
  ASSERT_TRUE(eventually([&] { return http_get(p.http, "/healthz").first == 200; }));
  auto post = http_raw(p.http, "POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi");
  EXPECT_TRUE(post.starts_with("HTTP/1.1 405")) << post;
  EXPECT_NE(post.find("Allow: GET, HEAD\r\n"), std::string::npos) << post;
  auto other = http_raw(p.http, "DELETE /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
  EXPECT_TRUE(other.starts_with("HTTP/1.1 404")) << other;
  auto big = http_raw(p.http, "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + std::string(9000, 'a') + "\r\n\r\n");
  EXPECT_TRUE(big.starts_with("HTTP/1.1 431")) << big.substr(0, 64);
  auto absolute = http_raw(p.http, "GET http://127.0.0.1/healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
  EXPECT_TRUE(absolute.starts_with("HTTP/1.1 200")) << absolute;
}

// The admin port's read buffer is bounded: a chunk's size line that never
// ends (Beast limits neither it nor a trailer) closes the connection, where
// it was all kept (a review's 300 MiB grew the broker by as much).
TEST(Processes, TheAdminPortKeepsNoEndlessChunkLine) {
  ports p;
  child broker{"sidecast-broker", broker_args(p)};
  ASSERT_TRUE(eventually([&] { return http_get(p.http, "/healthz").first == 200; }));
  int fd = connect_to(p.http);
  ASSERT_GE(fd, 0);
  std::string start = "POST /metrics HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2;a=";
  ASSERT_EQ(::send(fd, start.data(), start.size(), MSG_NOSIGNAL), static_cast<ssize_t>(start.size()));
  timeval five{5, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &five, sizeof five);
  const std::string block(64 * 1024, 'b');
  std::size_t sent = 0;
  while (sent < (32u << 20)) {
    auto n = ::send(fd, block.data(), block.size(), MSG_NOSIGNAL);
    if (n <= 0) break;  // closed by the broker (or a full window for 5 s)
    sent += static_cast<std::size_t>(n);
  }
  ::close(fd);
  EXPECT_LT(sent, 32u << 20) << "the broker took 32 MiB of one chunk line";
  EXPECT_EQ(http_get(p.http, "/healthz").first, 200);
}

// Out of file descriptors, an accept fails and the connection stays in the
// listen queue: the gateway counts it and pauses, then serves again once
// descriptors are free (it used to retry at once, at 100% CPU, unlogged).
TEST(Processes, AGatewayOutOfDescriptorsPausesAndServesAgain) {
  ports p;
  int gw_http = free_port();
  child gw{"sidecast-gateway",
           {"--http", "127.0.0.1:" + std::to_string(gw_http), "--broker", p.endpoint(p.router), "--events",
            p.endpoint(p.xpub), "--threads", "1", "--log-level", "error"}};
  ASSERT_TRUE(eventually([&] { return http_get(gw_http, "/metrics").first == 200; }));
  // Its open files now, and room for a few more: lowered from outside,
  // after the gateway raised its own limit at start.
  std::size_t open_files = 0;
  for ([[maybe_unused]] const auto& fd : std::filesystem::directory_iterator("/proc/" + std::to_string(gw.pid()) + "/fd"))
    ++open_files;
  rlimit tight{open_files + 4, open_files + 4};
  ASSERT_EQ(::prlimit(gw.pid(), RLIMIT_NOFILE, &tight, nullptr), 0) << std::strerror(errno);
  std::vector<int> held;
  auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < 16; ++i) {
    int fd = connect_to(gw_http);
    ASSERT_GE(fd, 0);
    held.push_back(fd);
  }
  std::this_thread::sleep_for(500ms);  // the accepts that fail, meanwhile
  for (int fd : held) ::close(fd);
  auto held_for = std::chrono::steady_clock::now() - start;
  std::optional<double> failed;
  ASSERT_TRUE(eventually([&] {
    failed = scrape(gw_http, "sidecast_gateway_accept_failures_total");
    return failed.has_value();
  })) << "the gateway serves no more";
  EXPECT_GE(*failed, 1.0);
  // One failed accept per 100 ms pause while they were held, and a few as
  // they went: retried at once, it failed thousands of times.
  EXPECT_LE(*failed, static_cast<double>(held_for / 100ms) + 5) << "the gateway did not pause";
}

// A gateway and a worker that stop say Goodbye, and the broker forgets them
// (not after their heartbeats are missed: 6 s here, 2 s x 3).
TEST(Processes, PeersThatStopAreForgottenAtOnce) {
  ports p;
  auto args = broker_args(p);
  args[std::find(args.begin(), args.end(), "--heartbeat-interval") - args.begin() + 1] = "2000";
  child broker{"sidecast-broker", args};
  int gw_http = free_port();
  child gw{"sidecast-gateway",
           {"--http", "127.0.0.1:" + std::to_string(gw_http), "--broker", p.endpoint(p.router), "--events",
            p.endpoint(p.xpub), "--gateway-id", "gwbye", "--threads", "1", "--log-level", "warn"}};
  child w{"sidecast-worker", worker_args(p, "wbye")};
  auto listed = [&](const std::string& id) {
    boost::system::error_code ec;
    auto page = boost::json::parse(http_get(p.http, "/status").second, ec);  // "" while the broker starts
    if (ec || !page.is_object()) return false;
    for (const auto& v : page.at("peers").as_array())
      if (v.at("id").as_string() == id) return true;
    return false;
  };
  ASSERT_TRUE(eventually([&] { return listed("gwbye") && listed("wbye"); }, 10s)) << http_get(p.http, "/status").second;
  EXPECT_EQ(gw.kill(SIGTERM), 0);
  EXPECT_EQ(w.kill(SIGTERM), 0);
  // Counted as they arrive (missed heartbeats would take 6 s and send none).
  EXPECT_TRUE(eventually([&] { return scrape(p.http, R"(sidecast_broker_messages_received_total{kind="goodbye"})") == 2.0; }, 2s));
  // /status is remade each tick (2 s).
  EXPECT_TRUE(eventually([&] { return !listed("gwbye") && !listed("wbye"); }, 5s));
}

// sidecast-worker --http: the worker's own figures and its services'
// (the chat's pruned history) on /metrics, and /healthz that follows the
// broker link.
TEST(Processes, WorkerMetricsAndHealth) {
  ports p;
  auto broker = std::make_unique<child>("sidecast-broker", broker_args(p));
  int worker_http = free_port();
  child w{"sidecast-worker",
          {"--service", "echo", "--service", "chat", "--chat-db", ":memory:", "--chat-keep", "2", "--id", "wm",
           "--broker", p.endpoint(p.router), "--publish", p.endpoint(p.xsub), "--heartbeat-interval", "100",
           "--http", "127.0.0.1:" + std::to_string(worker_http), "--log-level", "warn"}};
  zmq::context_t ctx{1};
  peer client{ctx, p.endpoint(p.router), "c1"};
  ASSERT_TRUE(client.hello());
  ASSERT_TRUE(echo_served(client));
  for (int i = 0; i < 3; ++i) {
    auto r = client.call("chat", "say", R"([{"room":"r","text":"hi"}])");
    ASSERT_TRUE(r && r->code() == proto::OK) << (r ? r->message() : "no answer");
  }
  auto r = client.call("chat", "say", R"([{"room":"r"}])");
  ASSERT_TRUE(r && r->code() == proto::BAD_REQUEST);
  EXPECT_EQ(http_get(worker_http, "/healthz").first, 200);
  EXPECT_EQ(scrape(worker_http, "sidecast_chat_messages_pruned_total"), 1.0) << "three says, two kept";
  EXPECT_EQ(scrape(worker_http, "sidecast_worker_connected"), 1.0);
  auto requests = scrape(worker_http, "sidecast_worker_requests_total");
  ASSERT_TRUE(requests);
  EXPECT_GE(*requests, 5.0) << "an echo or more, four says";
  EXPECT_GE(scrape(worker_http, "sidecast_worker_replies_total").value_or(0), 5.0);
  EXPECT_EQ(scrape(worker_http, R"(sidecast_worker_dropped_total{reason="queue_full"})"), 0.0);
  EXPECT_EQ(scrape(worker_http, "sidecast_worker_requests_running"), 0.0);
  EXPECT_EQ(scrape(worker_http, "sidecast_worker_draining"), 0.0);
  // The broker goes: the worker stops being healthy once it falls silent.
  broker.reset();
  EXPECT_TRUE(eventually([&] { return http_get(worker_http, "/healthz").first == 503; }));
  EXPECT_EQ(scrape(worker_http, "sidecast_worker_connected"), 0.0);
}


// --- A broker pair (Binary Star: broker/pair.hpp, docs/deployment.md) ---

struct pair_ports {
  ports primary, backup;
  int primary_pair = free_port(), backup_pair = free_port();
};

std::vector<std::string> pair_broker_args(const pair_ports& pp, bool primary) {
  const auto& mine = primary ? pp.primary : pp.backup;
  // 200 ms heartbeats (a 600 ms liveness): a pair's test should not see a
  // failover because the loaded machine it runs on paused the active broker.
  auto args = broker_args(mine, "200");
  args.insert(args.end(), {"--id", primary ? "primary" : "backup", "--pair", primary ? "primary" : "backup",
                           "--pair-bind", mine.endpoint(primary ? pp.primary_pair : pp.backup_pair),
                           "--pair-connect", mine.endpoint(primary ? pp.backup_pair : pp.primary_pair)});
  return args;
}

std::vector<std::string> pair_worker_args(const pair_ports& pp, const std::string& id) {
  auto args = worker_args(pp.primary, id);
  args.insert(args.end(), {"--backup-broker", pp.backup.endpoint(pp.backup.router), "--backup-publish",
                           pp.backup.endpoint(pp.backup.xsub)});
  return args;
}

// The broker's /status "pair" object: {"role", "state", "term", ...}; null
// when it does not answer.
boost::json::value pair_status(int http_port) {
  auto [code, body] = http_get(http_port, "/status");
  if (code != 200) return nullptr;
  boost::system::error_code ec;
  auto v = boost::json::parse(body, ec);
  if (ec || !v.is_object() || !v.as_object().contains("pair")) return nullptr;
  return v.as_object().at("pair");
}

bool pair_state_is(int http_port, std::string_view state) {
  auto p = pair_status(http_port);
  return p.is_object() && p.as_object().at("state").as_string() == state;
}

std::uint64_t pair_term(int http_port) {
  auto p = pair_status(http_port);
  return p.is_object() ? p.as_object().at("term").to_number<std::uint64_t>() : 0;
}

// A client on a link that knows both brokers of the pair, driven by the test.
class pair_client {
 public:
  pair_client(zmq::context_t& ctx, const pair_ports& pp, const core::curve_client& curve = {})
      : link_{ctx, options(pp, curve)} {}

  /// One echo request through whichever broker the link is on; its reply,
  /// or nullopt after a second (sent to a standby, or one that died).
  std::optional<proto::Reply> echo() {
    Envelope env;
    auto* r = env.mutable_request();
    auto id = "c1:" + std::to_string(++next_);
    r->set_id(id);
    r->set_service("echo");
    r->set_event("echo");
    r->set_args("[" + std::to_string(next_) + "]");
    r->set_wants_reply(true);
    r->set_timeout_ms(1000);
    link_.send(env);
    auto until = std::chrono::steady_clock::now() + 1s;
    while (std::chrono::steady_clock::now() < until) {
      if (auto now = std::chrono::steady_clock::now(); now >= link_.next_tick()) link_.tick(now);
      while (auto got = link_.receive())
        if (got->has_reply() && got->reply().id() == id) return got->reply();
      std::this_thread::sleep_for(5ms);
    }
    return std::nullopt;
  }
  /// True once an echo comes back OK, within `limit`.
  bool served(std::chrono::milliseconds limit) {
    return eventually([&] {
      auto r = echo();
      return r && r->code() == proto::OK;
    }, limit);
  }
  const core::peer_link& link() const { return link_; }

 private:
  static core::peer_link_options options(const pair_ports& pp, const core::curve_client& curve) {
    core::peer_link_options o;
    o.curve = curve;
    o.endpoint = pp.primary.endpoint(pp.primary.router);
    o.backup_endpoint = pp.backup.endpoint(pp.backup.router);
    o.id = "c1";
    o.role = proto::ROLE_CLIENT;
    o.heartbeat_interval = 100ms;
    return o;
  }
  core::peer_link link_;
  int next_ = 0;
};

// With CURVE the two brokers share one key pair, and each admits its own
// public key for the other's pair socket: the pair forms, and fails over,
// with only the listed gateways and workers let in.
TEST(Processes, ABrokerPairWithCurveSharesOneKeyPair) {
  pair_ports pp;
  auto [broker_public, broker_secret] = core::curve_keypair();
  auto [worker_public, worker_secret] = core::curve_keypair();
  auto [client_public, client_secret] = core::curve_keypair();
  auto with_curve = [&](std::vector<std::string> args) {
    args.insert(args.end(), {"--curve-secret", broker_secret, "--curve-allow", worker_public, "--curve-allow",
                             client_public});
    return args;
  };
  auto primary = std::make_unique<child>("sidecast-broker", with_curve(pair_broker_args(pp, true)));
  child backup{"sidecast-broker", with_curve(pair_broker_args(pp, false))};
  auto worker_args = pair_worker_args(pp, "wc");
  worker_args.insert(worker_args.end(), {"--curve-secret", worker_secret, "--curve-server-key", broker_public});
  child worker{"sidecast-worker", worker_args};
  zmq::context_t ctx{1};
  pair_client client{ctx, pp, {client_secret, broker_public}};
  ASSERT_TRUE(client.served(10s)) << "the pair never served";
  ASSERT_TRUE(eventually([&] { return pair_state_is(pp.backup.http, "passive"); }))
      << "the backup never heard the primary over CURVE";
  primary->kill(SIGKILL);
  ASSERT_TRUE(client.served(15s)) << "no failover to the backup";
  EXPECT_TRUE(pair_state_is(pp.backup.http, "active"));
  EXPECT_EQ(scrape(pp.backup.http, "sidecast_broker_dropped_total{reason=\"curve_refused\"}").value_or(0), 0.0);
}

// A raw peer's Hello to a broker that does not serve: Error STANDBY.
bool refuses_as_standby(zmq::context_t& ctx, const ports& p) {
  peer raw{ctx, p.endpoint(p.router), "raw"};
  raw.send_hello();
  auto got = raw.next(Envelope::kError, 2s);
  return got && got->error().code() == proto::STANDBY;
}

TEST(Processes, ABrokerPairFailsOverToTheBackupAndTheOldPrimaryComesBackPassive) {
  pair_ports pp;
  auto primary = std::make_unique<child>("sidecast-broker", pair_broker_args(pp, true));
  child backup{"sidecast-broker", pair_broker_args(pp, false)};
  child worker{"sidecast-worker", pair_worker_args(pp, "wp")};
  zmq::context_t ctx{1};
  pair_client client{ctx, pp};
  ASSERT_TRUE(client.served(10s)) << "the pair never served";
  EXPECT_EQ(client.link().endpoint(), pp.primary.endpoint(pp.primary.router));
  EXPECT_TRUE(pair_state_is(pp.primary.http, "active"));
  auto primary_term = pair_term(pp.primary.http);
  EXPECT_GT(primary_term, 0u);
  ASSERT_TRUE(eventually([&] { return pair_state_is(pp.backup.http, "passive"); }));
  EXPECT_TRUE(refuses_as_standby(ctx, pp.backup)) << "the passive backup took a peer";

  primary->kill(SIGKILL);
  // The worker and the client find the primary silent after their liveness
  // (3 × 200 ms), and so does the backup: the first of them to come makes
  // it active (failover).
  ASSERT_TRUE(client.served(15s)) << "no failover to the backup";
  EXPECT_EQ(client.link().endpoint(), pp.backup.endpoint(pp.backup.router));
  EXPECT_TRUE(pair_state_is(pp.backup.http, "active"));
  EXPECT_GT(pair_term(pp.backup.http), primary_term);
  EXPECT_EQ(scrape(pp.backup.http, "sidecast_broker_pair_activations_total"), 1.0);

  // No fail-back: the primary, restarted, hears an active backup and waits.
  primary = std::make_unique<child>("sidecast-broker", pair_broker_args(pp, true));
  ASSERT_TRUE(eventually([&] { return pair_state_is(pp.primary.http, "passive"); }, 10s));
  EXPECT_TRUE(refuses_as_standby(ctx, pp.primary)) << "the restarted primary took a peer";
  EXPECT_TRUE(client.served(5s));
  EXPECT_EQ(client.link().endpoint(), pp.backup.endpoint(pp.backup.router));
  EXPECT_GE(scrape(pp.primary.http, "sidecast_broker_dropped_total{reason=\"standby\"}").value_or(0), 1.0);
  EXPECT_EQ(backup.kill(SIGTERM), 0);
  EXPECT_EQ(primary->kill(SIGTERM), 0);
}

// The active broker stopped (SIGSTOP: a paused VM, a partition) long enough
// for the backup to take over, then resumed: two active brokers. The one
// activated earlier (a lower term) steps down, and refuses peers from then
// on; the pair serves on through the backup.
TEST(Processes, AStalledActiveBrokerOfAPairStepsDownWhenItResumes) {
  pair_ports pp;
  child primary{"sidecast-broker", pair_broker_args(pp, true)};
  child backup{"sidecast-broker", pair_broker_args(pp, false)};
  child worker{"sidecast-worker", pair_worker_args(pp, "ws")};
  zmq::context_t ctx{1};
  pair_client client{ctx, pp};
  ASSERT_TRUE(client.served(10s)) << "the pair never served";
  // (A backup that never heard the primary active never takes over.)
  ASSERT_TRUE(eventually([&] { return pair_state_is(pp.backup.http, "passive"); }));
  auto primary_term = pair_term(pp.primary.http);
  ASSERT_EQ(::kill(primary.pid(), SIGSTOP), 0);
  ASSERT_TRUE(client.served(15s)) << "no failover to the backup";
  EXPECT_GT(pair_term(pp.backup.http), primary_term);
  ASSERT_EQ(::kill(primary.pid(), SIGCONT), 0);
  ASSERT_TRUE(eventually([&] { return pair_state_is(pp.primary.http, "passive"); }, 10s))
      << "the resumed primary did not step down";
  EXPECT_TRUE(pair_state_is(pp.backup.http, "active"));
  EXPECT_TRUE(refuses_as_standby(ctx, pp.primary));
  EXPECT_TRUE(client.served(5s));
  EXPECT_EQ(client.link().endpoint(), pp.backup.endpoint(pp.backup.router));
  EXPECT_EQ(backup.kill(SIGTERM), 0);
  EXPECT_EQ(primary.kill(SIGTERM), 0);
}

// The active backup stopped, and the primary crashed and restarted
// meanwhile: the primary hears nobody and serves alone, and the peers move
// to it. When the backup resumes, still active from before, the primary's
// activation is the later one and stays; the backup steps down. Counting
// terms from 0 after its restart, the primary took term 1 against the
// backup's 2 and gave way to the stale backup.
TEST(Processes, APrimaryRestartedWhileTheActiveBackupIsStalledStaysWhenItResumes) {
  pair_ports pp;
  auto primary = std::make_unique<child>("sidecast-broker", pair_broker_args(pp, true));
  child backup{"sidecast-broker", pair_broker_args(pp, false)};
  child worker{"sidecast-worker", pair_worker_args(pp, "wr")};
  zmq::context_t ctx{1};
  pair_client client{ctx, pp};
  ASSERT_TRUE(client.served(10s)) << "the pair never served";
  ASSERT_TRUE(eventually([&] { return pair_state_is(pp.backup.http, "passive"); }));
  primary->kill(SIGKILL);
  ASSERT_TRUE(client.served(15s)) << "no failover to the backup";
  ASSERT_TRUE(pair_state_is(pp.backup.http, "active"));
  ASSERT_EQ(::kill(backup.pid(), SIGSTOP), 0);
  primary = std::make_unique<child>("sidecast-broker", pair_broker_args(pp, true));
  ASSERT_TRUE(client.served(15s)) << "the restarted primary never served alone";
  EXPECT_EQ(client.link().endpoint(), pp.primary.endpoint(pp.primary.router));
  ASSERT_EQ(::kill(backup.pid(), SIGCONT), 0);
  ASSERT_TRUE(eventually([&] { return pair_state_is(pp.backup.http, "passive"); }, 10s))
      << "the resumed backup did not step down";
  EXPECT_TRUE(pair_state_is(pp.primary.http, "active")) << "the later activation gave way";
  EXPECT_TRUE(client.served(5s));
  EXPECT_EQ(client.link().endpoint(), pp.primary.endpoint(pp.primary.router));
  EXPECT_EQ(backup.kill(SIGTERM), 0);
  EXPECT_EQ(primary->kill(SIGTERM), 0);
}

// What wakes a standby is any message from a peer once the active broker
// has been silent for a liveness, a heartbeat as well as a Hello: a link
// that waits at the standby heartbeats there, and is asked to say Hello.
TEST(Processes, AHeartbeatAtTheStandbyAfterTheSilenceMakesItTakeOver) {
  pair_ports pp;
  child primary{"sidecast-broker", pair_broker_args(pp, true)};
  child backup{"sidecast-broker", pair_broker_args(pp, false)};
  ASSERT_TRUE(eventually([&] { return pair_state_is(pp.backup.http, "passive"); }));
  ASSERT_EQ(::kill(primary.pid(), SIGSTOP), 0);
  zmq::context_t ctx{1};
  peer raw{ctx, pp.backup.endpoint(pp.backup.router), "raw"};
  raw.send_hello();
  auto refused = raw.next(Envelope::kError, 2s);
  ASSERT_TRUE(refused);
  EXPECT_EQ(refused->error().code(), proto::STANDBY);
  EXPECT_EQ(refused->error().takeover_ms(), 0u) << "the primary was heard just now: go there";
  std::this_thread::sleep_for(800ms);  // past the backup's liveness (3 × 200 ms) without the primary
  Envelope beat;
  beat.mutable_heartbeat();
  raw.send(beat);
  auto asked = raw.next(Envelope::kError, 2s);
  ASSERT_TRUE(asked);
  EXPECT_EQ(asked->error().code(), proto::NOT_REGISTERED) << asked->DebugString();
  EXPECT_TRUE(raw.hello());
  EXPECT_TRUE(pair_state_is(pp.backup.http, "active"));
  ::kill(primary.pid(), SIGCONT);
}

// A backup that never heard an active primary never serves: started alone,
// it refuses every peer, however long it waits (no split brain at start).
TEST(Processes, ABackupThatNeverHeardThePrimaryServesNobody) {
  pair_ports pp;
  child backup{"sidecast-broker", pair_broker_args(pp, false)};
  zmq::context_t ctx{1};
  std::this_thread::sleep_for(800ms);  // past its liveness (3 × 200 ms)
  EXPECT_TRUE(refuses_as_standby(ctx, pp.backup));
  EXPECT_TRUE(pair_state_is(pp.backup.http, "backup"));
  // The primary comes: it is active within its first intervals, the backup passive.
  child primary{"sidecast-broker", pair_broker_args(pp, true)};
  EXPECT_TRUE(eventually([&] { return pair_state_is(pp.primary.http, "active"); }));
  EXPECT_TRUE(eventually([&] { return pair_state_is(pp.backup.http, "passive"); }));
}

}  // namespace
}  // namespace sidecast::test
