// ctxcomp::Error and the precondition checks every public entry point uses.
// Messages name the argument and the values seen; with -fno-exceptions they go to a
// host-settable handler instead (which must not return).
#pragma once
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <initializer_list>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>

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
/// One part of an error message: text, a character, an integer or a floating-point value, as
/// `std::ostream <<` writes it. Messages are built by one non-template function (concat below),
/// so each distinct list of argument types of ctxcomp::fail costs its caller an array of these,
/// not a stream of its own.
struct MessagePart {
  enum class Kind { text, character, signed_integer, unsigned_integer, real, boolean } kind;
  std::string_view s;
  long long i = 0;
  unsigned long long u = 0;
  double d = 0;
  MessagePart(const char* x) : kind(Kind::text), s(x) {}
  MessagePart(const std::string& x) : kind(Kind::text), s(x) {}
  MessagePart(std::string_view x) : kind(Kind::text), s(x) {}
  MessagePart(char x) : kind(Kind::character), i(x) {}
  MessagePart(bool x) : kind(Kind::boolean), i(x) {}
  MessagePart(float x) : kind(Kind::real), d(x) {}  // ostream writes a float as a double
  MessagePart(double x) : kind(Kind::real), d(x) {}
  template <class T, std::enable_if_t<std::is_integral_v<T> && std::is_signed_v<T>, int> = 0>
  MessagePart(T x) : kind(Kind::signed_integer), i(x) {}
  template <class T, std::enable_if_t<std::is_integral_v<T> && std::is_unsigned_v<T>, int> = 0>
  MessagePart(T x) : kind(Kind::unsigned_integer), u(x) {}
};

/// The parts written one after the other into one string.
inline std::string concat(std::initializer_list<MessagePart> parts) {
  std::ostringstream os;
  for (const MessagePart& p : parts) {
    switch (p.kind) {
      case MessagePart::Kind::text: os << p.s; break;
      case MessagePart::Kind::character: os << char(p.i); break;
      case MessagePart::Kind::boolean: os << bool(p.i); break;
      case MessagePart::Kind::signed_integer: os << p.i; break;
      case MessagePart::Kind::unsigned_integer: os << p.u; break;
      case MessagePart::Kind::real: os << p.d; break;
    }
  }
  return os.str();
}
}  // namespace detail

namespace detail {
/// The innermost active RollbackScope of this thread (a linked list through `prev`).
struct RollbackNode {
  void (*undo)(void*) = nullptr;
  void* self = nullptr;
  RollbackNode* prev = nullptr;
};
inline RollbackNode*& rollback_top() noexcept {
  static thread_local RollbackNode* top = nullptr;
  return top;
}
}  // namespace detail

/// Undoes a partial change if an error is reported before dismiss(): a call that must modify
/// its outputs before a check it cannot do earlier (e.g. a mask that reads the cache's new
/// slots) wraps that stretch in a scope. With exceptions the undo runs while the error unwinds
/// through the scope; with -fno-exceptions ctxcomp::raise runs every active scope's undo,
/// innermost first, before calling the error handler. Either way the handler or the catcher
/// sees the outputs as they were before the call.
template <class F>
class RollbackScope {
 public:
  /// Registers `undo` (called at most once).
  explicit RollbackScope(F undo) : undo_(std::move(undo)), node_{&call, this, detail::rollback_top()} {
    detail::rollback_top() = &node_;
  }
  RollbackScope(const RollbackScope&) = delete;
  RollbackScope& operator=(const RollbackScope&) = delete;
  /// Runs the undo if an exception is leaving the scope.
  ~RollbackScope() {
    unlink();
#if defined(__cpp_exceptions) || defined(__EXCEPTIONS)
    if (armed_ && std::uncaught_exceptions() > uncaught_) undo_();
#endif
  }
  /// The change is complete: nothing to undo.
  void dismiss() noexcept {
    armed_ = false;
    unlink();
  }

 private:
  static void call(void* self) {
    auto* s = static_cast<RollbackScope*>(self);
    if (s->armed_) s->armed_ = false, s->undo_();
  }
  void unlink() noexcept {
    if (detail::rollback_top() == &node_) detail::rollback_top() = node_.prev;
  }
  F undo_;
  detail::RollbackNode node_;
  bool armed_ = true;
  int uncaught_ = std::uncaught_exceptions();
};

/// Reports an error: throws ctxcomp::Error, or (under -fno-exceptions) runs the active
/// RollbackScope undos and calls the handler.
[[noreturn]] inline void raise(const std::string& message) {
#if defined(__cpp_exceptions) || defined(__EXCEPTIONS)
  throw Error(message);
#else
  while (detail::RollbackNode* n = detail::rollback_top()) {
    detail::rollback_top() = n->prev;
    n->undo(n->self);
  }
  detail::error_handler_slot()(message.c_str());
  std::abort();
#endif
}

/// Reports an error whose message is the parts written one after the other (text, characters,
/// integers, floating-point values).
template <class... Parts>
[[noreturn]] void fail(const Parts&... parts) {
  raise(detail::concat({detail::MessagePart(parts)...}));
}

}  // namespace ctxcomp

/// Checks a precondition at a public boundary; the remaining arguments form the message.
#define CTXCOMP_CHECK(cond, ...)             \
  do {                                       \
    if (!(cond)) ::ctxcomp::fail(__VA_ARGS__); \
  } while (0)
