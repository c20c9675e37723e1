// libFuzzer target for the /ws JSON frames: no input may crash the decoder;
// the raw "data"/"id" texts it hands on are JSON values; what the encoders
// build from an accepted frame is valid JSON and decodes to the same fields.
// The raw-text helpers the HTTP API and the sinks use agree with Boost.JSON:
// data_from_args on any valid array, member_text on any valid object.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include <boost/json/parse.hpp>
#include <boost/json/serialize.hpp>
#include <boost/json/value.hpp>

#include "gateway/codec/json_scan.hpp"
#include "gateway/codec/socketio.hpp"
#include "gateway/codec/ws_json.hpp"

namespace ws = sidecast::gateway::ws_json;
namespace json = boost::json;

namespace {

json::value parse_or_trap(std::string_view text) {
  json::parse_options opts;
  opts.max_depth = sidecast::gateway::socketio::max_json_depth;
  boost::system::error_code ec;
  json::value v = json::parse(json::string_view(text.data(), text.size()), ec, {}, opts);
  if (ec) {
    __builtin_trap();
  }
  return v;
}

// What the input is, if it is valid JSON within the depth the gateway takes.
void check_raw_texts(std::string_view in) {
  json::parse_options opts;
  opts.max_depth = sidecast::gateway::socketio::max_json_depth;
  boost::system::error_code ec;
  const json::value v = json::parse(json::string_view(in.data(), in.size()), ec, {}, opts);
  if (ec) return;
  // Compared as Boost.JSON writes them: it reads some numbers as NaN
  // (0e3081, in 1.81), which equals nothing, itself included.
  auto same = [](std::string_view text, const json::value& value) {
    return json::serialize(parse_or_trap(text)) == json::serialize(value);
  };
  if (v.is_array()) {
    const auto& a = v.as_array();
    const auto data = ws::data_from_args(in);
    if (a.empty() ? !data.empty() : a.size() == 1 ? !same(data, a[0]) : data != in) __builtin_trap();
  } else if (v.is_object()) {
    for (const auto& member : v.as_object()) {
      const auto text = sidecast::gateway::codec_detail::member_text(in, member.key());
      if (text.empty() || !same(text, member.value())) __builtin_trap();
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view in(reinterpret_cast<const char*>(data), size);
  check_raw_texts(in);
  const auto f = ws::decode(in);
  if (!f) {
    return 0;
  }
  if (!f->data.empty()) {
    (void)parse_or_trap(f->data);
  }
  if (f->id) {
    const auto id = parse_or_trap(*f->id);
    if (!id.is_number() && !id.is_string()) {
      __builtin_trap();
    }
    if (!parse_or_trap(ws::encode_reply(*f->id, f->data, f->event)).is_object()) {
      __builtin_trap();
    }
  }
  const auto event = ws::decode(ws::encode_event(f->event, f->data, f->nsp.value_or("/")));
  if (!event || event->event != f->event || event->data != f->data || event->nsp.value_or("/") != f->nsp.value_or("/") ||
      event->id) {
    __builtin_trap();
  }
  return 0;
}
