#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>

namespace sidecast::core {

/// Fills `out` from the kernel's cryptographically secure generator
/// (getrandom(2)), through a buffer per thread: one system call per 512
/// bytes. For what a client must not guess: session ids, recovery ids.
/// Throws std::system_error only if the kernel refuses (it does not block
/// once the system has booted).
void secure_random(std::span<std::uint8_t> out);

/// `n` characters of the base64url alphabet, 6 secure random bits each.
std::string random_token(std::size_t n);

}  // namespace sidecast::core
