#include <array>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "proto/codec.hpp"

namespace sidecast::proto {
namespace {

TEST(EnvelopeCodec, RoundTripsEveryKind) {
  std::vector<Envelope> cases(11);
  cases[0].mutable_hello()->set_id("gw1");
  cases[1].mutable_welcome()->set_heartbeat_interval_ms(1000);
  cases[2].mutable_heartbeat();
  auto* r = cases[3].mutable_request();
  r->set_id("gw1:1");
  r->set_service("demo");
  r->set_args(R"(["x",{"a":"\u2028😀"}])");
  r->add_attachments(std::string("\0\1\2", 3));
  cases[4].mutable_reply()->set_code(TIMEOUT);
  cases[5].mutable_emit()->set_room("lobby");
  cases[6].mutable_control()->set_action(Control::JOIN);
  cases[7].mutable_lifecycle()->set_kind(Lifecycle::CONNECT);
  cases[8].mutable_cancel()->set_id("gw1:2");
  cases[9].mutable_report()->set_status(DeliveryReport::CLIENT_GONE);
  cases[10].mutable_error()->set_code(NOT_REGISTERED);
  for (const auto& env : cases) {
    auto decoded = decode(encode(env));
    ASSERT_TRUE(decoded) << kind_name(env);
    EXPECT_EQ(decoded->SerializeAsString(), env.SerializeAsString());
    EXPECT_EQ(kind_name(*decoded), kind_name(env));
  }
}

// kind_of reads the kind from its tag (one byte for kinds 1-15, two after):
// every kind's field number is at most last_kind, and an empty message of
// each kind is read right.
TEST(EnvelopePeek, KindOfReadsEveryKindFromItsTag) {
  const auto* kinds = Envelope::descriptor()->FindOneofByName("kind");
  ASSERT_TRUE(kinds);
  for (int i = 0; i < kinds->field_count(); ++i) {
    const auto* field = kinds->field(i);
    ASSERT_LE(field->number(), static_cast<int>(last_kind)) << field->name() << ": past proto::last_kind";
    ASSERT_LE(field->number(), 2047) << field->name() << ": a kind past 2047 needs a three-byte tag";
    Envelope env;
    env.GetReflection()->MutableMessage(&env, field);
    EXPECT_EQ(kind_of(encode(env)), env.kind_case()) << field->name();
  }
  EXPECT_EQ(kind_of(""), Envelope::KIND_NOT_SET);
  EXPECT_EQ(kind_of("\x08"), Envelope::KIND_NOT_SET);  // field 1 as a varint: not a kind
  EXPECT_EQ(kind_of("\x82"), Envelope::KIND_NOT_SET);  // field 16's first byte alone
  EXPECT_EQ(kind_of("\x82\x01"), Envelope::kRecall);
  EXPECT_EQ(kind_of(std::string_view{"\x8a\x01", 2}), Envelope::kGatewayGone);
  EXPECT_EQ(kind_of(std::string_view{"\x92\x01", 2}), Envelope::KIND_NOT_SET);  // field 18: no kind
  EXPECT_EQ(kind_of("\x82\x81"), Envelope::KIND_NOT_SET);  // a third byte would follow
}

TEST(EnvelopeCodec, PayloadBytesPassUntouched) {
  Envelope env;
  std::string args = "[\"\xf0\x9f\x98\x80\",1,null]";
  env.mutable_request()->set_args(args);
  auto decoded = decode(encode(env));
  ASSERT_TRUE(decoded);
  EXPECT_EQ(decoded->request().args(), args);
}

TEST(EnvelopeCodec, RejectsGarbage) {
  struct bad {
    const char* name;
    std::string bytes;
  };
  const bad cases[] = {
      {"empty (no kind)", ""},
      {"truncated varint", std::string("\x22\x80", 2)},
      {"length past end", std::string("\x22\x10\x0a", 3)},
      {"wrong wire type", std::string("\x23", 1)},
      {"text", "hello world"},
  };
  for (const auto& c : cases) EXPECT_FALSE(decode(c.bytes)) << c.name;
}

Envelope sample_request() {
  Envelope env;
  auto* r = env.mutable_request();
  r->set_id("gw-1:42");
  r->set_service("demo");
  r->set_sid("gw-1.abc");
  r->set_nsp("/");
  r->set_event("echo");
  r->set_args(R"(["x",{"a":"\u2028😀"}])");
  r->add_attachments(std::string("\0\1\2", 3));
  r->set_wants_reply(true);
  r->set_timeout_ms(30000);
  r->set_attempt(1);
  r->set_user("ünïcode");
  return env;
}

Envelope sample_reply() {
  Envelope env;
  auto* r = env.mutable_reply();
  r->set_id("gw-1:42");
  r->set_code(TIMEOUT);
  r->set_message("deadline passed");
  r->set_args("[1]");
  r->set_partial(true);
  return env;
}

TEST(EnvelopePeek, ReadsTheRoutingFieldsOfRequestsAndReplies) {
  auto bytes = encode(sample_request());
  auto head = peek(bytes);
  ASSERT_EQ(head.kind, Envelope::kRequest);
  EXPECT_EQ(head.id, "gw-1:42");
  EXPECT_EQ(head.service, "demo");
  EXPECT_EQ(head.sid, "gw-1.abc");
  EXPECT_TRUE(head.wants_reply);
  EXPECT_EQ(head.timeout_ms, 30000u);
  EXPECT_EQ(head.attempt, 1u);

  bytes = encode(sample_reply());
  head = peek(bytes);
  ASSERT_EQ(head.kind, Envelope::kReply);
  EXPECT_EQ(head.id, "gw-1:42");
  EXPECT_EQ(head.code, TIMEOUT);
  EXPECT_TRUE(head.partial);
}

// encode_request writes what protobuf serializes, byte for byte: defaults
// left out, empty attachments kept, long fields with multi-byte lengths.
TEST(EnvelopeCodec, HandWrittenRequestsAreProtobufsBytes) {
  std::string long_args = "[\"" + std::string(300, 'x') + "\"]";
  std::string huge(70000, 'b');
  std::vector<std::vector<std::string>> attachments{{}, {""}, {"a", "", std::string(200, 'z')}, {huge}};
  std::vector<request_fields> cases;
  cases.push_back({});  // every field at its default: an empty Request
  for (const auto& att : attachments) {
    request_fields f;
    f.id = "gw-1:2bd";
    f.service = "demo";
    f.sid = "gw-1.abc";
    f.nsp = "/";
    f.event = "echo";
    f.args = att.size() == 1 ? std::string_view{long_args} : std::string_view{"[1,\"\u00e9\"]"};
    f.attachments = att;
    f.wants_reply = att.size() != 1;
    f.timeout_ms = att.empty() ? 0 : 30000;
    f.attempt = att.size() == 3 ? 0xffffffffu : 1;
    f.user = att.size() == 3 ? "" : "alice";
    f.auth = att.empty() ? R"({"token":"t"})" : "";
    cases.push_back(f);
  }
  for (std::size_t i = 0; i < cases.size(); ++i) {
    const auto& f = cases[i];
    Envelope env;
    auto* r = env.mutable_request();
    r->set_id(std::string{f.id});
    r->set_service(std::string{f.service});
    r->set_sid(std::string{f.sid});
    r->set_nsp(std::string{f.nsp});
    r->set_event(std::string{f.event});
    r->set_args(std::string{f.args});
    for (const auto& a : f.attachments) r->add_attachments(a);
    r->set_wants_reply(f.wants_reply);
    r->set_timeout_ms(f.timeout_ms);
    r->set_attempt(f.attempt);
    r->set_user(std::string{f.user});
    r->set_auth(std::string{f.auth});
    std::string written(encoded_size(f), '\0');
    auto end = encode_request(f, written.data());
    EXPECT_EQ(end, written.data() + written.size()) << "case " << i;
    EXPECT_EQ(written, encode(env)) << "case " << i;
    auto back = decode(written);
    ASSERT_TRUE(back) << "case " << i;
    EXPECT_EQ(back->request().attachments_size(), static_cast<int>(f.attachments.size())) << "case " << i;
    EXPECT_EQ(peek(written).kind, Envelope::kRequest) << "case " << i;
  }
}

TEST(EnvelopeCodec, HandWrittenRepliesAreProtobufsBytes) {
  std::vector<std::string> none, some{"", "bin", std::string(300, 'q')};
  std::vector<reply_fields> cases;
  cases.push_back({});
  cases.push_back({"w1:7", OK, "", "[1]", none, false, false});
  cases.push_back({"gw-abcdef:2bd", TIMEOUT, "no answer \u00e9", "", some, true, true});
  std::string big = "[\"" + std::string(20000, 'a') + "\"]";
  cases.push_back({"c:1", INTERNAL, "boom", big, none, true, false});
  for (std::size_t i = 0; i < cases.size(); ++i) {
    const auto& f = cases[i];
    Envelope env;
    auto* r = env.mutable_reply();
    r->set_id(std::string{f.id});
    r->set_code(f.code);
    r->set_message(std::string{f.message});
    r->set_args(std::string{f.args});
    for (const auto& a : f.attachments) r->add_attachments(a);
    r->set_silent(f.silent);
    r->set_partial(f.partial);
    std::string written(encoded_size(f), '\0');
    EXPECT_EQ(encode_reply(f, written.data()), written.data() + written.size()) << "case " << i;
    EXPECT_EQ(written, encode(env)) << "case " << i;
    EXPECT_EQ(peek(written).kind, Envelope::kReply) << "case " << i;
  }
}

// request_body() hands over the body of exactly one Request, and nothing else.
TEST(EnvelopeCodec, RequestAndReplyBodiesAreTheMessageAlone) {
  Envelope env;
  env.mutable_request()->set_id("gw-1:1");
  env.mutable_request()->set_args("[1]");
  auto bytes = encode(env);
  auto body = request_body(bytes);
  ASSERT_TRUE(body);
  Request r;
  ASSERT_TRUE(r.ParseFromArray(body->data(), static_cast<int>(body->size())));
  EXPECT_EQ(r.id(), "gw-1:1");
  EXPECT_FALSE(request_body(bytes + bytes)) << "two requests";
  EXPECT_FALSE(request_body(bytes.substr(0, bytes.size() - 1))) << "cut short";
  EXPECT_FALSE(request_body(encode(sample_reply()))) << "another kind";
  EXPECT_FALSE(request_body("")) << "nothing";

  auto reply = encode(sample_reply());
  auto reply_bytes = reply_body(reply);
  ASSERT_TRUE(reply_bytes);
  Reply back;
  ASSERT_TRUE(back.ParseFromArray(reply_bytes->data(), static_cast<int>(reply_bytes->size())));
  EXPECT_EQ(back.SerializeAsString(), sample_reply().reply().SerializeAsString());
  EXPECT_FALSE(reply_body(bytes)) << "a request";
  EXPECT_FALSE(reply_body(reply + reply)) << "two replies";
}

TEST(EnvelopePeek, LeavesEverythingElseToTheParser) {
  Envelope cancel;
  cancel.mutable_cancel()->set_id("x:1");
  EXPECT_EQ(peek(encode(cancel)).kind, Envelope::KIND_NOT_SET) << "another kind";
  auto bytes = encode(sample_request());
  EXPECT_EQ(peek(bytes + bytes).kind, Envelope::KIND_NOT_SET) << "two kinds: the last one wins in the parser";
  auto bad = sample_request();
  bad.mutable_request()->set_id("\xc0\xaf");  // overlong '/'
  bytes = bad.SerializePartialAsString();
  EXPECT_EQ(peek(bytes).kind, Envelope::KIND_NOT_SET) << "invalid UTF-8";
  EXPECT_FALSE(decode(bytes)) << "the parser refuses it too";
  for (auto surrogate : {"\xed\xa0\x80", "\xf4\x90\x80\x80", "\xe0\x80"}) {
    bad.mutable_request()->set_sid(surrogate);
    EXPECT_EQ(peek(bad.SerializePartialAsString()).kind, Envelope::KIND_NOT_SET) << "sid " << surrogate;
  }
}

// Longer varints than needed: the parser takes a 10-byte value but at most
// 5 bytes for a tag or a length, so peek() takes only the shortest form.
// The 7-byte length is what tests/fuzz/envelope_fuzz found peek accepting
// and the parser refusing.
TEST(EnvelopePeek, LeavesOverlongVarintsToTheParser) {
  using namespace std::string_literals;
  auto overlong_length = "\x22\x80\x80\x80\x80\x80\x80\x00"s;  // Request, length 0 in 7 bytes
  EXPECT_EQ(peek(overlong_length).kind, Envelope::KIND_NOT_SET);
  EXPECT_FALSE(decode(overlong_length));
  EXPECT_EQ(peek("\x22\x00"s).kind, Envelope::kRequest) << "the shortest form of the same";
  auto padded_id = "\x22\x06\x8a\x00\x03x:1"s;  // Request{id "x:1"}, its tag in 2 bytes
  EXPECT_EQ(peek(padded_id).kind, Envelope::KIND_NOT_SET);
  auto parsed = decode(padded_id);
  ASSERT_TRUE(parsed) << "valid for the parser, which has the last word";
  EXPECT_EQ(parsed->request().id(), "x:1");
}

// Whatever peek() accepts, the real parser accepts with the same fields:
// every truncation and many single-byte changes of valid envelopes.
TEST(EnvelopePeek, NeverAcceptsWhatTheParserRefusesOrReadsItDifferently) {
  std::mt19937 rng{11};
  int peeked = 0;
  for (const auto& env : {sample_request(), sample_reply()}) {
    auto good = encode(env);
    std::vector<std::string> variants;
    for (std::size_t n = 0; n < good.size(); ++n) variants.push_back(good.substr(0, n));
    for (int i = 0; i < 20000; ++i) {
      auto v = good;
      v[rng() % v.size()] = static_cast<char>(rng() % 256);
      if (rng() % 4 == 0) v[rng() % v.size()] = static_cast<char>(rng() % 256);
      variants.push_back(std::move(v));
    }
    for (const auto& v : variants) {
      auto head = peek(v);
      if (head.kind == Envelope::KIND_NOT_SET) continue;
      ++peeked;
      auto full = decode(v);
      ASSERT_TRUE(full) << "peek accepted what the parser refuses";
      ASSERT_EQ(full->kind_case(), head.kind);
      if (head.kind == Envelope::kRequest) {
        const auto& r = full->request();
        ASSERT_EQ(r.id(), head.id);
        ASSERT_EQ(r.service(), head.service);
        ASSERT_EQ(r.sid(), head.sid);
        ASSERT_EQ(r.wants_reply(), head.wants_reply);
        ASSERT_EQ(r.timeout_ms(), head.timeout_ms);
        ASSERT_EQ(r.attempt(), head.attempt);
      } else {
        const auto& r = full->reply();
        ASSERT_EQ(r.id(), head.id);
        ASSERT_EQ(r.code(), head.code);
        ASSERT_EQ(r.partial(), head.partial);
      }
    }
  }
  EXPECT_GT(peeked, 1000) << "the mutations should leave many envelopes peekable";
}

TEST(Topics, RoomTopicsDoNotPrefixEachOther) {
  auto a = room_topic("/chat", "room");
  auto b = room_topic("/chat", "room2");
  EXPECT_NE(b.rfind(a, 0), 0u) << "subscribing to 'room' must not match 'room2'";
  auto n = namespace_topic("/chat");
  EXPECT_NE(namespace_topic("/chatter").rfind(n, 0), 0u);
  EXPECT_NE(a.rfind(n, 0), 0u) << "a namespace broadcast is not a room event";
}

TEST(Topics, ANamespacesRoomsPrefixMatchesItsRoomsOnly) {
  auto every = rooms_prefix("/chat");
  for (auto room : {"room", "", "user:42"}) EXPECT_EQ(room_topic("/chat", room).rfind(every, 0), 0u) << room;
  EXPECT_NE(room_topic("/chatter", "room").rfind(every, 0), 0u) << "another namespace's room";
  EXPECT_EQ(room_topic("/", "chat").rfind(rooms_prefix("/"), 0), 0u);
  EXPECT_NE(room_topic("/chat", "room").rfind(rooms_prefix("/"), 0), 0u) << "/chat's rooms are not /'s";
  EXPECT_NE(namespace_topic("/chat").rfind(every, 0), 0u) << "a namespace broadcast is not a room event";
}

TEST(Topics, ARoomTopicGivesBackItsRoom) {
  using namespace std::literals;
  for (auto room : {"room"sv, ""sv, "a\0b"sv, "user:42"sv})
    EXPECT_EQ(room_of_topic(room_topic("/chat", room), "/chat"), room);
  EXPECT_EQ(room_of_topic(room_topic("/", "lobby"), "/"), "lobby");
}

TEST(Topics, TopicForEmit) {
  Emit e;
  e.set_nsp("/");
  e.set_sid("gw1.abc");
  EXPECT_EQ(topic_for(e), "");
  e.set_room("r");
  EXPECT_EQ(topic_for(e), room_topic("/", "r"));
  e.set_broadcast(true);
  EXPECT_EQ(topic_for(e), namespace_topic("/"));
}

TEST(Topics, TopicForControl) {
  Control c;
  c.set_nsp("/chat");
  c.set_sid("gw1.abc");
  EXPECT_EQ(topic_for(c), "") << "a sid's control is routed, not published";
  c.set_in_room("r");
  EXPECT_EQ(topic_for(c), room_topic("/chat", "r"));
  c.set_in_namespace(true);
  EXPECT_EQ(topic_for(c), namespace_topic("/chat"));
  c.set_in_namespace(false);
  EXPECT_EQ(topic_for(c), "") << "in_namespace false names no one";
  c.set_in_namespace(true);
  c.clear_nsp();
  EXPECT_EQ(topic_for(c), "") << "no namespace, no topic";
}

TEST(EventStamps, SixteenBytesThereAndBack) {
  std::array<char, event_stamp_bytes> bytes{};
  encode_stamp({0x0102030405060708, 42}, bytes);
  EXPECT_EQ(bytes[0], 0x08) << "little-endian";
  auto back = decode_stamp({bytes.data(), bytes.size()});
  ASSERT_TRUE(back);
  EXPECT_EQ(back->stream, 0x0102030405060708u);
  EXPECT_EQ(back->seq, 42u);
  encode_stamp({~std::uint64_t{0}, ~std::uint64_t{0}}, bytes);
  back = decode_stamp({bytes.data(), bytes.size()});
  ASSERT_TRUE(back);
  EXPECT_EQ(back->seq, ~std::uint64_t{0});
}

TEST(EventStamps, AnythingElseIsNoStamp) {
  std::array<char, event_stamp_bytes> bytes{};
  encode_stamp({0, 7}, bytes);
  EXPECT_FALSE(decode_stamp({bytes.data(), bytes.size()})) << "stream 0 is none";
  encode_stamp({1, 7}, bytes);
  EXPECT_FALSE(decode_stamp({bytes.data(), 15}));
  EXPECT_FALSE(decode_stamp(std::string(17, 'x')));
  EXPECT_FALSE(decode_stamp(""));
}

// Table-driven: the stamps a subscriber hears for one topic, one after the
// other, and the events it finds lost before each.
TEST(EventStamps, AHeardStreamCountsTheGapsOfOneStream) {
  struct heard {
    event_stamp stamp;
    std::uint64_t missed;
    const char* why;
  };
  const heard cases[] = {
      {{7, 5}, 0, "the first heard: nothing known before it"},
      {{7, 6}, 0, "the next"},
      {{7, 9}, 2, "7 and 8 lost"},
      {{7, 10}, 0, "the next again"},
      {{8, 1}, 0, "a new stream (another broker, a restart) starts over"},
      {{8, 1000}, 998, "a long gap"},
      {{7, 11}, 0, "back on the old stream: starts over, counts nothing"},
      {{7, 11}, 0, "a repeat is not a gap"},
      {{7, 3}, 0, "nor a step back"},
      {{7, 4}, 0, "from which it counts on"},
      {{7, 6}, 1, "5 lost"},
  };
  heard_stream stream;
  for (const auto& c : cases) EXPECT_EQ(stream.missed_before(c.stamp), c.missed) << c.why;
}

TEST(Ids, OwnersAndValidity) {
  EXPECT_EQ(sid_owner("gw1.Xy_z"), "gw1");
  EXPECT_EQ(sid_owner("noprefix"), "");
  EXPECT_EQ(id_owner("worker-7:42"), "worker-7");
  EXPECT_EQ(id_owner("42"), "");
  EXPECT_TRUE(valid_peer_id("gw-1"));
  EXPECT_FALSE(valid_peer_id(""));
  EXPECT_FALSE(valid_peer_id("gw.1"));
  EXPECT_FALSE(valid_peer_id("gw:1"));
  EXPECT_FALSE(valid_peer_id(std::string(65, 'a')));
}

}  // namespace
}  // namespace sidecast::proto
