// WebSocket frame headers from clients (RFC 6455 §5.2): what read_header
// takes, what it refuses, and that it asks for more only when the header is
// not all there.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "gateway/codec/ws_frame.hpp"

namespace sidecast::gateway::ws_frame {
namespace {

using bytes = std::vector<unsigned char>;

status read(const bytes& in, header& h) { return read_header(in.data(), in.size(), h); }
status read(const bytes& in) {
  header h;
  return read(in, h);
}

TEST(WsFrame, ShortMaskedTextFrame) {
  const bytes in{0x81, 0x85, 1, 2, 3, 4, 'h' ^ 1, 'e' ^ 2, 'l' ^ 3, 'l' ^ 4, 'o' ^ 1};
  header h;
  ASSERT_EQ(read(in, h), status::ok);
  EXPECT_TRUE(h.fin);
  EXPECT_EQ(h.op, text);
  EXPECT_EQ(h.length, 5u);
  EXPECT_EQ(h.size, 6u);
  EXPECT_EQ(h.mask, in.data() + 2);
}

TEST(WsFrame, ExtendedLengthsInTheirShortestForm) {
  header h;
  ASSERT_EQ(read({0x02, 0xfe, 0x01, 0x00, 0, 0, 0, 0}, h), status::ok) << "16-bit length 256";
  EXPECT_FALSE(h.fin);
  EXPECT_EQ(h.op, binary);
  EXPECT_EQ(h.length, 256u);
  EXPECT_EQ(h.size, 8u);
  ASSERT_EQ(read({0x82, 0xff, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0}, h), status::ok) << "64-bit length 65536";
  EXPECT_EQ(h.length, 65536u);
  EXPECT_EQ(h.size, 14u);
  EXPECT_EQ(read({0x82, 0xfe, 0x00, 0x7d, 0, 0, 0, 0}), status::protocol_error) << "125 in 16 bits";
  EXPECT_EQ(read({0x82, 0xff, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0, 0, 0, 0}), status::protocol_error)
      << "65535 in 64 bits";
  EXPECT_EQ(read({0x82, 0xff, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}), status::protocol_error)
      << "the top bit of a 64-bit length";
}

TEST(WsFrame, RefusesWhatAServerMustNotTakeFromAClient) {
  EXPECT_EQ(read({0x81, 0x05, 'h', 'e', 'l', 'l', 'o'}), status::protocol_error) << "unmasked";
  for (unsigned rsv : {0x40u, 0x20u, 0x10u})
    EXPECT_EQ(read({static_cast<unsigned char>(0x81 | rsv), 0x80, 0, 0, 0, 0}), status::protocol_error) << rsv;
  for (unsigned char op : {3, 4, 5, 6, 7, 11, 12, 13, 14, 15})
    EXPECT_EQ(read({static_cast<unsigned char>(0x80 | op), 0x80, 0, 0, 0, 0}), status::protocol_error) << int(op);
  EXPECT_EQ(read({0x09, 0x80, 0, 0, 0, 0}), status::protocol_error) << "a fragmented ping";
  EXPECT_EQ(read({0x88, 0xfe, 0x00, 0x7e, 0, 0, 0, 0}), status::protocol_error) << "a close of 126 bytes";
  EXPECT_EQ(read({0x8a, 0xfe}), status::protocol_error) << "seen from the first two bytes";
}

TEST(WsFrame, ControlFramesUpTo125Bytes) {
  header h;
  ASSERT_EQ(read({0x89, 0xfd, 0, 0, 0, 0}, h), status::ok);
  EXPECT_EQ(h.op, ping);
  EXPECT_EQ(h.length, 125u);
  EXPECT_EQ(read({0x88, 0x80, 0, 0, 0, 0}), status::ok) << "an empty close";
  EXPECT_EQ(read({0x8a, 0x80, 0, 0, 0, 0}), status::ok) << "a pong";
  EXPECT_EQ(read({0x00, 0x80, 0, 0, 0, 0}), status::ok) << "a continuation (the connection checks the message)";
}

TEST(WsFrame, AsksForMoreOnlyWhileTheHeaderIsIncomplete) {
  const bytes frames[] = {
      {0x81, 0x85, 1, 2, 3, 4},
      {0x82, 0xfe, 0x01, 0x00, 1, 2, 3, 4},
      {0x82, 0xff, 0, 0, 0, 0, 0, 1, 0, 0, 1, 2, 3, 4},
  };
  for (const auto& f : frames) {
    for (std::size_t n = 0; n < f.size(); ++n) {
      header h;
      EXPECT_EQ(read_header(f.data(), n, h), status::need_more) << f.size() << " cut at " << n;
    }
    header h;
    EXPECT_EQ(read(f, h), status::ok);
    EXPECT_EQ(h.size, f.size()) << "the payload is not part of the header";
  }
}

}  // namespace
}  // namespace sidecast::gateway::ws_frame
