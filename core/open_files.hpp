#pragma once
// The process's limit on open file descriptors. A server holds one per
// connection (and libzmq a few per socket), and the usual soft limit
// (1024, systemd's default) is far below the connection limits: past it
// every accept fails.
#include <cstdint>

namespace sidecast::core {

/// Raises the soft RLIMIT_NOFILE to the hard limit, once, at start-up.
/// Returns the soft limit now in force (0 when it could not be read).
std::uint64_t raise_open_files_limit();

}  // namespace sidecast::core
