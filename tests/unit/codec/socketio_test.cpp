// Socket.IO v5 codec. Cases marked [spec] are the examples of
// socketio/socket.io-protocol Readme.md ("Packet encoding", the exchange
// examples and the sample session, with the Engine.IO "4" prefix removed).
#include "gateway/codec/socketio.hpp"

#include <gtest/gtest.h>

#include <boost/json/parse.hpp>
#include <boost/json/value.hpp>

#include <ostream>
#include <tuple>
#include <string>
#include <vector>

#include "gateway/codec/engineio.hpp"
#include "gateway/codec/json_scan.hpp"

namespace sio = sidecast::gateway::socketio;
namespace json = boost::json;
using namespace std::string_literals;

namespace sidecast::gateway::socketio {
void PrintTo(const packet& p, std::ostream* os) {
  *os << "{type=" << static_cast<int>(p.type) << ", nsp=" << ::testing::PrintToString(p.nsp) << ", id=";
  if (p.id) {
    *os << *p.id;
  } else {
    *os << "none";
  }
  *os << ", data=" << ::testing::PrintToString(p.data) << ", attachments=" << p.attachments << "}";
}
}  // namespace sidecast::gateway::socketio

namespace {

constexpr std::size_t max_attachments = 10;

sio::packet make(sio::packet_type type, std::string nsp = "/", std::optional<std::uint64_t> id = {},
                 std::string data = {}, std::size_t attachments = 0) {
  return sio::packet{type, std::move(nsp), id, std::move(data), attachments};
}

const std::string ph0 = R"({"_placeholder":true,"num":0})";
const std::string ph1 = R"({"_placeholder":true,"num":1})";

// ---------------------------------------------------------------------------
// Valid packets in canonical form: decode gives the packet, encode gives the
// same bytes back.

struct valid_case {
  const char* what;
  std::string wire;
  sio::packet expected;
};

void PrintTo(const valid_case& c, std::ostream* os) { *os << c.what << ": " << ::testing::PrintToString(c.wire); }

class decode_valid : public ::testing::TestWithParam<valid_case> {};

TEST_P(decode_valid, decodes_and_reencodes_byte_for_byte) {
  const auto& c = GetParam();
  const auto p = sio::decode(c.wire, max_attachments);
  ASSERT_TRUE(p.has_value()) << p.error().message();
  EXPECT_EQ(*p, c.expected);
  EXPECT_EQ(sio::encode(*p), c.wire);
  // The overload that takes the text's own buffer decodes the same.
  const auto moved = sio::decode_owned(std::string{c.wire}, max_attachments);
  ASSERT_TRUE(moved.has_value()) << moved.error().message();
  EXPECT_EQ(*moved, c.expected);
}

using T = sio::packet_type;

INSTANTIATE_TEST_SUITE_P(
    socketio, decode_valid,
    ::testing::Values(
        // Packet encoding: connection to a namespace.
        valid_case{"[spec] CONNECT main namespace", "0", make(T::connect)},
        valid_case{"[spec] CONNECT custom namespace with sid", R"(0/admin,{"sid":"oSO0OpakMV_3jnilAAAA"})",
                   make(T::connect, "/admin", {}, R"({"sid":"oSO0OpakMV_3jnilAAAA"})")},
        valid_case{"[spec] CONNECT_ERROR", R"(4{"message":"Not authorized"})",
                   make(T::connect_error, "/", {}, R"({"message":"Not authorized"})")},
        // Sending and receiving data.
        valid_case{"[spec] EVENT main namespace", R"(2["foo"])", make(T::event, "/", {}, R"(["foo"])")},
        valid_case{"[spec] EVENT custom namespace", R"(2/admin,["bar"])",
                   make(T::event, "/admin", {}, R"(["bar"])")},
        valid_case{"[spec] BINARY_EVENT", R"(51-["baz",)" + ph0 + "]",
                   make(T::binary_event, "/", {}, R"(["baz",)" + ph0 + "]", 1)},
        valid_case{"[spec] BINARY_EVENT two attachments", R"(52-/admin,["baz",)" + ph0 + "," + ph1 + "]",
                   make(T::binary_event, "/admin", {}, R"(["baz",)" + ph0 + "," + ph1 + "]", 2)},
        // Acknowledgement.
        valid_case{"[spec] EVENT with ack id", R"(212["foo"])", make(T::event, "/", 12, R"(["foo"])")},
        valid_case{"EVENT with a numeric name (socket.io-parser allows it)", R"(2[1,"x"])",
                   make(T::event, "/", {}, R"([1,"x"])")},
        valid_case{"[spec] ACK custom namespace", R"(3/admin,13["bar"])",
                   make(T::ack, "/admin", 13, R"(["bar"])")},
        valid_case{"[spec] BINARY_ACK", R"(61-15["bar",)" + ph0 + "]",
                   make(T::binary_ack, "/", 15, R"(["bar",)" + ph0 + "]", 1)},
        // Disconnection.
        valid_case{"[spec] DISCONNECT main namespace", "1", make(T::disconnect)},
        valid_case{"[spec] DISCONNECT custom namespace", "1/admin,", make(T::disconnect, "/admin")},
        // Exchange protocol examples.
        valid_case{"[spec] CONNECT with auth payload", R"(0/admin,{"token":"123"})",
                   make(T::connect, "/admin", {}, R"({"token":"123"})")},
        valid_case{"[spec] CONNECT answer", R"(0{"sid":"wZX3oN0bSVIhsaknAAAI"})",
                   make(T::connect, "/", {}, R"({"sid":"wZX3oN0bSVIhsaknAAAI"})")},
        valid_case{"[spec] CONNECT custom namespace, no payload", "0/admin,", make(T::connect, "/admin")},
        valid_case{"[spec] ACK with empty array", "312[]", make(T::ack, "/", 12, "[]")},
        valid_case{"[spec] EVENT custom namespace with id", R"(2/admin,13["foo"])",
                   make(T::event, "/admin", 13, R"(["foo"])")},
        valid_case{"[spec] BINARY_EVENT with id", R"(51-14["foo",)" + ph0 + "]",
                   make(T::binary_event, "/", 14, R"(["foo",)" + ph0 + "]", 1)},
        valid_case{"[spec] ACK answering a binary event", R"(314["bar"])", make(T::ack, "/", 14, R"(["bar"])")},
        valid_case{"[spec] EVENT id 15", R"(215["foo"])", make(T::event, "/", 15, R"(["foo"])")},
        // Sample session.
        valid_case{"[spec] sample: hey Jude", R"(2["hey","Jude"])",
                   make(T::event, "/", {}, R"(["hey","Jude"])")},
        valid_case{"[spec] sample: admin granted", R"(0/admin,{"sid":"-G5j-67EZFp-q59rADQM"})",
                   make(T::connect, "/admin", {}, R"({"sid":"-G5j-67EZFp-q59rADQM"})")},
        valid_case{"[spec] sample: tellme with ack", R"(2/admin,1["tellme"])",
                   make(T::event, "/admin", 1, R"(["tellme"])")},
        valid_case{"[spec] sample: binary ack", "61-/admin,1[" + ph0 + "]",
                   make(T::binary_ack, "/admin", 1, "[" + ph0 + "]", 1)},
        // Beyond the documents.
        valid_case{"ACK with empty array and namespace", "3/a,0[]", make(T::ack, "/a", 0, "[]")},
        valid_case{"largest ack id", R"(218446744073709551615["x"])",
                   make(T::event, "/", 18446744073709551615ull, R"(["x"])")},
        valid_case{"binary packet without attachments", R"(50-["x"])", make(T::binary_event, "/", {}, R"(["x"])")},
        valid_case{"ten attachments (the limit)",
                   R"(510-["x",{"_placeholder":true,"num":9},{"_placeholder":true,"num":8},)"
                   R"({"_placeholder":true,"num":7},{"_placeholder":true,"num":6},{"_placeholder":true,"num":5},)"
                   R"({"_placeholder":true,"num":4},{"_placeholder":true,"num":3},{"_placeholder":true,"num":2},)"
                   R"({"_placeholder":true,"num":1},{"_placeholder":true,"num":0}])",
                   make(T::binary_event, "/", {},
                        R"(["x",{"_placeholder":true,"num":9},{"_placeholder":true,"num":8},)"
                        R"({"_placeholder":true,"num":7},{"_placeholder":true,"num":6},{"_placeholder":true,"num":5},)"
                        R"({"_placeholder":true,"num":4},{"_placeholder":true,"num":3},{"_placeholder":true,"num":2},)"
                        R"({"_placeholder":true,"num":1},{"_placeholder":true,"num":0}])",
                        10)},
        valid_case{"nested placeholder", R"(51-["x",{"file":{"_placeholder":true,"num":0,"extra":1}}])",
                   make(T::binary_event, "/", {}, R"(["x",{"file":{"_placeholder":true,"num":0,"extra":1}}])", 1)},
        valid_case{"placeholder look-alike in a plain EVENT is data", R"(2["x",)" + ph0 + "]",
                   make(T::event, "/", {}, R"(["x",)" + ph0 + "]")},
        valid_case{"_placeholder false is not a placeholder", R"(50-["x",{"_placeholder":false,"num":7}])",
                   make(T::binary_event, "/", {}, R"(["x",{"_placeholder":false,"num":7}])")},
        valid_case{"numbers are not rewritten", R"(2["n",1.0,1e2,-0,123456789012345678901234567890])",
                   make(T::event, "/", {}, R"(["n",1.0,1e2,-0,123456789012345678901234567890])")},
        valid_case{"escapes are not rewritten", R"(2["\u00e9\ud83d\ude00\/\n"])",
                   make(T::event, "/", {}, R"(["\u00e9\ud83d\ude00\/\n"])")},
        valid_case{"astral and U+2028 raw", "2[\"m\",\"\xf0\x9f\x98\x80 \xe2\x80\xa8 \xe2\x80\xa9\"]",
                   make(T::event, "/", {}, "[\"m\",\"\xf0\x9f\x98\x80 \xe2\x80\xa8 \xe2\x80\xa9\"]")},
        valid_case{"astral event name", "2[\"\xf0\x9f\x98\x80\"]",
                   make(T::event, "/", {}, "[\"\xf0\x9f\x98\x80\"]")},
        valid_case{"UTF-8 namespace", "2/caf\xc3\xa9,[\"x\"]", make(T::event, "/caf\xc3\xa9", {}, "[\"x\"]")},
        valid_case{"whitespace around the payload is kept", "2 [ \"x\" , 1 ] \n",
                   make(T::event, "/", {}, " [ \"x\" , 1 ] \n")},
        valid_case{"empty event name", R"(2[""])", make(T::event, "/", {}, R"([""])")},
        valid_case{"reserved name as an argument", R"(2["x","connect"])",
                   make(T::event, "/", {}, R"(["x","connect"])")},
        valid_case{"ack payload of any elements", R"(35[null,{"a":[]},"s"])",
                   make(T::ack, "/", 5, R"([null,{"a":[]},"s"])")},
        valid_case{"CONNECT with empty object", "0{}", make(T::connect, "/", {}, "{}")}));

// ---------------------------------------------------------------------------
// Valid but not canonical: decode, then encode gives the canonical form.

struct canonical_case {
  const char* what;
  std::string wire;
  std::string canonical;
};

void PrintTo(const canonical_case& c, std::ostream* os) { *os << c.what << ": " << ::testing::PrintToString(c.wire); }

class decode_noncanonical : public ::testing::TestWithParam<canonical_case> {};

TEST_P(decode_noncanonical, encodes_canonically) {
  const auto p = sio::decode(GetParam().wire, max_attachments);
  ASSERT_TRUE(p.has_value()) << p.error().message();
  EXPECT_EQ(sio::encode(*p), GetParam().canonical);
  const auto again = sio::decode(GetParam().canonical, max_attachments);
  ASSERT_TRUE(again.has_value());
  EXPECT_EQ(*again, *p);
}

INSTANTIATE_TEST_SUITE_P(
    socketio, decode_noncanonical,
    ::testing::Values(canonical_case{"namespace without comma", "1/admin", "1/admin,"},
                      canonical_case{"CONNECT namespace without comma", "0/admin", "0/admin,"},
                      canonical_case{"explicit main namespace", R"(2/,["x"])", R"(2["x"])"},
                      canonical_case{"explicit main namespace, DISCONNECT", "1/,", "1"},
                      canonical_case{"leading zeros in ack id", R"(2007["x"])", R"(27["x"])"},
                      canonical_case{"leading zeros in attachments", "601-3[" + ph0 + "]", "61-3[" + ph0 + "]"}));

TEST(socketio, encode_omits_an_empty_namespace) {
  EXPECT_EQ(sio::encode(make(T::event, "", 3, R"(["x"])")), R"(23["x"])");
}

TEST(socketio, encode_binary_types_always_carry_the_count) {
  EXPECT_EQ(sio::encode(make(T::binary_ack, "/", 2, "[]", 0)), "60-2[]");
}

TEST(socketio, engineio_payload_of_socketio_packets) {
  // [spec] sample session, request n°5.
  const auto packets = sidecast::gateway::engineio::decode_payload("42[\"hello\"]\x1e" "42[\"world\"]");
  ASSERT_TRUE(packets.has_value());
  ASSERT_EQ(packets->size(), 2u);
  const auto first = sio::decode(packets->at(0).data, max_attachments);
  const auto second = sio::decode(packets->at(1).data, max_attachments);
  ASSERT_TRUE(first && second);
  EXPECT_EQ(first->data, R"(["hello"])");
  EXPECT_EQ(second->data, R"(["world"])");
}

// ---------------------------------------------------------------------------
// Malformed packets: each a specific error, never an exception.

struct invalid_case {
  const char* what;
  std::string wire;
  sio::error expected;
};

void PrintTo(const invalid_case& c, std::ostream* os) { *os << c.what << ": " << ::testing::PrintToString(c.wire); }

class decode_invalid : public ::testing::TestWithParam<invalid_case> {};

TEST_P(decode_invalid, returns_the_error) {
  const auto p = sio::decode(GetParam().wire, max_attachments);
  ASSERT_FALSE(p.has_value()) << ::testing::PrintToString(*p);
  EXPECT_EQ(p.error(), GetParam().expected) << p.error().message();
  EXPECT_EQ(p.error().category(), sio::error_category());
  EXPECT_FALSE(p.error().message().empty());
  const auto moved = sio::decode_owned(std::string{GetParam().wire}, max_attachments);
  ASSERT_FALSE(moved.has_value());
  EXPECT_EQ(moved.error(), GetParam().expected);
}

using E = sio::error;

INSTANTIATE_TEST_SUITE_P(
    socketio, decode_invalid,
    ::testing::Values(
        invalid_case{"empty", "", E::empty},
        invalid_case{"type 7", R"(7["x"])", E::invalid_type},
        invalid_case{"type letter", "a", E::invalid_type},
        invalid_case{"negative type", "-1", E::invalid_type},
        invalid_case{"leading space", R"( 2["x"])", E::invalid_type},
        invalid_case{"engine.io prefix left on", R"(42["x"])", E::bad_ack_id},
        invalid_case{"binary without count", "5", E::bad_attachments},
        invalid_case{"binary with empty count", R"(5-["x"])", E::bad_attachments},
        invalid_case{"binary count without dash", R"(51["x",{"_placeholder":true,"num":0}])", E::bad_attachments},
        invalid_case{"binary count with letter", R"(5a-["x"])", E::bad_attachments},
        invalid_case{"binary count at end", "61", E::bad_attachments},
        invalid_case{"binary count negative", R"(5-1-["x"])", E::bad_attachments},
        invalid_case{"too many attachments", R"(511-["x"])", E::too_many_attachments},
        invalid_case{"attachments overflow", R"(599999999999999999999999-["x"])", E::too_many_attachments},
        invalid_case{"control character in namespace", "2/ad\x01min,[\"x\"]", E::bad_namespace},
        invalid_case{"record separator in namespace", "2/a\x1e" "b,[\"x\"]", E::bad_namespace},
        invalid_case{"DEL in namespace", "1/a\x7f", E::bad_namespace},
        invalid_case{"NUL in namespace", "1/a\x00,"s, E::bad_namespace},
        invalid_case{"invalid UTF-8 in namespace", "2/\xff,[\"x\"]", E::bad_namespace},
        invalid_case{"truncated UTF-8 in namespace", "1/\xc3", E::bad_namespace},
        invalid_case{"overlong UTF-8 in namespace", "1/\xc0\xaf,", E::bad_namespace},
        invalid_case{"surrogate in namespace", "1/\xed\xa0\x80,", E::bad_namespace},
        invalid_case{"above U+10FFFF in namespace", "1/\xf4\x90\x80\x80,", E::bad_namespace},
        invalid_case{"ack id overflow", R"(218446744073709551616["x"])", E::bad_ack_id},
        invalid_case{"huge ack id", R"(299999999999999999999999999999["x"])", E::bad_ack_id},
        invalid_case{"id on CONNECT", "05{}", E::bad_ack_id},
        invalid_case{"id on DISCONNECT", "15", E::bad_ack_id},
        invalid_case{"id on CONNECT_ERROR", R"(4/x,1{"message":"m"})", E::bad_ack_id},
        invalid_case{"ACK without id", "3[]", E::missing_ack_id},
        invalid_case{"BINARY_ACK without id", "61-[" + ph0 + "]", E::missing_ack_id},
        invalid_case{"EVENT without payload", "2", E::missing_payload},
        invalid_case{"EVENT with id, no payload", "212", E::missing_payload},
        invalid_case{"EVENT namespace, no payload", "2/admin,", E::missing_payload},
        invalid_case{"namespace swallowing the payload", R"(2/admin["x"])", E::missing_payload},
        invalid_case{"ACK without payload", "31", E::missing_payload},
        invalid_case{"CONNECT_ERROR without payload", "4", E::missing_payload},
        invalid_case{"DISCONNECT with payload", "1{}", E::unexpected_payload},
        invalid_case{"DISCONNECT namespace with payload", R"(1/admin,["x"])", E::unexpected_payload},
        invalid_case{"unterminated array", R"(2["x")", E::invalid_json},
        invalid_case{"two values", R"(2["x"]])", E::invalid_json},
        invalid_case{"trailing comma", R"(2["x",])", E::invalid_json},
        invalid_case{"comment", R"(2["x"/*c*/])", E::invalid_json},
        invalid_case{"whitespace only payload", "2 ", E::invalid_json},
        invalid_case{"garbage after object", R"(0{"a":1}garbage)", E::invalid_json},
        invalid_case{"single quotes", "2['x']", E::invalid_json},
        invalid_case{"raw control character in string", "2[\"a\x01\"]", E::invalid_json},
        invalid_case{"invalid UTF-8 in payload", "2[\"\xff\"]", E::invalid_json},
        invalid_case{"lone surrogate bytes in payload", "2[\"\xed\xa0\x80\"]", E::invalid_json},
        invalid_case{"record separator after payload", "2[\"x\"]\x1e", E::invalid_json},
        invalid_case{"nested too deep", "2[\"x\"," + std::string(100, '[') + std::string(100, ']') + "]",
                     E::invalid_json},
        invalid_case{"CONNECT with array", "0[]", E::payload_not_object},
        invalid_case{"CONNECT with string", R"(0"x")", E::payload_not_object},
        invalid_case{"CONNECT with null", "0null", E::payload_not_object},
        invalid_case{"v4-style CONNECT_ERROR string", R"(4"Not authorized")", E::payload_not_object},
        invalid_case{"CONNECT_ERROR array", "4[]", E::payload_not_object},
        invalid_case{"EVENT with object", "2{}", E::payload_not_array},
        invalid_case{"EVENT with string", R"(2"foo")", E::payload_not_array},
        invalid_case{"ACK with object", "31{}", E::payload_not_array},
        invalid_case{"BINARY_ACK with object", "60-1{}", E::payload_not_array},
        invalid_case{"EVENT empty array", "2[]", E::empty_event},
        invalid_case{"BINARY_EVENT empty array", "50-[]", E::empty_event},
        invalid_case{"EVENT name is a boolean", "2[true]", E::event_name_not_string},
        invalid_case{"EVENT name is null", "2[null]", E::event_name_not_string},
        invalid_case{"EVENT name is an object", R"(2[{"a":1}])", E::event_name_not_string},
        invalid_case{"EVENT name is a placeholder", "51-[" + ph0 + "]", E::event_name_not_string},
        invalid_case{"reserved connect", R"(2["connect"])", E::reserved_event_name},
        invalid_case{"reserved connect_error", R"(2["connect_error"])", E::reserved_event_name},
        invalid_case{"reserved disconnect", R"(2["disconnect"])", E::reserved_event_name},
        invalid_case{"reserved disconnecting", R"(2["disconnecting"])", E::reserved_event_name},
        invalid_case{"reserved newListener", R"(2["newListener"])", E::reserved_event_name},
        invalid_case{"reserved removeListener", R"(2/a,1["removeListener",1])", E::reserved_event_name},
        invalid_case{"reserved name escaped", R"(2["\u0063onnect"])", E::reserved_event_name},
        invalid_case{"missing placeholder", R"(51-["x"])", E::placeholder_mismatch},
        invalid_case{"placeholder num out of range", R"(51-["x",{"_placeholder":true,"num":1}])",
                     E::placeholder_mismatch},
        invalid_case{"placeholder num repeated", R"(52-["x",)" + ph0 + "," + ph0 + "]", E::placeholder_mismatch},
        invalid_case{"extra placeholder", R"(50-["x",)" + ph0 + "]", E::placeholder_mismatch},
        invalid_case{"one placeholder for two attachments", R"(52-["x",)" + ph0 + "]", E::placeholder_mismatch},
        invalid_case{"placeholder without num", R"(51-["x",{"_placeholder":true}])", E::placeholder_mismatch},
        invalid_case{"placeholder negative num", R"(51-["x",{"_placeholder":true,"num":-1}])",
                     E::placeholder_mismatch},
        invalid_case{"placeholder string num", R"(51-["x",{"_placeholder":true,"num":"0"}])",
                     E::placeholder_mismatch},
        invalid_case{"placeholder fractional num", R"(51-["x",{"_placeholder":true,"num":0.5}])",
                     E::placeholder_mismatch},
        invalid_case{"BINARY_ACK placeholder mismatch", R"(61-1[{"_placeholder":true,"num":3}])",
                     E::placeholder_mismatch}));

TEST(socketio, max_attachments_is_the_callers_limit) {
  const std::string wire = R"(52-["x",)" + ph0 + "," + ph1 + "]";
  EXPECT_TRUE(sio::decode(wire, 2).has_value());
  EXPECT_EQ(sio::decode(wire, 1).error(), E::too_many_attachments);
  EXPECT_EQ(sio::decode(R"(50-["x"])", 0)->attachments, 0u);
}

TEST(socketio, every_short_input_is_handled) {
  for (int a = 0; a < 256; ++a) {
    for (int b = -1; b < 256; ++b) {
      for (const char* tail : {"", "[\"x\"]", "{}", "-[\"x\"]", ","}) {
        std::string s(1, static_cast<char>(a));
        if (b >= 0) {
          s += static_cast<char>(b);
        }
        s += tail;
        if (const auto p = sio::decode(s, max_attachments)) {
          EXPECT_EQ(sio::decode(sio::encode(*p), max_attachments).value(), *p) << s;
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Placeholders.

struct placeholder_case {
  const char* what;
  std::string json;
  bool has;
  std::optional<std::size_t> count;
  std::size_t consistent_with;  // attachments count that is consistent, or npos
};

void PrintTo(const placeholder_case& c, std::ostream* os) { *os << c.what << ": " << c.json; }

class placeholders : public ::testing::TestWithParam<placeholder_case> {};

constexpr std::size_t none = static_cast<std::size_t>(-1);

TEST_P(placeholders, are_counted_and_checked) {
  const auto& c = GetParam();
  const json::value v = json::parse(c.json);
  EXPECT_EQ(sio::has_placeholders(v), c.has);
  EXPECT_EQ(sio::count_placeholders(v), c.count);
  for (std::size_t n = 0; n < 4; ++n) {
    EXPECT_EQ(sio::placeholders_consistent(v, n), n == c.consistent_with) << n;
    EXPECT_EQ(sio::placeholders_consistent(std::string_view(c.json), n), n == c.consistent_with) << n;
  }
}

INSTANTIATE_TEST_SUITE_P(
    socketio, placeholders,
    ::testing::Values(
        placeholder_case{"[spec] one", R"(["baz",)" + ph0 + "]", true, 1, 1},
        placeholder_case{"[spec] two", R"(["baz",)" + ph0 + "," + ph1 + "]", true, 2, 2},
        placeholder_case{"none", R"(["baz",{"a":[1,2,{"b":null}]}])", false, 0, 0},
        placeholder_case{"scalar", "3", false, 0, 0},
        placeholder_case{"reversed order", "[" + ph1 + "," + ph0 + "]", true, 2, 2},
        placeholder_case{"deeply nested", R"({"a":[[{"b":)" + ph0 + "}]]}", true, 1, 1},
        placeholder_case{"duplicate num", "[" + ph0 + "," + ph0 + "]", true, 2, none},
        placeholder_case{"gap", "[" + ph0 + R"(,{"_placeholder":true,"num":2}])", true, 2, none},
        placeholder_case{"bad num", R"([{"_placeholder":true,"num":"0"}])", true, std::nullopt, none},
        placeholder_case{"missing num", R"([{"_placeholder":true}])", true, std::nullopt, none},
        placeholder_case{"flag not true", R"([{"_placeholder":1,"num":0}])", false, 0, 0},
        placeholder_case{"inside a placeholder is not searched",
                         R"([{"_placeholder":true,"num":0,"x":{"_placeholder":true,"num":1}}])", true, 1, 1}));

TEST(socketio, placeholders_on_invalid_json_are_never_consistent) {
  EXPECT_FALSE(sio::placeholders_consistent(std::string_view("[{"), 0));
  EXPECT_FALSE(sio::placeholders_consistent(std::string_view(""), 0));
}

TEST(socketio, placeholder_walk_has_no_recursion_limit) {
  // Deeper than any parser limit: built directly, not parsed.
  json::value v = json::parse(ph0);
  for (int i = 0; i < 10000; ++i) {
    json::array a;
    a.emplace_back(std::move(v));
    v = std::move(a);
  }
  EXPECT_EQ(sio::count_placeholders(v), 1u);
  EXPECT_TRUE(sio::placeholders_consistent(v, 1));
}

// ---------------------------------------------------------------------------
// split_event / join_event.

struct split_case {
  const char* what;
  std::string array;
  std::string name;
  std::string rest;
};

void PrintTo(const split_case& c, std::ostream* os) { *os << c.what << ": " << c.array; }

class split_valid : public ::testing::TestWithParam<split_case> {};

TEST_P(split_valid, splits_and_joins_back) {
  const auto& c = GetParam();
  const auto parts = sio::split_event(c.array);
  ASSERT_TRUE(parts.has_value());
  EXPECT_EQ(parts->first, c.name);
  EXPECT_EQ(parts->second, c.rest);
  // The rest is a valid array; joining gives back the same JSON value.
  EXPECT_TRUE(json::parse(parts->second).is_array());
  EXPECT_EQ(json::parse(sio::join_event(parts->first, parts->second)), json::parse(c.array));
  // The overload that reuses the array's buffer gives the same parts.
  EXPECT_EQ(sio::split_event_owned(std::string{c.array}), parts);
}

INSTANTIATE_TEST_SUITE_P(
    socketio, split_valid,
    ::testing::Values(
        split_case{"[spec] name only", R"(["foo"])", "foo", "[]"},
        split_case{"[spec] one argument", R"(["hey","Jude"])", "hey", R"(["Jude"])"},
        split_case{"[spec] binary placeholders", R"(["baz",)" + ph0 + "," + ph1 + "]", "baz",
                   "[" + ph0 + "," + ph1 + "]"},
        split_case{"arguments copied verbatim", R"(["n",1.0,1e2,{"a":[1,"]"]},"\u00e9"])", "n",
                   R"([1.0,1e2,{"a":[1,"]"]},"\u00e9"])"},
        split_case{"whitespace", " [ \"a\" , 1 ] ", "a", "[ 1 ] "},
        split_case{"whitespace before ]", "[\"a\" ]", "a", "[]"},
        split_case{"escaped name", R"(["\u00e9v\"t\\",1])", "\xc3\xa9v\"t\\", "[1]"},
        split_case{"astral name raw", "[\"\xf0\x9f\x98\x80\",\"\xe2\x80\xa8\"]", "\xf0\x9f\x98\x80",
                   "[\"\xe2\x80\xa8\"]"},
        split_case{"astral name escaped", R"(["\ud83d\ude00"])", "\xf0\x9f\x98\x80", "[]"},
        split_case{"empty name", R"(["",2])", "", "[2]"}));

class split_invalid : public ::testing::TestWithParam<std::string> {};

// A numeric event name becomes the text of the number, as JavaScript's
// event emitters key it.
TEST(split_numeric, name_is_the_numbers_text) {
  for (auto [array, name, rest] : {std::tuple{"[1]", "1", "[]"}, std::tuple{"[ -2.5e3 ,{\"a\":1}]", "-2.5e3", "[{\"a\":1}]"},
                                   std::tuple{"[42,\"x\",3]", "42", "[\"x\",3]"}}) {
    const auto parts = sio::split_event(array);
    ASSERT_TRUE(parts.has_value()) << array;
    EXPECT_EQ(parts->first, name);
    EXPECT_EQ(json::parse(parts->second), json::parse(rest));
    EXPECT_EQ(sio::split_event_owned(std::string{array}), parts);
  }
}

TEST_P(split_invalid, is_nullopt) {
  EXPECT_FALSE(sio::split_event(GetParam()).has_value());
  EXPECT_FALSE(sio::split_event_owned(std::string{GetParam()}).has_value());
}

INSTANTIATE_TEST_SUITE_P(socketio, split_invalid,
                         ::testing::Values("", "[]", "[1x]", "[01]", "[-]", "[1", "[null,\"x\"]", "{}", "\"x\"", "[\"unterminated",
                                           "[\"x\"", "[\"x\":1]", "[\"x\\\"]", " ", "[", "[\"\\u12\"]"));

struct join_case {
  const char* what;
  std::string name;
  std::string args;
  std::string expected;
};

void PrintTo(const join_case& c, std::ostream* os) { *os << c.what; }

class join_table : public ::testing::TestWithParam<join_case> {};

TEST_P(join_table, builds_the_payload) {
  EXPECT_EQ(sio::join_event(GetParam().name, GetParam().args), GetParam().expected);
}

INSTANTIATE_TEST_SUITE_P(
    socketio, join_table,
    ::testing::Values(join_case{"[spec] no arguments", "foo", "[]", R"(["foo"])"},
                      join_case{"[spec] one argument", "hey", R"(["Jude"])", R"(["hey","Jude"])"},
                      join_case{"blank arguments", "a", "", R"(["a"])"},
                      join_case{"spaced empty array", "a", " [ \n ] ", R"(["a"])"},
                      join_case{"arguments verbatim", "a", R"([1.0, {"b":1e2}])", R"(["a",1.0, {"b":1e2}])"},
                      join_case{"non-array is one argument", "a", R"({"k":1})", R"(["a",{"k":1}])"},
                      join_case{"name escaped", "a\"b\\c\n", "[]", R"(["a\"b\\c\n"])"},
                      join_case{"name control character", std::string("\x01", 1), "[]", R"(["\u0001"])"},
                      join_case{"name UTF-8 raw", "\xf0\x9f\x98\x80\xe2\x80\xa8", "[1]",
                                "[\"\xf0\x9f\x98\x80\xe2\x80\xa8\",1]"}));

TEST(socketio, split_then_join_is_byte_exact_for_canonical_payloads) {
  for (const std::string payload : {R"(["foo"])", R"(["hey","Jude"])", R"(["chat",1,{"a":2},[null]])"}) {
    const auto parts = sio::split_event(payload);
    ASSERT_TRUE(parts);
    EXPECT_EQ(sio::join_event(parts->first, parts->second), payload);
  }
}

// ---------------------------------------------------------------------------
// binary_assembler.

TEST(socketio_binary_assembler, collects_the_spec_example) {
  // [spec] 52-/admin,["baz",<placeholder 0>,<placeholder 1>] + <01 02> + <03 04>
  const auto header = sio::decode(R"(52-/admin,["baz",)" + ph0 + "," + ph1 + "]", max_attachments);
  ASSERT_TRUE(header);
  sio::binary_assembler assembler(max_attachments, 1024);
  EXPECT_FALSE(assembler.waiting());
  EXPECT_EQ(assembler.start(*header).value(), false);
  EXPECT_TRUE(assembler.waiting());
  EXPECT_EQ(assembler.pending(), 2u);
  EXPECT_FALSE(assembler.take().has_value());
  EXPECT_EQ(assembler.add("\x01\x02").value(), false);
  EXPECT_EQ(assembler.pending(), 1u);
  EXPECT_EQ(assembler.add("\x03\x04").value(), true);
  EXPECT_TRUE(assembler.complete());
  EXPECT_FALSE(assembler.waiting());
  const auto message = assembler.take();
  ASSERT_TRUE(message);
  EXPECT_EQ(message->header, *header);
  EXPECT_EQ(message->attachments, (std::vector<std::string>{"\x01\x02", "\x03\x04"}));
  EXPECT_FALSE(assembler.complete());
  EXPECT_FALSE(assembler.take().has_value());
}

TEST(socketio_binary_assembler, zero_attachments_complete_at_once) {
  sio::binary_assembler assembler(max_attachments, 1024);
  EXPECT_EQ(assembler.start(make(T::binary_ack, "/", 1, "[]", 0)).value(), true);
  EXPECT_TRUE(assembler.complete());
  EXPECT_EQ(assembler.add("x").error(), E::unexpected_attachment);
  EXPECT_TRUE(assembler.take().has_value());
}

TEST(socketio_binary_assembler, refuses_what_does_not_fit) {
  sio::binary_assembler assembler(2, 4);
  EXPECT_EQ(assembler.add("x").error(), E::unexpected_attachment);
  EXPECT_EQ(assembler.start(make(T::event, "/", {}, R"(["x"])")).error(), E::not_binary);
  EXPECT_EQ(assembler.start(make(T::binary_event, "/", {}, "[]", 3)).error(), E::too_many_attachments);
  ASSERT_TRUE(assembler.start(make(T::binary_event, "/", {}, "[]", 2)));
  EXPECT_EQ(assembler.start(make(T::binary_event, "/", {}, "[]", 1)).error(), E::assembler_busy);
  EXPECT_EQ(assembler.add("abc").value(), false);
  EXPECT_EQ(assembler.add("de").error(), E::attachments_too_large);
  // The failed message is dropped; the assembler is usable again.
  EXPECT_FALSE(assembler.waiting());
  ASSERT_TRUE(assembler.start(make(T::binary_event, "/", {}, "[]", 2)));
  EXPECT_EQ(assembler.add("ab").value(), false);
  EXPECT_EQ(assembler.add("cd").value(), true);
  EXPECT_EQ(assembler.add("e").error(), E::unexpected_attachment);
  // Complete but not taken: still busy.
  EXPECT_EQ(assembler.start(make(T::binary_event, "/", {}, "[]", 1)).error(), E::assembler_busy);
  assembler.reset();
  EXPECT_TRUE(assembler.start(make(T::binary_event, "/", {}, "[]", 1)));
}

TEST(socketio_binary_assembler, empty_attachments_count_towards_the_number_not_the_bytes) {
  sio::binary_assembler assembler(3, 0);
  ASSERT_TRUE(assembler.start(make(T::binary_event, "/", {}, "[]", 3)));
  EXPECT_FALSE(assembler.add("").value());
  EXPECT_FALSE(assembler.add("").value());
  EXPECT_TRUE(assembler.add("").value());
  EXPECT_EQ(assembler.take()->attachments.size(), 3u);
}

// valid_args: what the gateway accepts from workers as event or ack arguments.
TEST(socketio, valid_args_takes_blank_text_and_one_complete_json_value) {
  for (std::string ok : {"", "  \n", "[]", R"(["x",1,{"a":[true,null]}])", " [1] ", R"({"k":1})", "1", "\"s\"",
                         "[1.0e2,-0,18446744073709551616]", "[\"\\u00e9\xc3\xa9\"]"})
    EXPECT_TRUE(sio::valid_args(ok)) << ok;
  std::string deep(sio::max_json_depth, '[');
  deep += std::string(sio::max_json_depth, ']');
  EXPECT_TRUE(sio::valid_args(deep));
}

// JSON.stringify writes a lone surrogate escape for a string cut inside an
// emoji, and Node's JSON.parse takes it; Boost.JSON 1.81 does not, and the
// gateway closed the connection. Taken now, whole, and handed on as sent.
TEST(socketio, lone_surrogate_escapes_are_taken_and_handed_on_as_sent) {
  for (std::string wire : {R"(2["echo","cut: \ud83d"])", R"(2["echo","\udc00 first"])",
                           R"(2["echo","\uD83D\uDE00 a pair"])", R"(21["echo",{"k":"\ud800"}])"}) {
    auto p = sio::decode(wire, max_attachments);
    ASSERT_TRUE(p) << wire;
    EXPECT_TRUE(wire.ends_with(p->data)) << wire;
    EXPECT_TRUE(sio::valid_args(p->data)) << p->data;
  }
  EXPECT_TRUE(sio::valid_args(R"(["\ud83d"])"));
  boost::system::error_code ec;
  auto v = sio::parse_json(R"({"token":"\udfff"})", ec);
  EXPECT_FALSE(ec);
  EXPECT_TRUE(v.is_object());
  // Still refused: a broken escape, and an escaped backslash before a
  // "u" that is not an escape at all, inside an invalid value.
  EXPECT_FALSE(sio::decode(R"(2["echo","\ud83"])", max_attachments));
  EXPECT_FALSE(sio::valid_args(R"(["\\ud83d)"));
  std::string scratch;
  EXPECT_EQ(sidecast::gateway::codec_detail::surrogates_tolerated(R"(["\\ud83d"])", scratch), R"(["\\ud83d"])") << "not an escape";
  EXPECT_EQ(sidecast::gateway::codec_detail::surrogates_tolerated(R"(["\\\ud83d"])", scratch), R"(["\\\uFFFD"])");
  EXPECT_EQ(sidecast::gateway::codec_detail::surrogates_tolerated(R"(["\ud83d\ude00\udc00"])", scratch),
            R"(["\ud83d\ude00\uFFFD"])")
      << "a pair as it is, the lone low after it replaced";
}

TEST(socketio, valid_args_refuses_what_would_break_a_packet) {
  std::string too_deep(sio::max_json_depth + 1, '[');
  too_deep += std::string(sio::max_json_depth + 1, ']');
  for (std::string bad : {std::string("not json"), std::string("[1"), std::string("[1]]"), std::string("[1] x"),
                          std::string("[1][2]"), std::string("\xff\xfe"), std::string("[\"\xff\"]"),
                          std::string("[\"\xed\xa0\x80\"]"), std::string("[\"a\x00\"]", 6), std::string("[1,]"),
                          std::string("[\"unterminated]"), too_deep})
    EXPECT_FALSE(sio::valid_args(bad)) << bad;
}

TEST(socketio, error_codes_compare_and_describe) {
  const boost::system::error_code ec = sio::error::bad_namespace;
  EXPECT_EQ(ec, sio::error::bad_namespace);
  EXPECT_STREQ(ec.category().name(), "sidecast.socketio");
  EXPECT_EQ(ec.message(), "bad namespace");
}

TEST(socketio, namespace_and_reserved_helpers) {
  EXPECT_TRUE(sio::valid_namespace("/"));
  EXPECT_TRUE(sio::valid_namespace("/admin/x-y_z"));
  EXPECT_FALSE(sio::valid_namespace(""));
  EXPECT_FALSE(sio::valid_namespace("admin"));
  EXPECT_FALSE(sio::valid_namespace("/a,b"));
  EXPECT_TRUE(sio::is_reserved_event("disconnect"));
  EXPECT_FALSE(sio::is_reserved_event("Disconnect"));
  EXPECT_FALSE(sio::is_reserved_event(""));
}

}  // namespace

namespace {

TEST(socketio_errors, have_their_category_and_words) {
  auto ec = sio::make_error_code(sio::error::bad_ack_id);
  EXPECT_STREQ(ec.category().name(), "sidecast.socketio");
  EXPECT_EQ(ec.message(), "bad ack id");
  EXPECT_EQ(boost::system::error_code(999, sio::error_category()).message(), "unknown socketio codec error");
}

}  // namespace
