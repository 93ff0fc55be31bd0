// Host tensors: ilf::Tensor and ilf::Feeds (named tensors, what an engine takes and returns).
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>
#include "ilf/export.h"

namespace ilf {

// -- tensors ------------------------------------------------------------------------------------

/// f16: IEEE half precision, what an fp16 bundle's segments exchange (kept as numpy keeps it: the
/// loop's arithmetic on it rounds to float16 after every operation, as numpy's float16 does).
enum class DType { f32, i64, f16 };
using Shape = std::vector<int64_t>;


/// A dense, C-ordered host tensor, a value: a copy (or a reshaped() one) never sees another's writes.
/// Copies share storage until one is written (copy on write): the non-const data accessors first give
/// the tensor storage of its own where another copy shares it, so copying is cheap. A pointer from a
/// non-const accessor writes this tensor only while it is not copied (take the pointer after copying).
class ILF_API Tensor {
 public:
  Tensor() = default;
  Tensor(DType dtype, Shape shape);  // zero-filled
  static Tensor uninitialized(DType dtype, Shape shape);  // contents unspecified: for outputs
  static Tensor f32(Shape shape, const std::vector<float>& values);
  static Tensor i64(Shape shape, const std::vector<int64_t>& values);

  DType dtype() const noexcept { return dtype_; }
  const Shape& shape() const noexcept { return shape_; }
  int64_t dim(int axis) const;  // negative axes count from the end
  int64_t numel() const noexcept;
  size_t nbytes() const noexcept;
  bool empty() const noexcept { return !storage_; }

  float* f32_data();
  const float* f32_data() const;
  int64_t* i64_data();
  const int64_t* i64_data() const;
  uint16_t* f16_data();
  const uint16_t* f16_data() const;
  float value(int64_t i) const;  // element i of a float32 or float16 tensor, as float
  void* raw();  // as the non-const accessors above: storage of its own first
  const void* raw() const noexcept { return storage_.get(); }

  Tensor reshaped(Shape shape) const;  // the same values in another shape (storage shared until written)
  Tensor clone() const;                // storage of its own now
  std::string shape_string() const;  // "(1, 4, 8, 8)", as numpy prints shapes

 private:
  DType dtype_ = DType::f32;
  Shape shape_;
  void detach();  // storage of its own, the values kept
  std::shared_ptr<unsigned char[]> storage_;
};

using Feeds = std::map<std::string, Tensor>;

}  // namespace ilf
