// `/ws` JSON frames (format: gateway/codec/README.md).
#include "gateway/codec/ws_json.hpp"
#include "gateway/codec/json_scan.hpp"

#include <gtest/gtest.h>

#include <boost/json/parse.hpp>
#include <boost/json/value.hpp>

#include <ostream>
#include <string>
#include <vector>

namespace ws = sidecast::gateway::ws_json;
namespace json = boost::json;
using namespace std::string_literals;

namespace sidecast::gateway::ws_json {
void PrintTo(const client_frame& f, std::ostream* os) {
  *os << "{event=" << ::testing::PrintToString(f.event) << ", data=" << ::testing::PrintToString(f.data)
      << ", id=" << (f.id ? *f.id : "none") << ", nsp=" << (f.nsp ? *f.nsp : "none") << "}";
}
}  // namespace sidecast::gateway::ws_json

namespace {

ws::client_frame frame(std::string event, std::string data = {}, std::optional<std::string> id = {},
                       std::optional<std::string> nsp = {}) {
  return ws::client_frame{std::move(event), std::move(data), std::move(id), std::move(nsp)};
}

struct valid_case {
  const char* what;
  std::string text;
  ws::client_frame expected;
};

void PrintTo(const valid_case& c, std::ostream* os) { *os << c.what << ": " << ::testing::PrintToString(c.text); }

class decode_valid : public ::testing::TestWithParam<valid_case> {};

TEST_P(decode_valid, decodes) {
  const auto f = ws::decode(GetParam().text);
  ASSERT_TRUE(f.has_value()) << f.error().message();
  EXPECT_EQ(*f, GetParam().expected);
}

INSTANTIATE_TEST_SUITE_P(
    ws_json, decode_valid,
    ::testing::Values(
        valid_case{"event only", R"({"event":"chat"})", frame("chat")},
        valid_case{"all fields", R"({"event":"chat","data":{"text":"hi"},"id":7,"nsp":"/admin"})",
                   frame("chat", R"({"text":"hi"})", "7", "/admin")},
        valid_case{"any key order, string id, null data", R"({"id":"abc","data":null,"event":"x"})",
                   frame("x", "null", R"("abc")")},
        valid_case{"data false", R"({"event":"x","data":false})", frame("x", "false")},
        valid_case{"id of max_id_bytes", R"({"event":"x","id":")" + std::string(126, 'i') + "\"}",
                   frame("x", {}, "\"" + std::string(126, 'i') + "\"")},
        valid_case{"data string with escapes", R"({"event":"x","data":"a\"}\\"})", frame("x", R"("a\"}\\")")},
        valid_case{"data kept byte for byte",
                   R"({"event":"x","data":[1.0,1e2,-0,123456789012345678901234567890,"\u00e9"]})",
                   frame("x", R"([1.0,1e2,-0,123456789012345678901234567890,"\u00e9"])")},
        valid_case{"UTF-8 kept raw", "{\"event\":\"\xf0\x9f\x98\x80\",\"data\":\"\xe2\x80\xa8\xe2\x80\xa9\"}",
                   frame("\xf0\x9f\x98\x80", "\"\xe2\x80\xa8\xe2\x80\xa9\"")},
        valid_case{"escaped event name is unescaped", R"({"event":"\ud83d\ude00\n"})", frame("\xf0\x9f\x98\x80\n")},
        valid_case{"whitespace everywhere", " \n{ \"event\" : \"x\" , \"data\" : [ 1 , 2 ] , \"id\" : 3 }\t",
                   frame("x", "[ 1 , 2 ]", "3")},
        valid_case{"fractional and negative id", R"({"event":"x","id":-1.5e3})", frame("x", "", "-1.5e3")},
        valid_case{"escaped key", R"({"ev\u0065nt":"x","d\u0061ta":1})", frame("x", "1")},
        valid_case{"UTF-8 namespace", "{\"event\":\"x\",\"nsp\":\"/caf\xc3\xa9\"}", frame("x", "", {}, "/caf\xc3\xa9")},
        valid_case{"explicit main namespace", R"({"event":"x","nsp":"/"})", frame("x", "", {}, "/")},
        valid_case{"empty event name", R"({"event":""})", frame("")},
        valid_case{"nested data with brackets in strings", R"({"data":{"a":["]","}",{"b":"[{"}]},"event":"e"})",
                   frame("e", R"({"a":["]","}",{"b":"[{"}]})")}));

struct invalid_case {
  const char* what;
  std::string text;
  ws::error expected;
};

void PrintTo(const invalid_case& c, std::ostream* os) { *os << c.what << ": " << ::testing::PrintToString(c.text); }

class decode_invalid : public ::testing::TestWithParam<invalid_case> {};

TEST_P(decode_invalid, returns_the_error) {
  const auto f = ws::decode(GetParam().text);
  ASSERT_FALSE(f.has_value()) << ::testing::PrintToString(*f);
  EXPECT_EQ(f.error(), GetParam().expected) << f.error().message();
  EXPECT_EQ(f.error().category(), ws::error_category());
}

using E = ws::error;

INSTANTIATE_TEST_SUITE_P(
    ws_json, decode_invalid,
    ::testing::Values(
        invalid_case{"empty", "", E::empty},
        invalid_case{"blank", " ", E::invalid_json},
        invalid_case{"unterminated", "{", E::invalid_json},
        invalid_case{"trailing garbage", R"({"event":"x"}x)", E::invalid_json},
        invalid_case{"two objects", R"({"event":"x"}{"event":"y"})", E::invalid_json},
        invalid_case{"trailing comma", R"({"event":"x",})", E::invalid_json},
        invalid_case{"invalid UTF-8", "{\"event\":\"\xff\"}", E::invalid_json},
        invalid_case{"NUL byte", "{\"event\":\"x\"}\x00"s, E::invalid_json},
        invalid_case{"too deep", R"({"event":"x","data":)" + std::string(100, '[') + std::string(100, ']') + "}",
                     E::invalid_json},
        invalid_case{"Socket.IO packet sent to /ws", R"(42["x"])", E::invalid_json},
        invalid_case{"array", R"(["x"])", E::not_object},
        invalid_case{"string", R"("x")", E::not_object},
        invalid_case{"number", "1", E::not_object},
        invalid_case{"unknown key", R"({"event":"x","extra":1})", E::unknown_key},
        invalid_case{"misspelt key", R"({"evnet":"x"})", E::unknown_key},
        invalid_case{"key differs in case", R"({"Event":"x"})", E::unknown_key},
        invalid_case{"duplicate event", R"({"event":"x","event":"y"})", E::duplicate_key},
        invalid_case{"duplicate data", R"({"event":"x","data":1,"data":2})", E::duplicate_key},
        invalid_case{"duplicate through an escape", R"({"event":"x","ev\u0065nt":"y"})", E::duplicate_key},
        invalid_case{"empty object", "{}", E::missing_event},
        invalid_case{"no event", R"({"data":1})", E::missing_event},
        invalid_case{"event number", R"({"event":1})", E::event_not_string},
        invalid_case{"event null", R"({"event":null})", E::event_not_string},
        invalid_case{"event array", R"({"event":["x"]})", E::event_not_string},
        invalid_case{"reserved event", R"({"event":"disconnect"})", E::reserved_event_name},
        invalid_case{"reserved event escaped", R"({"event":"c\u006fnnect"})", E::reserved_event_name},
        invalid_case{"id true", R"({"event":"x","id":true})", E::bad_id},
        invalid_case{"id null", R"({"event":"x","id":null})", E::bad_id},
        invalid_case{"id array", R"({"event":"x","id":[1]})", E::bad_id},
        invalid_case{"id object", R"({"event":"x","id":{}})", E::bad_id},
        invalid_case{"id longer than max_id_bytes", R"({"event":"x","id":")" + std::string(127, 'i') + "\"}",
                     E::bad_id},
        invalid_case{"nsp without slash", R"({"event":"x","nsp":"admin"})", E::bad_namespace},
        invalid_case{"nsp empty", R"({"event":"x","nsp":""})", E::bad_namespace},
        invalid_case{"nsp number", R"({"event":"x","nsp":1})", E::bad_namespace},
        invalid_case{"nsp with comma", R"({"event":"x","nsp":"/a,b"})", E::bad_namespace},
        invalid_case{"nsp with escaped control", R"({"event":"x","nsp":"/a\u001eb"})", E::bad_namespace}));

TEST(ws_json, every_short_input_is_handled) {
  for (int a = 0; a < 256; ++a) {
    for (int b = -1; b < 256; ++b) {
      std::string s = R"({"event":"x","data":)";
      s += static_cast<char>(a);
      if (b >= 0) {
        s += static_cast<char>(b);
      }
      for (const char* tail : {"}", "", "]}", "\"}"}) {
        const auto f = ws::decode(s + tail);
        if (f) {
          // The located "data" text is one JSON value on its own.
          boost::system::error_code ec;
          json::parse(f->data, ec);
          EXPECT_FALSE(ec) << s + tail;
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Encoding.

TEST(ws_json, a_lone_surrogate_escape_is_taken) {
  const auto f = ws::decode(R"({"event":"echo","data":"cut: \ud83d","id":1})");
  ASSERT_TRUE(f) << f.error().message();
  EXPECT_EQ(f->data, R"("cut: \ud83d")");
}

TEST(ws_json, encode_event) {
  EXPECT_EQ(ws::encode_event("chat", R"({"text":"hi"})"), R"({"event":"chat","data":{"text":"hi"}})");
  EXPECT_EQ(ws::encode_event("chat", ""), R"({"event":"chat"})");
  EXPECT_EQ(ws::encode_event("chat", "1", "/admin"), R"({"event":"chat","data":1,"nsp":"/admin"})");
  EXPECT_EQ(ws::encode_event("chat", "1", ""), R"({"event":"chat","data":1})");
  EXPECT_EQ(ws::encode_event("a\"b\n", "[1.0]"), R"({"event":"a\"b\n","data":[1.0]})");
  EXPECT_EQ(ws::encode_event("\xf0\x9f\x98\x80\xe2\x80\xa8", "\"\xe2\x80\xa8\""),
            "{\"event\":\"\xf0\x9f\x98\x80\xe2\x80\xa8\",\"data\":\"\xe2\x80\xa8\"}");
}

TEST(ws_json, encode_reply) {
  EXPECT_EQ(ws::encode_reply("7", R"("ok")"), R"({"id":7,"data":"ok"})");
  EXPECT_EQ(ws::encode_reply(R"("abc")", "", "no handler"), R"({"id":"abc","error":"no handler"})");
  EXPECT_EQ(ws::encode_reply("1", "[]", "partial \"x\""), R"({"id":1,"data":[],"error":"partial \"x\""})");
  EXPECT_EQ(ws::encode_reply("", ""), R"({"id":null})");
  EXPECT_EQ(ws::encode_reply("-1.5e3", "null", ""), R"({"id":-1.5e3,"data":null,"error":""})");
}

TEST(ws_json, reply_echoes_the_id_verbatim) {
  for (const std::string text : {R"({"event":"x","id":12})", R"({"event":"x","id":"r-\u00e9"})",
                                 R"({"event":"x","id":1.50})", R"({"event":"x","id":123456789012345678901234567890})"}) {
    const auto f = ws::decode(text);
    ASSERT_TRUE(f && f->id);
    const auto reply = ws::encode_reply(*f->id, "true");
    EXPECT_EQ(reply, R"({"id":)" + *f->id + R"(,"data":true})");
    EXPECT_TRUE(json::parse(reply).is_object());
  }
}

TEST(ws_json, encoded_event_decodes_as_a_client_frame) {
  struct {
    std::string event, data, nsp;
  } cases[] = {{"chat", R"({"t":"hi"})", "/"}, {"x", "", "/admin"}, {"\xe2\x80\xa8", "[1.0,\"\\u2028\"]", "/"},
               {"q\"\\", "null", "/caf\xc3\xa9"}};
  for (const auto& c : cases) {
    const auto f = ws::decode(ws::encode_event(c.event, c.data, c.nsp));
    ASSERT_TRUE(f) << f.error().message();
    // "/" is left out: the connection's namespace (the only one a /ws client sends to is its own).
    EXPECT_EQ(*f, frame(c.event, c.data, {}, c.nsp == "/" ? std::nullopt : std::optional{c.nsp}));
  }
}

TEST(ws_json, error_codes_describe) {
  const boost::system::error_code ec = ws::error::duplicate_key;
  EXPECT_EQ(ec, ws::error::duplicate_key);
  EXPECT_STREQ(ec.category().name(), "sidecast.ws_json");
  EXPECT_EQ(ec.message(), "duplicate key");
}

}  // namespace

namespace {

TEST(ws_json_errors, have_their_category_and_words) {
  auto ec = ws::make_error_code(ws::error::missing_event);
  EXPECT_STREQ(ec.category().name(), "sidecast.ws_json");
  EXPECT_EQ(ec.message(), "missing \"event\"");
  EXPECT_EQ(boost::system::error_code(999, ws::error_category()).message(), "unknown ws_json codec error");
}

}  // namespace

// The HTTP API hands on a body's members as they were written (json_scan.hpp).
TEST(json_scan, member_text_is_the_values_own_text) {
  using sidecast::gateway::codec_detail::member_text;
  const std::string body = R"( { "event" : "x", "data" : {"n": 12345678901234567890123, "f": 1.10, "s": "a\"}"} ,
      "d\u0061ta2": [1.0, "]"], "args":[ 1e2 ] } )";
  ASSERT_FALSE(json::parse(body).is_null());
  EXPECT_EQ(member_text(body, "data"), R"({"n": 12345678901234567890123, "f": 1.10, "s": "a\"}"})");
  EXPECT_EQ(member_text(body, "data2"), R"([1.0, "]"])") << "a key written with escapes";
  EXPECT_EQ(member_text(body, "args"), "[ 1e2 ]");
  EXPECT_EQ(member_text(body, "event"), R"("x")");
  EXPECT_EQ(member_text(body, "n"), "") << "only the top level";
  EXPECT_EQ(member_text(body, "nope"), "");
  EXPECT_EQ(member_text(R"({"data":1,"data":2.50})", "data"), "2.50") << "the last, as Boost.JSON keeps";
  EXPECT_EQ(member_text("{}", "data"), "");
  EXPECT_EQ(member_text("[1]", "data"), "");
  EXPECT_EQ(member_text("", "data"), "");
  // Whatever the input, it stays in bounds (malformed text has no answer to trust).
  const std::string text = R"({"data":[1,{"a":"b\"c"}],"x":nul)";
  for (std::size_t n = 0; n <= text.size(); ++n) {
    auto found = member_text(std::string_view{text}.substr(0, n), "data");
    EXPECT_TRUE(found.empty() || found.data() >= text.data()) << n;
  }
}

TEST(ws_json, data_from_args_hands_on_the_arguments_text) {
  EXPECT_EQ(ws::data_from_args("[]"), "");
  EXPECT_EQ(ws::data_from_args(" [ ] "), "");
  EXPECT_EQ(ws::data_from_args(R"([{"n": 12345678901234567890123, "f": 1.10}])"),
            R"({"n": 12345678901234567890123, "f": 1.10})");
  EXPECT_EQ(ws::data_from_args(R"([ "a]" ])"), R"("a]")");
  EXPECT_EQ(ws::data_from_args("[1.0]"), "1.0");
  EXPECT_EQ(ws::data_from_args("[[1, 2]]"), "[1, 2]");
  EXPECT_EQ(ws::data_from_args("[1, 2.50]"), "[1, 2.50]") << "several: the array";
  EXPECT_EQ(ws::data_from_args(R"({"a":1})"), R"({"a":1})") << "not an array: unchanged";
  EXPECT_EQ(ws::data_from_args(""), "");
  // Blank args pass socketio::valid_args: as none, not as " " (which made
  // {"data": } on /ws and the HTTP API, and broke a whole poll's body).
  EXPECT_EQ(ws::data_from_args(" \t\r\n"), "");
}

// A worker's binary attachments reach a /ws or API client as base64 in the
// JSON, where a Socket.IO client gets binary frames; the rest of the text,
// a placeholder-like string or a big number included, is left as it is.
TEST(ws_json, attachments_are_inlined_as_base64) {
  const std::vector<std::string> two{std::string("\x01\x02\x03", 3), std::string("\xff\x00", 2)};
  EXPECT_EQ(ws::inline_attachments(R"([{"payload":{"_placeholder":true,"num":0},"n":12345678901234567890123}])", two),
            R"([{"payload":{"_base64":"AQID"},"n":12345678901234567890123}])");
  EXPECT_EQ(ws::inline_attachments(R"([{ "num" : 1, "_placeholder" : true }, 1.10])", two),
            R"([{"_base64":"/wA="}, 1.10])");
  // Not placeholders: a string that reads like one, num past the
  // attachments, _placeholder false, a placeholder in a larger object.
  const std::string kept[] = {
      R"(["{\"_placeholder\":true,\"num\":0}"])",
      R"([{"_placeholder":true,"num":2}])",
      R"([{"_placeholder":false,"num":0}])",
      R"([{"_placeholder":true,"num":-1}])",
  };
  for (const auto& text : kept) EXPECT_EQ(ws::inline_attachments(text, two), text);
  EXPECT_EQ(ws::inline_attachments(R"([{"_placeholder":true,"num":0,"x":"a"}])", two), R"([{"_base64":"AQID"}])")
      << "every placeholder member goes: the object is the attachment's place";
  EXPECT_EQ(ws::with_attachments("[1]", {}), "[1]");
  EXPECT_EQ(ws::data_from_args(ws::with_attachments(R"([{"_placeholder":true,"num":1}])", two)),
            R"({"_base64":"/wA="})");
}
