// Errors, the version, host tensors and timings.
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

const char* version() noexcept { return ILF_VERSION_STRING; }

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
  detach();
  return reinterpret_cast<float*>(storage_.get());
}
const float* Tensor::f32_data() const {
  if (dtype_ != DType::f32) detail::config_error("tensor is not float32");
  return reinterpret_cast<const float*>(storage_.get());
}
int64_t* Tensor::i64_data() {
  if (dtype_ != DType::i64) detail::config_error("tensor is not int64");
  detach();
  return reinterpret_cast<int64_t*>(storage_.get());
}
const int64_t* Tensor::i64_data() const {
  if (dtype_ != DType::i64) detail::config_error("tensor is not int64");
  return reinterpret_cast<const int64_t*>(storage_.get());
}

uint16_t* Tensor::f16_data() {
  if (dtype_ != DType::f16) detail::config_error("tensor is not float16");
  detach();
  return reinterpret_cast<uint16_t*>(storage_.get());
}
const uint16_t* Tensor::f16_data() const {
  if (dtype_ != DType::f16) detail::config_error("tensor is not float16");
  return reinterpret_cast<const uint16_t*>(storage_.get());
}
void* Tensor::raw() {
  detach();
  return storage_.get();
}

void Tensor::detach() {
  if (!storage_ || storage_.use_count() == 1) return;
  auto own = allocate(nbytes(), false);
  std::memcpy(own.get(), storage_.get(), nbytes());
  storage_ = std::move(own);
}

float Tensor::value(int64_t i) const {
  if (dtype_ == DType::f32) return f32_data()[i];
  if (dtype_ == DType::f16) return half_to_float(f16_data()[i]);
  return static_cast<float>(i64_data()[i]);
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

}  // namespace ilf
