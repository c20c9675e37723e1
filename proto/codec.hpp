#pragma once
// The envelope codec: pure functions from bytes to messages and back, plus
// the PUB/SUB topic layout and the id conventions shared by every component.
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>

#include "sidecast/v1/envelope.pb.h"

namespace sidecast::proto {

using namespace sidecast::v1;

/// Major version of the wire protocol this build speaks.
inline constexpr unsigned protocol_version = 1;

/// Parses one envelope. Returns nullopt for bytes that are not a valid
/// Envelope or that carry no kind.
std::optional<Envelope> decode(std::string_view bytes);

/// Parses into an existing envelope (reusing its allocations); false for
/// bytes that are not a valid Envelope with a kind.
bool decode_into(std::string_view bytes, Envelope& env);

/// The routing fields of the two hot kinds, read straight off the wire:
/// what the broker needs to route a Request or a Reply, without parsing
/// (and copying) its arguments and attachments. The views point into the
/// bytes given.
struct hot_envelope {
  Envelope::KindCase kind = Envelope::KIND_NOT_SET;  // kRequest, kReply, or not peeked
  std::string_view id;
  std::string_view service;  // Request
  std::string_view sid;      // Request (and Lifecycle, from head_of)
  std::uint32_t timeout_ms = 0;
  std::uint32_t attempt = 0;
  bool wants_reply = false;
  Code code = OK;  // Reply
  bool partial = false;
};

/// Peeks at an envelope that holds exactly one Request or Reply, checking
/// what the full parser checks (wire structure, UTF-8 in string fields).
/// Anything else — another kind, unknown fields, an unusual but valid
/// encoding, or bytes the parser would refuse — comes back with kind
/// KIND_NOT_SET: hand it to decode_into, which has the last word.
hot_envelope peek(std::string_view bytes);

/// The kind of an envelope from its tag (one byte for kinds 1-15, two for
/// the later ones), without parsing it: KIND_NOT_SET when the bytes start
/// with no kind's tag. Only a guess for bytes no parser has checked.
inline constexpr unsigned last_kind = Envelope::kGatewayGone;  // the highest field number of Envelope.kind
inline Envelope::KindCase kind_of(std::string_view bytes) {
  if (bytes.empty()) return Envelope::KIND_NOT_SET;
  unsigned tag = static_cast<unsigned char>(bytes[0]);
  if (tag & 0x80) {  // a two-byte tag: field 16 and up
    if (bytes.size() < 2 || (static_cast<unsigned char>(bytes[1]) & 0x80)) return Envelope::KIND_NOT_SET;
    tag = (tag & 0x7f) | (static_cast<unsigned>(static_cast<unsigned char>(bytes[1])) << 7);
  }
  unsigned field = tag >> 3;
  if ((tag & 7) != 2 || field == 0 || field > last_kind) return Envelope::KIND_NOT_SET;
  return static_cast<Envelope::KindCase>(field);
}

/// The body of an envelope that holds one Request and nothing else (tag and
/// length in their shortest encoding), for a proto::Request to parse on its
/// own; nothing for anything else. Parsing the body as a Request accepts
/// exactly what decode() would accept as an Envelope with that Request.
std::optional<std::string_view> request_body(std::string_view bytes);
/// The same for an envelope that holds one Reply and nothing else.
std::optional<std::string_view> reply_body(std::string_view bytes);

/// The same fields from a parsed Request, Reply or Lifecycle (a CONNECT
/// wants a reply); the views point into `env`.
hot_envelope head_of(const Envelope& env);

/// Serializes an envelope.
std::string encode(const Envelope& env);

/// The fields of a Request, as views: what encode_request writes.
struct request_fields {
  std::string_view id, service, sid, nsp, event, args;
  std::span<const std::string> attachments;
  bool wants_reply = false;
  std::uint32_t timeout_ms = 0;
  std::uint32_t attempt = 0;
  std::string_view user, auth;
};

/// Envelope{request} written by hand, byte for byte what protobuf would
/// serialize (fields in order, proto3 defaults left out): the gateway writes
/// each client event straight into the message it sends, where building a
/// Request first would copy every string into it. encoded_size() bytes.
std::size_t encoded_size(const request_fields& request);
/// Writes the envelope at `out` (encoded_size() bytes); returns its end.
char* encode_request(const request_fields& request, char* out);

/// The fields of a Reply, as views: what encode_reply writes.
struct reply_fields {
  std::string_view id;
  Code code = OK;
  std::string_view message, args;
  std::span<const std::string> attachments;
  bool silent = false;
  bool partial = false;
};

/// Envelope{reply}, written as encode_request writes a request: a worker's
/// answer goes straight into the message it sends.
std::size_t encoded_size(const reply_fields& reply);
char* encode_reply(const reply_fields& reply, char* out);

/// Options for an arena whose first block is `block`, a buffer the caller
/// keeps and reuses (for one arena at a time). An envelope built or parsed
/// on such an arena costs no allocation beyond string contents too long for
/// std::string's own buffer; on the heap, every message and every string
/// field set is one.
inline google::protobuf::ArenaOptions arena_on(std::span<char> block) {
  google::protobuf::ArenaOptions options;
  options.initial_block = block.data();
  options.initial_block_size = block.size();
  return options;
}

/// Short name of the envelope's kind, for logs and metric labels.
std::string_view kind_name(const Envelope& env);
std::string_view kind_name(Envelope::KindCase kind);

/// PUB/SUB topics. A topic ends with '\0' so that subscribing to one room
/// never matches a room whose name merely starts with it.
std::string room_topic(std::string_view nsp, std::string_view room);
/// The room of `topic`, a room_topic() of namespace `nsp`.
std::string_view room_of_topic(std::string_view topic, std::string_view nsp);
std::string namespace_topic(std::string_view nsp);
/// The prefix every room_topic() of `nsp` starts with: a SUB subscribed to it
/// hears every room of the namespace (and no room of another).
std::string rooms_prefix(std::string_view nsp);
/// The topic an Emit travels under; empty for addressed (sid) emits.
std::string topic_for(const Emit& emit);
/// The topic a room-wide Control travels under; empty for a sid's, for
/// one that names no namespace, and for `in_namespace` false.
std::string topic_for(const Control& control);

/// The third frame of every event the broker's XPUB sends, after the topic
/// and the envelope: which stream of the topic it belongs to and its number
/// in it. The broker numbers each topic's events 1, 2, 3, ... in the order
/// it publishes them; a gateway that hears a topic's events 5 and 8 of one
/// stream lost 6 and 7 on the way (the XPUB's or its SUB's high-water mark,
/// or a reconnect). A new stream (a restarted broker, the other broker of a
/// pair, a topic that lost its counter to another) starts over and counts
/// nothing. 16 bytes: the stream, then the number, little-endian.
struct event_stamp {
  std::uint64_t stream = 0;  // never 0 on the wire
  std::uint64_t seq = 0;
};
inline constexpr std::size_t event_stamp_bytes = 16;
void encode_stamp(const event_stamp& stamp, std::span<char, event_stamp_bytes> out);
/// nullopt unless `bytes` is 16 bytes naming a stream other than 0.
std::optional<event_stamp> decode_stamp(std::string_view bytes);

/// What a subscriber keeps for one topic to find the events it lost.
class heard_stream {
 public:
  /// Takes the stamp of an event just heard; returns how many events of
  /// its stream came between the last one heard and this one (0 for the
  /// first of a stream: nothing is known before it).
  std::uint64_t missed_before(const event_stamp& stamp);

 private:
  event_stamp last_;
};

/// Peer ids and sids: a sid is "<gateway id>.<random>", a request or ack id is
/// "<peer id>:<n>". Ids are non-empty and contain neither '.' nor ':'.
bool valid_peer_id(std::string_view id);
/// A gateway's Hello.sid_prefix: "<id>.<tag>", the tag 1 to 32 of
/// [A-Za-z0-9_-] (what core::random_token draws). Every sid it issues then
/// begins with it.
bool valid_sid_prefix(std::string_view id, std::string_view prefix);
/// The gateway id that owns a sid, or empty if the sid has no prefix.
std::string_view sid_owner(std::string_view sid);
/// The peer id that issued a request or ack id, or empty.
std::string_view id_owner(std::string_view id);

}  // namespace sidecast::proto
