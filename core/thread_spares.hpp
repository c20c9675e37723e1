#pragma once

// Per-thread caches that need no lock, for the hot paths' memory: what a
// thread makes and frees over and over (a message's text, a frame's block)
// is kept for its next use instead of going back to the heap.

#include <cstddef>
#include <memory>
#include <string>
#include <vector>

namespace sidecast::core {

/// The calling thread's own T, made on first use. Null while the thread
/// exits, once its T is gone: code that hands memory back then (another
/// thread-local's destructor) must free it the ordinary way.
template <typename T>
class per_thread {
 public:
  static T* get() {
    if (gone_) return nullptr;
    if (!keeper_.value) keeper_.value = std::make_unique<T>();
    return keeper_.value.get();
  }

 private:
  struct keeper {
    std::unique_ptr<T> value;
    ~keeper() {
      gone_ = true;
      value.reset();
    }
  };
  static inline thread_local keeper keeper_;
  static inline thread_local bool gone_ = false;  // trivially destroyed: readable to the end
};

/// Strings whose buffers a thread reuses: a message read from a client is
/// made into one (take()), and the code that is done with it, on the same
/// thread, gives it back (give()). A string given back on another thread
/// joins that thread's spares. Bounded: `limit` strings per thread, none
/// with more than `largest` bytes of buffer.
class string_spares {
 public:
  static constexpr std::size_t limit = 64;
  static constexpr std::size_t largest = 4096;

  /// An empty string, with a spare buffer when the thread has one.
  static std::string take() {
    auto* spares = per_thread<pool>::get();
    if (spares == nullptr || spares->strings.empty()) return {};
    std::string s = std::move(spares->strings.back());
    spares->strings.pop_back();
    return s;
  }

  /// `s` is done with; its buffer is kept if it has one worth keeping.
  static void give(std::string&& s) noexcept {
    if (s.capacity() <= sso || s.capacity() > largest) return;
    auto* spares = per_thread<pool>::get();
    if (spares == nullptr || spares->strings.size() >= limit) return;
    s.clear();
    spares->strings.push_back(std::move(s));  // within the capacity reserved: no throw
  }

 private:
  static constexpr std::size_t sso = std::string{}.capacity();  // a buffer inside the string: nothing to keep

  struct pool {
    pool() { strings.reserve(limit); }
    std::vector<std::string> strings;
  };
};

}  // namespace sidecast::core
