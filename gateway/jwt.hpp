#pragma once
// JSON Web Token verification (RFC 7519) for the connect auth payload:
// HS256 with a shared secret, RS256 with a PEM public key, both through
// OpenSSL. Pure apart from the key objects: the caller passes `now`.
#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include <boost/system/result.hpp>

namespace sidecast::gateway::jwt {

struct keys {
  std::string hs256_secret;     // empty: HS256 not accepted
  std::string rs256_public_pem; // empty: RS256 not accepted
  std::string audience;         // non-empty: "aud" must be it (or an array holding it)
  std::string issuer;           // non-empty: "iss" must be it
  bool require_exp = true;      // a token without "exp" is refused (it would never expire)
  std::chrono::seconds leeway{30};  // clock skew allowed on "exp" and "nbf" (verify_auth)
  bool any() const { return !hs256_secret.empty() || !rs256_public_pem.empty(); }
};

struct claims {
  std::string subject;  // "sub": the user id that travels with every request
  std::string payload;  // the payload JSON, as sent
  std::optional<std::int64_t> exp;  // "exp", seconds since the epoch
};

/// A verifier holds the parsed public key; build it once at start-up.
class verifier {
 public:
  /// Throws std::invalid_argument for an unreadable PEM key.
  explicit verifier(keys k);
  ~verifier();
  verifier(verifier&&) noexcept;
  verifier& operator=(verifier&&) noexcept;

  bool enabled() const { return keys_.any(); }
  std::chrono::seconds leeway() const { return keys_.leeway; }

  /// Checks the signature (the header's alg must be one we accept: never
  /// "none"), "exp" (required unless keys::require_exp is off) and "nbf"
  /// (with `leeway`), "aud" and "iss" when the keys name them, and that
  /// "sub" is a string.
  /// The error says why, for the client's connect_error.
  boost::system::result<claims, std::string> verify(std::string_view token,
                                                    std::chrono::system_clock::time_point now,
                                                    std::chrono::seconds leeway = std::chrono::seconds(30)) const;
  /// The same, with the keys' leeway, for the token a connect's auth
  /// payload carries ({"token": "..."}, as text): the error is the client's connect_error message,
  /// "authentication required: auth.token" when there is none.
  boost::system::result<claims, std::string> verify_auth(std::string_view auth,
                                                         std::chrono::system_clock::time_point now) const;

 private:
  struct pkey;
  keys keys_;
  std::unique_ptr<pkey> rsa_;
};

/// base64url without padding (RFC 7515 §2), strict; exposed for tests.
std::optional<std::string> base64url_decode(std::string_view text);
std::string base64url_encode(std::string_view bytes);

}  // namespace sidecast::gateway::jwt
