#include "gateway/codec/socketio.hpp"

#include <algorithm>
#include <array>
#include <limits>

#include <boost/json/basic_parser_impl.hpp>
#include <boost/json/monotonic_resource.hpp>
#include <boost/json/parse.hpp>
#include <boost/json/serialize.hpp>
#include <boost/json/value.hpp>

#include "core/utf8.hpp"
#include "gateway/codec/error_category.hpp"
#include "gateway/codec/json_scan.hpp"

namespace sidecast::gateway::socketio {
namespace {

namespace json = boost::json;
using namespace codec_detail;

const char* describe(error e) noexcept {
  switch (e) {
    case error::empty: return "empty packet";
    case error::invalid_type: return "invalid packet type";
    case error::bad_attachments: return "bad attachments count";
    case error::too_many_attachments: return "too many attachments";
    case error::bad_namespace: return "bad namespace";
    case error::bad_ack_id: return "bad ack id";
    case error::missing_ack_id: return "missing ack id";
    case error::invalid_json: return "invalid JSON payload";
    case error::missing_payload: return "missing payload";
    case error::unexpected_payload: return "payload not allowed for this packet type";
    case error::payload_not_object: return "payload must be an object";
    case error::payload_not_array: return "payload must be an array";
    case error::empty_event: return "event payload is an empty array";
    case error::event_name_not_string: return "event name is neither a string nor a number";
    case error::reserved_event_name: return "reserved event name";
    case error::placeholder_mismatch: return "placeholders do not match the attachments";
    case error::not_binary: return "not a binary packet";
    case error::assembler_busy: return "binary packet still waiting for attachments";
    case error::unexpected_attachment: return "unexpected binary attachment";
    case error::attachments_too_large: return "binary attachments too large";
  }
  return "unknown socketio codec error";
}

bool is_digit(char c) noexcept { return c >= '0' && c <= '9'; }

bool is_binary(packet_type t) noexcept {
  return t == packet_type::binary_event || t == packet_type::binary_ack;
}

// Where a placeholder's "num" is valid, returns it.
std::optional<std::uint64_t> placeholder_num(const json::object& o) {
  const auto* num = o.if_contains("num");
  if (num == nullptr) {
    return std::nullopt;
  }
  if (const auto* u = num->if_uint64()) {
    return *u;
  }
  if (const auto* i = num->if_int64(); i != nullptr && *i >= 0) {
    return static_cast<std::uint64_t>(*i);
  }
  return std::nullopt;
}

bool is_placeholder(const json::object& o) {
  const auto* flag = o.if_contains("_placeholder");
  return flag != nullptr && flag->is_bool() && flag->get_bool();
}

// Visits every placeholder object, depth first, without recursion (a value
// built by a caller may nest deeper than the parser's limit). Stops when the
// visitor returns false; returns false in that case.
template <class Visitor>
bool for_each_placeholder(const json::value& root, Visitor&& visit) {
  std::vector<const json::value*> stack{&root};
  while (!stack.empty()) {
    const json::value* v = stack.back();
    stack.pop_back();
    if (const auto* a = v->if_array()) {
      for (const auto& e : *a) {
        stack.push_back(&e);
      }
    } else if (const auto* o = v->if_object()) {
      if (is_placeholder(*o)) {
        if (!visit(*o)) {
          return false;
        }
        continue;  // the reference replaces the whole object, so no descent
      }
      for (const auto& kv : *o) {
        stack.push_back(&kv.value());
      }
    }
  }
  return true;
}

bool consistent(const json::value& v, std::size_t attachments) {
  std::vector<std::uint64_t> nums;
  const bool all_valid = for_each_placeholder(v, [&](const json::object& o) {
    const auto num = placeholder_num(o);
    if (!num || nums.size() == attachments) {
      return false;
    }
    nums.push_back(*num);
    return true;
  });
  if (!all_valid || nums.size() != attachments) {
    return false;
  }
  std::sort(nums.begin(), nums.end());
  for (std::size_t i = 0; i < nums.size(); ++i) {
    if (nums[i] != i) {
      return false;
    }
  }
  return true;
}

json::parse_options payload_parse_options() noexcept {
  json::parse_options opts;
  opts.max_depth = max_json_depth;
  return opts;
}

// Reads the unsigned decimal at s[i..]; advances i past the digits. nullopt on
// overflow of uint64_t.
std::optional<std::uint64_t> read_decimal(std::string_view s, std::size_t& i) noexcept {
  std::uint64_t n = 0;
  constexpr auto max = std::numeric_limits<std::uint64_t>::max();
  bool overflow = false;
  while (i < s.size() && is_digit(s[i])) {
    const auto d = static_cast<std::uint64_t>(s[i] - '0');
    if (n > (max - d) / 10) {
      overflow = true;  // keep consuming so the caller sees where digits end
    } else {
      n = n * 10 + d;
    }
    ++i;
  }
  if (overflow) {
    return std::nullopt;
  }
  return n;
}

}  // namespace

const boost::system::error_category& error_category() noexcept {
  static const enum_category<error> category{"sidecast.socketio", describe};
  return category;
}

boost::system::error_code make_error_code(error e) noexcept {
  return {static_cast<int>(e), error_category()};
}

bool valid_namespace(std::string_view nsp) noexcept {
  if (nsp.empty() || nsp.front() != '/') {
    return false;
  }
  for (const char ch : nsp) {
    const auto c = static_cast<unsigned char>(ch);
    if (c < 0x20 || c == 0x7f || c == ',') {
      return false;
    }
  }
  return core::valid_utf8(nsp);
}

bool is_reserved_event(std::string_view name) noexcept {
  constexpr std::array<std::string_view, 6> reserved{
      "connect", "connect_error", "disconnect", "disconnecting", "newListener", "removeListener"};
  return std::find(reserved.begin(), reserved.end(), name) != reserved.end();
}

namespace {

// decode() but for the data: the packet, and where its payload starts in `text`.
boost::system::result<std::pair<packet, std::size_t>> decode_header(std::string_view text, std::size_t max_attachments) {
  if (text.empty()) {
    return error::empty;
  }
  if (text[0] < '0' || text[0] > '6') {
    return error::invalid_type;
  }
  packet p;
  p.type = static_cast<packet_type>(text[0] - '0');
  std::size_t i = 1;

  if (is_binary(p.type)) {
    const std::size_t start = i;
    const auto count = read_decimal(text, i);
    if (i == start || i >= text.size() || text[i] != '-') {
      return error::bad_attachments;
    }
    if (!count || *count > max_attachments) {
      return error::too_many_attachments;
    }
    p.attachments = static_cast<std::size_t>(*count);
    ++i;
  }

  if (i < text.size() && text[i] == '/') {
    const auto comma = text.find(',', i);
    const auto end = comma == std::string_view::npos ? text.size() : comma;
    const auto nsp = text.substr(i, end - i);
    if (!valid_namespace(nsp)) {
      return error::bad_namespace;
    }
    p.nsp.assign(nsp);
    i = comma == std::string_view::npos ? text.size() : comma + 1;
  }

  if (i < text.size() && is_digit(text[i])) {
    const auto id = read_decimal(text, i);
    if (!id) {
      return error::bad_ack_id;
    }
    p.id = *id;
  }

  const bool id_allowed = p.type == packet_type::event || p.type == packet_type::binary_event ||
                          p.type == packet_type::ack || p.type == packet_type::binary_ack;
  if (p.id && !id_allowed) {
    return error::bad_ack_id;
  }
  if (!p.id && (p.type == packet_type::ack || p.type == packet_type::binary_ack)) {
    return error::missing_ack_id;
  }

  const auto payload = text.substr(i);
  if (payload.empty()) {
    switch (p.type) {
      case packet_type::connect:
      case packet_type::disconnect:
        return std::pair{std::move(p), i};
      default:
        return error::missing_payload;
    }
  }
  if (p.type == packet_type::disconnect) {
    return error::unexpected_payload;
  }

  // Most payloads are small: parse into a stack buffer, spill to the heap.
  std::array<unsigned char, 4096> buffer;
  json::monotonic_resource resource(buffer.data(), buffer.size());
  boost::system::error_code ec;
  std::string scratch;
  const auto checked = surrogates_tolerated(payload, scratch);
  const json::value v = json::parse(json::string_view(checked.data(), checked.size()), ec,
                                    &resource, payload_parse_options());
  if (ec) {
    return error::invalid_json;
  }

  switch (p.type) {
    case packet_type::connect:
    case packet_type::connect_error:
      if (!v.is_object()) {
        return error::payload_not_object;
      }
      break;
    case packet_type::event:
    case packet_type::binary_event: {
      const auto* a = v.if_array();
      if (a == nullptr) {
        return error::payload_not_array;
      }
      if (a->empty()) {
        return error::empty_event;
      }
      // socket.io-parser accepts a string (not a reserved one) or a number.
      const auto* name = a->front().if_string();
      if (name == nullptr) {
        if (!a->front().is_number()) return error::event_name_not_string;
      } else if (is_reserved_event(std::string_view(name->data(), name->size()))) {
        return error::reserved_event_name;
      }
      break;
    }
    case packet_type::ack:
    case packet_type::binary_ack:
      if (!v.is_array()) {
        return error::payload_not_array;
      }
      break;
    case packet_type::disconnect:
      break;  // handled above
  }
  if (is_binary(p.type) && !consistent(v, p.attachments)) {
    return error::placeholder_mismatch;
  }
  return std::pair{std::move(p), i};
}

}  // namespace

boost::system::result<packet> decode(std::string_view text, std::size_t max_attachments) {
  auto header = decode_header(text, max_attachments);
  if (!header) return header.error();
  auto& [p, payload_at] = *header;
  p.data.assign(text.substr(payload_at));
  return std::move(p);
}

boost::system::result<packet> decode_owned(std::string&& text, std::size_t max_attachments) {
  auto header = decode_header(text, max_attachments);
  if (!header) return header.error();
  auto& [p, payload_at] = *header;
  text.erase(0, payload_at);  // the data keeps the buffer
  p.data = std::move(text);
  return std::move(p);
}

std::string encode(const packet& p) {
  std::string out;
  encode_to(out, p);
  return out;
}

void encode_to(std::string& out, const packet& p) {
  out.reserve(out.size() + 32 + p.nsp.size() + p.data.size());
  out += static_cast<char>('0' + static_cast<int>(p.type));
  if (is_binary(p.type)) {
    out += std::to_string(p.attachments);
    out += '-';
  }
  if (!p.nsp.empty() && p.nsp != "/") {
    out += p.nsp;
    out += ',';
  }
  if (p.id) {
    out += std::to_string(*p.id);
  }
  out += p.data;
}

std::optional<std::uint64_t> placeholder_index(const json::object& o) {
  return is_placeholder(o) ? placeholder_num(o) : std::nullopt;
}

bool has_placeholders(const json::value& v) {
  return !for_each_placeholder(v, [](const json::object&) { return false; });
}

std::optional<std::size_t> count_placeholders(const json::value& v) {
  std::size_t n = 0;
  const bool all_valid = for_each_placeholder(v, [&](const json::object& o) {
    ++n;
    return placeholder_num(o).has_value();
  });
  if (!all_valid) {
    return std::nullopt;
  }
  return n;
}

bool placeholders_consistent(const json::value& v, std::size_t attachments) {
  return consistent(v, attachments);
}

bool placeholders_consistent(std::string_view text, std::size_t attachments) {
  boost::system::error_code ec;
  const json::value v = json::parse(json::string_view(text.data(), text.size()), ec, {},
                                    payload_parse_options());
  return !ec && consistent(v, attachments);
}

namespace {

// split_event's scan: the name, and where the rest of the array starts (at
// its ']' or its ',').
std::optional<std::pair<std::string, std::size_t>> split_name(std::string_view array_json) {
  std::size_t i = skip_space(array_json, 0);
  if (i >= array_json.size() || array_json[i] != '[') {
    return std::nullopt;
  }
  i = skip_space(array_json, i + 1);
  if (i >= array_json.size()) {
    return std::nullopt;
  }
  std::size_t name_end;
  std::string name;
  if (array_json[i] == '-' || (array_json[i] >= '0' && array_json[i] <= '9')) {
    // A numeric event name (socket.io-parser allows them): its JSON text.
    name_end = array_json.find_first_of(",] \t\r\n", i);
    if (name_end == npos) return std::nullopt;
    const auto token = array_json.substr(i, name_end - i);
    boost::system::error_code ec;
    const json::value v = json::parse(json::string_view(token.data(), token.size()), ec);
    if (ec || !v.is_number()) return std::nullopt;
    name.assign(token);
  } else if (array_json[i] != '"' || (name_end = string_end(array_json, i)) == npos) {
    return std::nullopt;
  } else if (const auto token = array_json.substr(i, name_end - i); token.find('\\') == std::string_view::npos) {
    name.assign(token.substr(1, token.size() - 2));
  } else {
    boost::system::error_code ec;
    const json::value v = json::parse(json::string_view(token.data(), token.size()), ec);
    if (ec || !v.is_string()) {
      return std::nullopt;
    }
    name.assign(v.get_string().data(), v.get_string().size());
  }
  i = skip_space(array_json, name_end);
  if (i >= array_json.size() || (array_json[i] != ']' && array_json[i] != ',')) {
    return std::nullopt;
  }
  return std::pair{std::move(name), i};
}

}  // namespace

std::optional<std::pair<std::string, std::string>> split_event(std::string_view array_json) {
  auto name = split_name(array_json);
  if (!name) return std::nullopt;
  auto& [event, i] = *name;
  if (array_json[i] == ']') return std::pair{std::move(event), std::string("[]")};
  std::string rest;
  rest.reserve(array_json.size() - i);
  rest += '[';
  rest += array_json.substr(i + 1);
  return std::pair{std::move(event), std::move(rest)};
}

std::optional<std::pair<std::string, std::string>> split_event_owned(std::string&& array_json) {
  auto name = split_name(array_json);
  if (!name) return std::nullopt;
  auto& [event, i] = *name;
  if (array_json[i] == ']') return std::pair{std::move(event), std::string("[]")};
  array_json.replace(0, i + 1, 1, '[');  // `[name,rest` -> `[rest`, in the same buffer
  return std::pair{std::move(event), std::move(array_json)};
}

namespace {

// A basic_parser handler that keeps nothing: the parser alone validates.
struct null_handler {
  static constexpr std::size_t max_object_size = std::size_t(-1);
  static constexpr std::size_t max_array_size = std::size_t(-1);
  static constexpr std::size_t max_key_size = std::size_t(-1);
  static constexpr std::size_t max_string_size = std::size_t(-1);
  using ec = boost::system::error_code;
  bool on_document_begin(ec&) { return true; }
  bool on_document_end(ec&) { return true; }
  bool on_object_begin(ec&) { return true; }
  bool on_object_end(std::size_t, ec&) { return true; }
  bool on_array_begin(ec&) { return true; }
  bool on_array_end(std::size_t, ec&) { return true; }
  bool on_key_part(json::string_view, std::size_t, ec&) { return true; }
  bool on_key(json::string_view, std::size_t, ec&) { return true; }
  bool on_string_part(json::string_view, std::size_t, ec&) { return true; }
  bool on_string(json::string_view, std::size_t, ec&) { return true; }
  bool on_number_part(json::string_view, ec&) { return true; }
  bool on_int64(std::int64_t, json::string_view, ec&) { return true; }
  bool on_uint64(std::uint64_t, json::string_view, ec&) { return true; }
  bool on_double(double, json::string_view, ec&) { return true; }
  bool on_bool(bool, ec&) { return true; }
  bool on_null(ec&) { return true; }
  bool on_comment_part(json::string_view, ec&) { return true; }
  bool on_comment(json::string_view, ec&) { return true; }
};

}  // namespace

json::value parse_json(std::string_view text, boost::system::error_code& ec) {
  std::string scratch;
  return json::parse(surrogates_tolerated(text, scratch), ec, {}, payload_parse_options());
}

bool valid_args(std::string_view args) noexcept {
  if (skip_space(args, 0) == args.size()) return true;
  try {
    json::basic_parser<null_handler> parser(payload_parse_options());
    boost::system::error_code ec;
    std::string scratch;
    args = surrogates_tolerated(args, scratch);
    const std::size_t used = parser.write_some(false, args.data(), args.size(), ec);
    return !ec && used == args.size();
  } catch (...) {  // the parser's depth stack could not grow
    return false;
  }
}

std::string join_event(std::string_view name, std::string_view args_array_json) {
  const std::string quoted = json::serialize(json::string_view(name.data(), name.size()));
  std::size_t first = skip_space(args_array_json, 0);
  std::size_t last = args_array_json.size();
  while (last > first && is_json_space(args_array_json[last - 1])) {
    --last;
  }
  std::string_view args = args_array_json.substr(first, last - first);
  if (args.size() >= 2 && args.front() == '[' && args.back() == ']') {
    args = args.substr(1, args.size() - 2);
    const std::size_t content = skip_space(args, 0);
    if (content == args.size()) {
      args = {};
    }
  }
  std::string out;
  out.reserve(quoted.size() + args.size() + 3);
  out += '[';
  out += quoted;
  if (!args.empty()) {
    out += ',';
    out += args;
  }
  out += ']';
  return out;
}

binary_assembler::binary_assembler(std::size_t max_attachments, std::size_t max_bytes) noexcept
    : max_attachments_(max_attachments), max_bytes_(max_bytes) {}

boost::system::result<bool> binary_assembler::start(packet header) {
  if (active_) {
    return error::assembler_busy;
  }
  if (!is_binary(header.type)) {
    return error::not_binary;
  }
  if (header.attachments > max_attachments_) {
    return error::too_many_attachments;
  }
  header_ = std::move(header);
  buffers_.clear();
  // The count comes from a peer: do not let it size an allocation up front.
  buffers_.reserve(std::min<std::size_t>(header_.attachments, 16));
  bytes_ = 0;
  active_ = true;
  return header_.attachments == 0;
}

boost::system::result<bool> binary_assembler::add(std::string attachment) {
  if (!waiting()) {
    return error::unexpected_attachment;
  }
  if (attachment.size() > max_bytes_ - bytes_) {
    reset();
    return error::attachments_too_large;
  }
  bytes_ += attachment.size();
  buffers_.push_back(std::move(attachment));
  return buffers_.size() == header_.attachments;
}

std::optional<binary_assembler::message> binary_assembler::take() {
  if (!complete()) {
    return std::nullopt;
  }
  message m{std::move(header_), std::move(buffers_)};
  reset();
  return m;
}

void binary_assembler::reset() noexcept {
  active_ = false;
  bytes_ = 0;
  header_ = packet{};
  buffers_.clear();
}

}  // namespace sidecast::gateway::socketio
