#pragma once
// The plain HTTP API under /api/v1/ (docs/http-api.md):
//   POST   /api/v1/sessions                     {"nsp","auth"} -> {"session","sid","nsp"}
//   POST   /api/v1/sessions/{session}/emit      {"event","data","ack"}
//   GET    /api/v1/sessions/{session}/events?timeout=MS   long-poll -> {"events":[...]}
//   DELETE /api/v1/sessions/{session}
// (`session`: the client's secret key of it, not the socket's sid)
//   POST   /api/v1/publish  (API key)           {"nsp","event","data","sid"|"room"|"broadcast","except"}
//   GET    /api/v1/sockets/{sid}            (API key)  -> {"sid","nsp","rooms"}
//   POST   /api/v1/sockets/{sid}/join|leave (API key)  {"room"}
//   POST   /api/v1/sockets/{sid}/disconnect (API key)
//   POST   /api/v1/rooms/join|leave|disconnect (API key)  {"nsp","room"|"broadcast","join"|"leave"} -> 202
#include <atomic>
#include <chrono>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>

#include <boost/asio/awaitable.hpp>
#include <boost/beast/http/message.hpp>
#include <boost/beast/http/string_body.hpp>
#include <boost/url/params_view.hpp>

#include "gateway/reply_slot.hpp"
#include "proto/codec.hpp"

namespace sidecast::gateway {

class gateway;
class api_session;

class api {
 public:
  explicit api(gateway& gw) : gw_{gw} {}

  /// Answers a request whose path starts with /api/v1/, from address `peer`.
  boost::asio::awaitable<http_answer> handle(boost::beast::http::request<boost::beast::http::string_body>& req,
                                             std::string_view path, const boost::urls::params_view& params,
                                             const std::string& peer);

  void remove(const std::string& sid);
  std::shared_ptr<api_session> find(const std::string& sid);
  /// Sessions the server closed (a drain, their worker) whose client has
  /// not had the events they kept: its next poll, here or relayed from a
  /// peer gateway, gets them with the 410. A drain waits for them.
  std::size_t owing() const { return owing_.load(std::memory_order_relaxed); }
  /// A drain: each API poll this gateway relays for a client of its own is
  /// answered empty now, and its owner told that the client left (GONE), so
  /// that the owner keeps its events for the client's next poll elsewhere.
  /// Stopped with them waiting, the owner's next event went into a poll no
  /// one would read.
  void end_relayed_polls();
  void owe(bool more) {
    if (more) owing_.fetch_add(1, std::memory_order_relaxed);
    else owing_.fetch_sub(1, std::memory_order_relaxed);
  }

  /// Bridge thread: serves a request a peer gateway relayed (an HttpForward
  /// with a target) for one of this gateway's sessions, on the session's
  /// thread, or sockets (it checked the API key), on the bridge's; `answer`
  /// gets the answer there.
  void serve_forwarded(proto::HttpForward f, std::function<void(http_answer)> answer);

 private:
  using request = boost::beast::http::request<boost::beast::http::string_body>;

  /// The API key publish, sockets and rooms take: an answer refusing the request
  /// when it has none, or a wrong one.
  std::optional<http_answer> refuse_key(const request& req) const;
  http_answer publish(const request& req);
  /// POST /api/v1/rooms/{action}: a room-wide join, leave or disconnect.
  http_answer rooms(const request& req, std::string_view action);
  /// /api/v1/sockets/{sid}[/{action}] for one of this gateway's sockets (of
  /// any kind), with the request's body: `answer` gets the socket (no
  /// action), or 200 once the action is done.
  void serve_socket(std::string_view sid, std::string_view action, std::string_view body,
                    std::function<void(http_answer)> answer);
  // "/{sid}[/{action}]" -> (sid, action).
  static std::pair<std::string_view, std::string_view> session_path(std::string_view rest);
  /// Asks the gateway that owns `sid` through the broker; its answer, or
  /// 504 after `timeout`.
  boost::asio::awaitable<http_answer> relay(request& req, std::string sid, std::string_view action,
                                            std::chrono::milliseconds timeout);
  boost::asio::awaitable<void> serve_relayed(proto::HttpForward f, std::function<void(http_answer)> answer);
  /// `relay`: the id of the peer gateway's forward it came in (empty: ours).
  boost::asio::awaitable<http_answer> on_session(request& req, std::string_view sid, std::string_view action,
                                                 const boost::urls::params_view& params, std::string relay = {});

  gateway& gw_;
  std::mutex mutex_;
  std::unordered_map<std::string, std::weak_ptr<api_session>> sessions_;
  std::atomic<std::size_t> owing_{0};
  // The API polls this gateway relays to their owners, while they wait, by
  // the forward's id (under mutex_).
  struct relayed_poll {
    std::string sid, target;
    std::weak_ptr<reply_slot> slot;
  };
  std::unordered_map<std::string, relayed_poll> relayed_polls_;
};

}  // namespace sidecast::gateway
