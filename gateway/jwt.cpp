#include "gateway/jwt.hpp"

#include <openssl/bio.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/pem.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>

#include <boost/json.hpp>

#include "gateway/codec/socketio.hpp"

namespace sidecast::gateway::jwt {

namespace json = boost::json;

struct verifier::pkey {
  EVP_PKEY* key = nullptr;
  ~pkey() { EVP_PKEY_free(key); }
};

namespace {

constexpr std::string_view alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

int value_of(char c) {
  auto pos = alphabet.find(c);
  return pos == std::string_view::npos ? -1 : static_cast<int>(pos);
}

std::optional<json::object> object_of(std::string_view text) {
  boost::system::error_code ec;
  auto v = json::parse(text, ec);
  if (ec || !v.is_object()) return std::nullopt;
  return std::move(v.as_object());
}

// NumericDates past ±2^40 s (≈ 35,000 years) are refused as malformed: the
// bound keeps the conversions and the leeway arithmetic below defined.
constexpr std::int64_t date_bound = std::int64_t{1} << 40;

// A NumericDate claim: absent (nullopt), or its value; `bad` is set when it
// is there but not a number within date_bound.
std::optional<std::int64_t> date_claim(const json::object& o, std::string_view name, bool& bad) {
  auto* v = o.if_contains(name);
  if (!v) return std::nullopt;
  double d = 0;
  if (v->is_int64()) d = static_cast<double>(v->as_int64());
  else if (v->is_uint64()) d = static_cast<double>(v->as_uint64());
  else if (v->is_double()) d = v->as_double();
  else bad = true;
  if (!bad && !(std::isfinite(d) && d > -static_cast<double>(date_bound) && d < static_cast<double>(date_bound)))
    bad = true;
  if (bad) return std::nullopt;
  return static_cast<std::int64_t>(d);
}

using verdict = boost::system::result<claims, std::string>;

verdict fail(std::string why) { return verdict{boost::system::in_place_error, std::move(why)}; }

}  // namespace

std::optional<std::string> base64url_decode(std::string_view text) {
  if (text.size() % 4 == 1) return std::nullopt;
  std::string out;
  out.reserve(text.size() * 3 / 4);
  unsigned buffer = 0;
  int bits = 0;
  for (char c : text) {
    int v = value_of(c);
    if (v < 0) return std::nullopt;
    buffer = (buffer << 6) | static_cast<unsigned>(v);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out.push_back(static_cast<char>((buffer >> bits) & 0xff));
    }
  }
  if (bits > 0 && (buffer & ((1u << bits) - 1)) != 0) return std::nullopt;  // non-zero padding bits
  return out;
}

std::string base64url_encode(std::string_view bytes) {
  std::string out;
  unsigned buffer = 0;
  int bits = 0;
  for (unsigned char c : bytes) {
    buffer = (buffer << 8) | c;
    bits += 8;
    while (bits >= 6) {
      bits -= 6;
      out.push_back(alphabet[(buffer >> bits) & 0x3f]);
    }
  }
  if (bits > 0) out.push_back(alphabet[(buffer << (6 - bits)) & 0x3f]);
  return out;
}

verifier::verifier(keys k) : keys_{std::move(k)} {
  if (!keys_.rs256_public_pem.empty()) {
    rsa_ = std::make_unique<pkey>();
    BIO* bio = BIO_new_mem_buf(keys_.rs256_public_pem.data(), static_cast<int>(keys_.rs256_public_pem.size()));
    rsa_->key = bio ? PEM_read_bio_PUBKEY(bio, nullptr, nullptr, nullptr) : nullptr;
    BIO_free(bio);
    if (!rsa_->key || EVP_PKEY_base_id(rsa_->key) != EVP_PKEY_RSA)
      throw std::invalid_argument("JWT public key: not an RSA public key in PEM form");
  }
}

verifier::~verifier() = default;
verifier::verifier(verifier&&) noexcept = default;
verifier& verifier::operator=(verifier&&) noexcept = default;

boost::system::result<claims, std::string> verifier::verify_auth(std::string_view auth,
                                                                 std::chrono::system_clock::time_point now) const {
  boost::system::error_code ec;
  auto value = socketio::parse_json(auth, ec);
  if (ec || !value.is_object()) return fail("auth is not a JSON object");
  auto* token = value.as_object().if_contains("token");
  if (!token || !token->is_string()) return fail("authentication required: auth.token");
  auto checked = verify(token->as_string(), now, keys_.leeway);
  if (!checked) return fail("invalid token: " + checked.error());
  return checked;
}

boost::system::result<claims, std::string> verifier::verify(std::string_view token,
                                                            std::chrono::system_clock::time_point now,
                                                            std::chrono::seconds leeway) const {
  auto first = token.find('.');
  auto second = first == std::string_view::npos ? first : token.find('.', first + 1);
  if (second == std::string_view::npos || token.find('.', second + 1) != std::string_view::npos)
    return fail("malformed token");
  auto signed_part = token.substr(0, second);
  auto header_text = base64url_decode(token.substr(0, first));
  auto payload_text = base64url_decode(token.substr(first + 1, second - first - 1));
  auto signature = base64url_decode(token.substr(second + 1));
  if (!header_text || !payload_text || !signature) return fail("malformed token");
  auto header = object_of(*header_text);
  auto payload = object_of(*payload_text);
  if (!header || !payload) return fail("malformed token");
  auto* alg = header->if_contains("alg");
  if (!alg || !alg->is_string()) return fail("token has no alg");
  // RFC 7515, 4.1.11: a token whose header names extensions the recipient
  // must understand is refused when it does not; this one understands none.
  if (header->contains("crit")) return fail("token has a crit header (no extension is understood)");

  if (alg->as_string() == "HS256" && !keys_.hs256_secret.empty()) {
    unsigned char mac[EVP_MAX_MD_SIZE];
    unsigned int mac_len = 0;
    HMAC(EVP_sha256(), keys_.hs256_secret.data(), static_cast<int>(keys_.hs256_secret.size()),
         reinterpret_cast<const unsigned char*>(signed_part.data()), signed_part.size(), mac, &mac_len);
    if (signature->size() != mac_len || CRYPTO_memcmp(mac, signature->data(), mac_len) != 0)
      return fail("bad signature");
  } else if (alg->as_string() == "RS256" && rsa_) {
    EVP_MD_CTX* ctx = EVP_MD_CTX_new();
    bool ok = ctx && EVP_DigestVerifyInit(ctx, nullptr, EVP_sha256(), nullptr, rsa_->key) == 1 &&
              EVP_DigestVerify(ctx, reinterpret_cast<const unsigned char*>(signature->data()), signature->size(),
                               reinterpret_cast<const unsigned char*>(signed_part.data()), signed_part.size()) == 1;
    EVP_MD_CTX_free(ctx);
    if (!ok) return fail("bad signature");
  } else {
    return fail("algorithm not accepted: " + std::string{alg->as_string()});
  }

  auto seconds = std::chrono::duration_cast<std::chrono::seconds>(now.time_since_epoch()).count();
  bool bad_date = false;
  auto exp = date_claim(*payload, "exp", bad_date);
  auto nbf = date_claim(*payload, "nbf", bad_date);
  if (bad_date) return fail("exp or nbf is not a date");
  if (!exp && keys_.require_exp) return fail("token has no exp");
  if (exp && seconds > *exp + leeway.count()) return fail("token expired");
  if (nbf && seconds + leeway.count() < *nbf) return fail("token not valid yet");
  if (!keys_.audience.empty()) {
    // RFC 7519 4.1.3: one string, or an array of them.
    auto* aud = payload->if_contains("aud");
    auto names = [&](const boost::json::value& v) { return v.is_string() && v.as_string() == keys_.audience; };
    bool ours = aud && (names(*aud) || (aud->is_array() && std::any_of(aud->as_array().begin(),
                                                                         aud->as_array().end(), names)));
    if (!ours) return fail("token is not for this audience");
  }
  if (!keys_.issuer.empty()) {
    auto* iss = payload->if_contains("iss");
    if (!iss || !iss->is_string() || iss->as_string() != keys_.issuer) return fail("token's issuer is not accepted");
  }
  auto* sub = payload->if_contains("sub");
  if (!sub || !sub->is_string() || sub->as_string().empty()) return fail("token has no subject");
  return claims{std::string{sub->as_string()}, std::move(*payload_text), exp};
}

}  // namespace sidecast::gateway::jwt
