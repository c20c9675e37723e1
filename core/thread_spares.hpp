#pragma once

// Per-thread caches that need no lock, for the hot paths' memory: what a
// thread makes and frees over and over (a message's text, a frame's block)
// is kept for its next use instead of going back to the heap.

#include <array>
#include <cstddef>
#include <new>
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

/// Blocks of up to `Sizes` sizes (each claimed by its first use) that a
/// thread reuses: a block given back is kept for the thread's next take()
/// of that size, up to `Limit` of each; past them, and for other sizes, the
/// heap. A block given back on another thread joins that thread's spares.
/// `Tag` names the user: each has spares of its own.
template <typename Tag, std::size_t Sizes = 4, std::size_t Limit = 256>
class block_spares {
 public:
  block_spares() {
    for (auto& s : spares_) s.blocks.reserve(Limit);
  }
  ~block_spares() {
    for (auto& s : spares_)
      for (auto* p : s.blocks) ::operator delete(p);
  }
  block_spares(const block_spares&) = delete;
  block_spares& operator=(const block_spares&) = delete;

  static void* take(std::size_t size) {
    auto* mine = per_thread<block_spares>::get();
    auto* s = mine ? mine->of(size) : nullptr;
    if (s == nullptr || s->blocks.empty()) return ::operator new(size);
    auto* p = s->blocks.back();
    s->blocks.pop_back();
    return p;
  }
  static void give(void* p, std::size_t size) noexcept {
    auto* mine = per_thread<block_spares>::get();
    auto* s = mine ? mine->of(size) : nullptr;
    if (s == nullptr || s->blocks.size() >= Limit) return ::operator delete(p);
    s->blocks.push_back(p);  // within the capacity reserved: no throw
  }

 private:
  struct sized {
    std::size_t size = 0;  // of each block; 0: not claimed yet
    std::vector<void*> blocks;
  };
  sized* of(std::size_t size) noexcept {
    for (auto& s : spares_) {
      if (s.size == 0) s.size = size;
      if (s.size == size) return &s;
    }
    return nullptr;
  }
  std::array<sized, Sizes> spares_;
};

/// An allocator over block_spares<Tag>: for memory a thread makes and frees
/// over and over in a few sizes (std::allocate_shared's blocks, Asio's
/// operations through asio::bind_allocator).
template <typename T, typename Tag>
struct spare_block_allocator {
  using value_type = T;
  spare_block_allocator() = default;
  template <typename U>
  spare_block_allocator(const spare_block_allocator<U, Tag>&) noexcept {}
  template <typename U>
  struct rebind {
    using other = spare_block_allocator<U, Tag>;
  };
  T* allocate(std::size_t n) {
    static_assert(alignof(T) <= __STDCPP_DEFAULT_NEW_ALIGNMENT__);
    return static_cast<T*>(block_spares<Tag>::take(n * sizeof(T)));
  }
  void deallocate(T* p, std::size_t n) noexcept { block_spares<Tag>::give(p, n * sizeof(T)); }
  friend bool operator==(const spare_block_allocator&, const spare_block_allocator&) { return true; }
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
