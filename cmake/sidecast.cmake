# Shared build helpers: one place for the language level, warnings and
# sanitizer presets, so every component library is built the same way.

option(SIDECAST_WERROR "Treat warnings as errors" OFF)
set(SIDECAST_SANITIZE "" CACHE STRING "Sanitizers: '', 'address,undefined' or 'thread'")

function(sidecast_apply_defaults target)
  target_compile_features(${target} PUBLIC cxx_std_20)
  target_compile_options(${target} PRIVATE -Wall -Wextra -Wpedantic -Wshadow
                                           -Wnon-virtual-dtor -Wno-missing-field-initializers)
  if(SIDECAST_WERROR)
    target_compile_options(${target} PRIVATE -Werror)
  endif()
endfunction()

if(SIDECAST_SANITIZE)
  # Undefined behaviour aborts, so a test that hits it fails instead of printing.
  add_compile_options(-fsanitize=${SIDECAST_SANITIZE} -fno-sanitize-recover=all -fno-omit-frame-pointer)
  add_link_options(-fsanitize=${SIDECAST_SANITIZE})
  if(CMAKE_CXX_COMPILER_ID STREQUAL "Clang")
    # clang's function sanitizer misfires on coroutine frames.
    add_compile_options(-fno-sanitize=function)
  endif()
endif()

# sidecast_fuzzed(library): in a fuzz build (SIDECAST_FUZZ, clang), the
# library a tests/fuzz target exercises gets libFuzzer's coverage hooks and
# the sanitizers, so the fuzzer is guided by the library's branches, not only
# the harness's; -O1 keeps executions fast in Debug. Whatever else links it
# (unit tests, the gateway) gets the sanitizer runtimes, which also supply the
# coverage hooks. Nothing outside a fuzz build.
function(sidecast_fuzzed library)
  if(SIDECAST_FUZZ)
    target_compile_options(${library} PRIVATE -O1 -fno-omit-frame-pointer
      -fsanitize=fuzzer-no-link,address,undefined -fno-sanitize-recover=undefined)
    target_link_options(${library} INTERFACE -fsanitize=address,undefined)
  endif()
endfunction()

# sidecast_library(name SOURCES ... DEPS ...): a static component library.
function(sidecast_library name)
  cmake_parse_arguments(ARG "" "" "SOURCES;DEPS" ${ARGN})
  add_library(${name} STATIC ${ARG_SOURCES})
  target_include_directories(${name} PUBLIC ${PROJECT_SOURCE_DIR})
  target_link_libraries(${name} PUBLIC ${ARG_DEPS})
  sidecast_apply_defaults(${name})
endfunction()

# sidecast_executable(name SOURCES ... DEPS ...): a thin main over libraries,
# with getpid() answered from a cached value (core/pid_cache.cpp).
function(sidecast_executable name)
  cmake_parse_arguments(ARG "" "" "SOURCES;DEPS" ${ARGN})
  add_executable(${name} ${ARG_SOURCES})
  target_link_libraries(${name} PRIVATE ${ARG_DEPS} sidecast_pid_cache)
  sidecast_apply_defaults(${name})
endfunction()

# sidecast_test(name LABEL label SOURCES ... DEPS ...): a GoogleTest binary
# registered with ctest under the given label.
function(sidecast_test name)
  cmake_parse_arguments(ARG "" "LABEL;TIMEOUT" "SOURCES;DEPS" ${ARGN})
  add_executable(${name} ${ARG_SOURCES})
  target_link_libraries(${name} PRIVATE ${ARG_DEPS} GTest::gtest GTest::gtest_main)
  sidecast_apply_defaults(${name})
  set_target_properties(${name} PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/tests)
  if(NOT ARG_TIMEOUT)
    set(ARG_TIMEOUT 120)
  endif()
  add_test(NAME ${name} COMMAND ${name})
  set_tests_properties(${name} PROPERTIES LABELS "${ARG_LABEL}" TIMEOUT ${ARG_TIMEOUT})
endfunction()
