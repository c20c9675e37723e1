#pragma once
// Included before Asio by every header of ours that includes it.
// Asio's per-thread cache is laid out by this value: every translation unit
// that uses Asio must see the one sidecast_asio gives (core/CMakeLists.txt).
#if !defined(BOOST_ASIO_RECYCLING_ALLOCATOR_CACHE_SIZE) || BOOST_ASIO_RECYCLING_ALLOCATOR_CACHE_SIZE != 32
#error "link sidecast_asio (PUBLIC definitions) to use Asio: BOOST_ASIO_RECYCLING_ALLOCATOR_CACHE_SIZE must be 32"
#endif
