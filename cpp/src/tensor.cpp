// Tensors, .npy files and the small file helpers.
#include <sys/stat.h>
#include <unistd.h>

#include <charconv>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <random>

#include "internal.hpp"

namespace ilf {

Error::Error(Kind kind, const std::string& message) : std::runtime_error(message), kind_(kind) {}

const char* version() noexcept { return ILF_VERSION; }

namespace {

size_t item_size(DType dtype) { return dtype == DType::f32 ? 4 : dtype == DType::f16 ? 2 : 8; }

int64_t count(const Shape& shape) {
  int64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0) detail::config_error("negative dimension in a tensor shape");
    n *= d;
  }
  return n;
}

std::shared_ptr<unsigned char[]> allocate(size_t bytes, bool zero = true) {
  std::shared_ptr<unsigned char[]> p(new unsigned char[bytes ? bytes : 1]);
  if (zero) std::memset(p.get(), 0, bytes);
  return p;
}

}  // namespace

Tensor::Tensor(DType dtype, Shape shape)
    : dtype_(dtype), shape_(std::move(shape)), storage_(allocate(count(shape_) * item_size(dtype))) {}

Tensor Tensor::uninitialized(DType dtype, Shape shape) {
  Tensor t;
  t.dtype_ = dtype;
  t.shape_ = std::move(shape);
  t.storage_ = allocate(count(t.shape_) * item_size(dtype), false);
  return t;
}

Tensor Tensor::f32(Shape shape, const std::vector<float>& values) {
  Tensor t(DType::f32, std::move(shape));
  if (static_cast<int64_t>(values.size()) != t.numel()) detail::config_error("tensor values do not fill its shape");
  std::memcpy(t.raw(), values.data(), t.nbytes());
  return t;
}

Tensor Tensor::i64(Shape shape, const std::vector<int64_t>& values) {
  Tensor t(DType::i64, std::move(shape));
  if (static_cast<int64_t>(values.size()) != t.numel()) detail::config_error("tensor values do not fill its shape");
  std::memcpy(t.raw(), values.data(), t.nbytes());
  return t;
}

int64_t Tensor::dim(int axis) const {
  int n = static_cast<int>(shape_.size());
  if (axis < 0) axis += n;
  if (axis < 0 || axis >= n) detail::config_error("tensor axis out of range");
  return shape_[axis];
}

int64_t Tensor::numel() const noexcept {
  int64_t n = 1;
  for (int64_t d : shape_) n *= d;
  return n;
}

size_t Tensor::nbytes() const noexcept { return static_cast<size_t>(numel()) * item_size(dtype_); }

float* Tensor::f32_data() {
  if (dtype_ != DType::f32) detail::config_error("tensor is not float32");
  return reinterpret_cast<float*>(storage_.get());
}
const float* Tensor::f32_data() const {
  if (dtype_ != DType::f32) detail::config_error("tensor is not float32");
  return reinterpret_cast<const float*>(storage_.get());
}
int64_t* Tensor::i64_data() {
  if (dtype_ != DType::i64) detail::config_error("tensor is not int64");
  return reinterpret_cast<int64_t*>(storage_.get());
}
const int64_t* Tensor::i64_data() const {
  if (dtype_ != DType::i64) detail::config_error("tensor is not int64");
  return reinterpret_cast<const int64_t*>(storage_.get());
}

uint16_t* Tensor::f16_data() {
  if (dtype_ != DType::f16) detail::config_error("tensor is not float16");
  return reinterpret_cast<uint16_t*>(storage_.get());
}
const uint16_t* Tensor::f16_data() const {
  if (dtype_ != DType::f16) detail::config_error("tensor is not float16");
  return reinterpret_cast<const uint16_t*>(storage_.get());
}
float Tensor::value(int64_t i) const {
  if (dtype_ == DType::f32) return f32_data()[i];
  if (dtype_ == DType::f16) return half_to_float(f16_data()[i]);
  return static_cast<float>(i64_data()[i]);
}

uint16_t float_to_half(float value) noexcept {  // numpy's npy_floatbits_to_halfbits, ties to even
  uint32_t x;
  std::memcpy(&x, &value, 4);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t exp = (x >> 23) & 0xffu, mant = x & 0x7fffffu;
  if (exp == 0xff) {  // inf, nan
    if (!mant) return sign | 0x7c00u;
    uint16_t h = static_cast<uint16_t>(0x7c00u + (mant >> 13));
    return sign | (h == 0x7c00u ? 0x7c01u : h);
  }
  const int e = static_cast<int>(exp) - 112;  // the half exponent field
  if (e >= 31) return sign | 0x7c00u;           // overflow: inf
  if (e <= 0) {                                  // subnormal (or zero)
    if (e < -10) return sign;
    const uint32_t m = mant | 0x800000u;
    const int shift = 14 - e;
    uint32_t h = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (h & 1u))) ++h;
    return static_cast<uint16_t>(sign | h);
  }
  uint32_t h = (static_cast<uint32_t>(e) << 10) | (mant >> 13);
  const uint32_t rem = mant & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // a carry into the exponent is right (up to inf)
  return static_cast<uint16_t>(sign | h);
}

float half_to_float(uint16_t h) noexcept {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu, x;
  if (exp == 0x1f) {
    x = sign | 0x7f800000u | (mant << 13);
  } else if (exp == 0) {
    if (!mant) {
      x = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do {
        ++e;
        mant <<= 1;
      } while (!(mant & 0x400u));
      x = sign | (static_cast<uint32_t>(112 - e) << 23) | ((mant & 0x3ffu) << 13);
    }
  } else {
    x = sign | ((exp + 112) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}

Tensor Tensor::reshaped(Shape shape) const {
  if (count(shape) != numel()) detail::config_error("cannot reshape " + shape_string());
  Tensor t = *this;
  t.shape_ = std::move(shape);
  return t;
}

Tensor Tensor::clone() const {
  Tensor t(dtype_, shape_);
  if (nbytes()) std::memcpy(t.raw(), raw(), nbytes());
  return t;
}

std::string Tensor::shape_string() const {
  std::string s = "(";
  for (size_t i = 0; i < shape_.size(); ++i) s += (i ? ", " : "") + std::to_string(shape_[i]);
  if (shape_.size() == 1) s += ",";
  return s + ")";
}

double Timings::total(const std::string& stage) const {
  auto it = calls_.find(stage);
  double sum = 0;
  if (it != calls_.end())
    for (double s : it->second) sum += s;
  return sum;
}

// -- files --------------------------------------------------------------------------------------

namespace detail {

std::string py_float(double value) {
  char buf[64];
  auto res = std::to_chars(buf, buf + sizeof buf, value);
  std::string s(buf, res.ptr);
  if (s.find_first_of(".en") == std::string::npos) s += ".0";
  return s;
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) bundle_error(path + " is unreadable: " + std::strerror(errno));
  std::string data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) bundle_error(path + " is unreadable: " + std::strerror(errno));
  return data;
}

bool is_file(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

bool is_dir(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

std::string join_path(const std::string& a, const std::string& b) {
  if (a.empty()) return b;
  return a.back() == '/' ? a + b : a + "/" + b;
}

bool write_atomic(const std::string& path, const std::string& data, std::string* why) {
  auto slash = path.rfind('/');
  std::string dir = slash == std::string::npos ? "." : path.substr(0, slash);
  std::string name = slash == std::string::npos ? path : path.substr(slash + 1);
  std::random_device rd;
  std::string tmp = dir + "/." + name + "." + std::to_string(::getpid()) + "." + std::to_string(rd());
  FILE* f = std::fopen(tmp.c_str(), "wb");
  if (!f) {
    if (why) *why = std::strerror(errno);
    return false;
  }
  bool ok = std::fwrite(data.data(), 1, data.size(), f) == data.size();
  ok = (std::fclose(f) == 0) && ok;
  if (ok) ok = std::rename(tmp.c_str(), path.c_str()) == 0;
  if (!ok) {
    if (why) *why = std::strerror(errno);
    std::remove(tmp.c_str());
  }
  return ok;
}

}  // namespace detail

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
  // make this allocate what its header says): as runtime/npy.py checks it.
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
  int64_t n = count(shape);
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
  std::ofstream f(path, std::ios::binary);
  if (!f) detail::config_error("cannot write " + path + ": " + std::strerror(errno));
  f.write(out.data(), static_cast<std::streamsize>(out.size()));
  if (!f) detail::config_error("cannot write " + path + ": " + std::strerror(errno));
}

}  // namespace ilf
