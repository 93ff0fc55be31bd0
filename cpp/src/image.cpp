// PNG files of images (the encoder: png.cpp).
#include "internal.hpp"

namespace ilf {

void write_png(const std::string& path, const Image& image) {
  std::vector<uint8_t> data = detail::encode_png(image);
  std::string why;  // written beside `path` and renamed into place: a file replaced whole or not at all
  if (!detail::write_atomic(path, std::string(data.begin(), data.end()), &why))
    detail::config_error("cannot write " + path + ": " + why);
}

}  // namespace ilf
