#pragma once
// An HTTP answer that another thread provides later: a long-poll GET waits on
// one until its Engine.IO session has packets (or closes). The first
// complete() wins; it is thread-safe. A wait() that is cancelled (the
// client left while its poll waited, see http_session.cpp) abandons the
// slot: an answer that comes later is refused, and its giver told.
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>

#include <boost/asio/awaitable.hpp>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/as_tuple.hpp>

namespace sidecast::gateway {

struct http_answer {
  unsigned status = 200;
  std::string content_type = "text/plain; charset=UTF-8";
  std::string body;
  std::string allow = {};  // a 405's Allow header: the methods the resource takes
  std::optional<std::uint64_t> head_length = {};  // a HEAD's Content-Length (the body left empty)
};

class reply_slot : public std::enable_shared_from_this<reply_slot> {
 public:
  explicit reply_slot(boost::asio::any_io_executor ex)
      : timer_{ex, boost::asio::steady_timer::time_point::max()} {}
  /// A slot nobody waits on: the answer goes to `on_answer` (on `ex`).
  reply_slot(boost::asio::any_io_executor ex, std::function<void(http_answer)> on_answer)
      : timer_{ex, boost::asio::steady_timer::time_point::max()}, on_answer_{std::move(on_answer)} {}

  /// `taken` (optional) is called on the slot's executor with whether this
  /// answer was the one taken, once the waiter has it: false when another
  /// came first, or the slot was abandoned before or while the waiter
  /// resumed, so what it carried can go back where it came from.
  void complete(http_answer answer, std::function<void(bool taken)> taken = {}) {
    boost::asio::dispatch(timer_.get_executor(), [self = shared_from_this(), a = std::move(answer),
                                                  taken = std::move(taken)]() mutable {
      if (self->answer_) {
        if (taken) taken(false);
        return;
      }
      if (self->on_answer_) {
        self->answer_ = http_answer{};
        std::exchange(self->on_answer_, nullptr)(std::move(a));
        if (taken) taken(true);
        return;
      }
      self->answer_ = std::move(a);
      self->taken_ = std::move(taken);  // told in wait()
      self->timer_.cancel();
    });
  }

  /// On the slot's executor: waits for complete(). Cancelled (terminal
  /// cancellation of the awaiting coroutine), it abandons the slot and
  /// returns an answer nobody will write.
  boost::asio::awaitable<http_answer> wait() {
    // (Asked once, out of any condition: GCC 12 miscompiles a co_await there.)
    auto state = co_await boost::asio::this_coro::cancellation_state;
    auto cancelled = [&] { return state.cancelled() != boost::asio::cancellation_type::none; };
    while (!answer_) {
      if (cancelled()) {
        answer_ = http_answer{};
        break;
      }
      co_await timer_.async_wait(boost::asio::as_tuple(boost::asio::use_awaitable));
    }
    // Cancelled after the answer came (the client left in the same turn):
    // it will not be written.
    if (auto taken = std::exchange(taken_, nullptr)) taken(!cancelled());
    co_return std::move(*answer_);
  }

  bool done() const { return answer_.has_value(); }

 private:
  boost::asio::steady_timer timer_;
  std::optional<http_answer> answer_;
  std::function<void(http_answer)> on_answer_;
  std::function<void(bool)> taken_;  // complete()'s, until wait() resumes
};

}  // namespace sidecast::gateway
