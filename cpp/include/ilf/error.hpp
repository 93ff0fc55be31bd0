// ilf::Error: the one exception type of the library (docs/cpp.md).
#pragma once

#include <stdexcept>
#include <string>
#include "ilf/export.h"

namespace ilf {

/// Every error this library raises: one line, no trailing newline.
/// `bundle`: a bundle that is missing, edited, incomplete or of an unknown schema version;
/// `config`: a request or option that cannot work (the CLI exits 2 on both);
/// `engine`: the engine failed while running (the CLI exits 1).
class ILF_API Error : public std::runtime_error {
 public:
  enum class Kind { bundle, config, engine };
  Error(Kind kind, const std::string& message);
  Kind kind() const noexcept { return kind_; }

 private:
  Kind kind_;
};

}  // namespace ilf
