#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace ilf::detail {

/// Incremental SHA-256; `hex()` finishes it (call once).
class Sha256 {
 public:
  Sha256();
  void update(const void* data, size_t size);
  std::string hex();

 private:
  uint32_t state_[8];
  unsigned char buffer_[64];
  size_t buffered_ = 0;
  uint64_t length_ = 0;
};

}  // namespace ilf::detail
