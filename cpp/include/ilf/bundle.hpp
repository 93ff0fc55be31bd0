// The bundle format (manifest, step plans) and ilf::Bundle, a bundle on disk, validated.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>
#include "ilf/export.h"
#include "ilf/tensor.hpp"

namespace ilf {

// -- the bundle format ----------------------------------------------------------------------------

constexpr int kSchemaVersion = 2;       // manifest.schema.json: what a bundle without the below is
constexpr int kStateSchemaVersion = 4;  // 4: a multi-tensor state (SD3, Flux) and several tokenizers
constexpr int kInstructionSchemaVersion = 5;  // 5: a prompt format (Sana: tokenizer.instruction)
constexpr int kConvertedTokenizersSchemaVersion = 6;  // 6: schema 4's `tokenizers` with `openvino`
constexpr int kCrossKvSchemaVersion = 7;  // 7: a `cross_kv` segment, run after `context` (kCrossKvSegment)
// Every block's caption cross-attention K/V, computed once per generation from `context`'s outputs;
// its outputs join the conditioning the block segments read (build/export/cross_kv.py).
constexpr const char* kCrossKvSegment = "cross_kv";
constexpr int kPlanVersion = 3;         // plan.schema.json: the newest version read (1, 2 and 3 are)

struct ILF_API Dim {
  int64_t value = -1;  // -1: symbolic
  std::string symbol;  // e.g. "batch"
};

struct ILF_API TensorSpec {
  std::string name;
  std::vector<Dim> shape;
  std::string dtype;  // numpy's name: "float32", "int64"
};

struct ILF_API SegmentSpec {
  std::string name;
  std::string file;
  std::vector<TensorSpec> inputs, outputs;
  std::optional<std::pair<int, int>> blocks;  // inclusive; none for non-block segments
  std::vector<std::string> input_names() const;
  std::vector<std::string> output_names() const;
  bool takes_feed() const;  // an inner-loop block segment (adds the feedback's `feed`, eqs. 2-3)
  bool has_input(const std::string& name) const;
};

struct ILF_API ModelSpec {
  int num_blocks = 0, latent_channels = 0, out_channels = 0, patch_size = 0, sample_size = 0;
  int vae_scale_factor = 0, default_image_size = 0;
  std::vector<std::string> context_inputs;
  bool uses_size_conditions = false;
  int num_classes = 0;  // DiT: labels 0..num_classes-1; num_classes is the null class
  // Schema 4 (their defaults are what a schema 2 bundle means):
  std::vector<std::string> state = {"hidden"};    // the state between blocks, in order
  std::map<std::string, std::string> state_init;  // state tensor -> the context output it starts as
  std::string token_layout = "patch";             // patch: (p, p, C) per token; packed: (C, 2, 2) (Flux)
  std::string guidance = "cfg";                   // cfg | embedded (Flux.1-dev) | none (Flux.1-schnell)
  bool position_ids = false;                      // Flux: img_ids (N, 3) and txt_ids (L, 3) inputs
};

/// A block segment's output for state tensor `state` (NAME_out), and its ILF feed (`feed` for
/// `hidden`, NAME_feed otherwise): ilf_deploy/core/state.py.
ILF_API std::string state_output_name(const std::string& state);
ILF_API std::string state_feed_name(const std::string& state);

struct ILF_API TokenizerSpec {
  std::string file;  // tokenizer/tokenizer.json (the `tokenizers` library's)
  int max_length = 0;
  int pad_id = 0;
  std::optional<std::string> openvino;  // the same tokenizer converted by openvino-tokenizers (.xml; schema 6 in `tokenizers`)
  std::string input = "input_ids";      // the text_encoder input its ids feed (schema 4 `tokenizers`)
  // Schema 5 (Sana): a prompt's ids are the instruction's + the prompt's, instruction_max_length long; a
  // negative prompt's are its own, max_length long (the text encoder keeps max_length of them either way)
  std::optional<std::string> instruction;
  int instruction_max_length = 0;
};

struct ILF_API VariantSpec {
  std::string name, mode;
  std::map<std::string, SegmentSpec> segments;
  std::vector<std::string> engines() const;  // which engines read it, by mode
};

struct ILF_API Manifest {
  int schema_version = kSchemaVersion;
  std::string architecture;  // pixart-alpha | pixart-sigma | dit | sd3 | flux
  std::string config_hash;
  ModelSpec model;
  std::optional<std::pair<int, int>> loop;  // the ILF inner loop b..e
  std::string precision;                    // fp32 | fp16
  int max_batch = 1;
  std::vector<std::pair<int, int>> resolutions;  // (height, width) pixels; the first is the default
  std::vector<std::pair<int, int>> latent_sizes;
  std::vector<int> cut_points;
  std::map<std::string, SegmentSpec> segments;
  std::vector<std::pair<std::string, std::string>> plans;  // name -> file, in the manifest's order
  std::optional<TokenizerSpec> tokenizer;                  // none: class-conditional (DiT), or `tokenizers`
  std::vector<TokenizerSpec> tokenizers;                   // schema 4: several (SD3, Flux), by text_encoder input
  std::map<std::string, std::string> files;                // path -> sha256 hex
  std::map<std::string, VariantSpec> variants;

  const SegmentSpec& segment(const std::string& name, const std::string& variant = "") const;
  const VariantSpec& variant(const std::string& name) const;
  std::vector<const SegmentSpec*> block_segments() const;  // in the order of the blocks they cover
};

enum class OpKind { blocks, ilf, cache_refresh, cache_reuse, cache_adaptive };
enum class TimeRef { t, t_post };

struct ILF_API Op {
  OpKind kind = OpKind::blocks;
  int start = 0, end = 0;
  TimeRef time = TimeRef::t;
  std::string key;  // Δ-cache key (cache_refresh / cache_reuse / cache_adaptive; version 2: a keyed ilf)
  bool keyed = false;  // the op has a key (a version 1 plan's ilf key is dropped: it meant nothing)
  double threshold = 0;  // cache_adaptive: the largest relative L1 change of the probe that reuses
  int max_reuse = 0;     // cache_adaptive: the most reuses in a row
  int size() const { return end - start + 1; }
  int block_forwards() const;  // cache_adaptive: at most (when it refreshes)
  bool stores() const;         // stores a Δ under its key (cache_refresh, a keyed ilf)
};

/// The scheduler's precomputed linear step: x0 = x0_x*x + x0_eps*eps; x_next = x*x + eps*eps +
/// sum_j history[j] * x0 of the j-th previous step (most recent first).
struct ILF_API Coefficients {
  double timestep = 0, prev_timestep = 0, x = 0, eps = 0, x0_x = 0, x0_eps = 0;
  std::vector<double> history;
};

struct ILF_API Step {
  int index = 0;
  double timestep = 0;
  std::optional<double> t_post;
  std::vector<Op> ops;
  TimeRef final_time = TimeRef::t;
  Coefficients coefficients;
  bool feedback() const;
  int block_forwards() const;
};

/// One step's timing at one image size (a version 3 plan's `schedules` entry).
struct ILF_API StepTiming {
  double timestep = 0;
  std::optional<double> t_post;
  Coefficients coefficients;
};

struct ILF_API Plan {
  std::string name;
  int num_blocks = 0;
  std::string scheduler;
  std::vector<Step> steps;
  std::optional<std::pair<int, int>> loop;
  int version = 1;  // as the file says
  /// Version 3: image token count -> each step's timing at that size (Flux's size-dependent shift).
  std::map<int64_t, std::vector<StepTiming>> schedules;

  /// The plan with the timing of an image of `tokens` tokens (itself where none depends on the size);
  /// Error(config) for a size it has no schedule for (StepPlan.for_image_tokens).
  Plan for_image_tokens(int64_t tokens) const;
  bool adaptive() const;
  int block_forwards() const;  // per image; an adaptive plan's most
  std::vector<int> feedback_steps() const;
  std::vector<int> cut_points() const;
  /// A plan JSON document (plan.schema.json), validated as StepPlan.validate does.
  static Plan parse(const std::string& json_text, const std::string& where);
  static Plan load(const std::string& path);
};

struct ILF_API LoadOptions {
  bool verify_hashes = true;  // sha256 of every file in `files` (the digest is always checked)
  std::string digest;         // "sha256:<hex>": refuse any other bundle; empty: any
};

/// A bundle on disk, validated. Cheap to copy (shared, immutable).
class ILF_API Bundle {
 public:
  /// Read and check a bundle; one-line Error(bundle) on a missing manifest, an unknown schema
  /// version, an edited manifest (digest), a missing or edited file, or another --digest.
  static Bundle load(const std::string& path, const LoadOptions& options = {});

  const std::string& path() const;
  const Manifest& manifest() const;
  const std::string& digest() const;  // "sha256:<hex>" of manifest.json's bytes

  std::vector<std::string> plan_names() const;
  std::string default_plan() const;  // the first ILF plan, else the first plan
  /// A bundled plan by name, or a plan JSON file whose cut points this bundle has.
  Plan plan(const std::string& spec) const;
  std::string segment_path(const std::string& name, const std::string& variant = "") const;
  Tensor positions(int latent_height, int latent_width) const;  // positions/HxW.npy
  /// The image tokens of a latent of this size: (h / patch) * (w / patch), a version 3 plan's key.
  int64_t image_tokens(int latent_height, int latent_width) const;

 private:
  struct Data;
  std::shared_ptr<const Data> data_;
};

/// "sha256:<64 lowercase hex>" or Error(config), before any bundle is read.
ILF_API void check_digest_option(const std::string& digest);

}  // namespace ilf
