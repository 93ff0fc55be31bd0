// .npy files (numpy format 1.0-3.0), as numpy.load and numpy.save read and write them.
#include <sys/stat.h>
#include <unistd.h>

#include <charconv>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <random>

#include "internal.hpp"

namespace ilf::detail {

// -- .npy ---------------------------------------------------------------------------------------

namespace {

[[noreturn]] void npy_error(const std::string& path, const std::string& why) {
  detail::config_error("cannot read " + path + ": " + why);
}

std::string header_value(const std::string& header, const std::string& key) {
  auto at = header.find("'" + key + "'");
  if (at == std::string::npos) return "";
  auto colon = header.find(':', at);
  if (colon == std::string::npos) return "";
  size_t start = header.find_first_not_of(' ', colon + 1);
  if (start == std::string::npos) return "";
  if (header[start] == '(') return header.substr(start, header.find(')', start) - start + 1);
  if (header[start] == '\'') return header.substr(start + 1, header.find('\'', start + 1) - start - 1);
  size_t end = header.find_first_of(",}", start);
  return header.substr(start, end - start);
}

}  // namespace

Tensor read_npy(const std::string& path) {
  if (!detail::is_file(path)) npy_error(path, "no such file");
  std::string data;
  try {
    data = detail::read_file(path);
  } catch (const Error& e) {
    npy_error(path, e.what());
  }
  if (data.empty()) npy_error(path, "the file is empty");
  if (data.size() < 10 || data.compare(0, 6, "\x93NUMPY") != 0) npy_error(path, "not a .npy file");
  int major = static_cast<unsigned char>(data[6]);
  size_t header_len, offset;
  if (major == 1) {
    header_len = static_cast<unsigned char>(data[8]) | (static_cast<unsigned char>(data[9]) << 8);
    offset = 10;
  } else if (major == 2 || major == 3) {
    if (data.size() < 12) npy_error(path, "truncated header");
    header_len = 0;
    for (int i = 0; i < 4; ++i) header_len |= static_cast<size_t>(static_cast<unsigned char>(data[8 + i])) << (8 * i);
    offset = 12;
  } else {
    npy_error(path, "unsupported .npy version " + std::to_string(major));
  }
  if (data.size() < offset + header_len) npy_error(path, "truncated header");
  std::string header = data.substr(offset, header_len);
  std::string descr = header_value(header, "descr");
  std::string fortran = header_value(header, "fortran_order");
  std::string shape_text = header_value(header, "shape");
  if (fortran != "False") npy_error(path, "Fortran-ordered arrays are not supported (save it C-ordered)");
  Shape shape;
  if (shape_text.size() < 2 || shape_text.front() != '(') npy_error(path, "no shape in the header");
  {
    std::string inner = shape_text.substr(1, shape_text.size() - 2);
    size_t pos = 0;
    while (pos < inner.size()) {
      size_t next = inner.find(',', pos);
      std::string part = inner.substr(pos, next == std::string::npos ? std::string::npos : next - pos);
      part.erase(0, part.find_first_not_of(' '));
      part.erase(part.find_last_not_of(' ') + 1);
      int64_t dim = -1;
      auto [end, ec] = std::from_chars(part.data(), part.data() + part.size(), dim);
      if (!part.empty() && (ec != std::errc() || end != part.data() + part.size() || dim < 0))
        npy_error(path, "the header's shape " + shape_text + " is not a tuple of sizes");
      if (!part.empty()) shape.push_back(dim);
      if (next == std::string::npos) break;
      pos = next + 1;
    }
  }
  // The header's claim against what the file holds, before any allocation (a 192-byte file must not
  // make this allocate what its header says): as core/runtime/npy.py checks it.
  const size_t available = data.size() - offset - header_len;
  const size_t itemsize = descr == "<f8" || descr == "<i8" ? 8 : descr == "<f4" || descr == "<i4" ? 4 : descr == "<f2" ? 2 : 0;
  if (!itemsize) npy_error(path, "unsupported dtype " + descr + " (float16, float32, float64, int32 or int64)");
  uint64_t claimed = itemsize;  // bytes; `fits`: no overflow of 64 bits on the way
  bool fits = true;
  for (int64_t d : shape) fits = fits && !__builtin_mul_overflow(claimed, static_cast<uint64_t>(d), &claimed);
  if (!fits || claimed != available) {
    std::string claim = fits ? std::to_string(claimed) + " bytes" : "more bytes than 64 bits count";
    npy_error(path, "its header claims " + shape_text + " " + descr + " (" + claim + ") but the file holds " +
                        std::to_string(available));
  }
  int64_t n = 1;  // the dimensions fit: `claimed` counted their product above
  for (int64_t d : shape) n *= d;
  const char* body = data.data() + offset + header_len;
  auto need = [&](size_t item) {
    if (available < static_cast<size_t>(n) * item) npy_error(path, "truncated data");
  };
  if (descr == "<f4" || descr == "<f8") {
    Tensor t(DType::f32, shape);
    float* out = t.f32_data();
    if (descr == "<f4") {
      need(4);
      std::memcpy(out, body, n * 4);
    } else {
      need(8);
      for (int64_t i = 0; i < n; ++i) {
        double v;
        std::memcpy(&v, body + 8 * i, 8);
        out[i] = static_cast<float>(v);
      }
    }
    return t;
  }
  if (descr == "<f2") {
    Tensor t(DType::f16, shape);
    need(2);
    std::memcpy(t.raw(), body, n * 2);
    return t;
  }
  if (descr == "<i8" || descr == "<i4") {
    Tensor t(DType::i64, shape);
    int64_t* out = t.i64_data();
    if (descr == "<i8") {
      need(8);
      std::memcpy(out, body, n * 8);
    } else {
      need(4);
      for (int64_t i = 0; i < n; ++i) {
        int32_t v;
        std::memcpy(&v, body + 4 * i, 4);
        out[i] = v;
      }
    }
    return t;
  }
  npy_error(path, "unsupported dtype " + descr + " (float16, float32, float64, int32 or int64)");
}

void write_npy(const std::string& path, const Tensor& tensor) {
  std::string shape = "(";
  for (size_t i = 0; i < tensor.shape().size(); ++i) shape += (i ? ", " : "") + std::to_string(tensor.shape()[i]);
  if (tensor.shape().size() == 1) shape += ",";
  shape += ")";
  std::string header = std::string("{'descr': '") + (tensor.dtype() == DType::f32 ? "<f4" : tensor.dtype() == DType::f16 ? "<f2" : "<i8") +
                       "', 'fortran_order': False, 'shape': " + shape + ", }";
  size_t total = 10 + header.size() + 1;
  header += std::string((64 - total % 64) % 64, ' ') + "\n";
  std::string out = "\x93NUMPY";
  out += '\x01';
  out += '\x00';
  out += static_cast<char>(header.size() & 0xff);
  out += static_cast<char>(header.size() >> 8);
  out += header;
  out.append(static_cast<const char*>(tensor.raw()), tensor.nbytes());
  std::string why;
  if (!write_atomic(path, out, &why)) detail::config_error("cannot write " + path + ": " + why);
}

}  // namespace ilf::detail
