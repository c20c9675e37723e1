// libFuzzer target for the /ws JSON frames: no input may crash the decoder;
// the raw "data"/"id" texts it hands on are JSON values; what the encoders
// build from an accepted frame is valid JSON and decodes to the same fields.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include <boost/json/parse.hpp>
#include <boost/json/value.hpp>

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

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view in(reinterpret_cast<const char*>(data), size);
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
