#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/pem.h>
#include <openssl/rsa.h>

#include <gtest/gtest.h>

#include "gateway/jwt.hpp"

namespace sidecast::gateway::jwt {
namespace {

using namespace std::chrono_literals;

const auto now = std::chrono::system_clock::time_point{std::chrono::seconds(1'800'000'000)};

std::string hs256(const std::string& header, const std::string& payload, const std::string& secret) {
  auto signed_part = base64url_encode(header) + "." + base64url_encode(payload);
  unsigned char mac[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  HMAC(EVP_sha256(), secret.data(), static_cast<int>(secret.size()),
       reinterpret_cast<const unsigned char*>(signed_part.data()), signed_part.size(), mac, &len);
  return signed_part + "." + base64url_encode(std::string(reinterpret_cast<char*>(mac), len));
}

TEST(Base64Url, RoundTripAndStrictness) {
  for (std::string s : std::vector<std::string>{"", "f", "fo", "foo", "foob", std::string("\xff\xfe\x00\x01", 4)})
    EXPECT_EQ(base64url_decode(base64url_encode(s)), s);
  EXPECT_EQ(base64url_encode("\xfb\xff"), "-_8");
  EXPECT_FALSE(base64url_decode("a"));     // impossible length
  EXPECT_FALSE(base64url_decode("ab=="));  // padding is not base64url
  EXPECT_FALSE(base64url_decode("a+b/"));  // standard alphabet
  EXPECT_FALSE(base64url_decode("ab"));    // non-zero trailing bits ("ab" -> 0x69 + 4 bits)
}

TEST(Jwt, Hs256AcceptsGoodTokensOnly) {
  verifier v{{.hs256_secret = "s3cret"}};
  const std::string header = R"({"alg":"HS256","typ":"JWT"})";
  auto good = v.verify(hs256(header, R"({"sub":"ann","exp":1800000100})", "s3cret"), now);
  ASSERT_TRUE(good) << good.error();
  EXPECT_EQ(good->subject, "ann");

  struct bad {
    const char* what;
    std::string token;
    const char* why;
  };
  const bad cases[] = {
      {"wrong secret", hs256(header, R"({"sub":"ann"})", "guess"), "bad signature"},
      {"expired", hs256(header, R"({"sub":"ann","exp":1799999000})", "s3cret"), "token expired"},
      {"not yet", hs256(header, R"({"sub":"ann","exp":1800002000,"nbf":1800001000})", "s3cret"),
       "token not valid yet"},
      // Without exp a stolen token would never expire.
      {"no exp", hs256(header, R"({"sub":"ann"})", "s3cret"), "token has no exp"},
      {"no subject", hs256(header, R"({"exp":1800000100})", "s3cret"), "token has no subject"},
      {"alg none", base64url_encode(R"({"alg":"none"})") + "." + base64url_encode(R"({"sub":"ann"})") + ".",
       "algorithm not accepted: none"},
      {"RS256 not configured", hs256(R"({"alg":"RS256"})", R"({"sub":"ann"})", "s3cret"),
       "algorithm not accepted: RS256"},
      {"two parts", "abc.def", "malformed token"},
      {"four parts", "a.b.c.d", "malformed token"},
      {"garbage", "!!.??.**", "malformed token"},
      {"payload not JSON", base64url_encode(header) + "." + base64url_encode("nope") + ".x", "malformed token"},
      // Dates that are not numbers, or too far out to compute with (an int64
      // cast of 1e300, or exp + leeway past INT64_MAX, was undefined).
      {"exp a string", hs256(header, R"({"sub":"ann","exp":"soon"})", "s3cret"), "exp or nbf is not a date"},
      {"exp huge", hs256(header, R"({"sub":"ann","exp":1e300})", "s3cret"), "exp or nbf is not a date"},
      {"exp near INT64_MAX", hs256(header, R"({"sub":"ann","exp":9223372036854775800})", "s3cret"),
       "exp or nbf is not a date"},
      {"exp past INT64_MAX", hs256(header, R"({"sub":"ann","exp":18446744073709551615})", "s3cret"),
       "exp or nbf is not a date"},
      {"nbf very negative", hs256(header, R"({"sub":"ann","nbf":-1e19})", "s3cret"), "exp or nbf is not a date"},
      // RFC 7515, 4.1.11: an extension the recipient must understand, and does not.
      {"crit", hs256(R"({"alg":"HS256","crit":["x"],"x":1})", R"({"sub":"ann","exp":1800000100})", "s3cret"),
       "token has a crit header (no extension is understood)"},
  };
  for (const auto& c : cases) {
    auto r = v.verify(c.token, now);
    ASSERT_FALSE(r) << c.what;
    EXPECT_EQ(r.error(), c.why) << c.what;
  }
  EXPECT_TRUE(v.verify(hs256(header, R"({"sub":"ann","exp":1799999990})", "s3cret"), now))
      << "30 s of leeway for clock skew";
}

// --jwt-audience and --jwt-issuer: a token minted for another service with
// the same key is refused; --jwt-allow-no-exp takes one without exp.
// The auth object is read as deep as payloads may nest (64), not Boost's
// 32: a valid token beside a field nested 40 deep was "authentication
// required: auth.token". Auth that is no JSON object says so.
TEST(Jwt, AuthIsReadAsDeepAsPayloads) {
  verifier v{{.hs256_secret = "s3cret"}};
  auto token = hs256(R"({"alg":"HS256","typ":"JWT"})", R"({"sub":"ann","exp":1800000100})", "s3cret");
  auto auth = R"({"token":")" + token + R"(","deep":)" + std::string(40, '[') + std::string(40, ']') + "}";
  auto checked = v.verify_auth(auth, now);
  ASSERT_TRUE(checked) << checked.error();
  EXPECT_EQ(checked->subject, "ann");
  auto broken = v.verify_auth("{\"token\":", now);
  ASSERT_FALSE(broken);
  EXPECT_EQ(broken.error(), "auth is not a JSON object");
  auto none = v.verify_auth("{}", now);
  ASSERT_FALSE(none);
  EXPECT_EQ(none.error(), "authentication required: auth.token");
}

// The connect's auth is checked with the keys' leeway (--jwt-leeway), and
// the claims carry exp for --jwt-end-at-exp.
TEST(Jwt, AuthTakesTheKeysLeewayAndGivesExp) {
  auto token = hs256(R"({"alg":"HS256","typ":"JWT"})", R"({"sub":"ann","exp":1799999990})", "s3cret");
  auto auth = R"({"token":")" + token + R"("})";
  verifier lenient{{.hs256_secret = "s3cret"}};  // 30 s by default
  auto checked = lenient.verify_auth(auth, now);
  ASSERT_TRUE(checked) << checked.error();
  EXPECT_EQ(checked->exp, 1799999990);
  verifier strict{{.hs256_secret = "s3cret", .leeway = std::chrono::seconds(5)}};
  auto late = strict.verify_auth(auth, now);
  ASSERT_FALSE(late);
  EXPECT_EQ(late.error(), "invalid token: token expired");
}

TEST(Jwt, AudienceIssuerAndExpAreThePolicysToSet) {
  const std::string header = R"({"alg":"HS256","typ":"JWT"})";
  verifier v{{.hs256_secret = "s3cret", .audience = "sidecast", .issuer = "https://auth.example"}};
  auto token = [&](const char* payload) { return hs256(header, payload, "s3cret"); };
  EXPECT_TRUE(v.verify(token(R"({"sub":"a","exp":1800000100,"aud":"sidecast","iss":"https://auth.example"})"), now));
  EXPECT_TRUE(v.verify(
      token(R"({"sub":"a","exp":1800000100,"aud":["billing","sidecast"],"iss":"https://auth.example"})"), now))
      << "aud may be an array";
  struct bad {
    const char* payload;
    const char* why;
  };
  for (const auto& [payload, why] : {
           bad{R"({"sub":"a","exp":1800000100,"iss":"https://auth.example"})", "token is not for this audience"},
           bad{R"({"sub":"a","exp":1800000100,"aud":"billing","iss":"https://auth.example"})",
               "token is not for this audience"},
           bad{R"({"sub":"a","exp":1800000100,"aud":["billing"],"iss":"https://auth.example"})",
               "token is not for this audience"},
           bad{R"({"sub":"a","exp":1800000100,"aud":"sidecast"})", "token's issuer is not accepted"},
           bad{R"({"sub":"a","exp":1800000100,"aud":"sidecast","iss":"https://evil.example"})",
               "token's issuer is not accepted"},
       }) {
    auto r = v.verify(token(payload), now);
    ASSERT_FALSE(r) << payload;
    EXPECT_EQ(r.error(), why) << payload;
  }
  verifier lax{{.hs256_secret = "s3cret", .require_exp = false}};
  EXPECT_TRUE(lax.verify(token(R"({"sub":"a"})"), now));
}

TEST(Jwt, Rs256WithAPemPublicKey) {
  EVP_PKEY* key = EVP_RSA_gen(2048);
  ASSERT_NE(key, nullptr);
  BIO* bio = BIO_new(BIO_s_mem());
  PEM_write_bio_PUBKEY(bio, key);
  char* pem_data = nullptr;
  long pem_len = BIO_get_mem_data(bio, &pem_data);
  std::string pem(pem_data, static_cast<std::size_t>(pem_len));
  BIO_free(bio);

  auto signed_part =
      base64url_encode(R"({"alg":"RS256"})") + "." + base64url_encode(R"({"sub":"bob","exp":1800000100})");
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  EVP_DigestSignInit(ctx, nullptr, EVP_sha256(), nullptr, key);
  size_t sig_len = 0;
  EVP_DigestSign(ctx, nullptr, &sig_len, reinterpret_cast<const unsigned char*>(signed_part.data()), signed_part.size());
  std::string sig(sig_len, '\0');
  EVP_DigestSign(ctx, reinterpret_cast<unsigned char*>(sig.data()), &sig_len,
                 reinterpret_cast<const unsigned char*>(signed_part.data()), signed_part.size());
  EVP_MD_CTX_free(ctx);
  EVP_PKEY_free(key);
  auto token = signed_part + "." + base64url_encode(sig.substr(0, sig_len));

  verifier v{{.rs256_public_pem = pem}};
  auto r = v.verify(token, now);
  ASSERT_TRUE(r) << r.error();
  EXPECT_EQ(r->subject, "bob");
  auto tampered = token;
  tampered[tampered.size() / 2] ^= 1;
  EXPECT_FALSE(v.verify(tampered, now));
  EXPECT_THROW(verifier({.rs256_public_pem = "not a key"}), std::invalid_argument);
}

}  // namespace
}  // namespace sidecast::gateway::jwt
