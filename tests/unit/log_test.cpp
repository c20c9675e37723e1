// core::printable: what a peer sends is logged without control bytes.
#include <gtest/gtest.h>

#include "core/log.hpp"

namespace sidecast::core {
namespace {

TEST(Printable, KeepsPrintableAsciiAndEscapesTheRest) {
  EXPECT_EQ(printable("gw-1.abc"), "gw-1.abc");
  // A handed-over ROUTER pipe's id: a zero byte and four of a counter.
  EXPECT_EQ(printable(std::string_view{"\0k\x8b\x45g", 5}), "\\x00k\\x8bEg");
  EXPECT_EQ(printable("\x1b[2J"), "\\x1b[2J");          // a terminal escape
  EXPECT_EQ(printable("a\\b"), "a\\x5cb");               // so that \x in the output is always an escape
  EXPECT_EQ(printable("caf\xc3\xa9"), "caf\\xc3\\xa9");  // bytes, not characters
}

TEST(Printable, CutsLongText) {
  EXPECT_EQ(printable(std::string(200, 'a'), 4), "aaaa...");
  EXPECT_EQ(printable("abcd", 4), "abcd");
  EXPECT_EQ(printable(""), "");
}

}  // namespace
}  // namespace sidecast::core
