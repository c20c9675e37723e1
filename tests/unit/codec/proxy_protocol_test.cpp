// The PROXY protocol header (versions 1 and 2) a balancer sends first.
#include "gateway/codec/proxy_protocol.hpp"

#include <gtest/gtest.h>

#include <ostream>
#include <string>

namespace pp = sidecast::gateway::proxy_protocol;
using namespace std::string_literals;

namespace sidecast::gateway::proxy_protocol {
void PrintTo(const header& h, std::ostream* os) { *os << "{size=" << h.size << ", client=" << h.client << "}"; }
}  // namespace sidecast::gateway::proxy_protocol

namespace {

const std::string v2_signature = "\r\n\r\n\0\r\nQUIT\n"s;

// A version 2 header: version and command byte, family byte, then `rest`
// (addresses and TLVs) with its length.
std::string v2(unsigned char version_command, unsigned char family, const std::string& rest) {
  std::string out = v2_signature;
  out += static_cast<char>(version_command);
  out += static_cast<char>(family);
  out += static_cast<char>(rest.size() >> 8);
  out += static_cast<char>(rest.size() & 0xff);
  return out + rest;
}

const std::string v4_addresses = "\xc0\x00\x02\x01\x0a\x00\x00\x01\x04\xd2\x1f\x90"s;  // 192.0.2.1 -> 10.0.0.1
const std::string v6_addresses = "\x20\x01\x0d\xb8"s + std::string(11, '\0') + "\x01"s + std::string(15, '\0') +
                                 "\x01"s + "\x04\xd2\x1f\x90"s;  // 2001:db8::1 -> ::1

struct valid_case {
  const char* what;
  std::string bytes;
  pp::header expected;
};

void PrintTo(const valid_case& c, std::ostream* os) { *os << c.what; }

class parse_valid : public ::testing::TestWithParam<valid_case> {};

TEST_P(parse_valid, takes_the_header_and_leaves_the_rest) {
  const auto& c = GetParam();
  for (const std::string after : {"", "GET / HTTP/1.1\r\n"}) {
    auto r = pp::parse(c.bytes + after);
    ASSERT_TRUE(r.has_value()) << r.error().message();
    ASSERT_TRUE(r->has_value()) << "asked for more input";
    EXPECT_EQ(**r, c.expected);
  }
}

INSTANTIATE_TEST_SUITE_P(
    proxy_protocol, parse_valid,
    ::testing::Values(
        valid_case{"v1 TCP4", "PROXY TCP4 192.0.2.1 10.0.0.1 1234 8080\r\n", {41, "192.0.2.1"}},
        valid_case{"v1 TCP6", "PROXY TCP6 2001:db8::1 ::1 1234 8080\r\n", {38, "2001:db8::1"}},
        valid_case{"v1 TCP6 written long", "PROXY TCP6 2001:0db8:0:0:0:0:0:1 ::1 1 2\r\n", {42, "2001:db8::1"}},
        valid_case{"v1 UNKNOWN", "PROXY UNKNOWN\r\n", {15, ""}},
        valid_case{"v1 UNKNOWN with addresses", "PROXY UNKNOWN ffff:f...f ffff:f...f 65535 65535\r\n", {49, ""}},
        valid_case{"v1 ports at their bounds", "PROXY TCP4 1.2.3.4 5.6.7.8 0 65535\r\n", {36, "1.2.3.4"}},
        valid_case{"v2 PROXY TCP over IPv4", v2(0x21, 0x11, v4_addresses), {28, "192.0.2.1"}},
        valid_case{"v2 PROXY UDP over IPv4", v2(0x21, 0x12, v4_addresses), {28, "192.0.2.1"}},
        valid_case{"v2 PROXY TCP over IPv6", v2(0x21, 0x21, v6_addresses), {52, "2001:db8::1"}},
        valid_case{"v2 with TLVs after the addresses", v2(0x21, 0x11, v4_addresses + "\x04\x00\x02id"s),
                   {33, "192.0.2.1"}},
        valid_case{"v2 LOCAL (a health check)", v2(0x20, 0x00, ""), {16, ""}},
        valid_case{"v2 LOCAL with addresses", v2(0x20, 0x11, v4_addresses), {28, ""}},
        valid_case{"v2 PROXY over AF_UNIX", v2(0x21, 0x31, std::string(216, 'u')), {232, ""}},
        valid_case{"v2 PROXY, family unspecified", v2(0x21, 0x00, ""), {16, ""}}));

struct invalid_case {
  const char* what;
  std::string bytes;
  pp::error expected;
};

void PrintTo(const invalid_case& c, std::ostream* os) { *os << c.what; }

class parse_invalid : public ::testing::TestWithParam<invalid_case> {};

TEST_P(parse_invalid, is_an_error) {
  auto r = pp::parse(GetParam().bytes);
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error(), pp::make_error_code(GetParam().expected)) << r.error().message();
}

INSTANTIATE_TEST_SUITE_P(
    proxy_protocol, parse_invalid,
    ::testing::Values(
        invalid_case{"plain HTTP", "GET / HTTP/1.1\r\n\r\n", pp::error::not_proxy},
        invalid_case{"lower case", "proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n", pp::error::not_proxy},
        invalid_case{"v2 signature broken", "\r\n\r\n\0\r\nQUIX\n"s + std::string(8, '\0'), pp::error::not_proxy},
        invalid_case{"v1 unknown protocol", "PROXY SCTP 1.2.3.4 5.6.7.8 1 2\r\n", pp::error::bad_line},
        invalid_case{"v1 missing a port", "PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", pp::error::bad_line},
        invalid_case{"v1 two spaces", "PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n", pp::error::bad_line},
        invalid_case{"v1 no protocol", "PROXY \r\n", pp::error::bad_line},
        invalid_case{"v1 IPv6 address as TCP4", "PROXY TCP4 ::1 ::1 1 2\r\n", pp::error::bad_address},
        invalid_case{"v1 not an address", "PROXY TCP4 example.com 5.6.7.8 1 2\r\n", pp::error::bad_address},
        invalid_case{"v1 bad destination", "PROXY TCP4 1.2.3.4 5.6.7 1 2\r\n", pp::error::bad_address},
        invalid_case{"v1 port too large", "PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", pp::error::bad_address},
        invalid_case{"v1 port not a number", "PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", pp::error::bad_address},
        invalid_case{"v1 no CRLF within 107 bytes", "PROXY TCP4 " + std::string(120, '1'), pp::error::too_long},
        invalid_case{"v1 LF only", "PROXY UNKNOWN\n" + std::string(100, 'x'), pp::error::too_long},
        invalid_case{"v2 version 1", v2(0x11, 0x11, v4_addresses), pp::error::bad_version},
        invalid_case{"v2 unknown command", v2(0x22, 0x11, v4_addresses), pp::error::bad_version},
        invalid_case{"v2 IPv4 addresses cut short", v2(0x21, 0x11, "\x01\x02\x03\x04"s), pp::error::bad_address},
        invalid_case{"v2 IPv6 addresses cut short", v2(0x21, 0x21, v4_addresses), pp::error::bad_address},
        invalid_case{"v2 longer than max_header_bytes", v2(0x21, 0x11, std::string(pp::max_header_bytes, 'x')),
                     pp::error::too_long}));

TEST(proxy_protocol, every_prefix_of_a_header_asks_for_more) {
  for (const std::string& h : {"PROXY TCP4 192.0.2.1 10.0.0.1 1234 8080\r\n"s, v2(0x21, 0x21, v6_addresses)}) {
    for (std::size_t n = 0; n < h.size(); ++n) {
      auto r = pp::parse(std::string_view{h}.substr(0, n));
      ASSERT_TRUE(r.has_value()) << n << ": " << r.error().message();
      EXPECT_FALSE(r->has_value()) << "a header taken from its first " << n << " bytes";
    }
  }
}

TEST(proxy_protocol, a_long_v2_length_is_refused_before_its_bytes_arrive) {
  auto r = pp::parse(v2_signature + "\x21\x11\xff\xff"s);
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error(), pp::make_error_code(pp::error::too_long));
}

// Every such input is decided (a full line, a v2 header of all its bytes),
// and a header taken never reaches past its input.
TEST(proxy_protocol, every_short_input_is_decided_within_its_bytes) {
  for (int a = 0; a < 256; ++a) {
    for (int b = 0; b < 256; ++b) {
      std::string v1 = "PROXY TCP4 ";
      v1 += static_cast<char>(a);
      v1 += static_cast<char>(b);
      v1 += "\r\n";
      for (const std::string& s : {v1, v2_signature + static_cast<char>(a) + static_cast<char>(b) + "\x00\x04"s + "abcd"}) {
        auto r = pp::parse(s);
        if (!r) continue;
        ASSERT_TRUE(r->has_value()) << "asked for more of a complete input";
        EXPECT_LE((*r)->size, s.size());
      }
    }
  }
}

}  // namespace
