// Requests, tokenizers and ilf::Generator: request -> latents -> images.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>
#include "ilf/bundle.hpp"
#include "ilf/engine.hpp"
#include "ilf/export.h"
#include "ilf/image.hpp"
#include "ilf/loop.hpp"
#include "ilf/tensor.hpp"

namespace ilf {

// -- generation ---------------------------------------------------------------------------------

struct ILF_API TokenIds {
  std::vector<int64_t> input_ids;  // one tokenizer (PixArt)
  std::vector<int64_t> attention_mask;
  /// Several tokenizers (schema 4 `tokenizers`: SD3, Flux): ids by the text_encoder input they feed,
  /// each padded to its tokenizer's max_length (the text encoder takes no mask).
  std::map<std::string, std::vector<int64_t>> inputs;
  bool empty() const { return input_ids.empty() && inputs.empty(); }
};

/// Prompt -> token ids and attention mask, padded to the tokenizer's max_length.
class ILF_API Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  virtual TokenIds encode(const std::string& text) = 0;
};

/// The bundle's tokenizer as converted by openvino-tokenizers at build time (manifest
/// tokenizer.openvino; Sana's pads to instruction_max_length), run by OpenVINO with the openvino_tokenizers extension library
/// (ILF_OPENVINO_TOKENIZERS, else the path found at build time). SD3 and Flux (schema 6): every
/// tokenizer of `tokenizers` converted, one encode giving each one's ids in `TokenIds::inputs` and the
/// longest one's mask. Error(config) where the bundle has none (or not one per input): pass token
/// ids instead.
ILF_API std::unique_ptr<Tokenizer> make_openvino_tokenizer(const Bundle& bundle);

/// As the PixArt pipelines preprocess a prompt before tokenising: lower case, surrounding
/// whitespace stripped (Python's str.lower().strip(), with the C library's Unicode case mapping).
ILF_API std::string preprocess_prompt(const std::string& prompt);

struct ILF_API Request {
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
struct ILF_API RequestFields {
  std::optional<std::string> prompt, negative_prompt;
  std::optional<int64_t> class_label, height, width, seed;
  std::optional<double> guidance_scale;
};

/// A refused field and its one-line reason, e.g. {"guidance_scale", "guidance_scale must be in 0..30, got 31"}.
struct ILF_API RequestProblem {
  std::string param, message;
};

/// The request contract (ilf_deploy/core/runtime/request.py, its limits and messages from
/// ilf_deploy/core/schemas/request-contract.json): the first field it refuses for this bundle, or nullopt.
/// Prompt tokens are not counted (the OpenVINO tokenizer truncates): `generate` also refuses a
/// prompt longer than the model's max_length tokens.
ILF_API std::optional<RequestProblem> request_problem(const Manifest& manifest, const RequestFields& fields);

/// The diffusers pipelines' defaults (core/runtime/generator.py); a model without guidance runs at 1.
ILF_API double default_guidance(const std::string& architecture, bool guidance_free = false);

/// Request -> latents -> images on one engine: the port of core/runtime/generator.py + pipeline.py.
class ILF_API Generator {
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
  /// `pooled_prompt_embeds`), from `tokens` when given, else from `prompt` (`negative`: a negative
  /// prompt, which Sana tokenises without its instruction); cached.
  Feeds encode_text(const std::string& prompt, const TokenIds& tokens = {}, bool negative = false);
  /// Per image of the last generate_batch: the block forwards that ran.
  const std::vector<int>& last_block_forwards() const { return last_block_forwards_; }

  const Bundle& bundle() const { return bundle_; }
  Engine& engine() { return *engine_; }
  Segments& segments() { return *segments_; }
  Timings& timings() { return segments_->timings(); }

 private:
  Feeds batch_inputs(const std::vector<Request>& requests, bool guided, std::pair<int, int> latent_hw);
  Feeds run_text_encoder(const TokenIds& tokens);
  /// `prompt` through the bundle's OpenVINO tokenizer(s), as core/runtime/pipeline.py tokenises it.
  TokenIds tokenize(const std::string& prompt, bool negative);
  void check_request(const Request& request) const;

  Bundle bundle_;
  std::unique_ptr<Engine> engine_;
  std::unique_ptr<Segments> segments_;
  std::unique_ptr<Tokenizer> tokenizer_;
  std::map<std::string, Feeds> prompt_cache_;
  std::vector<int> last_block_forwards_;
};

}  // namespace ilf
