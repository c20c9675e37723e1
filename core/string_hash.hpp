#pragma once
// A transparent hash for maps keyed by std::string: with std::equal_to<>,
// find() takes a std::string_view, so a lookup copies no key.
#include <cstddef>
#include <functional>
#include <string_view>

namespace sidecast::core {

struct string_hash {
  using is_transparent = void;
  // Not noexcept: libstdc++'s unordered containers then keep each node's
  // hash (a long key is not hashed again on a rehash or a miss in its bucket).
  std::size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};

}  // namespace sidecast::core
