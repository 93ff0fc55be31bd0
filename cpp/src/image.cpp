// PNG files of images (the encoder: png.cpp).
#include <cerrno>
#include <cstring>
#include <fstream>

#include "internal.hpp"

namespace ilf {

void write_png(const std::string& path, const Image& image) {
  std::vector<uint8_t> data = detail::encode_png(image);
  std::ofstream f(path, std::ios::binary);
  if (!f) detail::config_error("cannot write " + path + ": " + std::strerror(errno));
  f.write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(data.size()));
  if (!f) detail::config_error("cannot write " + path + ": " + std::strerror(errno));
}

}  // namespace ilf
