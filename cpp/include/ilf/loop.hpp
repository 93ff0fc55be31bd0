// The step loop: ilf::Segments (a bundle's segments on one engine) and ilf::denoise.
#pragma once

#include <functional>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>
#include "ilf/bundle.hpp"
#include "ilf/engine.hpp"
#include "ilf/export.h"
#include "ilf/tensor.hpp"

namespace ilf {

// -- the loop -----------------------------------------------------------------------------------

/// The model's state between blocks: named tensors (`hidden`; an MMDiT's `text` too), as the
/// manifest's model.state names them (ilf_deploy/core/state.py).
using State = std::map<std::string, Tensor>;

/// A bundle's segments on one engine: the port of core/runtime/runner.py's SegmentRunner (input
/// selection and checks, timings, conditioning, embedding, block ranges, the ILF inner loop, the
/// final layer) and so the `Segments` of core/runtime/loop.py.
class ILF_API Segments {
 public:
  Segments(Bundle bundle, Engine& engine);

  Feeds run(const std::string& name, const Feeds& feeds);
  Feeds context(const Feeds& inputs);
  Feeds conditioning(double timestep, const Feeds& context);
  /// The state before block 0: the embed segment's `hidden`, and each state tensor that starts as a
  /// conditioning entry (model.state_init: an MMDiT's text stream).
  State embed(const Tensor& latents, const Feeds& cond);
  /// Blocks start..end through the segments that cover them; inside the loop `feed` (one tensor per
  /// state tensor) is added before every block (eqs. 2-3), zero when null.
  State blocks(int start, int end, const State& state, const Feeds& cond, const State* feed = nullptr);
  State inner_loop(const State& state, const Feeds& cond, const Feeds& cond_post);
  /// The final layer's tokens unpacked to (B, C, height, width) by model.token_layout.
  Tensor final(const State& state, const Feeds& cond, int64_t height, int64_t width);

  const Bundle& bundle() const { return bundle_; }
  Engine& engine() { return engine_; }
  Timings& timings() { return timings_; }
  int latent_channels() const;
  int num_blocks() const;
  std::optional<std::pair<int, int>> loop() const;
  const std::vector<std::string>& state_names() const;
  /// Sees every call's feeds before it runs (verification, calibration).
  std::function<void(const std::string&, const Feeds&)> recorder;

 private:
  Bundle bundle_;
  Engine& engine_;
  Timings timings_;
  std::vector<const SegmentSpec*> block_segments_;
  bool uses_positions_ = false;  // the embed segment takes `pos_embed` (positions/HxW.npy)
  std::map<std::string, std::vector<std::string>> input_names_;
  std::map<std::pair<int, int>, Tensor> positions_;
};

/// check_plan: a picked schedule (Plan::for_image_tokens), the plan's depth and feedback loop against
/// the bundle's.
ILF_API void check_plan(const Plan& plan, const Segments& segments);

/// Every step of `plan` from `latents`; `inputs` are [uncond; cond] rows when guiding.
/// `guidance`: one scale, or one per image; a single scale <= 1 means no guidance.
/// `block_forwards` (optional) receives the block forwards each image ran (an adaptive plan decides
/// them at run time; for every other plan they are the plan's).
ILF_API Tensor denoise(Segments& segments, const Plan& plan, const Tensor& latents, const Feeds& inputs,
               const std::vector<float>& guidance, const std::function<void(int)>& on_step = {},
               std::vector<int>* block_forwards = nullptr);


}  // namespace ilf
