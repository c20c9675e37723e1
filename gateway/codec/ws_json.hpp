// The `/ws` endpoint's JSON frames, for clients that speak plain WebSocket
// instead of Socket.IO. Format: gateway/codec/README.md.
//
// Pure functions: no I/O, clocks, logging or global state. Malformed input is
// an error value, never an exception. "data" and "id" keep their original
// JSON text so they pass through byte for byte.
#pragma once

#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>

#include <boost/system/error_code.hpp>
#include <boost/system/result.hpp>

namespace sidecast::gateway::ws_json {

// Client -> server: {"event": string, "data"?: any, "id"?: number|string,
// "nsp"?: string}.
struct client_frame {
  std::string event;
  std::string data;               // raw JSON text of "data", empty when absent
  std::optional<std::string> id;  // raw JSON text of "id", echoed in the reply
  std::optional<std::string> nsp;  // absent: the connection's own namespace

  friend bool operator==(const client_frame&, const client_frame&) = default;
};

// The longest "id" (its JSON text) a frame may carry: the gateway keeps it
// until the reply, for every request a connection has waiting.
inline constexpr std::size_t max_id_bytes = 128;

enum class error {
  empty = 1,            // no input at all
  invalid_json,         // not exactly one JSON value (or nested too deep)
  not_object,           // the frame is not a JSON object
  unknown_key,          // a key other than event, data, id, nsp
  duplicate_key,        // a key given twice
  missing_event,        // no "event"
  event_not_string,     // "event" is not a string
  reserved_event_name,  // socketio::is_reserved_event
  bad_id,               // "id" is neither a number nor a string, or longer than max_id_bytes
  bad_namespace,        // "nsp" is not a string or not socketio::valid_namespace
};

const boost::system::error_category& error_category() noexcept;
boost::system::error_code make_error_code(error e) noexcept;

boost::system::result<client_frame> decode(std::string_view text);

// Server -> client event: {"event":"...","data":<data_json>,"nsp":"..."}.
// "data" is left out when data_json is empty, "nsp" when it is "/" or empty.
// data_json must be valid JSON; it is copied as it is.
std::string encode_event(std::string_view event, std::string_view data_json,
                         std::string_view nsp = "/");

// The "data" of a /ws frame made from a Socket.IO-style argument array: a
// single argument as it is (its own text, byte for byte), no argument as
// empty (no "data"), several as the array itself. Text that is not a JSON
// array is returned unchanged. `args_array_json` must be valid JSON.
std::string data_from_args(std::string_view args_array_json);

// What the JSON faces (/ws, the HTTP API) carry of binary attachments: in
// `args_json` (a worker's event or answer), each Socket.IO placeholder
// {"_placeholder":true,"num":N} whose attachment is there becomes
// {"_base64":"<attachment N, standard base64>"}; every other byte is kept
// as it is. `args_json` must be valid JSON.
std::string inline_attachments(std::string_view args_json, std::span<const std::string> attachments);
// `args_json` itself when there are no attachments.
inline std::string with_attachments(std::string args_json, std::span<const std::string> attachments) {
  return attachments.empty() ? args_json : inline_attachments(args_json, attachments);
}

// Reply to a frame that carried an id: {"id":<id_json>,"data":<data_json>,
// "error":"..."}. "data" is left out when empty, "error" when absent; an empty
// id_json is written as null.
std::string encode_reply(std::string_view id_json, std::string_view data_json,
                         std::optional<std::string_view> error_message = std::nullopt);

}  // namespace sidecast::gateway::ws_json

template <>
struct boost::system::is_error_code_enum<sidecast::gateway::ws_json::error> : std::true_type {};
