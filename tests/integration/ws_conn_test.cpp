// The gateway's own WebSocket framing (gateway/ws_conn) over real loopback
// sockets: against Beast's client, and against hand-made frames for
// everything RFC 6455 forbids a client to send.
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <future>
#include <stdexcept>
#include <thread>

#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/read_until.hpp>
#include <boost/asio/write.hpp>
#include <boost/beast/core/buffers_to_string.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http/read.hpp>
#include <boost/beast/websocket.hpp>

#include "gateway/io_batch.hpp"
#include "gateway/ws_conn.hpp"
#include "tests/integration/harness.hpp"

namespace sidecast::gateway {
namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
namespace websocket = beast::websocket;
using asio::ip::tcp;
using namespace std::chrono_literals;

// A server whose connections echo every message. Some messages do more:
// "close-me" closes from the server side; "flood N SIZE" sends N frames
// of SIZE bytes at once; "drop-others" floods every other connection past
// its queue bound, so the server drops them; "throw" makes the handler throw.
class echo_server {
 public:
  // `io_uring`: whether the connections batch their socket calls through it.
  echo_server(ws_limits limits, bool io_uring)
      : limits_{limits}, acceptor_{ioc_, {asio::ip::make_address("127.0.0.1"), 0}} {
    configure_ws_loop(ioc_, io_uring, metrics_);
    do_accept();
    thread_ = std::thread([this] { ioc_.run(); });
  }
  ~echo_server() {
    ioc_.stop();
    thread_.join();
  }
  unsigned short port() const { return acceptor_.local_endpoint().port(); }
  int closes() const { return closes_; }
  std::size_t touched() const { return touched_; }
  double counter(prometheus::Counter& c) const { return c.Value(); }
  gateway_metrics& metrics() { return metrics_; }

  /// Holds the server's thread (it runs nothing else) until the returned
  /// promise is set: what clients send meanwhile is all ready at once.
  std::promise<void> pause() {
    std::promise<void> go;
    auto held = std::make_shared<std::shared_future<void>>(go.get_future().share());
    std::promise<void> paused;
    auto is_paused = paused.get_future();
    asio::post(ioc_, [held, paused = std::move(paused)]() mutable {
      paused.set_value();
      held->wait_for(10s);
    });
    is_paused.wait();
    return go;
  }

 private:
  struct pending {
    beast::tcp_stream stream;
    beast::flat_buffer buffer;
    http::request<http::string_body> request;
  };

  void do_accept() {
    acceptor_.async_accept(ioc_, [this](boost::system::error_code ec, tcp::socket socket) {
      if (ec) return;
      auto p = std::make_shared<pending>(pending{beast::tcp_stream{std::move(socket)}, {}, {}});
      http::async_read(p->stream, p->buffer, p->request, [this, p](boost::system::error_code read_ec, std::size_t) {
        if (read_ec) return;
        auto conn = std::make_shared<ws_conn>(std::move(p->stream), limits_, metrics_);
        std::weak_ptr<ws_conn> weak = conn;
        conns_.push_back(weak);
        auto touched = std::make_shared<std::size_t>(0);  // lives in the handler, as a session does
        conn->accept(
            std::move(p->request),
            [weak, touched, this](std::string data, bool binary) {
              auto c = weak.lock();
              if (!c) return;
              if (data == "close-me") return c->close();
              if (data == "throw") throw std::runtime_error("a handler failed");
              if (data == "drop-others") {
                auto payload = shared_bytes::copy_of(std::string(1, 'x'));
                for (auto& other : conns_) {
                  auto o = other.lock();
                  if (!o || o == c) continue;
                  for (std::size_t i = 0; i <= limits_.queue_messages; ++i) o->send(frame{payload, true});
                }
                return;
              }
              if (data.starts_with("flood-touch ")) {
                // Sends until the connection drops us, then uses the handler's
                // own state: the handler must outlive the drop it caused.
                std::size_t n = 0;
                std::sscanf(data.c_str(), "flood-touch %zu", &n);
                auto payload = shared_bytes::copy_of(std::string(10, 'x'));
                for (std::size_t i = 0; i < n; ++i) {
                  c->send(frame{payload, true});
                  ++*touched;
                }
                touched_ = *touched;
                return;
              }
              if (data.starts_with("flood ")) {
                std::size_t n = 0, size = 0;
                std::sscanf(data.c_str(), "flood %zu %zu", &n, &size);
                auto payload = shared_bytes::copy_of(std::string(size, 'x'));
                for (std::size_t i = 0; i < n; ++i) c->send(frame{payload, true});
                return;
              }
              c->send(frame{shared_bytes::copy_of(data), binary});
            },
            [this] { ++closes_; });
      });
      do_accept();
    });
  }

  ws_limits limits_;
  std::vector<std::weak_ptr<ws_conn>> conns_;  // used on the server's thread only
  asio::io_context ioc_;
  tcp::acceptor acceptor_;
  prometheus::Registry registry_;
  gateway_metrics metrics_{registry_};
  std::atomic<int> closes_{0};
  std::atomic<std::size_t> touched_{0};
  std::thread thread_;
};

// A client that writes raw frames after a hand-made upgrade.
class raw_client {
 public:
  explicit raw_client(unsigned short port) : socket_{ioc_} {
    socket_.connect({asio::ip::make_address("127.0.0.1"), port});
    socket_.set_option(tcp::no_delay(true));
    timeval tv{5, 0};
    ::setsockopt(socket_.native_handle(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    asio::write(socket_, asio::buffer(std::string{
                             "GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                             "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"}));
    std::string head;
    std::size_t n = 0;
    // Under the sanitizer preset the runtime may stop every thread of the
    // process for a moment (a ptrace attach from a clone of it), which ends
    // a blocking poll with EINTR: read on; what came stays in `head`.
    for (int tries = 0;; ++tries) {
      boost::system::error_code ec;
      n = asio::read_until(socket_, asio::dynamic_buffer(head), "\r\n\r\n", ec);
      if (ec == asio::error::interrupted && tries < 100) continue;
      if (ec) throw boost::system::system_error{ec, "read_until"};
      break;
    }
    EXPECT_TRUE(head.starts_with("HTTP/1.1 101")) << head;
    EXPECT_NE(head.find("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), std::string::npos) << head;
    rest_ = head.substr(n);
  }

  /// A client frame: masked unless told otherwise.
  static std::string make(std::uint8_t op, std::string_view payload, bool fin = true, bool masked = true,
                          std::uint8_t rsv = 0) {
    std::string f;
    f += static_cast<char>((fin ? 0x80 : 0) | rsv | op);
    std::uint8_t m = masked ? 0x80 : 0;
    if (payload.size() < 126) {
      f += static_cast<char>(m | payload.size());
    } else if (payload.size() <= 0xffff) {
      f += static_cast<char>(m | 126);
      f += static_cast<char>(payload.size() >> 8);
      f += static_cast<char>(payload.size() & 0xff);
    } else {
      f += static_cast<char>(m | 127);
      for (int i = 7; i >= 0; --i) f += static_cast<char>((std::uint64_t{payload.size()} >> (8 * i)) & 0xff);
    }
    const char key[4] = {0x12, 0x34, 0x56, 0x78};
    if (masked) f.append(key, 4);
    for (std::size_t i = 0; i < payload.size(); ++i) f += masked ? static_cast<char>(payload[i] ^ key[i % 4]) : payload[i];
    return f;
  }

  void write(std::string_view bytes) { asio::write(socket_, asio::buffer(bytes)); }

  /// Sends FIN: the client writes no more, and still reads.
  void shutdown_send() { socket_.shutdown(tcp::socket::shutdown_send); }

  struct got {
    std::uint8_t op = 0xff;  // 0xff: the connection ended (EOF, reset or timeout)
    std::string payload;
    unsigned close_code() const {
      return payload.size() >= 2 ? (static_cast<unsigned char>(payload[0]) << 8) | static_cast<unsigned char>(payload[1])
                                 : 1005;
    }
  };

  /// The next server frame (servers never mask).
  got read() {
    unsigned char h[2];
    if (!take(h, 2)) return {};
    std::uint64_t len = h[1] & 0x7f;
    EXPECT_FALSE(h[1] & 0x80) << "a server frame was masked";
    if (len >= 126) {
      unsigned char ext[8];
      int k = len == 126 ? 2 : 8;
      if (!take(ext, k)) return {};
      len = 0;
      for (int i = 0; i < k; ++i) len = (len << 8) | ext[i];
    }
    got g;
    g.payload.resize(len);
    if (!take(g.payload.data(), len)) return {};
    g.op = h[0] & 0x0f;
    return g;
  }

  /// True once the server has closed TCP (EOF or reset).
  bool ended() {
    char c;
    return !take(&c, 1);
  }

 private:
  bool take(void* out, std::size_t n) {
    auto* p = static_cast<char*>(out);
    std::size_t from_rest = std::min(n, rest_.size());
    std::memcpy(p, rest_.data(), from_rest);
    rest_.erase(0, from_rest);
    // Bounded: a server that never answers fails the test in 5 s, not at
    // ctest's timeout (Asio's blocking read would wait on past SO_RCVTIMEO).
    auto deadline = std::chrono::steady_clock::now() + 5s;
    for (std::size_t have = from_rest; have < n;) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
      pollfd ready{socket_.native_handle(), POLLIN, 0};
      if (left.count() <= 0 || ::poll(&ready, 1, static_cast<int>(left.count())) != 1) return false;
      auto r = ::recv(socket_.native_handle(), p + have, n - have, 0);
      if (r <= 0) return false;
      have += static_cast<std::size_t>(r);
    }
    return true;
  }

  asio::io_context ioc_;
  tcp::socket socket_;
  std::string rest_;
};

// Every test runs twice: socket calls batched through io_uring, and made one by one.
class WsConn : public ::testing::TestWithParam<bool> {};

constexpr std::uint8_t text = 1, binary = 2, close_op = 8, ping = 9, pong = 10, continuation = 0;

// The server closed TCP, and counted it as its `closes`-th ended connection.
void expect_ended(raw_client& c, const echo_server& server, int closes) {
  EXPECT_TRUE(c.ended());
  EXPECT_TRUE(test::eventually([&] { return server.closes() == closes; }));
}

// The server's close frame, then the end (as above); returns its code (1005: none).
unsigned expect_close(raw_client& c, const echo_server& server, int closes) {
  auto g = c.read();
  EXPECT_EQ(g.op, close_op);
  expect_ended(c, server, closes);
  return g.close_code();
}

TEST_P(WsConn, EchoesTextAndBinary) {
  echo_server server{{}, GetParam()};
  raw_client c{server.port()};
  c.write(raw_client::make(text, "hello"));
  auto g = c.read();
  EXPECT_EQ(g.op, text);
  EXPECT_EQ(g.payload, "hello");
  c.write(raw_client::make(binary, std::string("\0\1\2", 3)));
  g = c.read();
  EXPECT_EQ(g.op, binary);
  EXPECT_EQ(g.payload, std::string("\0\1\2", 3));
}

TEST_P(WsConn, ReassemblesFragmentsAndAnswersPingsBetweenThem) {
  echo_server server{{}, GetParam()};
  raw_client c{server.port()};
  c.write(raw_client::make(text, "he", false) + raw_client::make(ping, "p?") + raw_client::make(continuation, "ll", false) +
          raw_client::make(continuation, "o"));
  auto g = c.read();
  EXPECT_EQ(g.op, pong);
  EXPECT_EQ(g.payload, "p?");
  g = c.read();
  EXPECT_EQ(g.op, text);
  EXPECT_EQ(g.payload, "hello");
}

TEST_P(WsConn, FramesSplitAcrossReadsAndManyInOneRead) {
  echo_server server{{}, GetParam()};
  raw_client c{server.port()};
  // One byte per write: the frame arrives in pieces.
  for (char b : raw_client::make(text, "slow")) {
    c.write({&b, 1});
    std::this_thread::sleep_for(1ms);
  }
  EXPECT_EQ(c.read().payload, "slow");
  // Three frames in one write.
  c.write(raw_client::make(text, "a") + raw_client::make(text, "b") + raw_client::make(text, "c"));
  EXPECT_EQ(c.read().payload, "a");
  EXPECT_EQ(c.read().payload, "b");
  EXPECT_EQ(c.read().payload, "c");
  // Past the shared read buffer (64 KiB), with the 64-bit length form both ways.
  std::string big(200'000, 'z');
  big[123'456] = 'y';
  c.write(raw_client::make(binary, big));
  auto g = c.read();
  EXPECT_EQ(g.op, binary);
  EXPECT_EQ(g.payload, big);
  // The 16-bit form.
  std::string mid(1000, 'm');
  c.write(raw_client::make(text, mid));
  EXPECT_EQ(c.read().payload, mid);
}

struct bad_case {
  const char* name;
  std::string bytes;
  unsigned code;
};

TEST_P(WsConn, WhatAClientMayNotSendClosesWithTheRightCode) {
  ws_limits limits;
  limits.max_message = 1000;
  std::string non_minimal = {static_cast<char>(0x81), static_cast<char>(0x80 | 126), 0, 5, 1, 2, 3, 4, 'a', 'b', 'c', 'd', 'e'};
  std::vector<bad_case> cases = {
      {"unmasked", raw_client::make(text, "x", true, false), 1002},
      {"reserved bit", raw_client::make(text, "x", true, true, 0x40), 1002},
      {"unknown opcode", raw_client::make(3, "x"), 1002},
      {"continuation first", raw_client::make(continuation, "x"), 1002},
      {"text inside a fragmented message", raw_client::make(text, "a", false) + raw_client::make(text, "b"), 1002},
      {"fragmented ping", raw_client::make(ping, "x", false), 1002},
      {"long ping", raw_client::make(ping, std::string(126, 'p')), 1002},
      {"length not in its shortest form", non_minimal, 1002},
      {"bad close code", raw_client::make(close_op, std::string("\x03\xe7", 2)), 1002},
      {"one-byte close", raw_client::make(close_op, "x"), 1002},
      {"invalid UTF-8", raw_client::make(text, "\xc3\x28"), 1007},
      {"invalid UTF-8 across fragments", raw_client::make(text, "\xe2\x82", false) + raw_client::make(continuation, "x"),
       1007},
      {"surrogate", raw_client::make(text, "\xed\xa0\x80"), 1007},
      {"too big", raw_client::make(binary, std::string(1001, 'b')), 1009},
      {"too big in fragments", raw_client::make(binary, std::string(600, 'b'), false) +
                                   raw_client::make(continuation, std::string(600, 'b')),
       1009},
  };
  echo_server server{limits, GetParam()};
  int n = 0;
  for (const auto& bad : cases) {
    SCOPED_TRACE(bad.name);
    raw_client c{server.port()};
    c.write(raw_client::make(text, "fine"));
    EXPECT_EQ(c.read().payload, "fine");
    c.write(bad.bytes);
    EXPECT_EQ(expect_close(c, server, ++n), bad.code);
  }
  EXPECT_EQ(server.metrics().oversize.Value(), 2);
  auto malformed = std::count_if(cases.begin(), cases.end(), [](const bad_case& b) { return b.code != 1009; });
  EXPECT_EQ(server.metrics().bad_frame.Value(), static_cast<double>(malformed)) << "every protocol error is counted";
}

TEST_P(WsConn, EchoesTheClientsCloseAndEndsTheConnection) {
  echo_server server{{}, GetParam()};
  raw_client c{server.port()};
  c.write(raw_client::make(close_op, std::string("\x0f\xa0", 2) + "bye"));  // 4000
  EXPECT_EQ(expect_close(c, server, 1), 4000u);
}

TEST_P(WsConn, ServerCloseSendsWhatIsQueuedThenAnEmptyCloseFrame) {
  echo_server server{{}, GetParam()};
  raw_client c{server.port()};
  c.write(raw_client::make(text, "one") + raw_client::make(text, "close-me") + raw_client::make(text, "ignored"));
  EXPECT_EQ(c.read().payload, "one");
  auto g = c.read();
  EXPECT_EQ(g.op, close_op);
  EXPECT_EQ(g.payload, "");  // no status code, as Node's ws sends
  c.write(raw_client::make(close_op, ""));
  expect_ended(c, server, 1);
}

TEST_P(WsConn, ALargeBurstGoesOutWholeThroughPartialWrites) {
  echo_server server{ws_limits{.queue_bytes = 64 << 20}, GetParam()};
  raw_client c{server.port()};
  // 2,000 × 10 KB: far more than the kernel's socket buffers; the client
  // reads only after asking, so the server meets a full socket many times.
  c.write(raw_client::make(text, "flood 2000 10000"));
  std::this_thread::sleep_for(100ms);
  for (int i = 0; i < 2000; ++i) {
    auto g = c.read();
    ASSERT_EQ(g.op, binary) << "frame " << i;
    ASSERT_EQ(g.payload.size(), 10000u) << "frame " << i;
  }
  c.write(raw_client::make(text, "after"));
  EXPECT_EQ(c.read().payload, "after");
}

TEST_P(WsConn, AConsumerPastTheQueueBoundIsDropped) {
  echo_server server{ws_limits{.queue_messages = 16}, GetParam()};
  raw_client c{server.port()};
  c.write(raw_client::make(text, "flood 17 10"));
  expect_ended(c, server, 1);
  EXPECT_EQ(server.metrics().slow_consumer.Value(), 1);

  raw_client fine{server.port()};
  fine.write(raw_client::make(text, "flood 16 10"));
  for (int i = 0; i < 16; ++i) EXPECT_EQ(fine.read().payload.size(), 10u);
}

TEST_P(WsConn, PingsFromAClientThatDoesNotReadAreBoundedToo) {
  echo_server server{ws_limits{.queue_messages = 100, .queue_bytes = 64 << 20}, GetParam()};
  raw_client c{server.port()};
  // 90 × 100 KB: more than the kernel buffers, so the server's queue holds
  // frames it cannot write; then pings, whose pongs join that queue. The
  // kernel may take 4 MB and more of the flood (tcp_wmem's maximum, grown
  // to as the server writes): 50 pings were not enough where it took half,
  // 150 are past the bound with or without the flood's frames.
  c.write(raw_client::make(text, "flood 90 100000"));
  std::this_thread::sleep_for(100ms);
  std::string pings;
  for (int i = 0; i < 150; ++i) pings += raw_client::make(ping, "");
  c.write(pings);
  EXPECT_TRUE(test::eventually([&] { return server.closes() == 1; }));
  EXPECT_EQ(server.metrics().slow_consumer.Value(), 1);
}

TEST_P(WsConn, AClientCloseRightAfterTheServersStillGetsTheServersCloseFrame) {
  echo_server server{{}, GetParam()};
  raw_client c{server.port()};
  // "close-me" makes the server close; the client's own close is in the same
  // segment, so it arrives before the server's close frame has been written.
  c.write(raw_client::make(text, "one") + raw_client::make(text, "close-me") + raw_client::make(close_op, ""));
  EXPECT_EQ(c.read().payload, "one");
  EXPECT_EQ(expect_close(c, server, 1), 1005u);  // an empty close frame: the server's own
}

// A message and the client's FIN that are both in before the server looks
// come as one edge (EPOLLIN | EPOLLRDHUP): the read that takes the message
// is short, yet the socket is not drained, and no edge comes for the FIN.
// The message is answered, then the server closes TCP at once, not at the
// next failed write or ping timeout: as from Node's ws, its answer still goes
// out to a client that only shut its sending side, with no close frame after
// it. Two clients, so that with io_uring their reads are one batch.
TEST_P(WsConn, AMessageAndTheClientsFinInOneEdgeAreBothSeen) {
  echo_server server{{}, GetParam()};
  raw_client a{server.port()}, b{server.port()};
  for (auto* c : {&a, &b}) {
    c->write(raw_client::make(text, "first"));  // the connection is in the server's epoll set
    EXPECT_EQ(c->read().payload, "first");
  }
  auto go = server.pause();
  for (auto* c : {&a, &b}) {
    c->write(raw_client::make(text, "last"));
    c->shutdown_send();
  }
  std::this_thread::sleep_for(20ms);  // all in the server's sockets before it looks
  go.set_value();
  EXPECT_EQ(a.read().payload, "last");
  EXPECT_EQ(b.read().payload, "last");
  EXPECT_TRUE(a.ended());  // EOF: no close frame came first
  expect_ended(b, server, 2);
}

TEST_P(WsConn, AHandlerThatGetsItsConnectionDroppedKeepsItsStateUntilItReturns) {
  echo_server server{ws_limits{.queue_messages = 16}, GetParam()};
  raw_client c{server.port()};
  c.write(raw_client::make(text, "flood-touch 40"));
  EXPECT_TRUE(c.ended());
  EXPECT_TRUE(test::eventually([&] { return server.touched() == 40; }));  // under ASan: no use after free
  EXPECT_EQ(server.metrics().slow_consumer.Value(), 1);
}

TEST_P(WsConn, ConnectionsDroppedWhileTheirEventsAreInTheSameBatchAreSkipped) {
  // Every client asks, at the same moment, to have all the others dropped.
  // Whichever message the server reads first drops the rest, whose own
  // messages may already sit in the same epoll batch: those events must
  // find their connection gone and be skipped, never touch it.
  echo_server server{ws_limits{.queue_messages = 16}, GetParam()};
  constexpr int n = 12;
  std::vector<std::unique_ptr<raw_client>> clients;
  for (int i = 0; i < n; ++i) clients.push_back(std::make_unique<raw_client>(server.port()));
  auto frame = raw_client::make(text, "drop-others");
  for (auto& c : clients) c->write(frame);
  ASSERT_TRUE(test::eventually([&] { return server.closes() == n - 1; }));
  int alive = 0;
  for (auto& c : clients) {
    try {
      c->write(raw_client::make(text, "still here?"));
    } catch (const boost::system::system_error&) {
      continue;  // reset: a dropped one
    }
    auto g = c->read();
    if (g.op == text) {
      EXPECT_EQ(g.payload, "still here?");
      ++alive;
    }
  }
  EXPECT_EQ(alive, 1);
  EXPECT_EQ(server.closes(), n - 1);
}

TEST_P(WsConn, AHandlerThatThrowsCostsOnlyItsOwnConnection) {
  echo_server server{{}, GetParam()};
  raw_client bad{server.port()}, good{server.port()};
  bad.write(raw_client::make(text, "throw") + raw_client::make(text, "after"));
  good.write(raw_client::make(text, "meanwhile"));
  expect_ended(bad, server, 1);
  EXPECT_EQ(good.read().payload, "meanwhile");
  good.write(raw_client::make(text, "later"));
  EXPECT_EQ(good.read().payload, "later");
}

TEST_P(WsConn, BeastClientInterop) {
  echo_server server{{}, GetParam()};
  asio::io_context ioc;
  websocket::stream<tcp::socket> ws{ioc};
  ws.next_layer().connect({asio::ip::make_address("127.0.0.1"), server.port()});
  ws.handshake("127.0.0.1", "/ws");
  // Fragmented by the client: 8-byte write buffer.
  ws.auto_fragment(true);
  ws.write_buffer_bytes(8);
  std::string pong_payload;
  ws.control_callback([&](websocket::frame_type kind, beast::string_view payload) {
    if (kind == websocket::frame_type::pong) pong_payload = std::string{payload};
  });
  ws.ping("are you there");
  std::string message(100'000, 'q');
  ws.text(true);
  ws.write(asio::buffer(message));
  beast::flat_buffer buffer;
  ws.read(buffer);
  EXPECT_EQ(beast::buffers_to_string(buffer.data()), message);
  EXPECT_EQ(pong_payload, "are you there");
  ws.close(websocket::close_reason{4001});
  EXPECT_TRUE(test::eventually([&] { return server.closes() == 1; }));
}

// Whether this kernel lets a batch use io_uring (a container's seccomp
// profile may not): a probe of two calls.
bool ring_available() {
  int sv[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0) return false;
  io_batch probe{true};
  char a, b;
  probe.recv(sv[0], &a, 1);
  probe.recv(sv[1], &b, 1);
  probe.run();
  ::close(sv[0]);
  ::close(sv[1]);
  return probe.using_ring();
}

// Connections that become readable together are read in one batch, each
// into its own slice of one buffer, and their answers go out in one batch:
// every client gets its own messages back, whole and in order, the ones
// larger than a slice included (read on past the slice).
TEST_P(WsConn, ConnectionsReadyTogetherEachGetTheirOwnAnswers) {
  echo_server server{{}, GetParam()};
  constexpr int n = 40;
  std::vector<std::unique_ptr<raw_client>> clients;
  for (int i = 0; i < n; ++i) clients.push_back(std::make_unique<raw_client>(server.port()));
  auto message = [](int i, int k) {
    auto tag = "client " + std::to_string(i) + " message " + std::to_string(k);
    return i % 8 == 0 ? std::string(20'000 + i, static_cast<char>('a' + k)) + tag : tag;
  };
  for (int round = 0; round < 3; ++round) {
    auto go = server.pause();
    for (int i = 0; i < n; ++i)
      clients[i]->write(raw_client::make(text, message(i, 2 * round)) + raw_client::make(text, message(i, 2 * round + 1)));
    // Loopback delivery may be left to a softirq on a busy machine: give it
    // time, so that most of it is in when the server looks.
    std::this_thread::sleep_for(20ms);
    go.set_value();
    for (int i = 0; i < n; ++i) {
      for (int k : {2 * round, 2 * round + 1}) {
        auto g = clients[i]->read();
        ASSERT_EQ(g.op, text) << "client " << i << " got no answer";
        EXPECT_EQ(g.payload, message(i, k)) << "client " << i;
      }
    }
  }
  auto batched = server.metrics().io_uring_calls.Value();
  if (!GetParam()) {
    EXPECT_EQ(batched, 0);
  } else if (ring_available()) {
    // The ring was used, for batches of more than one call. (How the calls
    // fall into batches depends on when each client's bytes arrived, which
    // the test does not control: in one CI run 200 calls were batched
    // where a run here batches all 240.)
    EXPECT_GT(batched, 0);
    EXPECT_LE(server.metrics().io_uring_batches.Value(), batched / 2);
  }
}

INSTANTIATE_TEST_SUITE_P(Calls, WsConn, ::testing::Values(true, false),
                         [](const auto& p) { return p.param ? "io_uring" : "one_by_one"; });

}  // namespace
}  // namespace sidecast::gateway
