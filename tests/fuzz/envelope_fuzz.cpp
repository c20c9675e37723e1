// libFuzzer target for the envelope codec, the one parser of bytes from
// ZeroMQ peers that is not protobuf's own: proto::peek reads a Request's or a
// Reply's routing fields straight off the wire for the broker's hot path. No
// input may crash it, and whatever it accepts the protobuf parser must accept
// as the same kind with the same fields (differential). The arena parse the
// broker and the workers use must agree with the heap parse, and an accepted
// envelope must survive encode/decode. The worker parses a Request's body on
// its own (request_body), the gateway a Reply's (reply_body): each must
// accept exactly what the full parse does, the same. The hand-written encoders (encode_request, encode_reply) must
// write what protobuf writes for the same fields.
#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "proto/codec.hpp"

namespace proto = sidecast::proto;
using proto::Envelope;

namespace {

void check_same(const proto::hot_envelope& peeked, const proto::hot_envelope& parsed) {
  if (peeked.kind != parsed.kind || peeked.id != parsed.id) __builtin_trap();
  if (peeked.kind == Envelope::kRequest &&
      (peeked.service != parsed.service || peeked.sid != parsed.sid || peeked.timeout_ms != parsed.timeout_ms ||
       peeked.attempt != parsed.attempt || peeked.wants_reply != parsed.wants_reply)) {
    __builtin_trap();
  }
  if (peeked.kind == Envelope::kReply && (peeked.code != parsed.code || peeked.partial != parsed.partial)) {
    __builtin_trap();
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view in(reinterpret_cast<const char*>(data), size);

  const auto full = proto::decode(in);
  const auto peeked = proto::peek(in);
  if (peeked.kind != Envelope::KIND_NOT_SET) {
    if (!full) __builtin_trap();  // peek accepted what the parser refuses
    check_same(peeked, proto::head_of(*full));
  }

  // The third frame of an XPUB event: a stamp exactly when 16 bytes name a
  // stream, and the same stamp again once encoded.
  if (const auto stamp = proto::decode_stamp(in)) {
    if (size != proto::event_stamp_bytes || stamp->stream == 0) __builtin_trap();
    std::array<char, proto::event_stamp_bytes> again;
    proto::encode_stamp(*stamp, again);
    if (std::string_view(again.data(), again.size()) != in) __builtin_trap();
  } else if (size == proto::event_stamp_bytes && std::any_of(data, data + 8, [](auto b) { return b != 0; })) {
    __builtin_trap();  // 16 bytes with a stream refused
  }

  alignas(16) static std::array<char, 4096> block;
  google::protobuf::Arena arena{proto::arena_on(block)};
  auto& on_arena = *google::protobuf::Arena::CreateMessage<Envelope>(&arena);
  if (proto::decode_into(in, on_arena) != full.has_value()) __builtin_trap();

  if (const auto body = proto::request_body(in)) {
    proto::Request alone;
    bool ok = alone.ParseFromArray(body->data(), static_cast<int>(body->size()));
    if (ok != (full && full->has_request())) __builtin_trap();
    if (ok && alone.SerializeAsString() != full->request().SerializeAsString()) __builtin_trap();
  }
  if (const auto body = proto::reply_body(in)) {  // the gateway's parse of a Reply
    proto::Reply alone;
    bool ok = alone.ParseFromArray(body->data(), static_cast<int>(body->size()));
    if (ok != (full && full->has_reply())) __builtin_trap();
    if (ok && alone.SerializeAsString() != full->reply().SerializeAsString()) __builtin_trap();
  }

  if (full && full->has_request()) {
    Envelope known;  // what the hand-written encoder can say: no unknown fields
    *known.mutable_request() = full->request();
    known.mutable_request()->DiscardUnknownFields();
    const auto& r = known.request();
    proto::request_fields f{r.id(), r.service(), r.sid(), r.nsp(), r.event(), r.args(), {}, r.wants_reply(),
                            r.timeout_ms(), r.attempt(), r.user(), r.auth()};
    std::vector<std::string> attachments(r.attachments().begin(), r.attachments().end());
    f.attachments = attachments;
    std::string written(proto::encoded_size(f), '\0');
    if (proto::encode_request(f, written.data()) != written.data() + written.size()) __builtin_trap();
    if (written != proto::encode(known)) __builtin_trap();
  }
  if (full && full->has_reply()) {
    Envelope known;
    *known.mutable_reply() = full->reply();
    known.mutable_reply()->DiscardUnknownFields();
    const auto& r = known.reply();
    std::vector<std::string> attachments(r.attachments().begin(), r.attachments().end());
    proto::reply_fields f{r.id(), r.code(), r.message(), r.args(), attachments, r.silent(), r.partial()};
    std::string written(proto::encoded_size(f), '\0');
    if (proto::encode_reply(f, written.data()) != written.data() + written.size()) __builtin_trap();
    if (written != proto::encode(known)) __builtin_trap();
  }

  if (full) {
    const auto bytes = proto::encode(*full);
    if (proto::encode(on_arena) != bytes) __builtin_trap();
    const auto again = proto::decode(bytes);
    if (!again || proto::encode(*again) != bytes) __builtin_trap();
  }
  return 0;
}
