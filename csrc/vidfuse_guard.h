// vidfuse_guard.h: the C++ shims' exception boundary (C++ only, not part of the C API).
// Every entry point runs its body through `guarded`, so no exception crosses into Rust: a
// failure comes back as a malloc'd message the caller frees, NULL on success.
#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <exception>

namespace vidfuse {

// A malloc'd copy of `message` (NULL if out of memory).
inline char *copy_message(const char *message) {
    size_t len = std::strlen(message);
    char *out = static_cast<char *>(std::malloc(len + 1));
    if (out != nullptr) {
        std::memcpy(out, message, len + 1);
    }
    return out;
}

// Runs f, turning any exception into a malloc'd message (NULL on success).
template <typename F> char *guarded(F &&f) noexcept {
    try {
        f();
        return nullptr;
    } catch (const c10::Error &e) {
        return copy_message(e.what_without_backtrace());
    } catch (const std::exception &e) {
        return copy_message(e.what());
    } catch (...) {
        return copy_message("unknown C++ exception");
    }
}

} // namespace vidfuse
