#pragma once
// The `chat` service (namespace /chat): rooms, nicknames, messages kept in
// SQLite (WAL), the last 25 sent on join, presence per room. What is kept
// is bounded: the newest keep_per_room messages of a room, keep_total in all.
//
//   nick (name) (ack)            -> ack {nick}
//   join (room) (ack)            -> event history {room, messages: [...]} to the
//                                   socket, presence {room, members} to the room,
//                                   ack {room, members}
//   say {room, text} (ack)       -> message {id, room, nick, text, ts} to the room,
//                                   ack {id}
//   leave (room) (ack)           -> presence to the room (if the socket was in it), ack {room}
//   (disconnect)                 -> presence to every room the socket was in
//   (its gateway lost)           -> the same for every socket of that gateway
//   (the broker's Welcome)       -> each socket the tables name is checked with its
//                                   gateway (worker::check_socket); those gone leave
#include <chrono>
#include <memory>
#include <string>

#include <prometheus/registry.h>

#include "workers/sdk/worker.hpp"

namespace sidecast::workers {

struct chat_options {
  std::string database = "sidecast-chat.db";  // SQLite file; ":memory:" keeps nothing
  unsigned history = 25;                      // messages sent on join
  unsigned keep_per_room = 1000;              // older messages of a room are deleted as new ones come
  std::int64_t keep_total = 1000000;          // and the oldest of all past this many
  unsigned max_rooms = 256;                   // rooms one socket may be in (presence rows per socket)
  std::chrono::milliseconds busy_timeout{5000};  // a statement waits this long for a lock, then answers BUSY
};

/// Opens (and creates) the database; throws std::runtime_error when it cannot.
/// With a registry, counts the messages deleted to keep the bounds there
/// (sidecast_chat_messages_pruned_total) and the joins refused past
/// max_rooms (sidecast_chat_joins_refused_total), and the sockets checked
/// after a Welcome (sidecast_chat_sockets_checked_total{found}).
service chat_service(unsigned capacity, chat_options options, std::shared_ptr<prometheus::Registry> metrics = {});

}  // namespace sidecast::workers
