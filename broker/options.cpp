#include "broker/options.hpp"

#include "core/config.hpp"
#include "proto/codec.hpp"

namespace sidecast::broker {

void add_options(CLI::App& app, broker_config& c) {
  app.add_option("--id", c.id, "Broker id (in logs and Welcome; 1-64 characters without '.' or ':')")
      ->capture_default_str()
      ->check([](const std::string& id) {
        // It prefixes the ids of the broker's own messages (DISCONNECT notices: "<id>:<n>").
        return proto::valid_peer_id(id) ? std::string{} : "a broker id is 1-64 characters without '.' or ':'";
      });
  app.add_option("--router", c.router_endpoint, "ROUTER endpoint for gateways, workers and clients")
      ->capture_default_str();
  app.add_option("--xsub", c.xsub_endpoint, "XSUB endpoint workers publish room events to")
      ->capture_default_str();
  app.add_option("--xpub", c.xpub_endpoint, "XPUB endpoint gateways subscribe to")->capture_default_str();
  core::add_millis(app, "--heartbeat-interval", c.heartbeat_interval, "Heartbeat interval, ms");
  app.add_option("--heartbeat-liveness", c.heartbeat_liveness,
                 "Missed heartbeats before a peer is dropped")
      ->capture_default_str()
      ->check(CLI::Range(1u, 100u));
  core::add_millis(app, "--default-timeout", c.default_timeout, "Deadline for requests that carry none, ms");
  core::add_millis(app, "--max-timeout", c.max_timeout, "Upper bound on any request's deadline, ms");
  app.add_option("--queue-limit", c.limits.queue_limit,
                 "Waiting requests per service before new ones get 'busy'")
      ->capture_default_str()
      ->check(CLI::Range(std::size_t{1}, std::size_t{10000000}));
  app.add_option("--queue-bytes", c.limits.queue_bytes,
                 "Bytes of the waiting requests of all services together before new ones get 'busy' (a request "
                 "may be up to --max-message-bytes, and wait up to --max-timeout)")
      ->capture_default_str()
      ->check(CLI::Range(std::size_t{1} << 16, std::size_t{1} << 40));
  app.add_option("--max-services", c.limits.max_services,
                 "Services known at once; a request naming another gets 'unavailable' at once. Names no worker "
                 "has served are forgotten when no request for them waits")
      ->capture_default_str()
      ->check(CLI::Range(std::size_t{1}, std::size_t{1000000}));
  app.add_option("--max-service-bytes", c.max_service_bytes,
                 "Longest service name a request or a worker's Hello may carry (each is a label of the broker's "
                 "metrics); a longer one is refused BAD_REQUEST, counted as dropped service_limit")
      ->capture_default_str()
      ->check(CLI::Range(std::size_t{1}, std::size_t{4096}));
  app.add_option("--max-capacity", c.limits.max_capacity,
                 "Jobs one worker may hold of one service at once: a larger capacity in its Hello is taken as "
                 "this (logged; sidecast_broker_capacity_clamped_total)")
      ->capture_default_str()
      ->check(CLI::Range(1u, 10000000u));
  app.add_option("--max-attempts", c.limits.max_attempts,
                 "Dispatches of one request before 'worker_lost'")
      ->capture_default_str()
      ->check(CLI::Range(1u, 100u));
  app.add_option("--max-parked", c.max_parked,
                 "Answers and events kept for live peers whose connection is gone for the moment (they are "
                 "replacing it), until they are back or their heartbeat liveness runs out; past it, such a "
                 "message is reported undelivered at once")
      ->capture_default_str();
  app.add_option("--max-parked-bytes", c.max_parked_bytes, "... and their bytes at most")->capture_default_str();
  app.add_option("--max-forwards", c.max_forwards,
                 "HTTP requests relayed between gateways remembered until answered, so that when the owner "
                 "gateway is lost each asker hears at once; past it a relayed request waits out its relay "
                 "deadline if its owner dies")
      ->capture_default_str();
  app.add_option("--max-peers", c.max_peers,
                 "Registered peers (gateways, workers, clients) at once; a new one's Hello past it is refused "
                 "(BUSY), counted as dropped peer_limit")
      ->capture_default_str()
      ->check(CLI::Range(std::size_t{1}, std::size_t{10000000}));
  core::add_millis(app, "--gateway-gone-after", c.gateway_gone_after,
                   "A gateway silent past its heartbeat liveness is dropped; silent this much longer (not back "
                   "with the same sid prefix), every worker is told its sockets are gone (GatewayGone), so that "
                   "services forget them. A gateway back after that ends its sockets, and its clients reconnect "
                   "(0: at once when dropped)",
                   0);
  app.add_option("--kept-sent", c.kept_sent,
                 "Messages sent to each peer kept until its heartbeats say it read them (from a peer that does "
                 "not say, those of its last heartbeat interval), so that those that die in a socket the peer "
                 "replaces are sent again (0: none)")
      ->capture_default_str();
  app.add_option("--kept-sent-bytes", c.kept_sent_bytes, "Bytes those kept messages may hold, per peer")
      ->capture_default_str();
  app.add_option("--event-streams", c.event_streams,
                 "Counters numbering each topic's events, by which gateways count the events they lost: a topic "
                 "hashes to a set of four, and keeps one while it is among the set's four last published (a "
                 "fifth takes the oldest: both topics' counts restart, and no event is lost). A few times the "
                 "rooms and namespaces active at once; rounded up to a power of two, 32 bytes each")
      ->capture_default_str()
      ->check(CLI::Range(std::size_t{1}, std::size_t{1} << 24));
  auto* pair = app.add_option("--pair", c.pair_role,
                              "This broker's place in a primary/backup pair (Binary Star): primary or backup. "
                              "Gateways and workers given both (--broker, --backup-broker) use the active one and "
                              "move to the other when it goes silent; there is no fail-back. With CURVE, both brokers take "
                              "the same --curve-secret")
                   ->check(CLI::IsMember({"primary", "backup"}));
  auto* pair_bind = app.add_option("--pair-bind", c.pair_bind,
                                   "PUB endpoint this broker of a pair says its state on, every heartbeat interval");
  auto* pair_connect =
      app.add_option("--pair-connect", c.pair_connect, "The other broker's --pair-bind endpoint");
  pair->needs(pair_bind)->needs(pair_connect);
  pair_bind->needs(pair);
  pair_connect->needs(pair);
  app.add_option("--curve-secret", c.curve_secret,
                 "Broker's CURVE secret key (Z85): encrypts every socket and admits only --curve-allow keys");
  // Keys to admit without a secret would be ignored: the broker would run
  // in plain text and admit anyone.
  app.add_option("--curve-allow", c.curve_allow, "Public key (Z85) of a gateway or worker allowed in (repeatable)")
      ->needs("--curve-secret");
  app.add_option("--max-message-bytes", c.max_message_bytes,
                 "Largest message a peer may send (ROUTER, XSUB, XPUB); a larger one makes libzmq drop that "
                 "peer's connection (tcp and ipc)")
      ->capture_default_str()
      ->check(CLI::Range(std::int64_t{1024}, std::int64_t{1} << 31));
  app.add_option("--max-subscription-bytes", c.max_subscription_bytes,
                 "Longest subscription (an event topic: a namespace or a room, with its prefix) a peer of the "
                 "XPUB may send; a longer one makes libzmq drop that peer's connection (libzmq keeps each in a "
                 "trie of about 32 bytes per byte). At least the gateways' --max-room-bytes plus their longest "
                 "namespace and 3")
      ->capture_default_str()
      ->check(CLI::Range(std::int64_t{1024}, std::int64_t{1} << 24));  // below, CURVE's handshake would not pass
  // Both directions: an each() callback ran before the value was stored,
  // and copied the default into the receive limits.
  app.add_option_function<int>(
         "--hwm", [&c](int hwm) { c.sndhwm = c.rcvhwm = hwm; },
         "Send/receive high-water mark per peer, messages (libzmq's 0, no limit, is not taken)")
      ->default_str(std::to_string(c.sndhwm))
      ->check(CLI::Range(1, 10000000));
}

}  // namespace sidecast::broker
