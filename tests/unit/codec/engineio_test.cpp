// Engine.IO v4 codec. Cases marked [spec] are the examples of
// socketio/engine.io-protocol README.md (and the Engine.IO half of the sample
// session in socketio/socket.io-protocol Readme.md).
#include "gateway/codec/engineio.hpp"

#include <gtest/gtest.h>

#include <initializer_list>
#include <ostream>
#include <string>
#include <vector>

namespace eio = sidecast::gateway::engineio;
using namespace std::string_literals;

namespace sidecast::gateway::engineio {
void PrintTo(const packet& p, std::ostream* os) {
  *os << "{type='" << static_cast<char>(p.type) << "', data=" << ::testing::PrintToString(p.data)
      << ", binary=" << p.binary << "}";
}
}  // namespace sidecast::gateway::engineio

namespace {

std::string bytes(std::initializer_list<unsigned char> b) { return std::string(b.begin(), b.end()); }

eio::packet text(eio::packet_type t, std::string data = {}) { return {t, std::move(data), false}; }
eio::packet binary(std::string data) { return {eio::packet_type::message, std::move(data), true}; }

// ---------------------------------------------------------------------------
// One text frame / polling segment.

struct text_case {
  const char* what;
  std::string wire;
  eio::packet expected;
};

void PrintTo(const text_case& c, std::ostream* os) { *os << c.what << ": " << ::testing::PrintToString(c.wire); }

class decode_text_valid : public ::testing::TestWithParam<text_case> {};

TEST_P(decode_text_valid, decodes_and_reencodes_byte_for_byte) {
  const auto& c = GetParam();
  const auto p = eio::decode_text(c.wire);
  ASSERT_TRUE(p.has_value());
  EXPECT_EQ(*p, c.expected);
  EXPECT_EQ(eio::encode_text(*p), c.wire);
  // The overload that takes the frame's own buffer decodes the same.
  EXPECT_EQ(eio::decode_text_owned(std::string{c.wire}), p);
}

INSTANTIATE_TEST_SUITE_P(
    engineio, decode_text_valid,
    ::testing::Values(
        text_case{"[spec] message", "4hello", text(eio::packet_type::message, "hello")},
        text_case{"[spec] ping", "2", text(eio::packet_type::ping)},
        text_case{"[spec] pong", "3", text(eio::packet_type::pong)},
        text_case{"[spec] probe ping", "2probe", text(eio::packet_type::ping, "probe")},
        text_case{"[spec] probe pong", "3probe", text(eio::packet_type::pong, "probe")},
        text_case{"[spec] upgrade", "5", text(eio::packet_type::upgrade)},
        text_case{"[spec] noop", "6", text(eio::packet_type::noop)},
        text_case{"[spec] close", "1", text(eio::packet_type::close)},
        text_case{"[spec] open (sample session)",
                  R"(0{"sid":"lv_VI97HAXpY6yYWAAAC","upgrades":["websocket"],"pingInterval":25000,"pingTimeout":5000,"maxPayload":1000000})",
                  text(eio::packet_type::open,
                       R"({"sid":"lv_VI97HAXpY6yYWAAAC","upgrades":["websocket"],"pingInterval":25000,"pingTimeout":5000,"maxPayload":1000000})")},
        text_case{"[spec] socket.io CONNECT in a message", "40", text(eio::packet_type::message, "0")},
        text_case{"[spec] socket.io EVENT in a message", R"(42["hey","Jude"])",
                  text(eio::packet_type::message, R"(2["hey","Jude"])")},
        text_case{"[spec] binary <01 02 03 04>", "bAQIDBA==", binary(bytes({1, 2, 3, 4}))},
        text_case{"empty binary message", "b", binary("")},
        text_case{"binary, one pad", "bAQID", binary(bytes({1, 2, 3}))},
        text_case{"binary, two pads", "bAQ==", binary(bytes({1}))},
        text_case{"binary with NUL and 0xff", "bAP8A", binary(bytes({0, 0xff, 0}))},
        text_case{"[spec] euro sign is 3 bytes", "4\xe2\x82\xac", text(eio::packet_type::message, "\xe2\x82\xac")},
        text_case{"astral character", "4\xf0\x9f\x98\x80", text(eio::packet_type::message, "\xf0\x9f\x98\x80")},
        text_case{"U+2028 stays raw", "4a\xe2\x80\xa8" "b", text(eio::packet_type::message, "a\xe2\x80\xa8" "b")},
        // The codec checks structure only: what a noop or close may carry is
        // the session's business. An EIO=3 length-prefixed body never gets
        // here (the handshake refuses EIO=3), and would read as a noop.
        text_case{"v3 length prefix reads as noop", "6:4hello", text(eio::packet_type::noop, ":4hello")},
        text_case{"message data may hold anything but 0x1e", "4\x00\x01\xff"s,
                  text(eio::packet_type::message, "\x00\x01\xff"s)}));

struct bad_text_case {
  const char* what;
  std::string wire;
};

void PrintTo(const bad_text_case& c, std::ostream* os) { *os << c.what << ": " << ::testing::PrintToString(c.wire); }

class decode_text_invalid : public ::testing::TestWithParam<bad_text_case> {};

TEST_P(decode_text_invalid, is_rejected) {
  EXPECT_FALSE(eio::decode_text(GetParam().wire).has_value());
  EXPECT_FALSE(eio::decode_text_owned(std::string{GetParam().wire}).has_value());
}

INSTANTIATE_TEST_SUITE_P(
    engineio, decode_text_invalid,
    ::testing::Values(bad_text_case{"empty", ""}, bad_text_case{"type 7", "7"},
                      bad_text_case{"type 9", "9hello"}, bad_text_case{"type letter", "xhello"},
                      bad_text_case{"type below '0'", "/"}, bad_text_case{"NUL type", "\x00"s},
                      bad_text_case{"capital B prefix", "BAQIDBA=="},
                      bad_text_case{"base64 length not multiple of 4", "bAQIDBA="},
                      bad_text_case{"base64 without padding", "bAQIDBA"},
                      bad_text_case{"base64 padding in the middle", "bAQ==AQID"},
                      bad_text_case{"base64 three pads", "bA==="},
                      bad_text_case{"base64 only pads", "b===="},
                      bad_text_case{"base64 pad then digit", "bAQ=D"},
                      bad_text_case{"base64 url alphabet", "b-_-_"},
                      bad_text_case{"base64 whitespace", "bAQID BA=="},
                      bad_text_case{"base64 non-zero bits under two pads", "bAR=="},
                      bad_text_case{"base64 non-zero bits under one pad", "bAQJ="},
                      bad_text_case{"base64 with NUL", "bAQ\x00="s},
                      bad_text_case{"base64 trailing separator", "bAQ==\x1e"}));

// ---------------------------------------------------------------------------
// Encoding.

struct encode_case {
  const char* what;
  eio::packet packet;
  std::string wire;
};

void PrintTo(const encode_case& c, std::ostream* os) { *os << c.what; }

class encode_text_table : public ::testing::TestWithParam<encode_case> {};

TEST_P(encode_text_table, encodes) {
  EXPECT_EQ(eio::encode_text(GetParam().packet), GetParam().wire);
}

INSTANTIATE_TEST_SUITE_P(
    engineio, encode_text_table,
    ::testing::Values(encode_case{"[spec] message", text(eio::packet_type::message, "hello"), "4hello"},
                      encode_case{"[spec] ping", text(eio::packet_type::ping), "2"},
                      encode_case{"[spec] pong probe", text(eio::packet_type::pong, "probe"), "3probe"},
                      encode_case{"[spec] noop", text(eio::packet_type::noop), "6"},
                      encode_case{"[spec] binary", binary(bytes({1, 2, 3, 4})), "bAQIDBA=="},
                      encode_case{"binary type is implied", {eio::packet_type::ping, "\x01", true}, "bAQ=="},
                      encode_case{"empty binary", binary(""), "b"}));

// ---------------------------------------------------------------------------
// Polling payloads.

struct payload_case {
  const char* what;
  std::string body;
  std::vector<eio::packet> packets;
};

void PrintTo(const payload_case& c, std::ostream* os) { *os << c.what << ": " << ::testing::PrintToString(c.body); }

class payload_valid : public ::testing::TestWithParam<payload_case> {};

TEST_P(payload_valid, decodes_and_reencodes_byte_for_byte) {
  const auto& c = GetParam();
  const auto packets = eio::decode_payload(c.body);
  ASSERT_TRUE(packets.has_value());
  EXPECT_EQ(*packets, c.packets);
  EXPECT_EQ(eio::encode_payload(*packets), c.body);
}

INSTANTIATE_TEST_SUITE_P(
    engineio, payload_valid,
    ::testing::Values(
        payload_case{"[spec] three packets",
                     "4hello\x1e" "2\x1e" "4world",
                     {text(eio::packet_type::message, "hello"), text(eio::packet_type::ping),
                      text(eio::packet_type::message, "world")}},
        payload_case{"[spec] text then binary",
                     "4hello\x1e" "bAQIDBA==",
                     {text(eio::packet_type::message, "hello"), binary(bytes({1, 2, 3, 4}))}},
        payload_case{"[spec] two socket.io events",
                     "42[\"hello\"]\x1e" "42[\"world\"]",
                     {text(eio::packet_type::message, R"(2["hello"])"),
                      text(eio::packet_type::message, R"(2["world"])")}},
        payload_case{"[spec] single packet", "40", {text(eio::packet_type::message, "0")}},
        payload_case{"close alone", "1", {text(eio::packet_type::close)}},
        payload_case{"UTF-8 segments",
                     "4\xe2\x82\xac\x1e" "4\xf0\x9f\x98\x80\xe2\x80\xa8",
                     {text(eio::packet_type::message, "\xe2\x82\xac"),
                      text(eio::packet_type::message, "\xf0\x9f\x98\x80\xe2\x80\xa8")}},
        payload_case{"two binaries", "bAQ==\x1e" "b",
                     {binary(bytes({1})), binary("")}}));

struct bad_payload_case {
  const char* what;
  std::string body;
};

void PrintTo(const bad_payload_case& c, std::ostream* os) { *os << c.what << ": " << ::testing::PrintToString(c.body); }

class payload_invalid : public ::testing::TestWithParam<bad_payload_case> {};

TEST_P(payload_invalid, rejects_the_whole_body) {
  EXPECT_FALSE(eio::decode_payload(GetParam().body).has_value());
}

INSTANTIATE_TEST_SUITE_P(
    engineio, payload_invalid,
    ::testing::Values(bad_payload_case{"empty body", ""}, bad_payload_case{"separator only", "\x1e"},
                      bad_payload_case{"trailing separator", "4a\x1e"},
                      bad_payload_case{"leading separator", "\x1e" "4a"},
                      bad_payload_case{"empty segment in the middle", "4a\x1e\x1e" "4b"},
                      bad_payload_case{"bad type in second segment", "4a\x1e" "zb"},
                      bad_payload_case{"bad base64 in second segment", "4a\x1e" "bAQ="}));

TEST(engineio, encode_empty_payload_is_empty) {
  EXPECT_EQ(eio::encode_payload({}), "");
}

// ---------------------------------------------------------------------------
// WebSocket binary frames.

TEST(engineio, binary_frame_is_a_message_with_raw_bytes) {
  const std::string frame = bytes({0x01, 0x02, 0x03, 0x04});
  EXPECT_EQ(eio::decode_binary(frame), binary(frame));
  const std::string odd = bytes({'4', 0x00, 0x1e, 0xff});  // no type prefix on binary frames
  EXPECT_EQ(eio::decode_binary(odd).data, odd);
  EXPECT_TRUE(eio::decode_binary("").binary);
}

// ---------------------------------------------------------------------------
// base64 on its own.

struct base64_case {
  std::string bytes;
  std::string text;
};

void PrintTo(const base64_case& c, std::ostream* os) { *os << ::testing::PrintToString(c.text); }

class base64_vectors : public ::testing::TestWithParam<base64_case> {};

TEST_P(base64_vectors, encode_and_decode) {
  EXPECT_EQ(eio::base64_encode(GetParam().bytes), GetParam().text);
  EXPECT_EQ(eio::base64_decode(GetParam().text), GetParam().bytes);
}

// RFC 4648 section 10, plus the Engine.IO document's example.
INSTANTIATE_TEST_SUITE_P(engineio, base64_vectors,
                         ::testing::Values(base64_case{"", ""}, base64_case{"f", "Zg=="},
                                           base64_case{"fo", "Zm8="}, base64_case{"foo", "Zm9v"},
                                           base64_case{"foob", "Zm9vYg=="},
                                           base64_case{"fooba", "Zm9vYmE="},
                                           base64_case{"foobar", "Zm9vYmFy"},
                                           base64_case{bytes({1, 2, 3, 4}), "AQIDBA=="},
                                           base64_case{bytes({0xfb, 0xff, 0xbf}), "+/+/"}));

TEST(engineio, base64_round_trips_every_byte_and_length) {
  std::string all;
  for (int b = 0; b < 256; ++b) {
    all += static_cast<char>(b);
  }
  for (std::size_t len = 0; len <= all.size(); ++len) {
    const auto chunk = all.substr(all.size() - len);
    const auto encoded = eio::base64_encode(chunk);
    EXPECT_EQ(encoded.size() % 4, 0u);
    EXPECT_EQ(eio::base64_decode(encoded), chunk) << len;
    EXPECT_EQ(eio::decode_text(eio::encode_text(binary(chunk))), binary(chunk)) << len;
  }
}

// ---------------------------------------------------------------------------
// Handshake and refusals.

TEST(engineio, open_payload_matches_the_sample_session) {
  EXPECT_EQ(eio::open_payload("lv_VI97HAXpY6yYWAAAC", true, 25000, 5000, 1000000),
            R"({"sid":"lv_VI97HAXpY6yYWAAAC","upgrades":["websocket"],"pingInterval":25000,"pingTimeout":5000,"maxPayload":1000000})");
}

TEST(engineio, open_payload_on_a_direct_websocket_has_no_upgrades) {
  EXPECT_EQ(eio::open_payload("abc", false, 300, 200, 1000000),
            R"({"sid":"abc","upgrades":[],"pingInterval":300,"pingTimeout":200,"maxPayload":1000000})");
}

TEST(engineio, open_payload_escapes_the_sid) {
  EXPECT_EQ(eio::open_payload("a\"b\\c", true, 1, 2, 3),
            R"({"sid":"a\"b\\c","upgrades":["websocket"],"pingInterval":1,"pingTimeout":2,"maxPayload":3})");
}

TEST(engineio, open_payload_large_max_payload) {
  EXPECT_EQ(eio::open_payload("s", true, 4294967295u, 0, 18446744073709551615ull),
            R"({"sid":"s","upgrades":["websocket"],"pingInterval":4294967295,"pingTimeout":0,"maxPayload":18446744073709551615})");
}

struct error_case {
  eio::error_code code;
  std::string_view body;
};

void PrintTo(const error_case& c, std::ostream* os) { *os << c.body; }

class error_bodies : public ::testing::TestWithParam<error_case> {};

TEST_P(error_bodies, exact_text) { EXPECT_EQ(eio::error_body(GetParam().code), GetParam().body); }

INSTANTIATE_TEST_SUITE_P(
    engineio, error_bodies,
    ::testing::Values(
        error_case{eio::error_code::transport_unknown, R"({"code":0,"message":"Transport unknown"})"},
        error_case{eio::error_code::session_id_unknown, R"({"code":1,"message":"Session ID unknown"})"},
        error_case{eio::error_code::bad_handshake_method, R"({"code":2,"message":"Bad handshake method"})"},
        error_case{eio::error_code::bad_request, R"({"code":3,"message":"Bad request"})"},
        error_case{eio::error_code::forbidden, R"({"code":4,"message":"Forbidden"})"},
        error_case{eio::error_code::unsupported_protocol_version,
                   R"({"code":5,"message":"Unsupported protocol version"})"},
        error_case{static_cast<eio::error_code>(42), R"({"code":3,"message":"Bad request"})"}));

// ---------------------------------------------------------------------------
// Nothing crashes on arbitrary bytes.

TEST(engineio, every_short_input_is_handled) {
  // All one- and two-byte inputs, and each with a separator around it.
  for (int a = 0; a < 256; ++a) {
    for (int b = -1; b < 256; ++b) {
      std::string s(1, static_cast<char>(a));
      if (b >= 0) {
        s += static_cast<char>(b);
      }
      if (const auto p = eio::decode_text(s)) {
        EXPECT_EQ(eio::decode_text(eio::encode_text(*p)), p);
      }
      (void)eio::decode_payload(s);
      (void)eio::decode_payload(s + '\x1e' + s);
    }
  }
}

}  // namespace
