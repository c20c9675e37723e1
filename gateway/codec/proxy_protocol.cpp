#include "gateway/codec/proxy_protocol.hpp"

#include <arpa/inet.h>

#include <array>
#include <cstring>
#include <vector>

#include "gateway/codec/error_category.hpp"

namespace sidecast::gateway::proxy_protocol {
namespace {

using namespace codec_detail;

const char* describe(error e) noexcept {
  switch (e) {
    case error::not_proxy: return "no PROXY protocol header";
    case error::bad_line: return "malformed PROXY protocol v1 line";
    case error::bad_address: return "bad address in the PROXY protocol header";
    case error::bad_version: return "unsupported PROXY protocol v2 version or command";
    case error::too_long: return "PROXY protocol header too long";
  }
  return "unknown proxy_protocol codec error";
}

constexpr std::string_view v1_prefix = "PROXY ";
constexpr std::size_t v1_max = 107;  // the longest line the spec allows, CRLF included
constexpr std::string_view v2_signature{"\r\n\r\n\0\r\nQUIT\n", 12};
constexpr std::size_t v2_fixed = 16;  // signature, version and command, family, length

// `family` address (AF_INET, AF_INET6) as text, or "" when it is not one.
std::string text_of(int family, const void* binary) {
  std::array<char, INET6_ADDRSTRLEN> out{};
  return inet_ntop(family, binary, out.data(), out.size()) ? std::string{out.data()} : std::string{};
}

// `text` in `family`, written back in its canonical form; "" when it does not parse.
std::string canonical(int family, const std::string& text) {
  std::array<unsigned char, 16> binary{};
  if (inet_pton(family, text.c_str(), binary.data()) != 1) return {};
  return text_of(family, binary.data());
}

bool is_port(std::string_view s) {
  if (s.empty() || s.size() > 5) return false;
  unsigned value = 0;
  for (char c : s) {
    if (c < '0' || c > '9') return false;
    value = value * 10 + static_cast<unsigned>(c - '0');
  }
  return value <= 65535;
}

boost::system::result<std::optional<header>> parse_v1(std::string_view bytes) {
  auto end = bytes.substr(0, v1_max).find("\r\n");
  if (end == std::string_view::npos) {
    if (bytes.size() >= v1_max) return error::too_long;
    return std::optional<header>{};
  }
  std::vector<std::string_view> parts;
  for (auto line = bytes.substr(0, end);;) {
    auto space = line.find(' ');
    parts.push_back(line.substr(0, space));
    if (space == std::string_view::npos) break;
    line.remove_prefix(space + 1);
  }
  header h{.size = end + 2, .client = {}};
  if (parts.size() >= 2 && parts[1] == "UNKNOWN") return std::optional{h};  // the rest of the line is ignored
  if (parts.size() != 6 || (parts[1] != "TCP4" && parts[1] != "TCP6")) return error::bad_line;
  int family = parts[1] == "TCP4" ? AF_INET : AF_INET6;
  h.client = canonical(family, std::string{parts[2]});
  if (h.client.empty() || canonical(family, std::string{parts[3]}).empty() || !is_port(parts[4]) ||
      !is_port(parts[5]))
    return error::bad_address;
  return std::optional{h};
}

boost::system::result<std::optional<header>> parse_v2(std::string_view bytes) {
  if (bytes.size() < v2_fixed) return std::optional<header>{};
  auto version_command = static_cast<unsigned char>(bytes[12]);
  auto family = static_cast<unsigned char>(bytes[13]);
  std::size_t length = (static_cast<std::size_t>(static_cast<unsigned char>(bytes[14])) << 8) |
                       static_cast<unsigned char>(bytes[15]);
  if ((version_command >> 4) != 2 || (version_command & 0x0f) > 1) return error::bad_version;
  if (v2_fixed + length > max_header_bytes) return error::too_long;
  if (bytes.size() < v2_fixed + length) return std::optional<header>{};
  header h{.size = v2_fixed + length, .client = {}};
  bool local = (version_command & 0x0f) == 0;
  auto transport = family & 0x0f;
  if (local || (transport != 1 && transport != 2)) return std::optional{h};  // no client to name
  const auto* addresses = bytes.data() + v2_fixed;
  switch (family >> 4) {
    case 1:  // IPv4: source, destination (4 bytes each), then the ports
      if (length < 12) return error::bad_address;
      h.client = text_of(AF_INET, addresses);
      break;
    case 2:  // IPv6: 16 bytes each
      if (length < 36) return error::bad_address;
      h.client = text_of(AF_INET6, addresses);
      break;
    default:  // AF_UNIX or unspecified: no address to use
      break;
  }
  return std::optional{h};
}

// Whether `bytes` (shorter than `signature`) may still become it.
bool may_become(std::string_view bytes, std::string_view signature) {
  return signature.substr(0, bytes.size()) == bytes;
}

}  // namespace

const boost::system::error_category& error_category() noexcept {
  static const enum_category<error> category{"sidecast.proxy_protocol", describe};
  return category;
}

boost::system::error_code make_error_code(error e) noexcept { return {static_cast<int>(e), error_category()}; }

boost::system::result<std::optional<header>> parse(std::string_view bytes) {
  if (bytes.size() < v2_signature.size() && may_become(bytes, v2_signature)) return std::optional<header>{};
  if (bytes.starts_with(v2_signature)) return parse_v2(bytes);
  if (bytes.size() < v1_prefix.size() && may_become(bytes, v1_prefix)) return std::optional<header>{};
  if (bytes.starts_with(v1_prefix)) return parse_v1(bytes);
  return error::not_proxy;
}

}  // namespace sidecast::gateway::proxy_protocol
