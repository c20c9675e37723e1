#include "workers/chat/chat.hpp"

#include <sqlite3.h>

#include <atomic>
#include <chrono>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <vector>

#include <boost/json.hpp>
#include <spdlog/spdlog.h>

#include "core/log.hpp"
#include "core/metrics.hpp"
#include "core/utf8.hpp"

namespace sidecast::workers {
namespace json = boost::json;

namespace {

constexpr std::size_t max_text = 2000, max_name = 32, max_room = 64;

// A database that stayed locked (by another process) past its busy
// timeout is answered BUSY, to try again, not INTERNAL.
[[noreturn]] void throw_sqlite(sqlite3* db, int rc) {
  std::string why = std::string{"sqlite: "} + sqlite3_errmsg(db);
  if ((rc & 0xff) == SQLITE_BUSY || (rc & 0xff) == SQLITE_LOCKED)
    throw answer_error{proto::BUSY, "the chat database is busy: try again (" + why + ")"};
  throw std::runtime_error(why);
}

// One connection in serialized mode shared by the handler threads; the
// statements it runs are short.
class database {
 public:
  database(const std::string& path, std::chrono::milliseconds busy_timeout) {
    if (sqlite3_open_v2(path.c_str(), &db_, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_FULLMUTEX,
                        nullptr) != SQLITE_OK) {
      std::string why = db_ ? sqlite3_errmsg(db_) : "out of memory";
      sqlite3_close(db_);
      throw std::runtime_error("chat database " + path + ": " + why);
    }
    sqlite3_busy_timeout(db_, static_cast<int>(busy_timeout.count()));
    try {
      set_up();
    } catch (const std::exception& e) {
      sqlite3_close(db_);  // no destructor for an object whose constructor threw
      throw std::runtime_error("chat database " + path + ": " + e.what());
    }
  }
  ~database() { sqlite3_close(db_); }
  database(const database&) = delete;
  database& operator=(const database&) = delete;

 private:
  // The tables (created, or brought up to this build's), after a check
  // that the file is sound: a damaged one is refused at start, where an
  // operator reads why, instead of failing event after event.
  void set_up() {
    check_integrity();
    exec("PRAGMA journal_mode=WAL");
    exec("PRAGMA synchronous=NORMAL");
    // A room is a namespace's (as Socket.IO's rooms are): its history and
    // members are those of the socket's namespace, when one chat worker
    // serves several (--route /a=chat --route /b=chat).
    exec(R"(CREATE TABLE IF NOT EXISTS messages (
              id INTEGER PRIMARY KEY AUTOINCREMENT, room TEXT NOT NULL, nick TEXT NOT NULL,
              sid TEXT NOT NULL, text TEXT NOT NULL, ts INTEGER NOT NULL, nsp TEXT NOT NULL DEFAULT ''))");
    // Messages stored by an earlier build, which did not keep the namespace,
    // have nsp '' and belong to their room in every namespace (legacy_nsp).
    add_column("messages", "nsp", "TEXT NOT NULL DEFAULT ''");
    exec("CREATE INDEX IF NOT EXISTS messages_room ON messages(room, id)");
    // The request id of the say that stored a message: a say run again (its
    // worker died after the commit, before its answer reached the broker,
    // and the broker gave it to another worker) finds its message there
    // instead of storing it twice. With the socket's sid: a gateway under
    // a pinned id draws its request ids anew at each start, and one may
    // meet an id of a message kept from an earlier start; a sid carries
    // 132 random bits. NULL in rows of earlier builds (NULLs are distinct
    // under UNIQUE).
    add_column("messages", "req_id", "TEXT");
    exec("CREATE UNIQUE INDEX IF NOT EXISTS messages_sid_req ON messages(sid, req_id)");
    // Presence and nicknames describe live sockets: kept across a restart,
    // and checked with their gateways at each Welcome (see sweep).
    exec("CREATE TABLE IF NOT EXISTS nicks (sid TEXT PRIMARY KEY, nick TEXT NOT NULL)");
    exec("CREATE TABLE IF NOT EXISTS presence (sid TEXT NOT NULL, room TEXT NOT NULL, nsp TEXT NOT NULL DEFAULT '/', "
         "PRIMARY KEY (sid, room))");
    add_column("presence", "nsp", "TEXT NOT NULL DEFAULT '/'");  // to a database of an earlier build
    // A room's members (members_of) without a scan of every socket's rows.
    exec("DROP INDEX IF EXISTS presence_room");  // an earlier build's, on the room alone
    exec("CREATE INDEX IF NOT EXISTS presence_nsp_room ON presence(nsp, room)");
    // Sockets that disconnected, for ten minutes: a join or nick of one
    // that a handler thread runs after its disconnect (they run on the
    // pool, in no set order) is refused, not left as a ghost member.
    exec("CREATE TABLE IF NOT EXISTS gone (sid TEXT PRIMARY KEY, at INTEGER NOT NULL)");
    exec("CREATE INDEX IF NOT EXISTS gone_at ON gone(at)");
    // The same for every socket of a gateway the broker announced gone
    // (on_gateway_gone): by its sid prefix.
    exec("CREATE TABLE IF NOT EXISTS gone_prefixes (prefix TEXT PRIMARY KEY, at INTEGER NOT NULL)");
  }
  // quick_check reads every page (O(file size): 0.3 s for a million
  // messages, the default --chat-keep-total, 228 MB in the page cache) but
  // not the indexes' agreement with their tables; it finds pages that
  // cannot be read as the tree they belong to.
  void check_integrity() {
    auto check = prepare("PRAGMA quick_check(5)");
    std::string problems;
    while (check.step()) {
      auto line = check.text(0);
      if (line == "ok") return;
      problems += (problems.empty() ? "" : "; ") + line;
    }
    throw std::runtime_error("the file is damaged (PRAGMA quick_check: " + problems +
                             "); restore it from a backup, or move it away to start with an empty history");
  }

 public:

  void exec(const char* sql) {
    if (int rc = sqlite3_exec(db_, sql, nullptr, nullptr, nullptr); rc != SQLITE_OK) throw_sqlite(db_, rc);
  }
  bool has_column(const std::string& table, const std::string& column) {
    return prepare("SELECT 1 FROM pragma_table_info(?) WHERE name = ?").bind(1, table).bind(2, column).step();
  }
  // Unless the table has it. Two workers of a shared database may both
  // start on one of an earlier build: the one that lost the race finds the
  // column there.
  void add_column(const std::string& table, const std::string& column, const std::string& type) {
    if (has_column(table, column)) return;
    auto sql = "ALTER TABLE " + table + " ADD COLUMN " + column + " " + type;
    if (int rc = sqlite3_exec(db_, sql.c_str(), nullptr, nullptr, nullptr); rc != SQLITE_OK && !has_column(table, column))
      throw_sqlite(db_, rc);
  }

  // A prepared statement with text/int binds and row access.
  class statement {
   public:
    statement(sqlite3* db, const char* sql) {
      if (int rc = sqlite3_prepare_v2(db, sql, -1, &stmt_, nullptr); rc != SQLITE_OK) throw_sqlite(db, rc);
    }
    ~statement() { sqlite3_finalize(stmt_); }
    statement(const statement&) = delete;  // one finalize (prepare() returns it in place)
    statement& operator=(const statement&) = delete;
    statement& bind(int i, const std::string& v) {
      sqlite3_bind_text(stmt_, i, v.data(), static_cast<int>(v.size()), SQLITE_TRANSIENT);
      return *this;
    }
    statement& bind(int i, std::int64_t v) {
      sqlite3_bind_int64(stmt_, i, v);
      return *this;
    }
    bool step() {
      int rc = sqlite3_step(stmt_);
      if (rc == SQLITE_ROW) return true;
      if (rc != SQLITE_DONE) throw_sqlite(sqlite3_db_handle(stmt_), rc);
      return false;
    }
    std::string text(int col) {
      auto* p = reinterpret_cast<const char*>(sqlite3_column_text(stmt_, col));
      return p ? std::string{p, static_cast<std::size_t>(sqlite3_column_bytes(stmt_, col))} : std::string{};
    }
    std::int64_t integer(int col) { return sqlite3_column_int64(stmt_, col); }

   private:
    sqlite3_stmt* stmt_ = nullptr;
  };

  statement prepare(const char* sql) { return statement{db_, sql}; }
  statement prepare(const std::string& sql) { return statement{db_, sql.c_str()}; }

  // Statements that stand or fall together: committed by commit(), rolled
  // back if it is never called (an exception on the way).
  class transaction {
   public:
    explicit transaction(database& db) : db_{db} { db_.exec("BEGIN IMMEDIATE"); }
    ~transaction() {
      if (!done_) sqlite3_exec(db_.db_, "ROLLBACK", nullptr, nullptr, nullptr);
    }
    transaction(const transaction&) = delete;
    transaction& operator=(const transaction&) = delete;
    void commit() {
      db_.exec("COMMIT");
      done_ = true;
    }

   private:
    database& db_;
    bool done_ = false;
  };

  std::int64_t last_id() { return sqlite3_last_insert_rowid(db_); }
  std::int64_t changes() { return sqlite3_changes(db_); }  // rows the last statement deleted (or changed)
  // Serializes multi-statement operations (insert then read the row id).
  std::mutex mutex;

 private:
  sqlite3* db_ = nullptr;
};

constexpr std::int64_t gone_kept_ms = 10 * 60 * 1000;

std::int64_t now_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}
constexpr const char* kGone = "the socket has disconnected";

// Gone within gone_kept_ms (older rows wait for the next insert's prune:
// past that they refuse nothing, or a gateway announced by one broker that
// came back to another would have its users refused until then).
bool is_gone(database& db, const std::string& sid) {
  auto since = now_ms() - gone_kept_ms;
  auto s = db.prepare("SELECT 1 FROM gone WHERE sid = ? AND at >= ?");
  s.bind(1, sid).bind(2, since);
  if (s.step()) return true;
  auto p = db.prepare("SELECT 1 FROM gone_prefixes WHERE substr(?, 1, length(prefix)) = prefix AND at >= ?");
  p.bind(1, sid).bind(2, since);
  return p.step();
}

// The first string past every one that begins with `prefix` (a sid prefix:
// ASCII, so its last byte has a successor): sids of a gateway are the range
// [prefix, prefix_end(prefix)), which the tables' sid keys answer without a scan.
std::string prefix_end(std::string prefix) {
  ++prefix.back();
  return prefix;
}

std::string nick_of(database& db, const std::string& sid) {
  auto s = db.prepare("SELECT nick FROM nicks WHERE sid = ?");
  s.bind(1, sid);
  return s.step() ? s.text(0) : "guest-" + sid.substr(sid.size() > 4 ? sid.size() - 4 : 0);
}

// The members of `room` in namespace `nsp`.
json::array members_of(database& db, const std::string& nsp, const std::string& room) {
  auto s = db.prepare(
      "SELECT p.sid, coalesce(n.nick, '') FROM presence p LEFT JOIN nicks n ON n.sid = p.sid "
      "WHERE p.nsp = ? AND p.room = ? ORDER BY 2");
  s.bind(1, nsp).bind(2, room);
  json::array out;
  while (s.step()) {
    auto sid = s.text(0);
    auto nick = s.text(1);
    out.push_back(json::string{nick.empty() ? "guest-" + sid.substr(sid.size() > 4 ? sid.size() - 4 : 0) : nick});
  }
  return out;
}

// A presence event's (and a join's answer's) arguments: the room's members.
std::string presence_args(const std::string& room, json::array members) {
  return json::serialize(json::array{json::object{{"room", room}, {"members", std::move(members)}}});
}

void announce_presence(request& req, database& db, const std::string& room) {
  req.emit_to_room(room, "presence", presence_args(room, members_of(db, req.nsp(), room)));
}

// The messages of a room as namespace `nsp` sees it: its own, and those an
// earlier build stored without a namespace.
constexpr const char* kRoomMessages = "room = ?1 AND nsp IN (?2, '')";

using rooms_of_sockets = std::vector<std::pair<std::string, std::string>>;  // nsp, room

// The sockets `where` names (a condition on `sid` with the parameters
// `params`) leave every room and lose their nicknames. Returns the rooms
// they were in, each once.
rooms_of_sockets forget_sockets(database& db, const std::string& where, const std::vector<std::string>& params) {
  auto run = [&](const std::string& sql, auto&& each_row) {
    auto s = db.prepare(sql);
    for (std::size_t i = 0; i < params.size(); ++i) s.bind(static_cast<int>(i + 1), params[i]);
    while (s.step()) each_row(s);
  };
  rooms_of_sockets rooms;
  run("SELECT DISTINCT nsp, room FROM presence WHERE " + where,
      [&](database::statement& s) { rooms.emplace_back(s.text(0), s.text(1)); });
  run("DELETE FROM presence WHERE " + where, [](database::statement&) {});
  run("DELETE FROM nicks WHERE " + where, [](database::statement&) {});
  return rooms;
}

// Socket `sid` is gone: it leaves its rooms, and a late join or nick of it
// is refused for gone_kept_ms. Returns its rooms. One transaction, as a
// join's check and insert are: with two chat workers on one database, a
// join on one could otherwise read "not gone" before the other's DELETE
// and insert its row after it (a ghost member); and a read that turns
// into a write (the SELECT, then the DELETE) is refused BUSY at once when
// another process writes, where BEGIN IMMEDIATE waits the busy timeout.
rooms_of_sockets forget_gone(database& db, const std::string& sid) {
  database::transaction tx{db};
  auto rooms = forget_sockets(db, "sid = ?", {sid});
  auto now = now_ms();
  db.prepare("INSERT OR REPLACE INTO gone(sid, at) VALUES(?, ?)").bind(1, sid).bind(2, now).step();
  db.prepare("DELETE FROM gone WHERE at < ?").bind(1, now - gone_kept_ms).step();
  tx.commit();
  return rooms;
}

// 1 to `limit` characters, as the limits the clients are told count them
// (a 32-character Cyrillic nickname is 64 bytes).
bool fits(std::string_view s, std::size_t limit) { return !s.empty() && core::code_points(s) <= limit; }

// The first argument as a bounded, non-empty string.
std::optional<std::string> string_arg(const json::array& args, std::size_t limit) {
  if (args.empty() || !args[0].is_string()) return std::nullopt;
  std::string s{args[0].as_string()};
  if (!fits(s, limit)) return std::nullopt;
  return s;
}

// What a sweep found of each socket it checked (the metric's label values).
struct sweep_counts {
  prometheus::Counter *present, *gone, *no_gateway, *unknown;
  prometheus::Counter* of(socket_state state) const {
    switch (state) {
      case socket_state::present: return present;
      case socket_state::gone: return gone;
      case socket_state::no_gateway: return no_gateway;
      case socket_state::unknown: return unknown;
    }
    return unknown;
  }
};

// After a Welcome: every socket the presence and nickname tables name is
// checked with its gateway (worker::check_socket), kBatch at a time in sid
// order, so that memory and the checks in flight stay bounded whatever the
// tables hold. A socket its gateway does not have leaves its rooms, as at a
// disconnect (its DISCONNECT was lost: it ended while no chat worker ran, or
// the broker that held it died), and its rooms hear it. One whose sid no
// live gateway owns leaves too, without being remembered as gone: just
// after a broker restart its gateway may not be back yet, and its socket
// may join again. An unknown answer keeps the rows.
class sweep : public std::enable_shared_from_this<sweep> {
 public:
  static constexpr std::int64_t kBatch = 256;

  sweep(std::shared_ptr<database> db, welcome w, std::optional<sweep_counts> counts)
      : db_{std::move(db)}, welcome_{std::move(w)}, counts_{counts} {}

  void next() {
    std::vector<std::string> sids;
    try {
      std::lock_guard lock{db_->mutex};
      auto s = db_->prepare("SELECT sid FROM presence WHERE sid > ?1 UNION SELECT sid FROM nicks WHERE sid > ?1 "
                            "ORDER BY 1 LIMIT ?2");
      s.bind(1, cursor_).bind(2, kBatch);
      while (s.step()) sids.push_back(s.text(0));
    } catch (const std::exception& e) {  // the database locked past its busy timeout, say
      spdlog::warn("chat: the check of its sockets stopped: {}", e.what());
      stopped_ = true;
    }
    if (sids.empty() || stopped_) return finish();
    cursor_ = sids.back();
    checked_ += sids.size();
    in_flight_ = sids.size();
    for (const auto& sid : sids) {
      auto self = shared_from_this();
      if (!stopped_ && welcome_.check_socket("", sid, [self, sid](socket_state state) { self->settled(sid, state); }))
        continue;
      // Refused: this one and the rest stay as they are.
      if (!stopped_.exchange(true))
        spdlog::warn("chat: a socket check was not sent (the outbox stayed full, --pending-acks-limit checks were "
                     "awaited, or the worker stops): the sockets not checked yet stay in their rooms");
      settled(sid, socket_state::unknown);
    }
  }

 private:
  void settled(const std::string& sid, socket_state state) {
    if (state == socket_state::present) {
      // Here after all: a gateway announced gone by one broker that came
      // back to another (no Welcome told it to renew its prefix) keeps its
      // sockets; a join of one is not refused.
      try {
        std::lock_guard lock{db_->mutex};
        db_->prepare("DELETE FROM gone_prefixes WHERE substr(?, 1, length(prefix)) = prefix").bind(1, sid).step();
      } catch (const std::exception&) {  // kept: it lapses in gone_kept_ms
      }
    }
    if (state == socket_state::gone || state == socket_state::no_gateway) {
      try {
        std::lock_guard lock{db_->mutex};
        rooms_of_sockets rooms;
        if (state == socket_state::gone) {
          rooms = forget_gone(*db_, sid);
        } else {
          database::transaction tx{*db_};  // a read, then writes (see forget_gone)
          rooms = forget_sockets(*db_, "sid = ?", {sid});
          tx.commit();
        }
        ++forgotten_;
        for (const auto& [nsp, room] : rooms)
          welcome_.emit_to_room(nsp, room, "presence", presence_args(room, members_of(*db_, nsp, room)));
      } catch (const std::exception& e) {  // kept, as an unknown one: the batch goes on
        state = socket_state::unknown;
        std::lock_guard lock{db_->mutex};
        if (log_limit_.allow()) spdlog::warn("chat: socket {} not forgotten: {}", sid, e.what());
      }
    }
    if (counts_) counts_->of(state)->Increment();
    if (--in_flight_ == 0) next();
  }

  void finish() {
    if (checked_ > 0)
      spdlog::info("chat: checked {} sockets with their gateways after the broker's Welcome: {} gone, forgotten{}",
                   checked_, forgotten_.load(), stopped_ ? " (stopped early: see the warnings before)" : "");
  }

  std::shared_ptr<database> db_;
  welcome welcome_;
  std::optional<sweep_counts> counts_;
  std::string cursor_;                   // the last sid of the batch checked last
  std::size_t checked_ = 0;              // next() only, which one batch's last answer calls
  std::atomic<std::size_t> in_flight_{0};
  std::atomic<std::size_t> forgotten_{0};
  std::atomic<bool> stopped_{false};
  core::log_limiter log_limit_;  // under db_->mutex
};

}  // namespace

service chat_service(unsigned capacity, chat_options options, std::shared_ptr<prometheus::Registry> metrics) {
  auto db = std::make_shared<database>(options.database, options.busy_timeout);
  prometheus::Counter* pruned = nullptr;  // owned by `metrics`, which the lambdas keep
  if (metrics)
    pruned = &core::counter(*metrics, "sidecast_chat_messages_pruned_total",
                            "Chat messages deleted to keep --chat-keep per room and --chat-keep-total in all");
  prometheus::Counter* refused_joins = nullptr;
  if (metrics)
    refused_joins = &core::counter(*metrics, "sidecast_chat_joins_refused_total",
                                   "Chat joins refused: the socket was in --chat-max-rooms rooms already");
  std::optional<sweep_counts> checked;
  if (metrics) {
    auto& f = core::counters(*metrics, "sidecast_chat_sockets_checked_total",
                             "Sockets of the presence and nickname tables checked with their gateways after a "
                             "Welcome, by what was found (gone and no_gateway: forgotten)");
    checked = sweep_counts{&f.Add({{"found", "present"}}), &f.Add({{"found", "gone"}}),
                           &f.Add({{"found", "no_gateway"}}), &f.Add({{"found", "unknown"}})};
  }
  auto history = options.history;
  auto max_rooms = static_cast<std::int64_t>(options.max_rooms);
  auto keep_per_room = static_cast<std::int64_t>(options.keep_per_room);
  auto keep_total = options.keep_total;
  return service{"chat", capacity}
      .on("nick",
          [db](request req) {
            auto name = string_arg(req.args(), max_name);
            if (!name) return (void)req.fail(proto::BAD_REQUEST, "a nickname is 1-32 characters");
            {
              std::lock_guard lock{db->mutex};
              database::transaction tx{*db};  // the check and the insert (see forget_gone)
              if (is_gone(*db, req.sid())) return (void)req.fail(proto::REFUSED, kGone);
              db->prepare("INSERT INTO nicks(sid, nick) VALUES(?, ?) ON CONFLICT(sid) DO UPDATE SET nick = excluded.nick")
                  .bind(1, req.sid())
                  .bind(2, *name)
                  .step();
              tx.commit();
            }
            req.reply(json::serialize(json::array{json::object{{"nick", *name}}}));
          })
      .on("join",
          [db, history, max_rooms, refused_joins](request req) {
            auto room = string_arg(req.args(), max_room);
            if (!room) return (void)req.fail(proto::BAD_REQUEST, "a room is 1-64 characters");
            json::array messages, members;
            // Held to the presence event: a disconnect's own presence, made
            // under the lock, then comes after this one, never before it with
            // this one's list (the gone socket in it) the last the room sees.
            std::lock_guard lock{db->mutex};
            {
              // The gone check, the room count and the insert in one
              // transaction (see forget_gone): across processes a join
              // racing its socket's disconnect left a ghost member, and the
              // count's read turning into the insert's write was answered
              // BUSY at once while another process wrote, not after the
              // busy timeout.
              database::transaction tx{*db};
              if (is_gone(*db, req.sid())) return (void)req.fail(proto::REFUSED, kGone);
              // A presence row per room the socket names, bounded: past it a
              // client naming room after room grew the table without end (the
              // gateway's --max-rooms refuses the join there, but this table
              // had kept the row, and the socket showed in the room's list).
              std::int64_t rooms_in = 0, in_this = 0;
              {
                auto in = db->prepare("SELECT count(*), coalesce(sum(room = ?), 0) FROM presence WHERE sid = ?");
                in.bind(1, *room).bind(2, req.sid());
                in.step();
                rooms_in = in.integer(0);
                in_this = in.integer(1);
              }
              if (rooms_in >= max_rooms && in_this == 0) {
                if (refused_joins) refused_joins->Increment();
                return (void)req.fail(proto::REFUSED, "in too many rooms (at most " + std::to_string(max_rooms) + ")");
              }
              db->prepare("INSERT OR IGNORE INTO presence(sid, room, nsp) VALUES(?, ?, ?)")
                  .bind(1, req.sid())
                  .bind(2, *room)
                  .bind(3, req.nsp())
                  .step();
              {
                auto s = db->prepare(std::string{"SELECT id, nick, text, ts FROM (SELECT * FROM messages WHERE "} +
                                     kRoomMessages + " ORDER BY id DESC LIMIT ?3) ORDER BY id");
                s.bind(1, *room).bind(2, req.nsp()).bind(3, static_cast<std::int64_t>(history));
                while (s.step())
                  messages.push_back(json::object{{"id", s.integer(0)}, {"room", *room}, {"nick", s.text(1)},
                                                  {"text", s.text(2)}, {"ts", s.integer(3)}});
              }
              members = members_of(*db, req.nsp(), *room);
              tx.commit();
            }
            req.join(*room);
            req.emit("history", json::serialize(json::array{json::object{{"room", *room}, {"messages", messages}}}));
            auto args = presence_args(*room, std::move(members));
            req.emit_to_room(*room, "presence", args);
            req.reply(args);
          })
      .on("leave",
          [db](request req) {
            auto room = string_arg(req.args(), max_room);
            if (!room) return (void)req.fail(proto::BAD_REQUEST, "a room is 1-64 characters");
            req.leave(*room);
            {
              std::lock_guard lock{db->mutex};
              db->prepare("DELETE FROM presence WHERE sid = ? AND room = ?").bind(1, req.sid()).bind(2, *room).step();
              // A leave of a room it was not in changes no one's list: no
              // presence event (a client could make any room hear one).
              if (db->changes() > 0) announce_presence(req, *db, *room);
            }
            req.reply(json::serialize(json::array{json::object{{"room", *room}}}));
          })
      .on("say",
          [db, keep_per_room, keep_total, metrics, pruned](request req) {
            auto args = req.args();
            const json::object* msg = !args.empty() && args[0].is_object() ? &args[0].as_object() : nullptr;
            auto* room = msg ? msg->if_contains("room") : nullptr;
            auto* text = msg ? msg->if_contains("text") : nullptr;
            if (!room || !room->is_string() || !fits(room->as_string(), max_room) || !text || !text->is_string() ||
                !fits(text->as_string(), max_text))
              return (void)req.fail(proto::BAD_REQUEST,
                                    "say needs {room, text}: a room of 1-64 characters, 1-2000 characters of text");
            std::string r{room->as_string()}, t{text->as_string()};
            std::int64_t id, ts = now_ms();
            std::string nick;
            bool retried = false;
            {
              std::lock_guard lock{db->mutex};
              // The message and the pruning it calls for, or none of it:
              // a message stored but answered with an error would be sent
              // again by a client that retries.
              database::transaction tx{*db};
              nick = nick_of(*db, req.sid());
              // Run before, up to its commit, by a worker that died before
              // its answer was sent (the broker then gives the request, same
              // id, to another worker): the message stored then is the
              // answer, and its event goes out again (same id, which a
              // client that saw the first drops).
              {
                auto stored = db->prepare("SELECT id, nick, ts FROM messages WHERE sid = ? AND req_id = ?");
                if (stored.bind(1, req.sid()).bind(2, req.id()).step()) {
                  id = stored.integer(0);
                  nick = stored.text(1);
                  ts = stored.integer(2);
                  retried = true;
                }
              }
              if (!retried) {
                db->prepare("INSERT INTO messages(room, nick, sid, text, ts, nsp, req_id) VALUES(?, ?, ?, ?, ?, ?, ?)")
                    .bind(1, r).bind(2, nick).bind(3, req.sid()).bind(4, t).bind(5, ts).bind(6, req.nsp())
                    .bind(7, req.id()).step();
                id = db->last_id();
              }
              // Bounded history: the room's newest keep_per_room, and ids
              // grow by one, so the newest keep_total of all.
              db->prepare(std::string{"DELETE FROM messages WHERE "} + kRoomMessages +
                          " AND id <= (SELECT id FROM messages WHERE " + kRoomMessages +
                          " ORDER BY id DESC LIMIT 1 OFFSET ?3)")
                  .bind(1, r).bind(2, req.nsp()).bind(3, keep_per_room).step();
              auto gone = db->changes();
              db->prepare("DELETE FROM messages WHERE id <= ?").bind(1, id - keep_total).step();
              gone += db->changes();
              tx.commit();
              if (pruned && gone > 0) pruned->Increment(static_cast<double>(gone));
              // Under the lock: this worker's messages reach the room in the
              // order of their ids (the order of its history).
              req.emit_to_room(r, "message", json::serialize(json::array{json::object{
                                                 {"id", id}, {"room", r}, {"nick", nick}, {"text", t}, {"ts", ts}}}));
            }
            req.reply(json::serialize(json::array{json::object{{"id", id}}}));
          })
      .on_disconnect([db](request req) {
        std::lock_guard lock{db->mutex};
        for (const auto& [nsp, room] : forget_gone(*db, req.sid())) announce_presence(req, *db, room);
      })
      .on_gateway_gone([db](const gateway_gone& g) {
        // Its sockets will never disconnect here: they leave every room at
        // once, and the rooms they were in hear the new member lists. The
        // announcement comes once: a database another process holds past
        // its busy timeout is tried three times (lost, its users would stay
        // in the lists until a Welcome's check).
        for (int attempt = 1;; ++attempt) {
          try {
            rooms_of_sockets rooms;
            std::lock_guard lock{db->mutex};
            {
              database::transaction tx{*db};
              rooms = forget_sockets(*db, "sid >= ? AND sid < ?", {g.sid_prefix(), prefix_end(g.sid_prefix())});
              auto now = now_ms();
              db->prepare("INSERT OR REPLACE INTO gone_prefixes(prefix, at) VALUES(?, ?)")
                  .bind(1, g.sid_prefix())
                  .bind(2, now)
                  .step();
              db->prepare("DELETE FROM gone_prefixes WHERE at < ?").bind(1, now - gone_kept_ms).step();
              tx.commit();
            }
            for (const auto& [nsp, room] : rooms)
              g.emit_to_room(nsp, room, "presence", presence_args(room, members_of(*db, nsp, room)));
            return;
          } catch (const answer_error& e) {
            if (e.code != proto::BUSY || attempt == 3) throw;
            spdlog::warn("chat: the sockets of gateway {} are not forgotten yet ({}): trying again", g.gateway(),
                         e.what());
          }
        }
      })
      .on_welcome([db, checked](const welcome& w) { std::make_shared<sweep>(db, w, checked)->next(); });
}

}  // namespace sidecast::workers
