#pragma once
// What the ZeroMQ bridge delivers to: one Socket.IO namespace socket, one /ws
// connection or one HTTP API session. The bridge posts every call onto the
// sink's executor, so a sink is only ever touched by its own thread.
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "gateway/io.hpp"

#include "proto/codec.hpp"

namespace sidecast::gateway {

/// An event for clients, shared by every local receiver of a broadcast and
/// encoded at most once per wire format (thread-safe, lazily).
class outbound_event {
 public:
  outbound_event(std::string nsp, std::string event, std::string args, std::vector<std::string> attachments,
                 std::uint64_t offset = 0)
      : nsp_{std::move(nsp)},
        event_{std::move(event)},
        args_{std::move(args)},
        attachments_{std::move(attachments)},
        offset_{offset} {}

  const std::string& nsp() const { return nsp_; }
  const std::string& event() const { return event_; }
  const std::string& args() const { return args_; }  // JSON array text
  const std::vector<std::string>& attachments() const { return attachments_; }
  /// Position in the gateway's stream of events (increasing); a recoverable
  /// socket's client acknowledges events by it.
  std::uint64_t offset() const { return offset_; }

  /// The Engine.IO message "4<Socket.IO EVENT or BINARY_EVENT>" with no ack id;
  /// with `with_offset`, the offset is appended as a last string argument
  /// (Socket.IO connection-state recovery).
  const std::string& socketio_frame(bool with_offset = false) const;
  /// The /ws JSON frame {"event","data"[,"nsp"]}.
  const std::string& ws_frame() const;

 private:
  std::string nsp_, event_, args_;
  std::vector<std::string> attachments_;
  std::uint64_t offset_;
  mutable std::once_flag sio_once_, sio_offset_once_, ws_once_;
  mutable std::string sio_, sio_offset_, ws_;
};

/// A request's answer, as sinks take it: what they use of a proto::Reply,
/// its strings moved out of the envelope it came in (nothing copied).
struct reply_data {
  proto::Code code = proto::OK;
  std::string message;  // what went wrong, when code is not OK
  std::string args;     // JSON text (an array, for events)
  std::vector<std::string> attachments;
  bool silent = false;  // OK with nothing for the client (a worker that already acked)
  bool by_gateway = false;  // refused by this gateway before it reached the broker (gateway_busy())
};

/// The user a connect hook's answer names ({"user": "..."}), or "": the
/// sid's user from then on, unless a token named it first.
std::string user_named_by(std::string_view connect_answer);

/// Buffers for reply args. The bridge parses a Reply's args into a buffer
/// from spare_text() on its thread, and the session that has sent the ack
/// gives the buffer back on its own. With one I/O thread (the demo's
/// default) that is the same thread, and a reply's args then cost no
/// allocation. Per thread, at most 256 buffers of at most 16 KB.
inline std::vector<std::string>& spare_texts() {
  thread_local std::vector<std::string> spares;
  return spares;
}
inline std::string spare_text() {
  auto& spares = spare_texts();
  if (spares.empty()) return {};
  auto s = std::move(spares.back());
  spares.pop_back();
  return s;
}
inline void give_back(std::string&& s) {
  auto& spares = spare_texts();
  if (s.capacity() <= 15 || s.capacity() > 16 * 1024 || spares.size() >= 256) return;
  s.clear();
  spares.push_back(std::move(s));
}

class client_sink {
 public:
  virtual ~client_sink() = default;
  /// The executor every delivery is posted to.
  virtual io_executor executor() const = 0;
  /// An event for this socket; `ack_id` non-empty: the worker wants the
  /// client's ack. nullptr when the socket took it (queued for its client,
  /// held until its connect is answered, kept for its recovery); else why it
  /// was dropped (already counted, and an ack it wanted already refused).
  [[nodiscard]] virtual const char* deliver(std::shared_ptr<const outbound_event> event, std::string ack_id) = 0;
  /// The answer to a request this sink made with `tag`.
  virtual void deliver_reply(std::uint64_t tag, reply_data reply) = 0;
  /// A worker disconnected this socket.
  virtual void deliver_disconnect() = 0;
  /// The gateway is shutting down (gateway::drain): the socket ends, in the
  /// way that sends its client to another gateway, and its service gets
  /// the DISCONNECT. (A Socket.IO socket on a live transport ends when its
  /// Engine.IO session is closed: only a parked one does anything here.)
  virtual void shut_down() {}
};

}  // namespace sidecast::gateway
