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

TEST(Topics, RoomTopicsDoNotPrefixEachOther) {
  auto a = room_topic("/chat", "room");
  auto b = room_topic("/chat", "room2");
  EXPECT_NE(b.rfind(a, 0), 0u) << "subscribing to 'room' must not match 'room2'";
  auto n = namespace_topic("/chat");
  EXPECT_NE(namespace_topic("/chatter").rfind(n, 0), 0u);
  EXPECT_NE(a.rfind(n, 0), 0u) << "a namespace broadcast is not a room event";
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
