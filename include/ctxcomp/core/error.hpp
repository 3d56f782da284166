// ctxcomp::Error and the precondition checks every public entry point uses.
// Messages name the argument and the values seen; with -fno-exceptions they go to a
// host-settable handler instead (which must not return).
#pragma once
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <stdexcept>
#include <string>

namespace ctxcomp {

/// The one exception type ctxcomp throws. Derived from std::runtime_error.
class Error : public std::runtime_error {
 public:
  /// An error with this message.
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

/// Handler used when exceptions are disabled. It receives the message and must not return.
using ErrorHandler = void (*)(const char* message);

namespace detail {
inline void default_error_handler(const char* message) {
  std::fprintf(stderr, "ctxcomp: fatal error: %s\n", message);
  std::abort();
}
inline ErrorHandler& error_handler_slot() {
  static ErrorHandler handler = &default_error_handler;
  return handler;
}
}  // namespace detail

/// Installs the handler called instead of `throw` when built with -fno-exceptions.
inline ErrorHandler set_error_handler(ErrorHandler handler) {
  ErrorHandler old = detail::error_handler_slot();
  detail::error_handler_slot() = handler ? handler : &detail::default_error_handler;
  return old;
}

namespace detail {
template <class... Parts>
std::string concat(const Parts&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  return os.str();
}
}  // namespace detail

/// Reports an error: throws ctxcomp::Error, or calls the handler under -fno-exceptions.
[[noreturn]] inline void raise(const std::string& message) {
#if defined(__cpp_exceptions) || defined(__EXCEPTIONS)
  throw Error(message);
#else
  detail::error_handler_slot()(message.c_str());
  std::abort();
#endif
}

template <class... Parts>
[[noreturn]] void fail(const Parts&... parts) {
  raise(detail::concat(parts...));
}

}  // namespace ctxcomp

/// Checks a precondition at a public boundary; the remaining arguments form the message.
#define CTXCOMP_CHECK(cond, ...)             \
  do {                                       \
    if (!(cond)) ::ctxcomp::fail(__VA_ARGS__); \
  } while (0)
