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

/// Free lists of blocks in up to `Sizes` sizes (each claimed by its first
/// use), at most `Limit` of each: a block given back is kept for the next
/// take() of its size; past the bound, and for other sizes, the heap. One
/// thread's, not locked: block_spares gives every thread its own, and the
/// worker SDK keeps one for its I/O thread alone.
template <std::size_t Sizes, std::size_t Limit>
class spare_lists {
 public:
  spare_lists() {
    for (auto& s : lists_) s.blocks.reserve(Limit);
  }
  ~spare_lists() {
    for (auto& s : lists_)
      for (auto* p : s.blocks) ::operator delete(p);
  }
  spare_lists(const spare_lists&) = delete;
  spare_lists& operator=(const spare_lists&) = delete;

  void* take(std::size_t size) {
    auto* s = of(size);
    if (s == nullptr || s->blocks.empty()) return ::operator new(size);
    auto* p = s->blocks.back();
    s->blocks.pop_back();
    return p;
  }
  void give(void* p, std::size_t size) noexcept {
    auto* s = of(size);
    if (s == nullptr || s->blocks.size() >= Limit) return ::operator delete(p);
    s->blocks.push_back(p);  // within the capacity reserved: no throw
  }

 private:
  struct sized {
    std::size_t size = 0;  // of each block; 0: not claimed yet
    std::vector<void*> blocks;
  };
  sized* of(std::size_t size) noexcept {
    for (auto& s : lists_) {
      if (s.size == 0) s.size = size;
      if (s.size == size) return &s;
    }
    return nullptr;
  }
  std::array<sized, Sizes> lists_;
};

/// Every thread's own spare_lists for the user `Tag` (each has spares of
/// its own). A block given back on another thread than the one that took
/// it joins that thread's spares.
template <typename Tag, std::size_t Sizes = 4, std::size_t Limit = 256>
class block_spares {
 public:
  static void* take(std::size_t size) {
    auto* mine = per_thread<lists>::get();
    return mine ? mine->take(size) : ::operator new(size);
  }
  static void give(void* p, std::size_t size) noexcept {
    auto* mine = per_thread<lists>::get();
    if (mine) mine->give(p, size);
    else ::operator delete(p);
  }

 private:
  struct lists : spare_lists<Sizes, Limit> {};  // a type of this Tag's: per_thread keeps one per type
};

/// An allocator over block_spares<Tag>: for memory a thread makes and frees
/// over and over in a few sizes (std::allocate_shared's blocks, the
/// operations Asio makes for a handler whose `allocator_type` it is).
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
