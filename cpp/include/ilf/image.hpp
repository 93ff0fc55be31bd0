// 8-bit RGB images, as the VAE decoder's output, and PNG files of them.
#pragma once

#include <cstdint>
#include <string>
#include <vector>
#include "ilf/export.h"

namespace ilf {

// -- images -------------------------------------------------------------------------------------

struct ILF_API Image {
  int height = 0;
  int width = 0;
  std::vector<uint8_t> rgb;  // height * width * 3, row-major
};

/// An 8-bit RGB PNG file (written whole, or an Error(config) naming the path).
ILF_API void write_png(const std::string& path, const Image& image);

}  // namespace ilf
