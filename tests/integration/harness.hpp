#pragma once
// Test helpers that play the broker's neighbours over real sockets: a peer
// (client or gateway) speaking the envelope protocol, child processes for the
// real binaries, and waiting on conditions instead of sleeping.
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <netinet/in.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <fstream>
#include <functional>
#include <optional>
#include <random>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <zmq.hpp>

#include "core/curve.hpp"
#include "proto/codec.hpp"

extern char** environ;

namespace sidecast::test {

using namespace std::chrono_literals;
using proto::Envelope;

/// Polls `condition` every 5 ms until it holds or `limit` passes.
inline bool eventually(const std::function<bool()>& condition, std::chrono::milliseconds limit = 5s) {
  auto until = std::chrono::steady_clock::now() + limit;
  while (std::chrono::steady_clock::now() < until) {
    if (condition()) return true;
    std::this_thread::sleep_for(5ms);
  }
  return condition();
}

/// A free TCP port on 127.0.0.1, picked at random from just below the kernel's
/// ephemeral range, as tools/free-ports does (its docstring says why: a port
/// from inside the range can become some outgoing connection's source port
/// before the server binds it). Never the same port twice in one process.
inline int free_port() {
  static std::set<int> given;
  static std::mt19937 random{std::random_device{}()};
  int high = 32768;
  if (std::ifstream range{"/proc/sys/net/ipv4/ip_local_port_range"}; range) range >> high;
  int low = std::max(1024, high - 12000);
  for (int attempt = 0; attempt < 1000; ++attempt) {
    int port = std::uniform_int_distribution<int>{low, high - 1}(random);
    if (given.contains(port)) continue;
    int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = htons(static_cast<uint16_t>(port));
    bool free = ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0;
    ::close(fd);
    if (free) {
      given.insert(port);
      return port;
    }
  }
  throw std::runtime_error("no free port below the ephemeral range");
}

/// A plain TCP connection to 127.0.0.1:port; -1 if it cannot be made.
inline int connect_to(int port) {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(static_cast<std::uint16_t>(port));
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

/// Writes `request` to 127.0.0.1:port on a new connection and reads until
/// the server closes it (at most 10 s); "" if it cannot connect.
inline std::string http_raw(int port, const std::string& request) {
  int fd = connect_to(port);
  if (fd < 0) return {};
  timeval ten{10, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &ten, sizeof ten);
  [[maybe_unused]] auto sent = ::write(fd, request.data(), request.size());
  std::string response;
  char buf[4096];
  for (ssize_t n; (n = ::read(fd, buf, sizeof buf)) > 0;) response.append(buf, static_cast<std::size_t>(n));
  ::close(fd);
  return response;
}

/// GET http://127.0.0.1:port/path with a plain socket; returns status and body.
inline std::pair<int, std::string> http_get(int port, const std::string& path) {
  auto response = http_raw(port, "GET " + path + " HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
  if (response.size() < 12) return {0, {}};
  auto body = response.find("\r\n\r\n");
  return {std::stoi(response.substr(9, 3)), body == std::string::npos ? "" : response.substr(body + 4)};
}

/// A DEALER peer of the broker, driven synchronously by the test.
class peer {
 public:
  peer(zmq::context_t& ctx, const std::string& endpoint, std::string id,
       proto::Role role = proto::ROLE_CLIENT, const core::curve_client& curve = {})
      : id_{std::move(id)}, role_{role}, socket_{ctx, zmq::socket_type::dealer} {
    socket_.set(zmq::sockopt::routing_id, id_);
    socket_.set(zmq::sockopt::linger, 0);
    core::apply(socket_, curve);
    socket_.connect(endpoint);
  }

  /// Sends Hello and waits for Welcome.
  bool hello(std::chrono::milliseconds limit = 3s) {
    send_hello();
    return next(Envelope::kWelcome, limit).has_value();
  }

  /// A worker's Hello (see send_hello), then waits for the Welcome.
  bool hello(const std::vector<std::pair<std::string, unsigned>>& services, std::uint64_t incarnation = 0,
             std::uint64_t connection = 0, std::chrono::milliseconds limit = 3s) {
    send_hello(services, false, incarnation, connection);
    return next(Envelope::kWelcome, limit).has_value();
  }

  /// Sends Hello (a worker's: with its services and capacities, and whether
  /// it drains; the link incarnation and socket number a peer_link would
  /// give), without waiting.
  void send_hello(const std::vector<std::pair<std::string, unsigned>>& services = {}, bool draining = false,
                  std::uint64_t incarnation = 0, std::uint64_t connection = 0) {
    Envelope env;
    auto* h = env.mutable_hello();
    h->set_role(role_);
    h->set_id(id_);
    h->set_protocol_version(proto::protocol_version);
    for (const auto& [name, capacity] : services) {
      auto* svc = h->add_services();
      svc->set_name(name);
      svc->set_capacity(capacity);
    }
    h->set_draining(draining);
    h->set_incarnation(incarnation);
    h->set_connection(connection);
    send(env);
  }

  void send(const Envelope& env) { send_raw(proto::encode(env)); }
  /// Answers job `id` (OK, with `args`).
  void reply(const std::string& id, const std::string& args = "[]") {
    Envelope env;
    env.mutable_reply()->set_id(id);
    env.mutable_reply()->set_args(args);
    send(env);
  }
  void send_raw(std::string_view bytes) { socket_.send(zmq::buffer(bytes), zmq::send_flags::none); }
  void send_frames(const std::vector<std::string>& frames) {
    for (std::size_t i = 0; i < frames.size(); ++i)
      socket_.send(zmq::buffer(frames[i]), i + 1 < frames.size() ? zmq::send_flags::sndmore : zmq::send_flags::none);
  }

  /// Next envelope of any kind except heartbeats, or nullopt after `limit`.
  std::optional<Envelope> receive(std::chrono::milliseconds limit) {
    auto until = std::chrono::steady_clock::now() + limit;
    for (;;) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(until - std::chrono::steady_clock::now());
      if (left.count() <= 0) return std::nullopt;
      zmq::pollitem_t item{socket_.handle(), 0, ZMQ_POLLIN, 0};
      zmq::poll(&item, 1, left);
      if (!(item.revents & ZMQ_POLLIN)) continue;
      zmq::message_t msg;
      if (!socket_.recv(msg)) continue;
      auto env = proto::decode(msg.to_string_view());
      if (!env || env->has_heartbeat()) continue;
      return env;
    }
  }

  /// The Reply to request `id`, skipping anything else, or nullopt when
  /// `limit` passes with nothing at all.
  std::optional<Envelope> reply_to(const std::string& id, std::chrono::milliseconds limit = 5s) {
    std::optional<Envelope> got;
    while ((got = receive_any(limit)) && !(got->has_reply() && got->reply().id() == id)) {}
    return got;
  }

  /// Next envelope, heartbeats too (receive() skips them), or nullopt after `limit`.
  std::optional<Envelope> receive_any(std::chrono::milliseconds limit) {
    zmq::pollitem_t item{socket_.handle(), 0, ZMQ_POLLIN, 0};
    zmq::poll(&item, 1, limit);
    zmq::message_t msg;
    if (!(item.revents & ZMQ_POLLIN) || !socket_.recv(msg)) return std::nullopt;
    return proto::decode(msg.to_string_view());
  }

  /// Next envelope of `kind`, skipping others, or nullopt after `limit`.
  std::optional<Envelope> next(Envelope::KindCase kind, std::chrono::milliseconds limit) {
    auto until = std::chrono::steady_clock::now() + limit;
    for (;;) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(until - std::chrono::steady_clock::now());
      auto env = receive(left);
      if (!env) return std::nullopt;
      if (env->kind_case() == kind) return env;
    }
  }

  std::string submit(const std::string& service, const std::string& event, const std::string& args,
                     std::chrono::milliseconds timeout = 5s, const std::string& sid = {},
                     const std::string& nsp = "/") {
    auto id = id_ + ":" + std::to_string(++next_id_);
    Envelope env;
    auto* r = env.mutable_request();
    r->set_id(id);
    r->set_service(service);
    r->set_event(event);
    r->set_args(args);
    r->set_sid(sid);
    r->set_nsp(nsp);
    r->set_wants_reply(true);
    r->set_timeout_ms(static_cast<std::uint32_t>(timeout.count()));
    send(env);
    return id;
  }

  /// Sends a request and waits for its reply.
  std::optional<proto::Reply> call(const std::string& service, const std::string& event, const std::string& args,
                                   std::chrono::milliseconds timeout = 5s) {
    auto id = submit(service, event, args, timeout);
    auto until = std::chrono::steady_clock::now() + timeout + 2s;
    for (;;) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(until - std::chrono::steady_clock::now());
      auto env = next(Envelope::kReply, left);
      if (!env) return std::nullopt;
      if (env->reply().id() == id) return env->reply();
    }
  }

  const std::string& id() const { return id_; }

 private:
  std::string id_;
  proto::Role role_;
  zmq::socket_t socket_;
  std::uint64_t next_id_ = 0;
};

/// A child process running one of the project's binaries.
class child {
 public:
  child(const std::string& binary, std::vector<std::string> args) {
    std::vector<std::string> argv_s{std::string{SIDECAST_BIN_DIR} + "/" + binary};
    argv_s.insert(argv_s.end(), args.begin(), args.end());
    std::vector<char*> argv;
    for (auto& a : argv_s) argv.push_back(a.data());
    argv.push_back(nullptr);
    if (::posix_spawn(&pid_, argv[0], nullptr, nullptr, argv.data(), environ) != 0) pid_ = -1;
  }
  ~child() { kill(SIGKILL); }
  child(const child&) = delete;
  child& operator=(const child&) = delete;

  bool running() const { return pid_ > 0; }
  /// Sends `sig` and reaps the process; returns its wait status.
  int kill(int sig) {
    if (pid_ <= 0) return -1;
    ::kill(pid_, sig);
    int status = 0;
    ::waitpid(pid_, &status, 0);
    pid_ = -1;
    return status;
  }
  pid_t pid() const { return pid_; }
  /// Reaps the process if it exits within `limit`; its wait status.
  std::optional<int> wait_exit(std::chrono::milliseconds limit) {
    auto until = std::chrono::steady_clock::now() + limit;
    while (pid_ > 0) {
      int status = 0;
      if (::waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        return status;
      }
      if (std::chrono::steady_clock::now() >= until) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    return std::nullopt;
  }

 private:
  pid_t pid_ = -1;
};

}  // namespace sidecast::test
