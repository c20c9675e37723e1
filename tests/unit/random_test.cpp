// core::secure_random and core::random_token: the ids a client must not guess.
#include "core/random.hpp"

#include <gtest/gtest.h>

#include <array>
#include <set>
#include <string>
#include <thread>

namespace sidecast::core {
namespace {

TEST(SecureRandom, TokensUseTheWholeAlphabetAndNeverRepeat) {
  static constexpr std::string_view alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
  std::set<std::string> seen;
  std::array<int, 64> counts{};
  for (int i = 0; i < 20000; ++i) {
    auto t = random_token(22);
    ASSERT_EQ(t.size(), 22u);
    for (char c : t) {
      auto at = alphabet.find(c);
      ASSERT_NE(at, std::string_view::npos) << "not base64url: " << t;
      ++counts[at];
    }
    seen.insert(std::move(t));
  }
  EXPECT_EQ(seen.size(), 20000u) << "a 132-bit token repeated";
  // 440,000 characters: 6,875 expected of each; a generator stuck on part
  // of the alphabet (a bad mask, a modulo of the wrong width) misses this
  // by far more than chance (the standard deviation is about 82).
  for (std::size_t i = 0; i < counts.size(); ++i) {
    EXPECT_GT(counts[i], 6000) << alphabet[i];
    EXPECT_LT(counts[i], 7750) << alphabet[i];
  }
}

TEST(SecureRandom, RequestsLargerThanTheBufferAreFilled) {
  std::vector<std::uint8_t> a(5000), b(5000);
  secure_random(a);
  secure_random(b);
  EXPECT_NE(a, b);
  // No long run of zeros: the buffer is refilled, never handed out cleared.
  std::size_t run = 0, longest = 0;
  for (auto byte : a) longest = std::max(longest, run = byte == 0 ? run + 1 : 0);
  EXPECT_LT(longest, 8u);
}

TEST(SecureRandom, ThreadsDrawDifferentBytes) {
  std::string a, b;
  std::thread t1{[&] { a = random_token(32); }}, t2{[&] { b = random_token(32); }};
  t1.join();
  t2.join();
  EXPECT_NE(a, b);
}

}  // namespace
}  // namespace sidecast::core
