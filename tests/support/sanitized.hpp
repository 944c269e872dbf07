// PEFT_TEST_SANITIZED: defined when the executable is built with a sanitizer that owns malloc and operator new
// (AddressSanitizer, ThreadSanitizer, MemorySanitizer), under GCC (__SANITIZE_*__) and clang (__has_feature). Tests
// that replace operator new to count allocations leave the replacement out there.
#pragma once

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define PEFT_TEST_SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer) || __has_feature(memory_sanitizer)
#define PEFT_TEST_SANITIZED 1
#endif
#endif
