// The OpenVINO engine and tokenizer: ports of ilf_deploy/engines/backends/openvino.py.
//
// Precision is pinned with INFERENCE_PRECISION_HINT (f32 by default: OpenVINO's CPU default is bf16
// where the CPU has AVX512_BF16 or AMX) and PERFORMANCE_HINT=LATENCY, the Python backend's config, so
// both runtimes compile the same kernels. Compiled models are cached in BUNDLE/openvino_cache as
// exported blobs written beside their final name and renamed into place (a crash never leaves half a
// blob), keyed on the segment's sha256, the device, the config, OpenVINO's build, this machine and
// the input shapes (each segment is compiled for the shapes it is called with, as the Python backend),
// each with a sidecar (BLOB.sha256: the key and the blob's sha256) checked before the blob is imported.
// The C++ blobs have their own names (cpp-*.blob): the Python cache key includes Python library
// versions this runtime cannot know, so the two caches never read each other's blobs.
#include <dlfcn.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <mutex>
#include <openvino/openvino.hpp>
#include <optional>
#include <sstream>
#include <type_traits>

#include "internal.hpp"

namespace ilf {
namespace {

std::mutex core_mutex;

ov::Core& core() {
  static ov::Core instance;
  return instance;
}

std::string first_line(const std::string& text) {
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    line.erase(0, line.find_first_not_of(" \t\r"));
    if (!line.empty()) return line;
  }
  return "unknown error";
}

std::string upper(std::string s) {
  for (auto& c : s) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  return s;
}

/// `cpu` -> `CPU`; OpenVINO's device names (GPU, GPU.1, NPU, AUTO:GPU,CPU...) pass through.
std::string ov_device(const std::string& device) {
  std::string name = upper(device);
  std::string family = name.substr(0, name.find(':'));
  if (size_t dot = family.find('.'); dot != std::string::npos) family.resize(dot);
  static const std::vector<std::string> families = {"CPU", "GPU", "NPU", "AUTO", "HETERO", "MULTI", "BATCH"};
  if (std::find(families.begin(), families.end(), family) == families.end())
    detail::config_error("--device " + device +
                         " is not an OpenVINO device; use cpu, GPU, GPU.N, NPU or AUTO (GPU/NPU were never tested by this project)");
  if (family == "CPU" || family == "GPU" || family == "NPU") {
    std::vector<std::string> available;
    {
      std::lock_guard<std::mutex> lock(core_mutex);
      available = core().get_available_devices();
    }
    bool found = std::any_of(available.begin(), available.end(), [&](const std::string& d) { return d.rfind(family, 0) == 0; });
    if (!found)
      detail::config_error("OpenVINO sees no " + family + " here (it has: " + (available.empty() ? "none" : detail::join(available, ", ")) +
                           ")");
  }
  return name;
}

ov::element::Type precision_type(const std::string& precision) {
  return precision == "bf16" ? ov::element::bf16 : ov::element::f32;
}

struct Port {
  std::string name;
  ov::Output<const ov::Node> port;
  ov::element::Type type;
};

struct Compiled {
  ov::CompiledModel model;
  ov::InferRequest request;
  std::vector<Port> inputs, outputs;
};

/// (input name, dims) of a segment's declared inputs, in order, as fed; nullopt: the dynamic model.
using Shapes = std::optional<std::vector<std::pair<std::string, Shape>>>;

/// Static-shape compiles per segment, as openvino.py's STATIC_SHAPES: the CPU plugin fuses more with
/// static shapes (int8 1.10-1.20x, the Python backend's docstring), and both runtimes must compile the
/// same models to stay bit-identical. Beyond them the dynamic model: memory stays bounded.
constexpr size_t kStaticShapes = 2;

std::string shapes_text(const Shapes& shapes) {
  if (!shapes) return "dynamic";
  std::string text;
  for (const auto& [name, dims] : *shapes) {
    text += (text.empty() ? "" : ",") + name + ":";
    for (size_t i = 0; i < dims.size(); ++i) text += (i ? "x" : "") + std::to_string(dims[i]);
  }
  return text;
}

ov::Tensor to_ov(const Tensor& t, const ov::element::Type& type, const std::string& segment, const std::string& name) {
  ov::Shape shape(t.shape().begin(), t.shape().end());
  void* data = const_cast<void*>(t.raw());
  const int64_t n = t.numel();
  if ((t.dtype() == DType::f32 && type == ov::element::f32) || (t.dtype() == DType::i64 && type == ov::element::i64) ||
      (t.dtype() == DType::f16 && type == ov::element::f16))
    return ov::Tensor(type, shape, data);  // no copy: OpenVINO reads our buffer
  ov::Tensor out(type, shape);
  auto convert = [&](auto* dst) {  // numpy's astype: ties to even into float16, truncation into ints
    using D = std::remove_pointer_t<decltype(dst)>;
    for (int64_t i = 0; i < n; ++i) {
      if constexpr (std::is_same_v<D, uint16_t>) dst[i] = float_to_half(t.value(i));
      else if (t.dtype() == DType::i64) dst[i] = static_cast<D>(t.i64_data()[i]);
      else dst[i] = static_cast<D>(t.value(i));
    }
  };
  if (type == ov::element::f32) convert(out.data<float>());
  else if (type == ov::element::f16) convert(reinterpret_cast<uint16_t*>(out.data()));
  else if (type == ov::element::i64) convert(out.data<int64_t>());
  else if (type == ov::element::i32) convert(out.data<int32_t>());
  else detail::engine_error("segment " + segment + " input " + name + " has element type " + type.get_type_name() + ", which this runtime does not feed");
  return out;
}

Tensor from_ov(const ov::Tensor& t, const std::string& segment, const std::string& name) {
  const ov::Shape& s = t.get_shape();
  Shape shape(s.begin(), s.end());
  const ov::element::Type type = t.get_element_type();
  const size_t n = t.get_size();
  if (type == ov::element::f16) {  // kept as float16, as numpy keeps the Python backend's outputs
    Tensor out = Tensor::uninitialized(DType::f16, shape);
    std::memcpy(out.raw(), t.data(), n * 2);
    return out;
  }
  if (type == ov::element::f32 || type == ov::element::bf16) {
    Tensor out = Tensor::uninitialized(DType::f32, shape);
    float* dst = out.f32_data();
    if (type == ov::element::f32) std::memcpy(dst, t.data(), n * sizeof(float));
    else
      for (size_t i = 0; i < n; ++i) dst[i] = static_cast<float>(t.data<const ov::bfloat16>()[i]);
    return out;
  }
  if (type == ov::element::i64 || type == ov::element::i32) {
    Tensor out = Tensor::uninitialized(DType::i64, shape);
    int64_t* dst = out.i64_data();
    if (type == ov::element::i64) std::memcpy(dst, t.data(), n * sizeof(int64_t));
    else
      for (size_t i = 0; i < n; ++i) dst[i] = t.data<const int32_t>()[i];
    return out;
  }
  detail::engine_error("segment " + segment + " output " + name + " has element type " + type.get_type_name() +
                       ", which this runtime does not read");
}

class OpenVinoEngine final : public Engine {
 public:
  OpenVinoEngine(Bundle bundle, OpenVinoOptions options) : bundle_(std::move(bundle)), options_(std::move(options)) {
    auto make = [&](const std::string& precision) {
      ov::AnyMap config = {ov::hint::inference_precision(precision_type(precision)),
                           ov::hint::performance_mode(ov::hint::PerformanceMode::LATENCY)};
      if (options_.threads > 0) config.emplace(ov::inference_num_threads(options_.threads));
      return config;
    };
    config_ = make(options_.precision);
    f32_config_ = make("f32");
    machine_ = cpu_model() + "|" + detail::join(cpu_flags(), ",") + "|" + std::to_string(std::max(1L, sysconf(_SC_NPROCESSORS_ONLN)));
  }

  std::string name() const override { return "openvino"; }
  std::string describe() const override {
    return "openvino " + options_.device + " " + options_.precision + (options_.variant.empty() ? "" : " variant " + options_.variant);
  }
  std::string variant() const override { return options_.variant; }
  Timings* inference_timings() override { return &infer_; }

  Feeds run(const std::string& segment, const Feeds& inputs) override {
    Compiled& c = compiled(segment, shapes_for(segment, inputs));
    for (const Port& p : c.inputs) {
      auto it = inputs.find(p.name);
      if (it == inputs.end()) detail::engine_error("segment " + segment + " needs input '" + p.name + "'");
      c.request.set_tensor(p.port, to_ov(it->second, p.type, segment, p.name));
    }
    double start = detail::now_s();
    try {
      c.request.infer();
    } catch (const std::exception& e) {
      detail::engine_error("OpenVINO failed running " + segment + ": " + first_line(e.what()));
    }
    infer_.add(segment, detail::now_s() - start);
    Feeds out;
    for (const Port& p : c.outputs) out.emplace(p.name, from_ov(c.request.get_tensor(p.port), segment, p.name));
    return out;
  }

 private:
  /// The requested precision for the blocks, the feedback block and the caption K/V projections,
  /// where nearly all FLOPs are (Manifest.reduced_precision_segments); f32 for the rest (the
  /// timestep's sinusoidal embedding loses its phase in bf16), as the Python backend's config_for.
  bool reduced(const std::string& segment) const {
    const Manifest& m = bundle_.manifest();
    if (!options_.variant.empty() && m.variant(options_.variant).mode == "bf16")  // it names its bf16 segments
      return m.variant(options_.variant).segments.count(segment) > 0;
    const SegmentSpec& spec = m.segment(segment);
    return spec.blocks.has_value() || segment == "feedback" || segment == kCrossKvSegment;
  }
  const ov::AnyMap& config_for(const std::string& segment) const { return reduced(segment) ? config_ : f32_config_; }
  std::string precision_for(const std::string& segment) const { return reduced(segment) ? options_.precision : "f32"; }

  /// The shapes to compile `segment` for: those of `inputs`, unless the segment already has
  /// kStaticShapes other shape sets compiled (then the dynamic model), as openvino.py's shapes_for.
  Shapes shapes_for(const std::string& segment, const Feeds& inputs) const {
    Shapes shapes{std::in_place};
    for (const std::string& name : bundle_.manifest().segment(segment, options_.variant).input_names()) {
      auto it = inputs.find(name);
      if (it == inputs.end()) detail::engine_error("segment " + segment + " needs input '" + name + "'");
      shapes->emplace_back(name, it->second.shape());
    }
    if (compiled_.count({segment, shapes})) return shapes;
    const auto seen = std::count_if(compiled_.begin(), compiled_.end(),
                                    [&](const auto& entry) { return entry.first.first == segment && entry.first.second; });
    return static_cast<size_t>(seen) < kStaticShapes ? shapes : std::nullopt;
  }

  std::string cache_path(const std::string& segment, const Shapes& shapes) const {
    return detail::join_path(bundle_.path(),
                             "openvino_cache/cpp-" + segment + "." + cache_key(segment, shapes).substr(0, 20) + ".blob");
  }

  /// The sha256 of what a blob must have been compiled from: the segment's bytes, device, options and
  /// input shapes (none: the dynamic model).
  std::string cache_key(const std::string& segment, const Shapes& shapes) const {
    const Manifest& m = bundle_.manifest();
    std::string rel = m.segment(segment, options_.variant).file;
    std::string stem = rel.substr(0, rel.rfind('.'));
    std::string key = "ilf-cpp-cache-2";
    for (auto& [f, digest] : m.files)  // the graph and its external data / IR weights
      if (f == rel || f.rfind(rel + ".", 0) == 0 || f == stem + ".bin") key += "|" + f + "=" + digest;
    key += "|" + options_.device + "|" + precision_for(segment) + "|LATENCY|" + std::to_string(options_.threads);
    key += "|" + openvino_version() + "|" + machine_ + "|" + shapes_text(shapes);
    return sha256_hex(key.data(), key.size());
  }

  /// Segment `segment`'s graph, reshaped to `shapes` where given; a graph that does not reshape runs
  /// with its dynamic shapes (one line on stderr), as openvino.py's read_model.
  std::shared_ptr<ov::Model> read_model(const std::string& segment, const std::string& path, const Shapes& shapes) {
    std::shared_ptr<ov::Model> model = core().read_model(path);
    if (!shapes) return model;
    std::map<ov::Output<ov::Node>, ov::PartialShape> fixed;
    for (const ov::Output<ov::Node>& port : model->inputs())
      for (const auto& [name, dims] : *shapes)
        if (port.get_names().count(name)) fixed.emplace(port, ov::PartialShape(dims));
    try {
      model->reshape(fixed);
    } catch (const std::exception& e) {
      std::cerr << "ilf: OpenVINO cannot reshape " << segment << " to " << shapes_text(shapes) << " (" << first_line(e.what())
                << "): dynamic shapes\n";
      model = core().read_model(path);
    }
    return model;
  }

  /// A cache entry is used only if its sidecar (BLOB.sha256, written after the blob) names this
  /// segment's key and the blob's own sha256: a blob swapped, replaced or cut short is compiled again.
  static std::string sidecar(const std::string& key, const std::string& blob_bytes) {
    return "ilf-cpp-cache-1 " + key + " sha256:" + sha256_hex(blob_bytes.data(), blob_bytes.size()) + "\n";
  }

  /// The verified blob's bytes, or "" (logged on stderr where an entry exists but does not match).
  std::string verified_blob(const std::string& blob, const std::string& key) const {
    if (!detail::is_file(blob)) return "";
    std::string bytes, recorded;
    try {
      bytes = detail::read_file(blob);
      recorded = detail::is_file(blob + ".sha256") ? detail::read_file(blob + ".sha256") : "";
    } catch (const Error&) {
      recorded.clear();
    }
    if (!bytes.empty() && recorded == sidecar(key, bytes)) return bytes;
    std::cerr << "ilf: OpenVINO cache entry " << blob << " does not match its digest (replaced, edited or "
              << "incomplete): compiling the segment again\n";
    return "";
  }

  /// Segment `segment` compiled for `shapes` (one infer request each).
  Compiled& compiled(const std::string& segment, const Shapes& shapes) {
    auto it = compiled_.find({segment, shapes});
    if (it != compiled_.end()) return it->second;
    const std::string path = bundle_.segment_path(segment, options_.variant);
    const std::string blob = options_.cache ? cache_path(segment, shapes) : "";
    const std::string key = options_.cache ? cache_key(segment, shapes) : "";
    Compiled c;
    bool loaded = false;
    std::lock_guard<std::mutex> lock(core_mutex);
    const std::string cached = blob.empty() ? "" : verified_blob(blob, key);
    if (!cached.empty()) {
      try {  // unreadable or stale: compile again and replace it
        std::istringstream in(cached);
        c.model = core().import_model(in, options_.device, config_for(segment));
        loaded = true;
      } catch (const std::exception&) {
      }
    }
    if (!loaded) {
      try {
        c.model = core().compile_model(read_model(segment, path, shapes), options_.device, config_for(segment));
      } catch (const std::exception& e) {
        detail::bundle_error("OpenVINO cannot compile " + path + " for " + options_.device + ": " + first_line(e.what()));
      }
      if (!blob.empty()) {  // a read-only bundle, or a device without export: run uncached
        try {
          std::ostringstream os;
          c.model.export_model(os);
          ::mkdir(detail::join_path(bundle_.path(), "openvino_cache").c_str(), 0755);
          const std::string bytes = os.str();
          if (detail::write_atomic(blob, bytes)) detail::write_atomic(blob + ".sha256", sidecar(key, bytes));
        } catch (const std::exception&) {
        }
      }
    }
    const SegmentSpec& spec = bundle_.manifest().segment(segment, options_.variant);
    std::vector<std::string> declared = spec.input_names();
    for (auto& n : spec.output_names()) declared.push_back(n);
    auto named = [&](const ov::Output<const ov::Node>& port) {
      const auto& names = port.get_names();
      for (auto& d : declared)
        if (names.count(d)) return d;
      return port.get_any_name();
    };
    for (auto& p : c.model.inputs()) c.inputs.push_back({named(p), p, p.get_element_type()});
    for (auto& p : c.model.outputs()) c.outputs.push_back({named(p), p, p.get_element_type()});
    c.request = c.model.create_infer_request();
    return compiled_.emplace(std::make_pair(segment, shapes), std::move(c)).first->second;
  }

  Bundle bundle_;
  OpenVinoOptions options_;
  ov::AnyMap config_, f32_config_;
  std::string machine_;
  std::map<std::pair<std::string, Shapes>, Compiled> compiled_;  // by segment and shapes
  Timings infer_;
};

// -- tokenizer ------------------------------------------------------------------------------------

std::once_flag extension_once;
std::string extension_error;

/// The openvino-tokenizers wheel's library beside the openvino wheel this process runs (both in one
/// site-packages: openvino/libs/libopenvino.so.* and openvino_tokenizers/lib/), found at run time
/// from where libopenvino was loaded: no path is compiled in, so a moved environment still finds it.
std::string tokenizers_beside_openvino() {
  Dl_info info{};
  if (!dladdr(reinterpret_cast<void*>(&ov::get_openvino_version), &info) || !info.dli_fname) return "";
  std::string libs = info.dli_fname;
  libs.resize(libs.find_last_of('/') == std::string::npos ? 0 : libs.find_last_of('/'));
  return libs + "/../../openvino_tokenizers/lib/libopenvino_tokenizers.so";
}

void load_tokenizers_extension() {
  std::call_once(extension_once, [] {
    std::vector<std::string> candidates;
    if (const char* env = std::getenv("ILF_OPENVINO_TOKENIZERS"); env && *env) candidates.push_back(env);
    if (std::string beside = tokenizers_beside_openvino(); !beside.empty()) candidates.push_back(beside);
    candidates.push_back("libopenvino_tokenizers.so");
    std::string last;
    for (auto& path : candidates) {
      if (path.find('/') != std::string::npos && !detail::is_file(path)) {
        last = path + " does not exist";
        continue;
      }
      try {
        std::lock_guard<std::mutex> lock(core_mutex);
        core().add_extension(path);
        return;
      } catch (const std::exception& e) {
        last = path + ": " + first_line(e.what());
      }
    }
    extension_error = "the OpenVINO tokenizer needs the openvino_tokenizers extension library (" + last +
                      "): pip install openvino-tokenizers matching OpenVINO " + openvino_version() +
                      ", or set ILF_OPENVINO_TOKENIZERS to its libopenvino_tokenizers.so; or pass --token-ids FILE";
  });
  if (!extension_error.empty()) detail::config_error(extension_error);
}

/// One converted tokenizer (`spec.openvino`, which the caller checked is there): ids `spec.max_length`
/// long, Sana's `instruction_max_length` (what an instructed prompt pads to).
class OvTokenizer final : public Tokenizer {
 public:
  OvTokenizer(const Bundle& bundle, const TokenizerSpec& spec)
      : max_length_(spec.instruction ? spec.instruction_max_length : spec.max_length) {
    load_tokenizers_extension();
    std::string path = detail::join_path(bundle.path(), spec.openvino.value());
    try {
      std::lock_guard<std::mutex> lock(core_mutex);
      model_ = core().compile_model(path, "CPU");
      request_ = model_.create_infer_request();
    } catch (const std::exception& e) {
      detail::config_error("OpenVINO cannot load the tokenizer " + path + ": " + first_line(e.what()));
    }
  }

  TokenIds encode(const std::string& text) override {
    ov::Tensor in(ov::element::string, ov::Shape{1});
    in.data<std::string>()[0] = text;
    request_.set_input_tensor(in);
    try {
      request_.infer();
    } catch (const std::exception& e) {
      detail::engine_error("the OpenVINO tokenizer failed: " + first_line(e.what()));
    }
    TokenIds out;
    out.input_ids = row(request_.get_tensor("input_ids"));
    out.attention_mask = row(request_.get_tensor("attention_mask"));
    if (static_cast<int>(out.input_ids.size()) != max_length_ || out.attention_mask.size() != out.input_ids.size())
      detail::engine_error("the OpenVINO tokenizer gave " + std::to_string(out.input_ids.size()) + " ids, not the " +
                           std::to_string(max_length_) + " the manifest says it pads to");
    return out;
  }

 private:
  static std::vector<int64_t> row(const ov::Tensor& t) {
    Tensor v = from_ov(t, "tokenizer", "ids");
    return {v.i64_data(), v.i64_data() + v.numel()};
  }

  int max_length_ = 0;
  ov::CompiledModel model_;
  ov::InferRequest request_;
};

/// SD3, Flux (schema 6 `tokenizers`): every converted tokenizer on the same text, ids by the
/// text_encoder input they feed (`inputs`); the attention mask is that of the one that reads the most
/// (T5), the one whose count the request contract limits (core/runtime/request.py bundle_token_limit).
class OvTokenizers final : public Tokenizer {
 public:
  explicit OvTokenizers(const Bundle& bundle) {
    const auto& specs = bundle.manifest().tokenizers;
    std::vector<std::string> names, missing;
    for (auto& spec : specs) {
      names.push_back(spec.input);
      if (!spec.openvino) missing.push_back(spec.input);
    }
    if (!missing.empty())  // `ilf-deploy build` converts each tokenizer where that is exact (docs/cpp.md)
      detail::config_error("this bundle has no OpenVINO tokenizer " +
                           (missing.size() < names.size() ? "for " + detail::join(missing, ", ") + " " : std::string()) +
                           "(its text encoder reads " + std::to_string(names.size()) + " tokenizers' ids: " +
                           detail::join(names, ", ") + "); pass --token-ids FILE with the ids of each");
    for (auto& spec : specs) {
      if (spec.max_length > specs[longest_].max_length) longest_ = parts_.size();
      parts_.emplace_back(spec.input, std::make_unique<OvTokenizer>(bundle, spec));
    }
  }

  TokenIds encode(const std::string& text) override {
    TokenIds out;
    for (size_t i = 0; i < parts_.size(); ++i) {
      TokenIds one = parts_[i].second->encode(text);
      if (i == longest_) out.attention_mask = one.attention_mask;
      out.inputs[parts_[i].first] = std::move(one.input_ids);
    }
    return out;
  }

 private:
  std::vector<std::pair<std::string, std::unique_ptr<OvTokenizer>>> parts_;  // by text_encoder input
  size_t longest_ = 0;
};

}  // namespace

std::string openvino_version() { return ov::get_openvino_version().buildNumber; }

std::unique_ptr<Engine> make_openvino_engine(const Bundle& bundle, const OpenVinoOptions& given) {
  OpenVinoOptions options = given;
  // `--variant f32|bf16` names a precision unless the bundle has a variant of that name
  if ((options.variant == "f32" || options.variant == "bf16") && !bundle.manifest().variants.count(options.variant)) {
    if (!given.precision.empty() && given.precision != options.variant)
      detail::config_error("variant '" + options.variant + "' and precision '" + given.precision + "' disagree");
    options.precision = options.variant;
    options.variant.clear();
  }
  if (options.precision.empty()) options.precision = "f32";
  if (options.precision != "f32" && options.precision != "bf16")
    detail::config_error("OpenVINO precision must be one of f32, bf16, got '" + options.precision + "'");
  if (!options.variant.empty()) {
    const VariantSpec& spec = bundle.manifest().variant(options.variant);  // lists the known ones
    auto engines = spec.engines();
    if (std::find(engines.begin(), engines.end(), "openvino") == engines.end())
      detail::config_error("variant '" + options.variant + "' (" + spec.mode + ") runs on --backend " + detail::join(engines, " or ") +
                           ", not openvino");
    if (spec.mode == "bf16") {  // schema 4 may hold one (quantize --mode bf16): bf16 on exactly its segments
      if (!given.precision.empty() && given.precision != "bf16")
        detail::config_error("variant '" + options.variant + "' runs in bf16, not precision '" + given.precision + "'");
      options.precision = "bf16";
    }
  }
  options.device = ov_device(options.device.empty() ? "CPU" : options.device);
  if (options.precision == "bf16" && options.device.rfind("CPU", 0) == 0 && !cpu_has_flag("avx512_bf16") &&
      !cpu_has_flag("amx_bf16"))
    detail::config_error("bf16 on the OpenVINO CPU needs AVX512_BF16 or AMX (this CPU has neither): use f32 or an int8 variant");
  return std::make_unique<OpenVinoEngine>(bundle, options);
}

std::unique_ptr<Tokenizer> make_openvino_tokenizer(const Bundle& bundle) {
  const Manifest& m = bundle.manifest();
  if (!m.tokenizers.empty()) return std::make_unique<OvTokenizers>(bundle);
  if (!m.tokenizer) detail::config_error("this bundle has no tokenizer (class-conditional model); pass --class-label");
  if (!m.tokenizer->openvino)
    detail::config_error(
        "this bundle has no OpenVINO tokenizer (manifest tokenizer.openvino: `ilf-deploy build` adds it where "
        "openvino-tokenizers is installed and converts the tokenizer exactly); pass --token-ids FILE");
  return std::make_unique<OvTokenizer>(bundle, *m.tokenizer);
}

}  // namespace ilf
