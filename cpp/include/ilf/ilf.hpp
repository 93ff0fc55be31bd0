// ilf: the C++ runtime for ilf-deploy bundles (https://github.com/.../ilf-deploy, README "Embedding in C++").
//
// A bundle (manifest.json + manifest.sha256 + plans/ + onnx/ + positions/ + tokenizer/) is read per the
// published schemas (ilf_deploy/schemas/*.schema.json, schema_version 2, and 4 for the two-stream
// MMDiTs SD3 and Flux.1): every file's sha256 and the manifest's digest are checked before anything
// runs. A step plan (plans/NAME.json, version 1, 2 or 3) is then executed exactly as
// ilf_deploy/runtime/loop.py does: segment calls on the model's state (the named tensors between
// blocks: image tokens, and an MMDiT's text tokens), the ILF inner loop with t_post conditioning, the
// Δ-cache (refresh/reuse, keyed ranges over several ops, adaptive reuse decided per image),
// classifier-free or embedded guidance and the plan's precomputed scheduler coefficients (multistep
// history included; a version 3 plan's schedule for the image's token count). Segments run on an
// `Engine` (OpenVINO here; anything that can run a named graph on named tensors can implement it).
//
// Nothing in this header includes OpenVINO or a JSON library: link ilf::ilf and include this.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace ilf {

/// The library's version ("0.1.0").
const char* version() noexcept;

/// Every error this library raises: one line, no trailing newline.
/// `bundle`: a bundle that is missing, edited, incomplete or of an unknown schema version;
/// `config`: a request or option that cannot work (the CLI exits 2 on both);
/// `engine`: the engine failed while running (the CLI exits 1).
class Error : public std::runtime_error {
 public:
  enum class Kind { bundle, config, engine };
  Error(Kind kind, const std::string& message);
  Kind kind() const noexcept { return kind_; }

 private:
  Kind kind_;
};

// -- tensors ------------------------------------------------------------------------------------

/// f16: IEEE half precision, what an fp16 bundle's segments exchange (kept as numpy keeps it: the
/// loop's arithmetic on it rounds to float16 after every operation, as numpy's float16 does).
enum class DType { f32, i64, f16 };
using Shape = std::vector<int64_t>;

/// float32 -> float16 bits, round to nearest even (numpy's astype(float16)); and back (exact).
uint16_t float_to_half(float value) noexcept;
float half_to_float(uint16_t bits) noexcept;

/// A dense, C-ordered host tensor. Copies share their storage (like numpy views); every operation
/// of the runtime makes a new tensor instead of writing into an input.
class Tensor {
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
  void* raw() noexcept { return storage_.get(); }
  const void* raw() const noexcept { return storage_.get(); }

  Tensor reshaped(Shape shape) const;  // shares storage
  Tensor clone() const;
  std::string shape_string() const;  // "(1, 4, 8, 8)", as numpy prints shapes

 private:
  DType dtype_ = DType::f32;
  Shape shape_;
  std::shared_ptr<unsigned char[]> storage_;
};

using Feeds = std::map<std::string, Tensor>;

/// .npy files (numpy format 1.0-3.0): float16/float32/float64/int32/int64 little-endian, C order,
/// read as float16, float32 or int64; written as <f2 / <f4 / <i8, version 1.0, as numpy.save does.
Tensor read_npy(const std::string& path);
void write_npy(const std::string& path, const Tensor& tensor);

// -- images -------------------------------------------------------------------------------------

struct Image {
  int height = 0;
  int width = 0;
  std::vector<uint8_t> rgb;  // height * width * 3, row-major
};

/// An 8-bit RGB PNG (zlib stored blocks: no compression, any viewer opens it).
std::vector<uint8_t> encode_png(const Image& image);
void write_png(const std::string& path, const Image& image);

// -- the bundle format ----------------------------------------------------------------------------

constexpr int kSchemaVersion = 2;       // manifest.schema.json: what a bundle without the below is
constexpr int kStateSchemaVersion = 4;  // 4: a multi-tensor state (SD3, Flux) and several tokenizers
constexpr int kInstructionSchemaVersion = 5;  // 5: a prompt format (Sana: tokenizer.instruction)
constexpr int kPlanVersion = 3;         // plan.schema.json: the newest version read (1, 2 and 3 are)

struct Dim {
  int64_t value = -1;  // -1: symbolic
  std::string symbol;  // e.g. "batch"
};

struct TensorSpec {
  std::string name;
  std::vector<Dim> shape;
  std::string dtype;  // numpy's name: "float32", "int64"
};

struct SegmentSpec {
  std::string name;
  std::string file;
  std::vector<TensorSpec> inputs, outputs;
  std::optional<std::pair<int, int>> blocks;  // inclusive; none for non-block segments
  std::vector<std::string> input_names() const;
  std::vector<std::string> output_names() const;
  bool takes_feed() const;  // an inner-loop block segment (adds the feedback's `feed`, eqs. 2-3)
  bool has_input(const std::string& name) const;
};

struct ModelSpec {
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
/// `hidden`, NAME_feed otherwise): ilf_deploy/state.py.
std::string state_output_name(const std::string& state);
std::string state_feed_name(const std::string& state);

struct TokenizerSpec {
  std::string file;  // tokenizer/tokenizer.json (the `tokenizers` library's)
  int max_length = 0;
  int pad_id = 0;
  std::optional<std::string> openvino;  // the same tokenizer converted by openvino-tokenizers (.xml)
  std::string input = "input_ids";      // the text_encoder input its ids feed (schema 4 `tokenizers`)
  // Schema 5 (Sana): a prompt's ids are the instruction's + the prompt's, instruction_max_length long; a
  // negative prompt's are its own, max_length long (the text encoder keeps max_length of them either way)
  std::optional<std::string> instruction;
  int instruction_max_length = 0;
};

struct VariantSpec {
  std::string name, mode;
  std::map<std::string, SegmentSpec> segments;
  std::vector<std::string> engines() const;  // which engines read it, by mode
};

struct Manifest {
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

struct Op {
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
struct Coefficients {
  double timestep = 0, prev_timestep = 0, x = 0, eps = 0, x0_x = 0, x0_eps = 0;
  std::vector<double> history;
};

struct Step {
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
struct StepTiming {
  double timestep = 0;
  std::optional<double> t_post;
  Coefficients coefficients;
};

struct Plan {
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

struct LoadOptions {
  bool verify_hashes = true;  // sha256 of every file in `files` (the digest is always checked)
  std::string digest;         // "sha256:<hex>": refuse any other bundle; empty: any
};

/// A bundle on disk, validated. Cheap to copy (shared, immutable).
class Bundle {
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
void check_digest_option(const std::string& digest);
std::string sha256_hex(const void* data, size_t size);
std::string sha256_file(const std::string& path);

// -- engines ------------------------------------------------------------------------------------

/// Seconds per call, by stage (segment name, "tokenizer", "scheduler", ...).
class Timings {
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
class Engine {
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

struct OpenVinoOptions {
  std::string device = "CPU";     // CPU here; GPU, GPU.N, NPU, AUTO are passed to OpenVINO (untested)
  std::string precision;          // "" or f32 (pinned: INFERENCE_PRECISION_HINT), or bf16 (AVX512_BF16/AMX)
  std::string variant;            // a bundle variant OpenVINO reads (int8-ov, int8-qdq), or f32/bf16; "" = the bundle
  int threads = 0;                // INFERENCE_NUM_THREADS; 0 = OpenVINO's choice
  bool cache = true;              // compiled models in BUNDLE/openvino_cache (skipped if read-only)
};

/// The OpenVINO engine (compiles each segment on first use). Error(config) on a bad device,
/// precision or variant.
std::unique_ptr<Engine> make_openvino_engine(const Bundle& bundle, const OpenVinoOptions& options = {});

/// The OpenVINO version this library runs ("2026.4.1-22982-...").
std::string openvino_version();

// -- the loop -----------------------------------------------------------------------------------

/// The model's state between blocks: named tensors (`hidden`; an MMDiT's `text` too), as the
/// manifest's model.state names them (ilf_deploy/state.py).
using State = std::map<std::string, Tensor>;

/// A bundle's segments on one engine: the port of runtime/runner.py's SegmentRunner (input
/// selection and checks, timings, conditioning, embedding, block ranges, the ILF inner loop, the
/// final layer) and so the `Segments` of runtime/loop.py.
class Segments {
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
void check_plan(const Plan& plan, const Segments& segments);

/// Every step of `plan` from `latents`; `inputs` are [uncond; cond] rows when guiding.
/// `guidance`: one scale, or one per image; a single scale <= 1 means no guidance.
/// `block_forwards` (optional) receives the block forwards each image ran (an adaptive plan decides
/// them at run time; for every other plan they are the plan's).
Tensor denoise(Segments& segments, const Plan& plan, const Tensor& latents, const Feeds& inputs,
               const std::vector<float>& guidance, const std::function<void(int)>& on_step = {},
               std::vector<int>* block_forwards = nullptr);

// -- generation ---------------------------------------------------------------------------------

struct TokenIds {
  std::vector<int64_t> input_ids;  // one tokenizer (PixArt)
  std::vector<int64_t> attention_mask;
  /// Several tokenizers (schema 4 `tokenizers`: SD3, Flux): ids by the text_encoder input they feed,
  /// each padded to its tokenizer's max_length (the text encoder takes no mask).
  std::map<std::string, std::vector<int64_t>> inputs;
  bool empty() const { return input_ids.empty() && inputs.empty(); }
};

/// Prompt -> token ids and attention mask, padded to the tokenizer's max_length.
class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  virtual TokenIds encode(const std::string& text) = 0;
};

/// The bundle's tokenizer as converted by openvino-tokenizers at build time (manifest
/// tokenizer.openvino), run by OpenVINO with the openvino_tokenizers extension library
/// (ILF_OPENVINO_TOKENIZERS, else the path found at build time). Error(config) where the bundle
/// has none: pass token ids instead.
std::unique_ptr<Tokenizer> make_openvino_tokenizer(const Bundle& bundle);

/// As the PixArt pipelines preprocess a prompt before tokenising: lower case, surrounding
/// whitespace stripped (Python's str.lower().strip(), with the C library's Unicode case mapping).
std::string preprocess_prompt(const std::string& prompt);

struct Request {
  std::string prompt;           // PixArt, SD3, Flux
  std::string negative_prompt;  // PixArt and SD3, with guidance (refused where guidance is not cfg)
  std::optional<int64_t> class_label;     // DiT
  /// default: 4.5 PixArt, 4.0 DiT, 7.0 SD3 (cfg: <= 1 disables), 3.5 Flux.1-dev (embedded: the model's
  /// input); Flux.1-schnell has none (only 1 is accepted)
  std::optional<double> guidance_scale;
  uint64_t seed = 0;
  int height = 0, width = 0;  // pixels; 0: the bundle's first resolution
  TokenIds tokens;            // given: used instead of tokenising `prompt`
  TokenIds negative_tokens;   // given: used instead of tokenising `negative_prompt`
};

/// A request's fields as a front door received them, before any narrowing (nullopt: not given).
struct RequestFields {
  std::optional<std::string> prompt, negative_prompt;
  std::optional<int64_t> class_label, height, width, seed;
  std::optional<double> guidance_scale;
};

/// A refused field and its one-line reason, e.g. {"guidance_scale", "guidance_scale must be in 0..30, got 31"}.
struct RequestProblem {
  std::string param, message;
};

/// The request contract (ilf_deploy/runtime/request.py, its limits and messages from
/// ilf_deploy/schemas/request-contract.json): the first field it refuses for this bundle, or nullopt.
/// Prompt tokens are not counted (the OpenVINO tokenizer truncates): `generate` also refuses a
/// prompt longer than the model's max_length tokens.
std::optional<RequestProblem> request_problem(const Manifest& manifest, const RequestFields& fields);

/// The diffusers pipelines' defaults (runtime/generator.py); a model without guidance runs at 1.
double default_guidance(const std::string& architecture, bool guidance_free = false);

/// Request -> latents -> images on one engine: the port of runtime/generator.py + pipeline.py.
class Generator {
 public:
  Generator(Bundle bundle, std::unique_ptr<Engine> engine);

  /// The tokenizer for prompts; by default the bundle's OpenVINO tokenizer, opened on first use.
  void set_tokenizer(std::unique_ptr<Tokenizer> tokenizer);

  Request resolve(const Request& request) const;               // size and guidance decided
  std::pair<int, int> latent_size(const Request& request) const;  // checked against the bundle
  /// Seeded N(0, 1) noise of this library's own generator (xoshiro256** + Box-Muller): NOT the
  /// stream numpy's default_rng(seed) draws in Python, so pass latents for identical results.
  Tensor initial_latents(const Request& request) const;

  Tensor generate_latents(const Plan& plan, const Request& request, const Tensor* latents = nullptr,
                          const std::function<void(int)>& on_step = {});
  /// Several requests of one size in one batch (every segment call serves them all).
  Tensor generate_batch(const Plan& plan, const std::vector<Request>& requests,
                        const std::vector<Tensor>* latents = nullptr,
                        const std::function<void(int)>& on_step = {});
  /// Final latents (B, C, h, w) -> uint8 RGB images (the VAE decoder).
  std::vector<Image> decode(const Tensor& latents);

  /// PixArt: (prompt embeddings (1, L, C), attention mask (1, L)), cached per prompt.
  std::pair<Tensor, Tensor> encode_prompt(const std::string& prompt);
  std::pair<Tensor, Tensor> encode_tokens(const TokenIds& tokens);
  /// Any text model: one row of the model's text inputs by name (PixArt `prompt_embeds`,
  /// `prompt_mask`; SD3 and Flux the text encoder's outputs, `prompt_embeds` and
  /// `pooled_prompt_embeds`), from `tokens` when given, else from `prompt`; cached.
  Feeds encode_text(const std::string& prompt, const TokenIds& tokens = {});
  /// Per image of the last generate_batch: the block forwards that ran.
  const std::vector<int>& last_block_forwards() const { return last_block_forwards_; }

  const Bundle& bundle() const { return bundle_; }
  Engine& engine() { return *engine_; }
  Segments& segments() { return *segments_; }
  Timings& timings() { return segments_->timings(); }

 private:
  Feeds batch_inputs(const std::vector<Request>& requests, bool guided, std::pair<int, int> latent_hw);
  Feeds run_text_encoder(const TokenIds& tokens);
  void check_request(const Request& request) const;

  Bundle bundle_;
  std::unique_ptr<Engine> engine_;
  std::unique_ptr<Segments> segments_;
  std::unique_ptr<Tokenizer> tokenizer_;
  std::map<std::string, Feeds> prompt_cache_;
  std::vector<int> last_block_forwards_;
};

// -- the machine --------------------------------------------------------------------------------

std::string cpu_model();
std::vector<std::string> cpu_flags();  // instruction-set flags of /proc/cpuinfo (avx*, amx*, ...)
bool cpu_has_flag(const std::string& flag);

}  // namespace ilf
