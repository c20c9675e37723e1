// Socket.IO v5 packet codec (https://github.com/socketio/socket.io-protocol),
// the default parser's text format:
//
//   <type>[<attachments>-][<namespace>,][<ack id>][<JSON payload>]
//
// Pure functions: no I/O, clocks, logging or global state. Malformed input is
// an error value (boost::system::error_code with socketio::error), never an
// exception. The JSON payload is validated but kept as the original text, so
// it reaches the other side byte for byte.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include <boost/json/fwd.hpp>
#include <boost/system/error_code.hpp>
#include <boost/system/result.hpp>

namespace sidecast::gateway::socketio {

enum class packet_type : std::uint8_t {
  connect = 0,
  disconnect = 1,
  event = 2,
  ack = 3,
  connect_error = 4,
  binary_event = 5,
  binary_ack = 6,
};

struct packet {
  packet_type type = packet_type::event;
  std::string nsp = "/";
  std::optional<std::uint64_t> id;
  std::string data;  // raw JSON text of the payload, empty when absent
  std::size_t attachments = 0;  // binary_event / binary_ack only

  friend bool operator==(const packet&, const packet&) = default;
};

enum class error {
  empty = 1,               // no input at all
  invalid_type,            // first character is not 0..6
  bad_attachments,         // binary header is not <digits>-
  too_many_attachments,    // over the caller's max_attachments
  bad_namespace,           // not valid UTF-8, or contains a control character
  bad_ack_id,              // overflow, or an id where the type allows none
  missing_ack_id,          // ACK / BINARY_ACK without an id
  invalid_json,            // payload is not exactly one JSON value
  missing_payload,         // EVENT / ACK / CONNECT_ERROR without payload
  unexpected_payload,      // DISCONNECT with a payload
  payload_not_object,      // CONNECT / CONNECT_ERROR payload is not an object
  payload_not_array,       // EVENT / ACK payload is not an array
  empty_event,             // EVENT payload is []
  event_name_not_string,   // EVENT payload's first element is not a string
  reserved_event_name,     // "connect", "disconnect", ... (see is_reserved_event)
  placeholder_mismatch,    // placeholders are not exactly num 0..attachments-1
  not_binary,              // binary_assembler: header is not a binary type
  assembler_busy,          // binary_assembler: header while attachments pending
  unexpected_attachment,   // binary_assembler: buffer with nothing pending
  attachments_too_large,   // binary_assembler: over the byte limit
};

const boost::system::error_category& error_category() noexcept;
boost::system::error_code make_error_code(error e) noexcept;

// Nesting limit for payload JSON (objects and arrays).
inline constexpr std::size_t max_json_depth = 64;

// JSON from a client or a worker parsed as deep as payloads may nest
// (max_json_depth; Boost.JSON's own default is 32): a body, an auth object.
boost::json::value parse_json(std::string_view text, boost::system::error_code& ec);

// `max_attachments` bounds the `<n>-` count of binary packets; a larger count
// is error::too_many_attachments. Rules on the payload follow the reference
// parser, made stricter where noted in gateway/codec/README.md: CONNECT
// optional object; DISCONNECT none; EVENT non-empty array starting with a
// non-reserved string; ACK array with an id; CONNECT_ERROR object; binary
// types also need placeholders num 0..n-1, each exactly once.
boost::system::result<packet> decode(std::string_view text, std::size_t max_attachments);
// The same, the packet's data taking over the buffer of `text`.
boost::system::result<packet> decode_owned(std::string&& text, std::size_t max_attachments);

// Canonical text: namespace omitted when "/" (or empty), attachment count only
// for binary types. The packet is not validated: encode what decode accepted
// or what the gateway built itself.
std::string encode(const packet& p);
// The same, appended to `out` (a buffer reused from one packet to the next).
void encode_to(std::string& out, const packet& p);

// A namespace the text format can carry and protobuf strings accept: starts
// with '/', valid UTF-8, no ',' and no control characters (which also keeps
// '\x1e' out of Engine.IO polling payloads).
bool valid_namespace(std::string_view nsp) noexcept;

// Event names the reference implementation refuses to receive.
bool is_reserved_event(std::string_view name) noexcept;

// Placeholders: objects whose "_placeholder" member is true, anywhere in the
// value. has_placeholders: at least one. count_placeholders: how many, or
// nullopt if one of them has no integral, non-negative "num". A payload is
// consistent with n attachments when its placeholders carry num 0..n-1, each
// exactly once (what every encoder produces).
// The attachment a placeholder object stands for: its "num", when `o` is a
// placeholder with a valid one.
std::optional<std::uint64_t> placeholder_index(const boost::json::object& o);
bool has_placeholders(const boost::json::value& v);
std::optional<std::size_t> count_placeholders(const boost::json::value& v);
bool placeholders_consistent(const boost::json::value& v, std::size_t attachments);
// Same on JSON text; invalid JSON is never consistent.
bool placeholders_consistent(std::string_view json, std::size_t attachments);

// EVENT payload helpers. split_event expects a JSON array already validated
// (e.g. packet::data from decode) and returns its first element, which must be
// a string, unescaped, and the other elements as an array text, copied as
// they are: `["chat",1,{"a":2}]` -> ("chat", `[1,{"a":2}]`). The arguments are
// not reparsed. nullopt when the text does not start like such an array.
std::optional<std::pair<std::string, std::string>> split_event(std::string_view array_json);
// The same, the arguments taking over the buffer of `array_json`.
std::optional<std::pair<std::string, std::string>> split_event_owned(std::string&& array_json);

// Inverse of split_event: `[<name as JSON string>,<elements of args>]`.
// `args_array_json` should be a JSON array; blank text means no arguments,
// anything else that is not bracketed is taken as a single argument.
std::string join_event(std::string_view name, std::string_view args_array_json);

// Whether `args` may be spliced into a packet for clients: empty (no
// arguments) or one complete JSON value, UTF-8 valid, nested at most
// max_json_depth deep. What the gateway checks of arguments that come from
// workers (Emit and Reply args are bytes the broker never looks at), so that
// a worker's bad JSON is refused at the gateway instead of reaching clients
// as a broken packet or an invalid text frame. Validates without building a
// value and without allocating.
bool valid_args(std::string_view args) noexcept;

// Collects a binary packet: the header (BINARY_EVENT / BINARY_ACK with
// `attachments` = n) then n binary frames, in order. A state machine with no
// I/O, bounded by a number of attachments and a number of bytes.
class binary_assembler {
 public:
  struct message {
    packet header;
    std::vector<std::string> attachments;
  };

  binary_assembler(std::size_t max_attachments, std::size_t max_bytes) noexcept;

  // Returns true when the message is already complete (zero attachments).
  boost::system::result<bool> start(packet header);
  // Returns true when this was the last attachment.
  boost::system::result<bool> add(std::string attachment);

  bool waiting() const noexcept { return active_ && buffers_.size() < header_.attachments; }
  bool complete() const noexcept { return active_ && buffers_.size() == header_.attachments; }
  std::size_t pending() const noexcept { return waiting() ? header_.attachments - buffers_.size() : 0; }

  // The finished message; resets the assembler. nullopt unless complete().
  std::optional<message> take();
  void reset() noexcept;

 private:
  std::size_t max_attachments_;
  std::size_t max_bytes_;
  std::size_t bytes_ = 0;
  bool active_ = false;
  packet header_;
  std::vector<std::string> buffers_;
};

}  // namespace sidecast::gateway::socketio

template <>
struct boost::system::is_error_code_enum<sidecast::gateway::socketio::error> : std::true_type {};
