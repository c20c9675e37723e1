#include "bench/loadgen/sio_client.hpp"

#include <netinet/in.h>

#include <charconv>
#include <cstring>
#include <memory>
#include <optional>
#include <deque>
#include <vector>

#include <boost/asio/connect.hpp>
#include <boost/asio/write.hpp>
#include <boost/beast/core/buffers_to_string.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/websocket.hpp>
#include <boost/json.hpp>

#include "gateway/codec/engineio.hpp"
#include "gateway/codec/socketio.hpp"

namespace sidecast::bench {

namespace beast = boost::beast;
namespace http = beast::http;
namespace websocket = beast::websocket;
namespace eio = gateway::engineio;
namespace sio = gateway::socketio;
using tcp = asio::ip::tcp;
using error_code = boost::system::error_code;

void sio_client::fail(std::string_view why) {
  if (closed_) return;
  closed_ = true;
  if (handlers_.on_close) handlers_.on_close(why);
}

void sio_client::on_eio_packet(std::string_view pkt) {
  if (pkt.empty()) return fail("empty Engine.IO packet");
  switch (pkt[0]) {
    case '2':  // ping: the server checks we are alive
      ++pings_;
      send_eio("3");
      return;
    case '4':
      break;
    case '0': {  // OPEN: learn the ping interval, then join namespace "/"
      auto open = eio::decode_text(pkt);
      error_code ec;
      auto v = open ? boost::json::parse(open->data, ec) : boost::json::value{};
      if (!open || ec || !v.is_object()) return fail("bad OPEN packet");
      if (auto* pi = v.as_object().if_contains("pingInterval"); pi && pi->is_number())
        ping_interval_ms_ = pi->to_number<unsigned>();
      send_eio("40");
      return;
    }
    case '1':
      return fail("Engine.IO close");
    case '6':  // noop (polling)
      return;
    default:
      return fail("unexpected Engine.IO packet");
  }
  std::string_view p = pkt.substr(1);
  if (p.empty()) return fail("empty Socket.IO packet");
  // Hot path: events and acks on "/" are read without a JSON parse; the
  // scenario looks only at the bytes it needs.
  if (p[0] == '2' && p.size() > 1 && p[1] == '[') {
    if (handlers_.on_event) handlers_.on_event(p.substr(1));
    return;
  }
  if (p[0] == '3') {
    std::uint64_t id = 0;
    auto [end, err] = std::from_chars(p.data() + 1, p.data() + p.size(), id);
    if (err != std::errc{} || end == p.data() + p.size() || *end != '[') return fail("bad ACK packet");
    if (handlers_.on_ack) handlers_.on_ack(id, std::string_view{end, static_cast<std::size_t>(p.data() + p.size() - end)});
    return;
  }
  auto decoded = sio::decode(p, 10);
  if (!decoded) return fail("bad Socket.IO packet");
  switch (decoded->type) {
    case sio::packet_type::connect:
      if (decoded->nsp == "/" && !ready_) {
        ready_ = true;
        if (handlers_.on_ready) handlers_.on_ready();
      }
      return;
    case sio::packet_type::connect_error:
      return fail("connect_error " + decoded->data);
    case sio::packet_type::disconnect:
      return fail("disconnected by the server");
    default:
      return;  // events with ack ids, other namespaces, binary: not used by the scenarios
  }
}

namespace {

// Opens `s` and binds it to `source` (port chosen at connect time, so ports
// are shared across destinations and the ephemeral range lasts longer).
error_code open_bound(tcp::socket& s, const client_options& o) {
  error_code ec;
  s.open(tcp::v4(), ec);
  if (ec) return ec;
  if (!o.source.is_unspecified()) {
    int one = 1;
    ::setsockopt(s.native_handle(), IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
    s.bind(tcp::endpoint{o.source, 0}, ec);
  }
  return ec;
}

// ---------------------------------------------------------------- WebSocket

class ws_client final : public sio_client, public std::enable_shared_from_this<ws_client> {
 public:
  ws_client(asio::io_context& ioc, client_options o, client_handlers h)
      : sio_client(std::move(h)), opt_(std::move(o)), ws_(ioc) {}

  void start() override {
    if (auto ec = open_bound(ws_.next_layer(), opt_)) return fail("bind: " + ec.message());
    ws_.next_layer().async_connect(opt_.server, [self = shared_from_this()](error_code ec) { self->on_connect(ec); });
  }

  void close() override {
    if (closed_) return;
    closed_ = true;
    error_code ec;
    ws_.next_layer().shutdown(tcp::socket::shutdown_both, ec);
    ws_.next_layer().close(ec);
  }

 private:
  void on_connect(error_code ec) {
    if (closed_) return;
    if (ec) return fail("connect: " + ec.message());
    ws_.next_layer().set_option(tcp::no_delay(true), ec);
    ws_.set_option(websocket::stream_base::decorator(
        [](websocket::request_type& req) { req.set(http::field::user_agent, "sidecast-bench"); }));
    ws_.read_message_max(1 << 20);
    ws_.auto_fragment(false);
    ws_.async_handshake(opt_.host_header, "/socket.io/?EIO=4&transport=websocket",
                        [self = shared_from_this()](error_code e) { self->on_handshake(e); });
  }

  void on_handshake(error_code ec) {
    if (closed_) return;
    if (ec) return fail("handshake: " + ec.message());
    do_read();
  }

  void do_read() {
    ws_.async_read(buf_, [self = shared_from_this()](error_code ec, std::size_t) { self->on_read(ec); });
  }

  void on_read(error_code ec) {
    if (closed_) return;
    if (ec) return fail("read: " + ec.message());
    if (ws_.got_text()) {
      auto d = buf_.cdata();
      on_eio_packet(std::string_view{static_cast<const char*>(d.data()), d.size()});
    }
    buf_.consume(buf_.size());
    if (!closed_) do_read();
  }

  void send_eio(std::string packet) override {
    if (closed_) return;
    out_.push_back(std::move(packet));
    if (!writing_) do_write();
  }

  void do_write() {
    writing_ = true;
    ws_.text(true);
    ws_.async_write(asio::buffer(out_.front()),
                    [self = shared_from_this()](error_code ec, std::size_t) { self->on_write(ec); });
  }

  void on_write(error_code ec) {
    writing_ = false;
    if (closed_) return;
    if (ec) return fail("write: " + ec.message());
    out_.pop_front();
    if (!out_.empty()) do_write();
  }

  client_options opt_;
  websocket::stream<tcp::socket> ws_;
  beast::flat_buffer buf_;
  std::deque<std::string> out_;
  bool writing_ = false;
};

// ------------------------------------------------ WebSocket, frames by hand

// A read buffer that grows without zero-filling: std::vector<char>::resize
// writes every new byte, and 16 KB per connection written at once was about a
// tenth of the generator's CPU while it opened 10,000 connections. Pages of
// this one are touched only when data arrives.
class read_buffer {
 public:
  char* data() { return data_.get(); }
  std::size_t size() const { return size_; }
  /// Grows to at least `n` bytes, keeping the first `keep`.
  void grow(std::size_t n, std::size_t keep) {
    if (n <= size_) return;
    auto bigger = std::make_unique_for_overwrite<char[]>(n);
    if (keep) std::memcpy(bigger.get(), data_.get(), keep);
    data_ = std::move(bigger);
    size_ = n;
  }

 private:
  std::unique_ptr<char[]> data_;
  std::size_t size_ = 0;
};

// The same client with the WebSocket framing done here instead of by
// beast::websocket::stream: the upgrade goes through beast::http (so bytes
// the server sends right after its 101 stay in our buffer), then every read
// takes whatever the socket holds into one growing buffer and every frame in
// it is handled before the next read; what handlers send meanwhile goes out
// in one write. Per received frame this saves the composed-operation and
// executor overhead of one async_read per message, which is most of the
// generator's user-space cost in fan-out. Server frames are not checked for
// UTF-8 (this is a load generator); client frames are masked (RFC 6455).
class raw_ws_client final : public sio_client, public std::enable_shared_from_this<raw_ws_client> {
 public:
  raw_ws_client(asio::io_context& ioc, client_options o, client_handlers h)
      : sio_client(std::move(h)), opt_(std::move(o)), sock_(ioc) {}

  void start() override {
    if (auto ec = open_bound(sock_, opt_)) return fail("bind: " + ec.message());
    sock_.async_connect(opt_.server, [self = shared_from_this()](error_code ec) { self->on_connect(ec); });
  }

  void close() override {
    if (closed_) return;
    closed_ = true;
    error_code ec;
    sock_.shutdown(tcp::socket::shutdown_both, ec);
    sock_.close(ec);
  }

 private:
  static constexpr std::size_t max_message = 1 << 20;

  std::uint32_t random32() {
    // xorshift: masking keys need not be secret here, only present.
    rng_ ^= rng_ << 13;
    rng_ ^= rng_ >> 7;
    rng_ ^= rng_ << 17;
    return static_cast<std::uint32_t>(rng_);
  }

  void on_connect(error_code ec) {
    if (closed_) return;
    if (ec) return fail("connect: " + ec.message());
    sock_.set_option(tcp::no_delay(true), ec);
    rng_ ^= reinterpret_cast<std::uintptr_t>(this) ^ static_cast<std::uint64_t>(sock_.native_handle()) << 32;
    std::string key(16, '\0');
    for (auto& c : key) c = static_cast<char>(random32());
    req_ = {http::verb::get, "/socket.io/?EIO=4&transport=websocket", 11};
    req_.set(http::field::host, opt_.host_header);
    req_.set(http::field::upgrade, "websocket");
    req_.set(http::field::connection, "Upgrade");
    req_.set(http::field::sec_websocket_key, eio::base64_encode(key));
    req_.set(http::field::sec_websocket_version, "13");
    req_.set(http::field::user_agent, "sidecast-bench");
    http::async_write(sock_, req_, [self = shared_from_this()](error_code e, std::size_t) {
      if (self->closed_) return;
      if (e) return self->fail("upgrade write: " + e.message());
      self->parser_.emplace();
      self->parser_->skip(true);  // a 101 has no body
      http::async_read_header(self->sock_, self->hbuf_, *self->parser_,
                              [self](error_code e2, std::size_t) { self->on_upgrade(e2); });
    });
  }

  void on_upgrade(error_code ec) {
    if (closed_) return;
    if (ec) return fail("upgrade read: " + ec.message());
    if (parser_->get().result() != http::status::switching_protocols)
      return fail("upgrade: HTTP " + std::to_string(parser_->get().result_int()));
    parser_.reset();
    auto left = hbuf_.cdata();
    rbuf_.grow(std::max<std::size_t>(16384, left.size() + 4096), 0);
    std::memcpy(rbuf_.data(), left.data(), left.size());
    rlen_ = left.size();
    hbuf_ = {};
    parse();
  }

  void do_read() {
    if (rbuf_.size() - rlen_ < 4096) {
      if (rbuf_.size() >= max_message + 4096 + 14) return fail("message too large");
      rbuf_.grow(std::max(rbuf_.size() * 2, rlen_ + 4096), rlen_);
    }
    sock_.async_read_some(asio::buffer(rbuf_.data() + rlen_, rbuf_.size() - rlen_),
                          [self = shared_from_this()](error_code ec, std::size_t n) { self->on_read(ec, n); });
  }

  void on_read(error_code ec, std::size_t n) {
    if (closed_) return;
    if (ec) return fail("read: " + ec.message());
    rlen_ += n;
    parse();
  }

  // Handles every complete frame in the buffer, then reads again.
  void parse() {
    in_parse_ = true;
    std::size_t pos = 0;
    const auto* b = reinterpret_cast<const unsigned char*>(rbuf_.data());
    while (!closed_ && rlen_ - pos >= 2) {
      const unsigned char* h = b + pos;
      bool fin = h[0] & 0x80;
      unsigned opcode = h[0] & 0x0f;
      if (h[1] & 0x80) return fail("masked server frame");
      std::uint64_t len = h[1] & 0x7f;
      std::size_t hl = 2;
      if (len == 126) {
        if (rlen_ - pos < 4) break;
        len = (std::uint64_t{h[2]} << 8) | h[3];
        hl = 4;
      } else if (len == 127) {
        if (rlen_ - pos < 10) break;
        len = 0;
        for (int i = 2; i < 10; ++i) len = (len << 8) | h[i];
        hl = 10;
      }
      if (len > max_message) return fail("frame too large");
      if (rlen_ - pos < hl + len) break;
      std::string_view payload{rbuf_.data() + pos + hl, static_cast<std::size_t>(len)};
      pos += hl + static_cast<std::size_t>(len);
      on_frame(fin, opcode, payload);
    }
    in_parse_ = false;
    if (closed_) return;
    if (pos) {
      std::memmove(rbuf_.data(), rbuf_.data() + pos, rlen_ - pos);
      rlen_ -= pos;
    }
    flush();
    do_read();
  }

  void on_frame(bool fin, unsigned opcode, std::string_view payload) {
    switch (opcode) {
      case 0x0:  // continuation
        if (!in_message_) return fail("stray continuation frame");
        if (frag_.size() + payload.size() > max_message) return fail("message too large");
        frag_ += payload;
        if (fin) {
          in_message_ = false;
          if (frag_text_) on_eio_packet(frag_);
          frag_.clear();
        }
        return;
      case 0x1:
      case 0x2:
        if (in_message_) return fail("new message inside a fragmented one");
        if (fin) {
          if (opcode == 0x1) on_eio_packet(payload);  // binary messages: attachments, not used
          return;
        }
        in_message_ = true;
        frag_text_ = opcode == 0x1;
        frag_.assign(payload);
        return;
      case 0x8:
        return fail("WebSocket close from the server");
      case 0x9:
        write_frame(0xA, payload);
        return;
      case 0xA:
        return;
      default:
        return fail("unknown WebSocket opcode");
    }
  }

  void send_eio(std::string packet) override {
    if (closed_) return;
    write_frame(0x1, packet);
    if (!in_parse_) flush();
  }

  void write_frame(unsigned opcode, std::string_view payload) {
    std::size_t n = payload.size();
    wbuf_ += static_cast<char>(0x80 | opcode);
    if (n < 126) {
      wbuf_ += static_cast<char>(0x80 | n);
    } else if (n < 65536) {
      wbuf_ += static_cast<char>(0x80 | 126);
      wbuf_ += static_cast<char>(n >> 8);
      wbuf_ += static_cast<char>(n & 0xff);
    } else {
      wbuf_ += static_cast<char>(0x80 | 127);
      for (int i = 7; i >= 0; --i) wbuf_ += static_cast<char>((static_cast<std::uint64_t>(n) >> (8 * i)) & 0xff);
    }
    std::uint32_t key = random32();
    char mask[4];
    std::memcpy(mask, &key, 4);
    wbuf_.append(mask, 4);
    std::size_t at = wbuf_.size();
    wbuf_ += payload;
    for (std::size_t i = 0; i < n; ++i) wbuf_[at + i] = static_cast<char>(wbuf_[at + i] ^ mask[i & 3]);
  }

  // One write at a time; what is queued meanwhile goes out in the next one.
  void flush() {
    if (writing_ || wbuf_.empty() || closed_) return;
    writing_ = true;
    std::swap(wbuf_, wout_);
    wbuf_.clear();
    asio::async_write(sock_, asio::buffer(wout_), [self = shared_from_this()](error_code ec, std::size_t) {
      self->writing_ = false;
      if (self->closed_) return;
      if (ec) return self->fail("write: " + ec.message());
      self->flush();
    });
  }

  client_options opt_;
  tcp::socket sock_;
  http::request<http::empty_body> req_;
  std::optional<http::response_parser<http::empty_body>> parser_;
  beast::flat_buffer hbuf_;
  read_buffer rbuf_;
  std::size_t rlen_ = 0;
  std::string frag_;
  bool in_message_ = false;
  bool frag_text_ = false;
  bool in_parse_ = false;
  std::string wbuf_, wout_;
  bool writing_ = false;
  std::uint64_t rng_ = 0x9e3779b97f4a7c15ull;
};

// ------------------------------------------------------------ long-polling

// Two HTTP/1.1 keep-alive connections, as a browser uses: one always holds a
// long-poll GET, the other carries POSTs (one at a time; what queues up
// meanwhile goes in the next POST, separated by '\x1e').
class polling_client final : public sio_client, public std::enable_shared_from_this<polling_client> {
 public:
  polling_client(asio::io_context& ioc, client_options o, client_handlers h)
      : sio_client(std::move(h)), opt_(std::move(o)), get_(ioc), post_(ioc) {}

  void start() override {
    if (auto ec = open_bound(get_, opt_)) return fail("bind: " + ec.message());
    get_.async_connect(opt_.server, [self = shared_from_this()](error_code ec) {
      if (self->closed_) return;
      if (ec) return self->fail("connect: " + ec.message());
      self->get_.set_option(tcp::no_delay(true), ec);
      self->handshake();
    });
  }

  void close() override {
    if (closed_) return;
    closed_ = true;
    error_code ec;
    get_.close(ec);
    post_.close(ec);
  }

 private:
  std::string target() const {
    std::string t = "/socket.io/?EIO=4&transport=polling";
    if (!sid_.empty()) t += "&sid=" + sid_;
    return t;
  }

  // One GET on the long-polling connection; `then` gets the read's result.
  template <typename Then>
  void get(const char* what, Then then) {
    get_req_ = {http::verb::get, target(), 11};
    get_req_.set(http::field::host, opt_.host_header);
    http::async_write(get_, get_req_, [self = shared_from_this(), what, then](error_code ec, std::size_t) {
      if (self->closed_) return;
      if (ec) return self->fail(std::string{what} + " write: " + ec.message());
      self->get_res_ = {};
      http::async_read(self->get_, self->get_buf_, self->get_res_,
                       [self, then](error_code e, std::size_t) { then(*self, e); });
    });
  }

  void handshake() {
    get("handshake", [](auto& self, error_code e) { self.on_handshake(e); });
  }

  void on_handshake(error_code ec) {
    if (closed_) return;
    if (ec) return fail("handshake read: " + ec.message());
    if (get_res_.result() != http::status::ok) return fail("handshake: HTTP " + std::to_string(get_res_.result_int()));
    std::string body = std::move(get_res_.body());
    auto open = eio::decode_text(body.substr(0, body.find(eio::payload_separator)));
    error_code jec;
    auto v = open && open->type == eio::packet_type::open ? boost::json::parse(open->data, jec) : boost::json::value{};
    auto* sid = v.is_object() ? v.as_object().if_contains("sid") : nullptr;
    if (jec || !sid || !sid->is_string()) return fail("handshake: no sid");
    sid_ = std::string(sid->as_string());
    on_eio_packet(std::string_view{body}.substr(0, body.find(eio::payload_separator)));  // OPEN: sends CONNECT
    // The POST connection opens only now, so its source port is taken after
    // the GET's (both on the same source address).
    if (auto e = open_bound(post_, opt_)) return fail("bind: " + e.message());
    post_.async_connect(opt_.server, [self = shared_from_this()](error_code e) {
      if (self->closed_) return;
      if (e) return self->fail("connect: " + e.message());
      self->post_.set_option(tcp::no_delay(true), e);
      self->post_open_ = true;
      self->do_post();
    });
    do_get();
  }

  void do_get() {
    get("GET", [](auto& self, error_code e) { self.on_get(e); });
  }

  void on_get(error_code ec) {
    if (closed_) return;
    if (ec) return fail("GET read: " + ec.message());
    if (get_res_.result() != http::status::ok) return fail("GET: HTTP " + std::to_string(get_res_.result_int()));
    std::string_view body = get_res_.body();
    while (!body.empty() && !closed_) {
      auto sep = body.find(eio::payload_separator);
      on_eio_packet(body.substr(0, sep));
      if (sep == std::string_view::npos) break;
      body.remove_prefix(sep + 1);
    }
    if (!closed_) do_get();
  }

  void send_eio(std::string packet) override {
    if (closed_) return;
    pending_.push_back(std::move(packet));
    do_post();
  }

  void do_post() {
    if (posting_ || !post_open_ || pending_.empty() || closed_) return;
    posting_ = true;
    std::string body;
    for (std::size_t i = 0; i < pending_.size(); ++i) {
      if (i) body += eio::payload_separator;
      body += pending_[i];
    }
    pending_.clear();
    post_req_ = {http::verb::post, target(), 11};
    post_req_.set(http::field::host, opt_.host_header);
    post_req_.set(http::field::content_type, "text/plain;charset=UTF-8");
    post_req_.body() = std::move(body);
    post_req_.prepare_payload();
    http::async_write(post_, post_req_, [self = shared_from_this()](error_code ec, std::size_t) {
      if (self->closed_) return;
      if (ec) return self->fail("POST write: " + ec.message());
      self->post_res_ = {};
      http::async_read(self->post_, self->post_buf_, self->post_res_,
                       [self](error_code e, std::size_t) { self->on_post(e); });
    });
  }

  void on_post(error_code ec) {
    posting_ = false;
    if (closed_) return;
    if (ec) return fail("POST read: " + ec.message());
    if (post_res_.result() != http::status::ok) return fail("POST: HTTP " + std::to_string(post_res_.result_int()));
    do_post();
  }

  client_options opt_;
  tcp::socket get_, post_;
  beast::flat_buffer get_buf_, post_buf_;
  http::request<http::empty_body> get_req_;
  http::response<http::string_body> get_res_;
  http::request<http::string_body> post_req_;
  http::response<http::string_body> post_res_;
  std::string sid_;
  std::vector<std::string> pending_;
  bool posting_ = false;
  bool post_open_ = false;
};

}  // namespace

std::shared_ptr<sio_client> make_ws_client(asio::io_context& ioc, client_options options, client_handlers handlers) {
  if (options.beast_websocket) return std::make_shared<ws_client>(ioc, std::move(options), std::move(handlers));
  return std::make_shared<raw_ws_client>(ioc, std::move(options), std::move(handlers));
}

std::shared_ptr<sio_client> make_polling_client(asio::io_context& ioc, client_options options,
                                                client_handlers handlers) {
  return std::make_shared<polling_client>(ioc, std::move(options), std::move(handlers));
}

}  // namespace sidecast::bench
