// ilf::Engine, what runs a bundle's segments, and the OpenVINO engine.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>
#include "ilf/bundle.hpp"
#include "ilf/export.h"
#include "ilf/tensor.hpp"

namespace ilf {

// -- engines ------------------------------------------------------------------------------------

/// Seconds per call, by stage (segment name, "tokenizer", "scheduler", ...).
class ILF_API Timings {
 public:
  void add(const std::string& stage, double seconds) { calls_[stage].push_back(seconds); }
  const std::map<std::string, std::vector<double>>& calls() const { return calls_; }
  double total(const std::string& stage) const;
  void clear() { calls_.clear(); }

 private:
  std::map<std::string, std::vector<double>> calls_;
};

/// What runs a bundle's segments: one named graph, named tensors in, named tensors out.
///
/// `run` receives exactly the inputs the segment declares in the manifest (host tensors: float32 and
/// int64, and float16 where an fp16 bundle's previous segment returned float16) and returns at least
/// its declared outputs. An engine converts to the graph's own element types at its boundary, and may
/// return float16 where the graph computes in it (the loop then rounds as numpy's float16 does).
/// Engines are not thread-safe: one per thread.
class ILF_API Engine {
 public:
  virtual ~Engine() = default;
  virtual std::string name() const = 0;  // "openvino"
  virtual std::string describe() const { return name(); }
  /// The bundle variant whose segments it runs ("" = the bundle's own).
  virtual std::string variant() const { return ""; }
  virtual Feeds run(const std::string& segment, const Feeds& inputs) = 0;
  /// Time spent inside the engine's own inference call, by segment, where it measures it.
  virtual Timings* inference_timings() { return nullptr; }
};

struct ILF_API OpenVinoOptions {
  std::string device = "CPU";     // CPU here; GPU, GPU.N, NPU, AUTO are passed to OpenVINO (untested)
  std::string precision;          // "" or f32 (pinned: INFERENCE_PRECISION_HINT), or bf16 (AVX512_BF16/AMX)
  std::string variant;            // a bundle variant OpenVINO reads (int8-ov, int8-qdq), or f32/bf16; "" = the bundle
  int threads = 0;                // INFERENCE_NUM_THREADS; 0 = OpenVINO's choice
  bool cache = true;              // compiled models in BUNDLE/openvino_cache (skipped if read-only)
};

/// The OpenVINO engine (compiles each segment on first use). Error(config) on a bad device,
/// precision or variant.
ILF_API std::unique_ptr<Engine> make_openvino_engine(const Bundle& bundle, const OpenVinoOptions& options = {});

/// The OpenVINO version this library runs ("2026.4.1-22982-...").
ILF_API std::string openvino_version();

}  // namespace ilf
