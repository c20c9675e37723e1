#include "gateway/codec/ws_json.hpp"

#include <array>

#include <boost/json/monotonic_resource.hpp>
#include <boost/json/parse.hpp>
#include <boost/json/serialize.hpp>
#include <boost/json/value.hpp>

#include "gateway/codec/engineio.hpp"
#include "gateway/codec/error_category.hpp"
#include "gateway/codec/json_scan.hpp"
#include "gateway/codec/socketio.hpp"

namespace sidecast::gateway::ws_json {
namespace {

namespace json = boost::json;
using namespace codec_detail;

const char* describe(error e) noexcept {
  switch (e) {
    case error::empty: return "empty frame";
    case error::invalid_json: return "invalid JSON";
    case error::not_object: return "frame is not a JSON object";
    case error::unknown_key: return "unknown key";
    case error::duplicate_key: return "duplicate key";
    case error::missing_event: return "missing \"event\"";
    case error::event_not_string: return "\"event\" is not a string";
    case error::reserved_event_name: return "reserved event name";
    case error::bad_id: return "\"id\" is neither a number nor a string of at most 128 bytes";
    case error::bad_namespace: return "bad \"nsp\"";
  }
  return "unknown ws_json codec error";
}

enum key_index : std::size_t { key_event, key_data, key_id, key_nsp, key_count };

struct span {
  std::size_t begin = npos;
  std::size_t end = npos;
  bool present() const noexcept { return begin != npos; }
};

std::optional<key_index> known_key(std::string_view key) noexcept {
  if (key == "event") return key_event;
  if (key == "data") return key_data;
  if (key == "id") return key_id;
  if (key == "nsp") return key_nsp;
  return std::nullopt;
}

// Records where each known value's text lies in a validated frame.
boost::system::result<std::array<span, key_count>> locate_members(std::string_view text) {
  std::array<span, key_count> spans{};
  std::optional<error> refused;
  auto walked = for_each_member(text, [&](std::string_view key, std::size_t begin, std::size_t end) {
    const auto index = known_key(key);
    if (!index) refused = error::unknown_key;
    else if (spans[*index].present()) refused = error::duplicate_key;
    else spans[*index] = span{begin, end};
    return !refused;
  });
  switch (walked) {
    case walk::done: return spans;
    case walk::stopped: return *refused;
    case walk::not_object: return error::not_object;
    case walk::malformed: break;
  }
  return error::invalid_json;
}

std::string quote(std::string_view s) {
  return json::serialize(json::string_view(s.data(), s.size()));
}

}  // namespace

const boost::system::error_category& error_category() noexcept {
  static const enum_category<error> category{"sidecast.ws_json", describe};
  return category;
}

boost::system::error_code make_error_code(error e) noexcept {
  return {static_cast<int>(e), error_category()};
}

boost::system::result<client_frame> decode(std::string_view text) {
  if (text.empty()) {
    return error::empty;
  }
  std::array<unsigned char, 4096> buffer;
  json::monotonic_resource resource(buffer.data(), buffer.size());
  json::parse_options opts;
  opts.max_depth = socketio::max_json_depth;
  boost::system::error_code ec;
  std::string scratch;
  const auto checked = surrogates_tolerated(text, scratch);
  const json::value v =
      json::parse(json::string_view(checked.data(), checked.size()), ec, &resource, opts);
  if (ec) {
    return error::invalid_json;
  }
  const auto* obj = v.if_object();
  if (obj == nullptr) {
    return error::not_object;
  }
  const auto spans = locate_members(text);
  if (!spans) {
    return spans.error();
  }
  const auto raw = [&](key_index k) {
    const span s = (*spans)[k];
    return text.substr(s.begin, s.end - s.begin);
  };

  client_frame frame;
  const auto* event = obj->if_contains("event");
  if (event == nullptr) {
    return error::missing_event;
  }
  if (!event->is_string()) {
    return error::event_not_string;
  }
  frame.event.assign(event->get_string().data(), event->get_string().size());
  if (socketio::is_reserved_event(frame.event)) {
    return error::reserved_event_name;
  }

  if (const auto* nsp = obj->if_contains("nsp")) {
    if (!nsp->is_string()) {
      return error::bad_namespace;
    }
    frame.nsp.emplace(nsp->get_string().data(), nsp->get_string().size());
    if (!socketio::valid_namespace(*frame.nsp)) {
      return error::bad_namespace;
    }
  }

  if (const auto* id = obj->if_contains("id")) {
    if (!id->is_number() && !id->is_string()) {
      return error::bad_id;
    }
    if (raw(key_id).size() > max_id_bytes) {
      return error::bad_id;
    }
    frame.id.emplace(raw(key_id));
  }

  if ((*spans)[key_data].present()) {
    frame.data.assign(raw(key_data));
  }
  return frame;
}

std::string encode_event(std::string_view event, std::string_view data_json, std::string_view nsp) {
  std::string out;
  out.reserve(32 + event.size() + data_json.size() + nsp.size());
  out += R"({"event":)";
  out += quote(event);
  if (!data_json.empty()) {
    out += R"(,"data":)";
    out += data_json;
  }
  if (!nsp.empty() && nsp != "/") {
    out += R"(,"nsp":)";
    out += quote(nsp);
  }
  out += '}';
  return out;
}

std::string encode_reply(std::string_view id_json, std::string_view data_json,
                         std::optional<std::string_view> error_message) {
  std::string out;
  out.reserve(32 + id_json.size() + data_json.size());
  out += R"({"id":)";
  out += id_json.empty() ? std::string_view("null") : id_json;
  if (!data_json.empty()) {
    out += R"(,"data":)";
    out += data_json;
  }
  if (error_message) {
    out += R"(,"error":)";
    out += quote(*error_message);
  }
  out += '}';
  return out;
}

std::string inline_attachments(std::string_view text, std::span<const std::string> attachments) {
  // A placeholder is short: an object longer than this is walked into, not
  // parsed. (Each '{' still measures its object: O(size x depth), depth at
  // most 64; only a worker's message with attachments comes here.)
  constexpr std::size_t longest_placeholder = 96;
  std::string out;
  out.reserve(text.size() + attachments.size() * 16);
  std::size_t i = 0;
  while (i < text.size()) {
    char c = text[i];
    if (c == '"') {  // a string, as it is: no '{' in it is an object
      auto end = string_end(text, i);
      if (end == npos) break;
      out.append(text.substr(i, end - i));
      i = end;
      continue;
    }
    if (c == '{') {
      auto end = value_end(text, i);
      if (end != npos && end - i <= longest_placeholder) {
        boost::system::error_code ec;
        auto v = json::parse(text.substr(i, end - i), ec);
        const auto* o = ec ? nullptr : v.if_object();
        auto num = o ? socketio::placeholder_index(*o) : std::nullopt;
        if (num && *num < attachments.size()) {
          out += R"({"_base64":")";
          out += engineio::base64_encode(attachments[static_cast<std::size_t>(*num)]);
          out += "\"}";
          i = end;
          continue;
        }
      }
    }
    out += c;
    ++i;
  }
  if (i < text.size()) out.append(text.substr(i));
  return out;
}

std::string data_from_args(std::string_view text) {
  // The args were validated as a JSON array (socketio::valid_args): the one
  // argument's text is handed on as it is, not parsed and written again.
  std::size_t i = skip_space(text, 0);
  if (i >= text.size()) return {};  // none at all (valid_args lets blank text through): as []
  if (text[i] != '[') return std::string{text};
  i = skip_space(text, i + 1);
  if (i < text.size() && text[i] == ']') return {};
  const std::size_t end = value_end(text, i);
  if (end == npos || end == i) return std::string{text};
  const std::size_t after = skip_space(text, end);
  if (after < text.size() && text[after] == ']') return std::string{text.substr(i, end - i)};
  return std::string{text};  // several: the array itself
}

}  // namespace sidecast::gateway::ws_json
