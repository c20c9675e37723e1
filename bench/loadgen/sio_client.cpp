#include "bench/loadgen/sio_client.hpp"

#include <netinet/in.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <cstdio>
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

#include "core/edge_set.hpp"
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
    arrived_ns_ = steady_now_ns();
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

// The WebSocket connections of one generator thread read through one
// edge_set (core/edge_set.hpp): one epoll_wait per batch of ready sockets and
// one recvmsg per read, where Asio's async_read_some would add a recv answered
// EAGAIN after every message.
class client_edges : public asio::execution_context::service {
 public:
  using key_type = client_edges;
  static asio::execution_context::id id;

  explicit client_edges(asio::execution_context& context)
      : service{context}, set{static_cast<asio::io_context&>(context), [](const std::string& what) {
                                std::fprintf(stderr, "sidecast-bench: %s\n", what.c_str());
                              }} {}

  core::edge_set set;

 private:
  void shutdown() override { set.close(); }
};

asio::execution_context::id client_edges::id;

// The same client with the WebSocket framing done here instead of by
// beast::websocket::stream: the upgrade goes through beast::http (so bytes
// the server sends right after its 101 stay in our buffer); then the
// descriptor leaves Asio for the thread's edge_set, every read takes whatever
// the socket holds into one growing buffer and every frame in it is handled
// before the next read; what handlers send meanwhile goes out in one write.
// Per received frame this saves the composed-operation and executor overhead
// of one async_read per message, which is most of the generator's user-space
// cost in fan-out. Server frames are not checked for UTF-8 (this is a load
// generator); client frames are masked (RFC 6455).
//
// Each read asks for the kernel's receive timestamp (SO_TIMESTAMPNS), the
// time the server's write put the bytes into this socket, and hands it on as
// arrived_ns(): with 1,000 subscribers on one generator core, the last of a
// broadcast's deliveries is read milliseconds after it arrived, and that wait
// is the generator's, not the server's.
class raw_ws_client final : public sio_client,
                            public core::edge_watcher,
                            public std::enable_shared_from_this<raw_ws_client> {
 public:
  raw_ws_client(asio::io_context& ioc, client_options o, client_handlers h)
      : sio_client(std::move(h)), opt_(std::move(o)), sock_(ioc), edges_{asio::use_service<client_edges>(ioc).set} {}

  ~raw_ws_client() override {
    if (fd_ >= 0) ::close(fd_);
  }

  void start() override {
    if (auto ec = open_bound(sock_, opt_)) return fail("bind: " + ec.message());
    sock_.async_connect(opt_.server, [self = shared_from_this()](error_code ec) { self->on_connect(ec); });
  }

  void close() override {
    closed_ = true;
    drop_socket();
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

  // Fails the client and lets go of its socket.
  void lost(std::string_view why) {
    fail(why);
    drop_socket();
  }

  void drop_socket() {
    auto held = edges_.unwatch(*this);  // the set's reference, dropped on return
    if (fd_ >= 0) {
      ::shutdown(fd_, SHUT_RDWR);
      ::close(fd_);
      fd_ = -1;
    }
    error_code ec;
    sock_.shutdown(tcp::socket::shutdown_both, ec);
    sock_.close(ec);
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
    // From here on the descriptor is ours, in the thread's edge_set.
    int one = 1;
    if (::setsockopt(sock_.native_handle(), SOL_SOCKET, SO_TIMESTAMPNS, &one, sizeof one) != 0)
      return lost(std::string("SO_TIMESTAMPNS: ") + std::strerror(errno));
    fd_ = sock_.release(ec);
    if (ec) return lost("release: " + ec.message());
    if (!edges_.watch(fd_, shared_from_this())) return lost(std::string("epoll: ") + std::strerror(errno));
    arrived_ns_ = steady_now_ns();
    parse();
    flush();
  }

  void on_edge(std::uint32_t events) override {
    if (closed_) return;
    if (events & (EPOLLOUT | EPOLLERR | EPOLLHUP)) flush();
    if (events & (EPOLLIN | EPOLLRDHUP | EPOLLERR | EPOLLHUP)) on_readable();
  }

  void on_edge_threw(const std::exception& e) override { lost(std::string("handler threw: ") + e.what()); }

  // Reads until the socket is empty (edge-triggered: a short read means it
  // is), handling the frames of each read before the next.
  void on_readable() {
    while (!closed_) {
      if (rbuf_.size() - rlen_ < 4096) {
        if (rbuf_.size() >= max_message + 4096 + 14) return lost("message too large");
        rbuf_.grow(std::max(rbuf_.size() * 2, rlen_ + 4096), rlen_);
      }
      std::size_t space = rbuf_.size() - rlen_;
      iovec iov{rbuf_.data() + rlen_, space};
      alignas(cmsghdr) char control[CMSG_SPACE(sizeof(timespec))];
      msghdr msg{};
      msg.msg_iov = &iov;
      msg.msg_iovlen = 1;
      msg.msg_control = control;
      msg.msg_controllen = sizeof control;
      ssize_t n = ::recvmsg(fd_, &msg, MSG_DONTWAIT);
      if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK) break;
        if (errno == EINTR) continue;
        return lost(std::string("read: ") + std::strerror(errno));
      }
      if (n == 0) return lost("read: the server closed the connection");
      arrived_ns_ = arrival(msg);
      rlen_ += static_cast<std::size_t>(n);
      parse();
      if (static_cast<std::size_t>(n) < space) break;
    }
    flush();
  }

  // The kernel's receive timestamp of the last bytes read (CLOCK_REALTIME),
  // moved to steady_clock by how long ago it was; now when there is none.
  static std::int64_t arrival(msghdr& msg) {
    std::int64_t now = steady_now_ns();
    for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
      if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_TIMESTAMPNS) continue;
      timespec rx, real;
      std::memcpy(&rx, CMSG_DATA(c), sizeof rx);
      ::clock_gettime(CLOCK_REALTIME, &real);
      std::int64_t ago = (std::int64_t{real.tv_sec} - rx.tv_sec) * 1'000'000'000 + (real.tv_nsec - rx.tv_nsec);
      return now - std::max<std::int64_t>(0, ago);
    }
    return now;
  }

  // Handles every complete frame in the buffer; keeps a partial one.
  void parse() {
    in_parse_ = true;
    std::size_t pos = 0;
    const auto* b = reinterpret_cast<const unsigned char*>(rbuf_.data());
    while (!closed_ && rlen_ - pos >= 2) {
      const unsigned char* h = b + pos;
      bool fin = h[0] & 0x80;
      unsigned opcode = h[0] & 0x0f;
      if (h[1] & 0x80) return lost("masked server frame");
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
      if (len > max_message) return lost("frame too large");
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

  // Writes what is queued, as far as the socket takes it; the rest waits for
  // the next writable edge. Not before the descriptor is in the edge_set.
  void flush() {
    if (closed_ || fd_ < 0) return;
    while (wsent_ < wbuf_.size()) {
      ssize_t n = ::send(fd_, wbuf_.data() + wsent_, wbuf_.size() - wsent_, MSG_DONTWAIT | MSG_NOSIGNAL);
      if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK) return;
        if (errno == EINTR) continue;
        return lost(std::string("write: ") + std::strerror(errno));
      }
      wsent_ += static_cast<std::size_t>(n);
    }
    wbuf_.clear();
    wsent_ = 0;
  }

  client_options opt_;
  tcp::socket sock_;  // until the upgrade; then the descriptor is fd_
  int fd_ = -1;
  core::edge_set& edges_;
  http::request<http::empty_body> req_;
  std::optional<http::response_parser<http::empty_body>> parser_;
  beast::flat_buffer hbuf_;
  read_buffer rbuf_;
  std::size_t rlen_ = 0;
  std::string frag_;
  bool in_message_ = false;
  bool frag_text_ = false;
  bool in_parse_ = false;
  std::string wbuf_;      // frames queued to write
  std::size_t wsent_ = 0;  // ... of which the socket took this much
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
                       [self, then](error_code e, std::size_t) {
                         self->arrived_ns_ = steady_now_ns();
                         then(*self, e);
                       });
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
