// libFuzzer target for the Socket.IO codec: no input may crash it; accepted
// packets survive encode/decode unchanged; event payloads split and join back
// to the same JSON; a binary header drives the assembler to completion.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include <boost/json/parse.hpp>
#include <boost/json/value.hpp>

#include "gateway/codec/socketio.hpp"

namespace sio = sidecast::gateway::socketio;
namespace json = boost::json;

namespace {

constexpr std::size_t max_attachments = 8;

json::value parse_or_trap(std::string_view text) {
  json::parse_options opts;
  opts.max_depth = sio::max_json_depth + 1;  // join_event adds no nesting, but be lenient
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

  // Helpers must cope with any text, validated or not.
  (void)sio::split_event(in);
  (void)sio::join_event(in, in);
  (void)sio::placeholders_consistent(in, size % 4);
  (void)sio::valid_namespace(in);

  const auto p = sio::decode(in, max_attachments);
  // The gateway decodes in the frame's own buffer: the same answer.
  const auto owned = sio::decode_owned(std::string{in}, max_attachments);
  if (owned.has_value() != p.has_value() || (p && *owned != *p)) {
    __builtin_trap();
  }
  if (sio::split_event_owned(std::string{in}) != sio::split_event(in)) {
    __builtin_trap();
  }
  if (!p) {
    return 0;
  }
  const auto again = sio::decode(sio::encode(*p), max_attachments);
  if (!again || *again != *p) {
    __builtin_trap();
  }
  if (p->attachments > max_attachments) {
    __builtin_trap();
  }

  if (p->type == sio::packet_type::event || p->type == sio::packet_type::binary_event) {
    const auto parts = sio::split_event(p->data);
    if (!parts || sio::is_reserved_event(parts->first)) {
      __builtin_trap();
    }
    if (!parse_or_trap(parts->second).is_array()) {
      __builtin_trap();
    }
    // A numeric event name (socket.io-parser allows them) is passed on as
    // the string of its JSON text, so it joins back as that string.
    json::value original = parse_or_trap(p->data);
    auto& items = original.as_array();
    if (items.front().is_number()) {
      if (parse_or_trap(parts->first) != items.front()) {
        __builtin_trap();
      }
      items.front() = json::string(parts->first);
    }
    if (parse_or_trap(sio::join_event(parts->first, parts->second)) != original) {
      __builtin_trap();
    }
  }

  if (p->type == sio::packet_type::binary_event || p->type == sio::packet_type::binary_ack) {
    const auto v = parse_or_trap(p->data);
    if (sio::count_placeholders(v) != p->attachments || !sio::placeholders_consistent(v, p->attachments)) {
      __builtin_trap();
    }
    sio::binary_assembler assembler(max_attachments, size);
    auto done = assembler.start(*p);
    for (std::size_t i = 0; done && !*done; ++i) {
      done = assembler.add(std::string(in.substr(0, i % (size + 1))));
    }
    const auto message = assembler.take();
    if (done && (!message || message->attachments.size() != p->attachments)) {
      __builtin_trap();
    }
  }
  return 0;
}
