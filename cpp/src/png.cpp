// PNG writer: 8-bit RGB, filter 0, the rows compressed by zlib (its CRC-32 for the chunks too).
#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>

#include <zlib.h>

#include "internal.hpp"

namespace ilf {
namespace {

void put32(std::vector<uint8_t>& out, uint32_t v) {
  for (int shift = 24; shift >= 0; shift -= 8) out.push_back(static_cast<uint8_t>(v >> shift));
}

void chunk(std::vector<uint8_t>& out, const char* type, const std::vector<uint8_t>& body) {
  put32(out, static_cast<uint32_t>(body.size()));
  size_t start = out.size();
  out.insert(out.end(), type, type + 4);
  out.insert(out.end(), body.begin(), body.end());
  put32(out, static_cast<uint32_t>(::crc32(0L, out.data() + start, static_cast<uInt>(out.size() - start))));
}

}  // namespace

namespace detail {

std::vector<uint8_t> encode_png(const Image& image) {
  if (image.height <= 0 || image.width <= 0 ||
      image.rgb.size() != static_cast<size_t>(image.height) * image.width * 3)
    detail::config_error("an image must be height x width x 3 bytes");
  std::vector<uint8_t> raw;
  size_t row = static_cast<size_t>(image.width) * 3;
  raw.reserve((row + 1) * image.height);
  for (int y = 0; y < image.height; ++y) {
    raw.push_back(0);  // filter: none
    raw.insert(raw.end(), image.rgb.begin() + y * row, image.rgb.begin() + (y + 1) * row);
  }
  // zlib at its default level (6), as PIL and libpng write by default
  uLongf z_size = compressBound(static_cast<uLong>(raw.size()));
  std::vector<uint8_t> z(z_size);
  if (compress2(z.data(), &z_size, raw.data(), static_cast<uLong>(raw.size()), Z_DEFAULT_COMPRESSION) != Z_OK)
    throw std::bad_alloc();  // Z_MEM_ERROR (the buffer is compressBound's: never Z_BUF_ERROR)
  z.resize(z_size);

  std::vector<uint8_t> out = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
  std::vector<uint8_t> ihdr;
  put32(ihdr, image.width);
  put32(ihdr, image.height);
  ihdr.insert(ihdr.end(), {8, 2, 0, 0, 0});  // 8 bits, truecolour, deflate, filter 0, no interlace
  chunk(out, "IHDR", ihdr);
  chunk(out, "IDAT", z);
  chunk(out, "IEND", {});
  return out;
}

}  // namespace detail
}  // namespace ilf
