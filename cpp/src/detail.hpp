// The library's internals that its own tools (ilf-run, ilf-tests) use too: not installed, not
// exported from libilf.so (-fvisibility=hidden). The tools link their own copy (the ilf_detail
// static library, CMakeLists.txt).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "ilf/image.hpp"
#include "ilf/tensor.hpp"

namespace ilf::detail {

/// float32 -> float16 bits, round to nearest even (numpy's astype(float16)); and back (exact).
uint16_t float_to_half(float value) noexcept;
float half_to_float(uint16_t bits) noexcept;

/// .npy files (numpy format 1.0-3.0): float16/float32/float64/int32/int64 little-endian, C order,
/// read as float16, float32 or int64; written as <f2 / <f4 / <i8, version 1.0, as numpy.save does.
Tensor read_npy(const std::string& path);
void write_npy(const std::string& path, const Tensor& tensor);

/// An 8-bit RGB PNG (zlib stored blocks: no compression, any viewer opens it).
std::vector<uint8_t> encode_png(const Image& image);

/// Write `data` to a temporary file beside `path`, then rename it into place (an output replaced
/// whole or not at all); false, with the reason in `why`, where it could not.
bool write_atomic(const std::string& path, const std::string& data, std::string* why = nullptr);

std::string sha256_hex(const void* data, size_t size);
std::string sha256_file(const std::string& path);  // Error(bundle) where unreadable

std::string cpu_model();
std::vector<std::string> cpu_flags();  // instruction-set flags of /proc/cpuinfo (avx*, amx*, ...)
bool cpu_has_flag(const std::string& flag);

}  // namespace ilf::detail
