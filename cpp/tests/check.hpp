// The unit tests' checks (cpp/tests/*.cpp, one ilf-tests binary): CHECK and EXPECT_ERROR count, print
// the failing line, and go on; main() exits 1 if any failed.
#pragma once

#include <ilf/error.hpp>

#include <functional>
#include <iostream>
#include <string>

namespace ilf_tests {

inline int failures = 0, checks = 0;

#define CHECK(cond)                                                                   \
  do {                                                                                \
    ++::ilf_tests::checks;                                                            \
    if (!(cond)) {                                                                    \
      ++::ilf_tests::failures;                                                        \
      std::cerr << __FILE__ << ":" << __LINE__ << ": CHECK(" #cond ") failed\n";      \
    }                                                                                 \
  } while (0)

/// `body` throws an ilf::Error of `kind` whose message contains `part`, on one line.
inline void expect_error(const std::function<void()>& body, ilf::Error::Kind kind, const std::string& part, const char* file,
                         int line) {
  ++checks;
  try {
    body();
  } catch (const ilf::Error& e) {
    std::string m = e.what();
    if (e.kind() == kind && m.find(part) != std::string::npos && m.find('\n') == std::string::npos) return;
    std::cerr << file << ":" << line << ": wrong error: " << m << " (wanted \"" << part << "\")\n";
    ++failures;
    return;
  }
  std::cerr << file << ":" << line << ": no error (wanted \"" << part << "\")\n";
  ++failures;
}
#define EXPECT_ERROR(body, kind, part) \
  ::ilf_tests::expect_error([&] { body; }, ilf::Error::Kind::kind, part, __FILE__, __LINE__)

// The test groups of other files
void test_denoise(const std::string& tmpdir);  // loop.cpp: denoise through a fake engine

}  // namespace ilf_tests
