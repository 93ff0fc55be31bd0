#pragma once

#include <cstddef>
#include <memory>
#include <string>

namespace ilf::detail {

/// Incremental SHA-256 (OpenSSL's EVP, which uses the CPU's SHA extensions where it has them);
/// `hex()` finishes it (call once).
class Sha256 {
 public:
  Sha256();
  ~Sha256();
  Sha256(const Sha256&) = delete;
  Sha256& operator=(const Sha256&) = delete;
  void update(const void* data, size_t size);
  std::string hex();

 private:
  struct Context;
  std::unique_ptr<Context> context_;
};

}  // namespace ilf::detail
