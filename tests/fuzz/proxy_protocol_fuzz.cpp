// libFuzzer target for the PROXY protocol header a balancer sends first: no
// input may crash parse(); it decides once (a prefix asks for more until the
// header's bytes are there, and every longer input gets the same answer:
// the same header, or the same refusal); an accepted header never reaches
// past its input or max_header_bytes, and names a client that parses back
// to itself.
#include <arpa/inet.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>

#include "gateway/codec/proxy_protocol.hpp"

namespace pp = sidecast::gateway::proxy_protocol;

namespace {

bool canonical_address(const std::string& text) {
  std::array<unsigned char, 16> binary{};
  std::array<char, INET6_ADDRSTRLEN> back{};
  for (int family : {AF_INET, AF_INET6})
    if (inet_pton(family, text.c_str(), binary.data()) == 1)
      return inet_ntop(family, binary.data(), back.data(), back.size()) && text == back.data();
  return false;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view in(reinterpret_cast<const char*>(data), size);
  std::optional<boost::system::result<std::optional<pp::header>>> decided;
  for (std::size_t n = 0; n <= in.size(); ++n) {
    auto r = pp::parse(in.substr(0, n));
    if (!decided) {
      if (r && !*r) continue;  // a prefix of a header: more to come
      decided = r;
      if (r) {
        const auto& h = **r;
        if (h.size > n || h.size > pp::max_header_bytes) __builtin_trap();
        if (!h.client.empty() && !canonical_address(h.client)) __builtin_trap();
      }
      continue;
    }
    // Bytes after the decision change nothing.
    if (r.has_value() != decided->has_value()) __builtin_trap();
    if (r ? **r != ***decided : r.error() != decided->error()) __builtin_trap();
  }
  return 0;
}
