// The PROXY protocol header (haproxy's proxy-protocol.txt, versions 1 and
// 2) that a balancer sends first on each connection it opens to a gateway
// (haproxy: `send-proxy` / `send-proxy-v2`), naming the client it serves.
// The gateway takes the client's address from it for its per-address
// limits (`--proxy-protocol`).
//
// Pure functions: no I/O, clocks, logging or global state. Malformed input
// is an error value, never an exception.
#pragma once

#include <cstddef>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>

#include <boost/system/error_code.hpp>
#include <boost/system/result.hpp>

namespace sidecast::gateway::proxy_protocol {

// The longest header taken: a version 1 line is at most 107 bytes; a
// version 2 header is 16 bytes and its addresses and TLVs, which a
// balancer keeps far below this.
inline constexpr std::size_t max_header_bytes = 2048;

struct header {
  std::size_t size = 0;  // bytes of the input it took; what follows is the client's
  // The client's address as text ("192.0.2.1", "2001:db8::1"); empty when
  // the header names none (v1 UNKNOWN, v2 LOCAL such as a health check,
  // or an address family other than TCP/UDP over IPv4 or IPv6).
  std::string client;

  friend bool operator==(const header&, const header&) = default;
};

enum class error {
  not_proxy = 1,  // the input starts with neither signature
  bad_line,       // version 1: not "PROXY TCP4|TCP6|UNKNOWN src dst sport dport\r\n"
  bad_address,    // an address or port that does not parse in its family
  bad_version,    // version 2: a version other than 2, or a command other than LOCAL or PROXY
  too_long,       // longer than max_header_bytes (or a v1 line past 107 bytes)
};

const boost::system::error_category& error_category() noexcept;
boost::system::error_code make_error_code(error e) noexcept;

/// The header at the start of `bytes`; nullopt when `bytes` is a prefix of
/// one and more input is needed.
boost::system::result<std::optional<header>> parse(std::string_view bytes);

}  // namespace sidecast::gateway::proxy_protocol

template <>
struct boost::system::is_error_code_enum<sidecast::gateway::proxy_protocol::error> : std::true_type {};
