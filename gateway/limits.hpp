#pragma once
// Admission limits: a token bucket for client events, the count of open
// connections in all and per address, and the balancers trusted to name a
// connection's client.
#include <algorithm>
#include <array>
#include <chrono>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include <boost/asio/ip/address.hpp>
#include <boost/asio/ip/network_v4.hpp>
#include <boost/asio/ip/network_v6.hpp>

namespace sidecast::gateway {

/// Addresses and networks ("192.0.2.7", "10.0.0.0/8", "fd00::/8"): the
/// balancers whose connections may name their client in a PROXY protocol
/// header (--proxy-protocol-from).
class network_set {
 public:
  /// Nullopt when an entry is neither an address nor a network.
  static std::optional<network_set> parse(const std::vector<std::string>& entries) {
    network_set set;
    for (const auto& e : entries) {
      boost::system::error_code ec;
      bool v6 = e.find(':') != std::string::npos;
      if (e.find('/') == std::string::npos) {
        auto a = boost::asio::ip::make_address(e, ec);
        if (ec) return std::nullopt;
        if (a.is_v4()) set.v4_.emplace_back(a.to_v4(), 32);
        else set.v6_.emplace_back(a.to_v6(), 128);
      } else if (v6) {
        set.v6_.push_back(boost::asio::ip::make_network_v6(e, ec));
        if (ec) return std::nullopt;
      } else {
        set.v4_.push_back(boost::asio::ip::make_network_v4(e, ec));
        if (ec) return std::nullopt;
      }
    }
    return set;
  }

  bool empty() const { return v4_.empty() && v6_.empty(); }

  bool contains(const boost::asio::ip::address& a) const {
    if (a.is_v6() && a.to_v6().is_v4_mapped()) return contains(boost::asio::ip::make_address_v4(boost::asio::ip::v4_mapped, a.to_v6()));
    if (a.is_v4()) {
      auto bits = a.to_v4().to_uint();
      return std::any_of(v4_.begin(), v4_.end(), [bits](const auto& n) {
        auto mask = n.netmask().to_uint();
        return (bits & mask) == (n.address().to_uint() & mask);
      });
    }
    auto bytes = a.to_v6().to_bytes();
    return std::any_of(v6_.begin(), v6_.end(), [&bytes](const auto& n) {
      auto prefix = n.address().to_bytes();
      for (unsigned i = 0, left = n.prefix_length(); left > 0; ++i, left -= std::min(left, 8u)) {
        unsigned char mask = static_cast<unsigned char>(0xff00u >> std::min(left, 8u));
        if ((bytes[i] & mask) != (prefix[i] & mask)) return false;
      }
      return true;
    });
  }

 private:
  std::vector<boost::asio::ip::network_v4> v4_;
  std::vector<boost::asio::ip::network_v6> v6_;
};

/// `rate` tokens per second up to `burst`; rate 0 means no limit. One per
/// connection, used on its thread only.
class token_bucket {
 public:
  token_bucket(double rate, double burst) : rate_{rate}, burst_{std::max(burst, 1.0)}, tokens_{burst_} {}

  bool take(std::chrono::steady_clock::time_point now = std::chrono::steady_clock::now()) {
    if (rate_ <= 0) return true;
    auto elapsed = std::chrono::duration<double>(now - last_).count();
    last_ = now;
    tokens_ = std::min(burst_, tokens_ + elapsed * rate_);
    if (tokens_ < 1) return false;
    tokens_ -= 1;
    return true;
  }

 private:
  double rate_, burst_, tokens_;
  std::chrono::steady_clock::time_point last_ = std::chrono::steady_clock::now();
};

/// What a per-address limit counts an address under. A global IPv6
/// address by its network of `ipv6_prefix` bits (64: what one host or site
/// is given; counted one by one, a client with a /64 would have 2^64
/// budgets). An IPv4 address as itself, and so an IPv4-mapped one, and a
/// NAT64 one (64:ff9b::/96, which carries the IPv4 client of a translator:
/// by its prefix, every IPv4 client would share one budget). Unique-local
/// and link-local IPv6 addresses (a local network's, where many clients
/// share one /64) by the whole address. Anything else as it is written.
inline std::string address_key(const std::string& address, unsigned ipv6_prefix = 64) {
  namespace ip = boost::asio::ip;
  boost::system::error_code ec;
  auto a = ip::make_address(address, ec);
  if (ec) return address;
  if (a.is_v4()) return a.to_v4().to_string();
  auto v6 = a.to_v6();
  if (v6.is_v4_mapped()) return ip::make_address_v4(ip::v4_mapped, v6).to_string();
  auto bytes = v6.to_bytes();
  static constexpr std::array<unsigned char, 12> nat64{0x00, 0x64, 0xff, 0x9b, 0, 0, 0, 0, 0, 0, 0, 0};
  if (std::equal(nat64.begin(), nat64.end(), bytes.begin()))
    return ip::address_v4{{bytes[12], bytes[13], bytes[14], bytes[15]}}.to_string();
  bool local = (bytes[0] & 0xfe) == 0xfc || v6.is_link_local();  // fc00::/7, fe80::/10
  if (local || ipv6_prefix >= 128) return v6.to_string();
  return ip::make_network_v6(v6, static_cast<unsigned short>(ipv6_prefix)).canonical().to_string();
}

/// Counts open connections (or sessions), in all and per address_key();
/// admit() hands out a slot that gives itself back when the last owner
/// drops it (the HTTP session, then its WebSocket).
class connection_limits {
 public:
  connection_limits(std::size_t total, std::size_t per_address, unsigned ipv6_prefix = 64)
      : total_{total}, per_address_{per_address}, ipv6_prefix_{ipv6_prefix} {}

  /// A place for a connection (or session) from `client`, counted under
  /// address_key(client); released when the last copy goes. Null when full.
  std::shared_ptr<void> admit(const std::string& client) {
    auto address = address_key(client, ipv6_prefix_);
    std::lock_guard lock{mutex_};
    auto& mine = by_address_[address];
    if (open_ >= total_ || mine >= per_address_) {
      if (mine == 0) by_address_.erase(address);
      return nullptr;
    }
    ++open_;
    ++mine;
    return std::shared_ptr<void>(static_cast<void*>(this), [this, address](void*) { release(address); });
  }

  std::size_t open() {
    std::lock_guard lock{mutex_};
    return open_;
  }

 private:
  void release(const std::string& address) {
    std::lock_guard lock{mutex_};
    --open_;
    if (auto it = by_address_.find(address); it != by_address_.end() && --it->second == 0) by_address_.erase(it);
  }

  std::mutex mutex_;
  std::size_t total_, per_address_, open_ = 0;
  unsigned ipv6_prefix_;
  std::unordered_map<std::string, std::size_t> by_address_;
};

}  // namespace sidecast::gateway
