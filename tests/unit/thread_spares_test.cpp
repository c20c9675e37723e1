// core/thread_spares.hpp: what a thread gives back it takes again, within
// the bounds, and never what another thread gave; a thread that is exiting
// frees what it gives back after its spares are gone.
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "core/thread_spares.hpp"

namespace sidecast::core {
namespace {

// Each test runs on a thread of its own, so it starts with no spares.
template <typename F>
void on_new_thread(F f) {
  std::thread t{f};
  t.join();
}

TEST(StringSpares, AStringGivenBackIsTakenAgainWithItsBuffer) {
  on_new_thread([] {
    EXPECT_EQ(string_spares::take().capacity(), std::string{}.capacity()) << "nothing spare yet";
    std::string s(100, 'x');
    const char* buffer = s.data();
    string_spares::give(std::move(s));
    auto again = string_spares::take();
    EXPECT_TRUE(again.empty());
    EXPECT_EQ(again.data(), buffer);
    EXPECT_GE(again.capacity(), 100u);
    EXPECT_EQ(string_spares::take().capacity(), std::string{}.capacity()) << "taken once";
  });
}

TEST(StringSpares, OnlyHeapBuffersUpToTheLargestAreKeptAndNoMoreThanTheLimit) {
  on_new_thread([] {
    string_spares::give(std::string{"short"});
    string_spares::give(std::string(string_spares::largest + 1, 'x'));
    EXPECT_EQ(string_spares::take().capacity(), std::string{}.capacity());
    std::vector<const char*> buffers;
    for (std::size_t i = 0; i < string_spares::limit + 8; ++i) {
      std::string s(64, 'x');
      buffers.push_back(s.data());
      string_spares::give(std::move(s));  // those past the limit are freed
    }
    std::size_t kept = 0;
    while (string_spares::take().capacity() > std::string{}.capacity()) ++kept;
    EXPECT_EQ(kept, string_spares::limit);
  });
}

TEST(StringSpares, AnotherThreadDoesNotTakeThisOnesSpares) {
  on_new_thread([] {
    string_spares::give(std::string(100, 'x'));
    std::size_t there = 0;
    on_new_thread([&] { there = string_spares::take().capacity(); });
    EXPECT_EQ(there, std::string{}.capacity());
    EXPECT_GE(string_spares::take().capacity(), 100u) << "still here";
  });
}

// Destroyed after the spares when the thread exits: made before them.
struct gives_back_at_exit {
  std::string text;
  ~gives_back_at_exit() { string_spares::give(std::move(text)); }
};

TEST(StringSpares, WhatIsGivenBackAfterTheThreadsSparesAreGoneIsFreed) {
  on_new_thread([] {
    thread_local gives_back_at_exit late;
    late.text.assign(100, 'x');
    string_spares::give(std::string(100, 'y'));  // the spares are made now, after `late`
  });  // no leak, no use after free (the sanitizer build checks both)
}

struct test_blocks;

TEST(BlockSpares, ABlockGivenBackIsTakenAgainForItsSize) {
  on_new_thread([] {
    using spares = block_spares<test_blocks>;
    void* a = spares::take(96);
    void* b = spares::take(200);
    spares::give(a, 96);
    spares::give(b, 200);
    EXPECT_EQ(spares::take(200), b);
    EXPECT_EQ(spares::take(96), a);
    spares::give(a, 96);
    spares::give(b, 200);
  });
}

TEST(BlockSpares, TheAllocatorServesAllocateShared) {
  on_new_thread([] {
    spare_block_allocator<char, test_blocks> alloc;
    const void* first = nullptr;
    {
      auto p = std::allocate_shared<std::string>(alloc, "kept");
      first = p.get();
    }
    auto again = std::allocate_shared<std::string>(alloc, "again");
    EXPECT_EQ(static_cast<const void*>(again.get()), first) << "the same block, from the spares";
    EXPECT_EQ(*again, "again");
  });
}

}  // namespace
}  // namespace sidecast::core
