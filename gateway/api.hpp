#pragma once
// The plain HTTP API under /api/v1/ (docs/http-api.md):
//   POST   /api/v1/sessions                     {"nsp","auth"} -> {"sid"}
//   POST   /api/v1/sessions/{sid}/emit          {"event","data","ack"}
//   GET    /api/v1/sessions/{sid}/events?timeout=MS   long-poll -> {"events":[...]}
//   DELETE /api/v1/sessions/{sid}
//   POST   /api/v1/publish  (API key)           {"nsp","event","data","sid"|"room"|"broadcast","except"}
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>

#include <boost/asio/awaitable.hpp>
#include <boost/beast/http/message.hpp>
#include <boost/beast/http/string_body.hpp>
#include <boost/url/params_view.hpp>

#include "gateway/reply_slot.hpp"

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

 private:
  http_answer publish(const boost::beast::http::request<boost::beast::http::string_body>& req);

  gateway& gw_;
  std::mutex mutex_;
  std::unordered_map<std::string, std::weak_ptr<api_session>> sessions_;
};

}  // namespace sidecast::gateway
