#include "workers/demo/demo.hpp"

#include <algorithm>

#include <boost/json.hpp>

#include "core/config.hpp"

namespace sidecast::workers {
namespace json = boost::json;

namespace {

// The first argument as a string, or empty.
std::string first_string(const json::array& args) {
  if (!args.empty() && args[0].is_string()) return std::string{args[0].as_string()};
  return {};
}

void echo(request req) { req.reply(req.args_text(), req.attachments()); }

void whoami(request req) {
  json::error_code ec;
  auto auth = json::parse(req.auth_text(), ec);
  if (ec) auth = json::object{};
  json::object who{{"sid", req.sid()}, {"nsp", req.nsp()}, {"auth", std::move(auth)}};
  if (!req.user().empty()) who["user"] = req.user();  // authenticated by the gateway (JWT) or the connect hook
  req.reply(json::array{std::move(who)});
}

void membership(request req, bool joining) {
  auto room = first_string(req.args());
  if (room.empty()) {
    req.fail(proto::BAD_REQUEST, "a room name is required");
    return;
  }
  joining ? req.join(room) : req.leave(room);
  req.reply(json::array{json::string{room}});
}

void say(request req) {
  auto args = req.args();
  if (args.empty() || !args[0].is_object()) {
    req.fail(proto::BAD_REQUEST, "say needs {room, text}");
    return;
  }
  const auto& msg = args[0].as_object();
  auto room = msg.if_contains("room");
  if (!room || !room->is_string()) {
    req.fail(proto::BAD_REQUEST, "say needs a room");
    return;
  }
  json::value text = msg.contains("text") ? msg.at("text") : json::value{""};
  json::object said{{"room", *room}, {"text", text}, {"from", req.sid()}};
  req.emit_to_room(std::string{room->as_string()}, "said", json::serialize(json::array{said}));
  req.reply(json::array{true});
}

// Emits `callback` with our arguments and acks the original event with the
// client's answer, binary included.
void call_me_back(request req) {
  auto left = std::chrono::duration_cast<std::chrono::milliseconds>(req.cancel().deadline() -
                                                                    std::chrono::steady_clock::now());
  bool sent = req.emit_with_ack(
      "callback", req.args_text(), req.attachments(),
      [req](ack_result ack) mutable {
        if (ack.code == proto::OK) req.reply(std::move(ack.args), std::move(ack.attachments));
        else req.fail(ack.code, "the client did not ack the callback: " + ack.message);
      },
      std::max(left, std::chrono::milliseconds(1)));
  // Refused (--pending-acks-limit emits await their acks already, the
  // outbox is full, the worker stops): no ack will come, so the event is
  // answered now, not silently.
  if (!sent) req.fail(proto::BUSY, "the callback could not be sent");
}

void bye(request req) { req.disconnect(); }

service with_demo_handlers(service s) {
  // All of them return at once (call-me-back's wait is a callback).
  return s.on_quick("echo", echo)
      .on_quick("echo-bin", echo)
      .on_quick("whoami", whoami)
      .on_quick("join", [](request r) { membership(std::move(r), true); })
      .on_quick("leave", [](request r) { membership(std::move(r), false); })
      .on_quick("say", say)
      .on_quick("call-me-back", call_me_back)
      .on_quick("bye", bye);
}

}  // namespace

service demo_service(unsigned capacity) {
  return with_demo_handlers(service{"demo", capacity}).on_connect([](request req) {
    if (req.nsp() == "/forbidden") req.fail(proto::REFUSED, "forbidden");
    else req.reply("{}");
  });
}

// delay(ms, ...rest): waits ms (or until cancelled), then acks [...rest].
// Simulates slow work for tests and benchmarks.
void delay(request req) {
  auto args = req.args();
  if (args.empty() || !args[0].is_number()) {
    req.fail(proto::BAD_REQUEST, "delay needs a number of milliseconds");
    return;
  }
  // Clamped before the cast: a double past int64 (1e300) is undefined there.
  auto ms = std::chrono::milliseconds(
      static_cast<std::int64_t>(std::clamp(args[0].to_number<double>(), 0.0, 86400e3)));
  if (!req.cancel().sleep_for(ms)) {
    req.fail(proto::CANCELLED, "cancelled");
    return;
  }
  args.erase(args.begin());
  req.reply(args);
}

service echo_service(unsigned capacity) {
  // Any event: the dispatcher falls back to the "*" handler.
  return service{"echo", capacity}.on_quick("*", echo).on("delay", delay);
}

void add_options(CLI::App& app, builtin_options& o) {
  app.add_option("--capacity", o.capacity, "Requests each service runs at once")
      ->capture_default_str()
      ->check(CLI::Range(1u, 100000u));
  app.add_option("--chat-db", o.chat.database, "SQLite file of the chat service (':memory:' keeps nothing)")
      ->capture_default_str();
  app.add_option("--chat-history", o.chat.history, "Messages sent to a socket joining a chat room")
      ->capture_default_str();
  app.add_option("--chat-keep", o.chat.keep_per_room, "Messages kept per chat room; older ones are deleted")
      ->capture_default_str()
      ->check(CLI::Range(1u, 100000000u));
  app.add_option("--chat-keep-total", o.chat.keep_total, "Messages kept in all chat rooms; the oldest are deleted")
      ->capture_default_str()
      ->check(CLI::Range(std::int64_t{1}, std::int64_t{1} << 40));
  app.add_option("--chat-max-rooms", o.chat.max_rooms,
                 "Chat rooms one socket may be in; a join past it is refused (keep it at most the gateways' "
                 "--max-rooms)")
      ->capture_default_str()
      ->check(CLI::Range(1u, 1000000u));
  core::add_millis(app, "--chat-busy-timeout", o.chat.busy_timeout,
                   "How long a chat statement waits for the database's lock (another process's), ms; then the "
                   "event is answered busy");
  core::add_millis(app, "--vm-launch-ms", o.vm.launch_time, "Time one simulated VM takes to launch, ms");
  app.add_option("--vm-failure-rate", o.vm.failure_rate, "Chance that a simulated VM fails (0-1)")
      ->capture_default_str()
      ->check(core::finite_range(0, 1));
  app.add_option("--vm-max-count", o.vm.max_count, "VMs one open_vm may ask for")
      ->capture_default_str()
      ->check(CLI::Range(1u, 100000u));
}

// The app the official socket.io-protocol test suite expects: on connect,
// "auth" with the CONNECT payload; "message" -> "message-back" with the same
// arguments; "message-with-ack" -> acked with its arguments (binary too).
service protocol_suite_service(unsigned capacity) {
  return service{"protocol-suite", capacity}
      .on_connect([](request req) {
        req.emit("auth", "[" + req.auth_text() + "]");  // sent right after the CONNECT answer
        req.reply("{}");
      })
      .on("message", [](request req) { req.emit("message-back", req.args_text(), req.attachments()); })
      .on("message-with-ack", echo);
}

const std::map<std::string, service_factory>& builtin_services() {
  static const std::map<std::string, service_factory> all{
      {"demo", [](const builtin_options& o) { return demo_service(o.capacity); }},
      {"echo", [](const builtin_options& o) { return echo_service(o.capacity); }},
      {"chat", [](const builtin_options& o) { return chat_service(o.capacity, o.chat, o.metrics); }},
      {"vm", [](const builtin_options& o) { return vm_service(o.capacity, o.vm); }},
      {"protocol-suite", [](const builtin_options& o) { return protocol_suite_service(o.capacity); }},
  };
  return all;
}

}  // namespace sidecast::workers
