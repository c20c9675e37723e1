#pragma once
// A transparent hash for maps keyed by std::string: with std::equal_to<>,
// find() takes a std::string_view, so a lookup copies no key.
#include <cstddef>
#include <functional>
#include <string_view>

namespace sidecast::core {

struct string_hash {
  using is_transparent = void;
  std::size_t operator()(std::string_view s) const noexcept { return std::hash<std::string_view>{}(s); }
};

}  // namespace sidecast::core
