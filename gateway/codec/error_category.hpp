// Internal to the codecs: the boost::system::error_category of a codec's
// error enum, from its name and a function that describes each value.
#pragma once

#include <string>

#include <boost/system/error_category.hpp>

namespace sidecast::gateway::codec_detail {

// Boost's error_category has a protected non-virtual destructor by design:
// categories are static objects never deleted through the base.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wnon-virtual-dtor"
template <typename Error>
class enum_category final : public boost::system::error_category {
 public:
  using describe_fn = const char* (*)(Error) noexcept;
  enum_category(const char* name, describe_fn describe) noexcept : name_{name}, describe_{describe} {}

  const char* name() const noexcept override { return name_; }
  std::string message(int ev) const override { return describe_(static_cast<Error>(ev)); }

 private:
  const char* name_;
  describe_fn describe_;
};
#pragma GCC diagnostic pop

}  // namespace sidecast::gateway::codec_detail
