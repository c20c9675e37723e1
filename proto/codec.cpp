#include "proto/codec.hpp"

#include <algorithm>
#include <limits>

#include "core/utf8.hpp"

using namespace std::literals;

namespace sidecast::proto {

bool decode_into(std::string_view bytes, Envelope& env) {
  return bytes.size() <= static_cast<std::size_t>(std::numeric_limits<int>::max()) &&
         env.ParseFromArray(bytes.data(), static_cast<int>(bytes.size())) &&
         env.kind_case() != Envelope::KIND_NOT_SET;
}

std::optional<Envelope> decode(std::string_view bytes) {
  Envelope env;
  if (!decode_into(bytes, env)) return std::nullopt;
  return env;
}

namespace {

// Protobuf wire format, as far as peek() needs it.
struct wire_reader {
  const unsigned char* p;
  const unsigned char* end;

  explicit wire_reader(std::string_view bytes)
      : p{reinterpret_cast<const unsigned char*>(bytes.data())}, end{p + bytes.size()} {}
  bool done() const { return p == end; }
  // Only the shortest encoding: the parser's limits for longer ones differ
  // by what is read (a tag or a length: 5 bytes at most, a value: 10), and
  // no encoder writes them, so they go to the parser (peek answers "not
  // peeked"). Found by tests/fuzz/envelope_fuzz: a 7-byte length of 0.
  bool varint(std::uint64_t& v) {
    v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (p == end) return false;
      auto b = *p++;
      v |= std::uint64_t(b & 0x7f) << shift;
      if (!(b & 0x80)) return b != 0 || shift == 0;
    }
    return false;
  }
  bool length_delimited(std::string_view& out) {
    std::uint64_t n;
    if (!varint(n) || n > static_cast<std::uint64_t>(end - p)) return false;
    out = {reinterpret_cast<const char*>(p), static_cast<std::size_t>(n)};
    p += n;
    return true;
  }
};

// Field kinds of the two peeked messages: a string to check, bytes to skip,
// or a varint to keep.
enum class field { string, bytes, varint };

// Reads one message body into `out`; false for anything unusual.
template <typename Known>
bool peek_fields(std::string_view body, hot_envelope& out, Known known) {
  wire_reader r{body};
  while (!r.done()) {
    std::uint64_t tag;
    if (!r.varint(tag)) return false;
    auto number = tag >> 3;
    auto wire = tag & 7;
    field f;
    if (number > 15 || !known(static_cast<int>(number), f)) return false;  // unknown: the parser keeps it
    if (f == field::varint) {
      std::uint64_t v;
      if (wire != 0 || !r.varint(v)) return false;
      if (out.kind == Envelope::kRequest) {
        if (number == 8) out.wants_reply = v != 0;
        if (number == 9) out.timeout_ms = static_cast<std::uint32_t>(v);
        if (number == 10) out.attempt = static_cast<std::uint32_t>(v);
      } else {
        if (number == 2) out.code = static_cast<Code>(static_cast<std::int32_t>(v));
        if (number == 7) out.partial = v != 0;  // 6, silent, is not needed for routing
      }
      continue;
    }
    std::string_view value;
    if (wire != 2 || !r.length_delimited(value)) return false;
    if (f == field::string && !core::valid_utf8(value)) return false;
    if (number == 1) out.id = value;
    if (number == 2 && out.kind == Envelope::kRequest) out.service = value;
    if (number == 3 && out.kind == Envelope::kRequest) out.sid = value;
  }
  return true;
}

}  // namespace

hot_envelope peek(std::string_view bytes) {
  hot_envelope out;
  wire_reader r{bytes};
  std::uint64_t tag;
  std::string_view body;
  if (!r.varint(tag) || !r.length_delimited(body) || !r.done()) return out;
  bool ok = false;
  if (tag == (Envelope::kRequest << 3 | 2)) {
    out.kind = Envelope::kRequest;
    ok = peek_fields(body, out, [](int n, field& f) {
      switch (n) {
        case 1: case 2: case 3: case 4: case 5: case 11: f = field::string; return true;
        case 6: case 7: case 12: f = field::bytes; return true;
        case 8: case 9: case 10: f = field::varint; return true;
        default: return false;
      }
    });
  } else if (tag == (Envelope::kReply << 3 | 2)) {
    out.kind = Envelope::kReply;
    ok = peek_fields(body, out, [](int n, field& f) {
      switch (n) {
        case 1: case 3: f = field::string; return true;
        case 4: case 5: f = field::bytes; return true;
        case 2: case 6: case 7: f = field::varint; return true;
        default: return false;
      }
    });
  }
  return ok ? out : hot_envelope{};
}

std::string encode(const Envelope& env) { return env.SerializeAsString(); }

namespace {

std::optional<std::string_view> body_of(std::string_view bytes, Envelope::KindCase kind) {
  wire_reader r{bytes};
  std::uint64_t tag;
  std::string_view body;
  if (!r.varint(tag) || tag != (static_cast<std::uint64_t>(kind) << 3 | 2) || !r.length_delimited(body) || !r.done())
    return std::nullopt;
  return body;
}

}  // namespace

std::optional<std::string_view> request_body(std::string_view bytes) { return body_of(bytes, Envelope::kRequest); }
std::optional<std::string_view> reply_body(std::string_view bytes) { return body_of(bytes, Envelope::kReply); }

namespace {

std::size_t varint_size(std::uint64_t v) {
  std::size_t n = 1;
  for (; v >= 0x80; v >>= 7) ++n;
  return n;
}

// Measures, then writes, the fields of a Request or a Reply; every field
// number is below 16, so every tag is one byte.
struct wire_sizer {
  std::size_t n = 0;
  void bytes(int, std::string_view v, bool always = false) {
    if (!v.empty() || always) n += 1 + varint_size(v.size()) + v.size();
  }
  void varint(int, std::uint64_t v) {
    if (v != 0) n += 1 + varint_size(v);
  }
};

struct wire_writer {
  char* p;
  void raw_varint(std::uint64_t v) {
    for (; v >= 0x80; v >>= 7) *p++ = static_cast<char>(v | 0x80);
    *p++ = static_cast<char>(v);
  }
  void bytes(int number, std::string_view v, bool always = false) {
    if (v.empty() && !always) return;
    *p++ = static_cast<char>(number << 3 | 2);
    raw_varint(v.size());
    if (!v.empty()) p = std::copy(v.begin(), v.end(), p);
  }
  void varint(int number, std::uint64_t v) {
    if (v == 0) return;
    *p++ = static_cast<char>(number << 3);
    raw_varint(v);
  }
};

template <typename Wire>
void write_fields(const request_fields& r, Wire& w) {
  w.bytes(1, r.id);
  w.bytes(2, r.service);
  w.bytes(3, r.sid);
  w.bytes(4, r.nsp);
  w.bytes(5, r.event);
  w.bytes(6, r.args);
  for (const auto& a : r.attachments) w.bytes(7, a, true);  // a repeated field keeps empty elements
  w.varint(8, r.wants_reply);
  w.varint(9, r.timeout_ms);
  w.varint(10, r.attempt);
  w.bytes(11, r.user);
  w.bytes(12, r.auth);
}

template <typename Wire>
void write_fields(const reply_fields& r, Wire& w) {
  w.bytes(1, r.id);
  w.varint(2, static_cast<std::uint64_t>(static_cast<std::int64_t>(r.code)));  // an enum is an int32
  w.bytes(3, r.message);
  w.bytes(4, r.args);
  for (const auto& a : r.attachments) w.bytes(5, a, true);
  w.varint(6, r.silent);
  w.varint(7, r.partial);
}

template <typename Fields>
std::size_t body_size(const Fields& f) {
  wire_sizer s;
  write_fields(f, s);
  return s.n;
}

// Envelope{kind: fields}: the oneof's tag, the body's length, the body.
template <typename Fields>
char* encode_envelope(int kind, const Fields& f, char* out) {
  wire_writer w{out};
  *w.p++ = static_cast<char>(kind << 3 | 2);
  w.raw_varint(body_size(f));
  write_fields(f, w);
  return w.p;
}

template <typename Fields>
std::size_t envelope_size(const Fields& f) {
  auto body = body_size(f);
  return 1 + varint_size(body) + body;
}

}  // namespace

std::size_t encoded_size(const request_fields& request) { return envelope_size(request); }
char* encode_request(const request_fields& request, char* out) {
  return encode_envelope(Envelope::kRequest, request, out);
}

std::size_t encoded_size(const reply_fields& reply) { return envelope_size(reply); }
char* encode_reply(const reply_fields& reply, char* out) { return encode_envelope(Envelope::kReply, reply, out); }

hot_envelope head_of(const Envelope& env) {
  hot_envelope out;
  out.kind = env.kind_case();
  if (env.has_request()) {
    const auto& r = env.request();
    out.id = r.id();
    out.service = r.service();
    out.sid = r.sid();
    out.timeout_ms = r.timeout_ms();
    out.attempt = r.attempt();
    out.wants_reply = r.wants_reply();
  } else if (env.has_lifecycle()) {
    const auto& l = env.lifecycle();
    out.id = l.id();
    out.service = l.service();
    out.sid = l.sid();
    out.timeout_ms = l.timeout_ms();
    out.attempt = l.attempt();
    out.wants_reply = l.kind() == Lifecycle::CONNECT;
  } else if (env.has_reply()) {
    const auto& r = env.reply();
    out.id = r.id();
    out.code = r.code();
    out.partial = r.partial();
  }
  return out;
}

std::string_view kind_name(const Envelope& env) { return kind_name(env.kind_case()); }

std::string_view kind_name(Envelope::KindCase kind) {
  switch (kind) {
    case Envelope::kHello: return "hello";
    case Envelope::kWelcome: return "welcome";
    case Envelope::kHeartbeat: return "heartbeat";
    case Envelope::kRequest: return "request";
    case Envelope::kReply: return "reply";
    case Envelope::kEmit: return "emit";
    case Envelope::kControl: return "control";
    case Envelope::kLifecycle: return "lifecycle";
    case Envelope::kCancel: return "cancel";
    case Envelope::kReport: return "report";
    case Envelope::kError: return "error";
    case Envelope::kForward: return "forward";
    case Envelope::kAnswer: return "answer";
    case Envelope::kDrain: return "drain";
    case Envelope::kGoodbye: return "goodbye";
    case Envelope::kRecall: return "recall";
    case Envelope::kGatewayGone: return "gateway_gone";
    case Envelope::KIND_NOT_SET: break;
  }
  return "none";
}

std::string rooms_prefix(std::string_view nsp) {
  std::string t;
  t.reserve(nsp.size() + 2);
  t += 'r';
  t += nsp;
  t += '\0';
  return t;
}

std::string room_topic(std::string_view nsp, std::string_view room) {
  auto t = rooms_prefix(nsp);
  t += room;
  t += '\0';
  return t;
}

std::string_view room_of_topic(std::string_view topic, std::string_view nsp) {
  topic.remove_prefix(std::min(topic.size(), nsp.size() + 2));  // 'r', nsp, '\0'
  if (!topic.empty()) topic.remove_suffix(1);                    // '\0'
  return topic;
}

std::string namespace_topic(std::string_view nsp) {
  std::string t;
  t.reserve(nsp.size() + 2);
  t += 'n';
  t += nsp;
  t += '\0';
  return t;
}

namespace {

void put_le64(std::uint64_t v, char* out) {
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((v >> (8 * i)) & 0xff);
}

std::uint64_t get_le64(const char* in) {
  std::uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v |= std::uint64_t{static_cast<unsigned char>(in[i])} << (8 * i);
  return v;
}

}  // namespace

void encode_stamp(const event_stamp& stamp, std::span<char, event_stamp_bytes> out) {
  put_le64(stamp.stream, out.data());
  put_le64(stamp.seq, out.data() + 8);
}

std::optional<event_stamp> decode_stamp(std::string_view bytes) {
  if (bytes.size() != event_stamp_bytes) return std::nullopt;
  event_stamp stamp{get_le64(bytes.data()), get_le64(bytes.data() + 8)};
  if (stamp.stream == 0) return std::nullopt;
  return stamp;
}

std::uint64_t heard_stream::missed_before(const event_stamp& stamp) {
  // The same stream, further on: the numbers between were lost. Anything
  // else (another stream, or a number not past the last, which one XPUB
  // pipe never delivers) starts counting again from this event.
  std::uint64_t missed = 0;
  if (stamp.stream == last_.stream && stamp.seq > last_.seq) missed = stamp.seq - last_.seq - 1;
  last_ = stamp;
  return missed;
}

std::string topic_for(const Emit& emit) {
  switch (emit.to_case()) {
    case Emit::kRoom: return room_topic(emit.nsp(), emit.room());
    case Emit::kBroadcast: return namespace_topic(emit.nsp());
    default: return {};
  }
}

std::string topic_for(const Control& control) {
  if (control.nsp().empty()) return {};  // names no namespace: no gateway has it
  switch (control.to_case()) {
    case Control::kInRoom: return room_topic(control.nsp(), control.in_room());
    case Control::kInNamespace: return control.in_namespace() ? namespace_topic(control.nsp()) : std::string{};
    default: return {};
  }
}

bool valid_peer_id(std::string_view id) {
  return !id.empty() && id.size() <= 64 && id.find_first_of(".:\0"sv) == std::string_view::npos;
}

bool valid_sid_prefix(std::string_view id, std::string_view prefix) {
  if (!prefix.starts_with(id) || prefix.size() <= id.size() + 1 || prefix[id.size()] != '.') return false;
  auto tag = prefix.substr(id.size() + 1);
  return tag.size() <= 32 && std::all_of(tag.begin(), tag.end(), [](char c) {
           return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' || c == '_';
         });
}

std::string_view sid_owner(std::string_view sid) {
  auto dot = sid.find('.');
  return dot == std::string_view::npos ? std::string_view{} : sid.substr(0, dot);
}

std::string_view id_owner(std::string_view id) {
  auto colon = id.find(':');
  return colon == std::string_view::npos ? std::string_view{} : id.substr(0, colon);
}

}  // namespace sidecast::proto
