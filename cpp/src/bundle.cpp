// The published bundle format: manifest.json (manifest.schema.json, schema_version 2, or 4 with a
// multi-tensor state and several tokenizers: SD3, Flux), its digest in manifest.sha256, the sha256 of
// every other file, and step plans (plan.schema.json, versions 1, 2 and 3).
//
// The checks and their one-line messages are core/runtime/bundle.py's and core/runtime/manifest.py's: the
// schema version first (its message says how to fix it), then the manifest's own digest, a pinned
// --digest, the published JSON Schema (manifest.schema.json, plan.schema.json: schema.cpp, by a schema
// library), then what the schema does not say: integers that must fit an `int`, the references
// between fields, and last every file's sha256. The readers below trust the structure the schema
// checked; their typed reads still refuse (never misread) a value of another type.
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <set>

#include "internal.hpp"
#include "schema.hpp"

namespace ilf {

using json = nlohmann::ordered_json;

namespace {

bool lower_hex(const std::string& s, size_t from, size_t count) {
  return s.size() == from + count && std::all_of(s.begin() + from, s.end(), [](char ch) {
           return (ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'f');
         });
}

const char* kManifest = "manifest.json";
// The manifest versions this reader implements, as Python's message lists its own ("2 and 3 and 4 and 5
// and 6 and 7"): 3 (a bf16 variant) is not one of them.
const std::string kReadableSchemas = std::to_string(kSchemaVersion) + " and " + std::to_string(kStateSchemaVersion) +
                                     " and " + std::to_string(kInstructionSchemaVersion) + " and " +
                                     std::to_string(kConvertedTokenizersSchemaVersion) + " and " +
                                     std::to_string(kCrossKvSchemaVersion);

/// A number (never a boolean) equal to a readable version, as Python's `version in (2, 4)` decides.
bool readable_schema(const nlohmann::ordered_json& v) {
  if (!v.is_number()) return false;
  const double n = v.get<double>();
  return n == kSchemaVersion || n == kStateSchemaVersion || n == kInstructionSchemaVersion ||
         n == kConvertedTokenizersSchemaVersion || n == kCrossKvSchemaVersion;
}
const char* kDigestFile = "manifest.sha256";

const std::vector<std::string> kModelInts = {"num_blocks", "latent_channels", "out_channels", "patch_size",
                                             "sample_size", "vae_scale_factor", "default_image_size"};

std::string type_name(const json& v) {
  if (v.is_null()) return "None";
  if (v.is_boolean()) return v.get<bool>() ? "True" : "False";
  if (v.is_string()) return "'" + v.get<std::string>() + "'";
  std::string s = v.dump();
  return s.size() > 60 ? s.substr(0, 60) + "…" : s;
}

/// Typed reads of a document the schema checked, in the schema's vocabulary ("at segments/embed/file:
/// 3 is not of type 'string'"), and the reader's own integer ranges (stricter than the schema's).
class Check {
 public:
  Check(std::string where, std::string schema) : where_(std::move(where)), schema_(std::move(schema)) {}

  [[noreturn]] void fail(const std::string& at, const std::string& message) const {
    detail::bundle_error(where_ + " does not follow the " + schema_ + " schema at " + (at.empty() ? "(top level)" : at) +
                         ": " + message);
  }

  const json& key(const json& obj, const std::string& at, const std::string& name) const {
    auto it = obj.find(name);
    if (it == obj.end()) fail(at, "'" + name + "' is a required property");
    return *it;
  }

  void object(const json& v, const std::string& at) const {
    if (!v.is_object()) fail(at, type_name(v) + " is not of type 'object'");
  }
  void array(const json& v, const std::string& at) const {
    if (!v.is_array()) fail(at, type_name(v) + " is not of type 'array'");
  }
  std::string string(const json& v, const std::string& at) const {
    if (!v.is_string()) fail(at, type_name(v) + " is not of type 'string'");
    return v.get<std::string>();
  }
  /// Every integer is read as 64 bits and range-checked, never narrowed: beyond int64 is refused too.
  int64_t integer(const json& v, const std::string& at, int64_t minimum = INT64_MIN,
                  int64_t maximum = std::numeric_limits<int64_t>::max()) const {
    if (!v.is_number_integer()) fail(at, type_name(v) + " is not of type 'integer'");
    if (v.is_number_unsigned() && v.get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
      fail(at, v.dump() + " is greater than the maximum of " + std::to_string(maximum));
    int64_t n = v.get<int64_t>();
    if (n < minimum) fail(at, std::to_string(n) + " is less than the minimum of " + std::to_string(minimum));
    if (n > maximum) fail(at, std::to_string(n) + " is greater than the maximum of " + std::to_string(maximum));
    return n;
  }
  /// An integer this reader keeps in an `int` (block indices, sizes, ids, counts): a larger one is
  /// refused in one line (Python, with no such limit, refuses it as out of range further on).
  int int32(const json& v, const std::string& at, int64_t minimum) const {
    return static_cast<int>(integer(v, at, minimum, std::numeric_limits<int>::max()));
  }
  double number(const json& v, const std::string& at) const {
    if (!v.is_number()) fail(at, type_name(v) + " is not of type 'number'");
    return v.get<double>();
  }
  bool boolean(const json& v, const std::string& at) const {
    if (!v.is_boolean()) fail(at, type_name(v) + " is not of type 'boolean'");
    return v.get<bool>();
  }
  std::pair<int, int> pair(const json& v, const std::string& at, int64_t minimum) const {
    array(v, at);
    if (v.size() != 2) fail(at, type_name(v) + " should have exactly 2 items");
    return {int32(v[0], at + "/0", minimum), int32(v[1], at + "/1", minimum)};
  }

 private:
  std::string where_, schema_;
};

TensorSpec parse_tensor(const Check& c, const json& v, const std::string& at) {
  TensorSpec t;
  t.name = c.string(c.key(v, at, "name"), at + "/name");
  const json& shape = c.key(v, at, "shape");
  c.array(shape, at + "/shape");
  for (size_t i = 0; i < shape.size(); ++i) {
    Dim d;
    if (shape[i].is_string()) {
      d.symbol = shape[i].get<std::string>();
    } else {
      d.value = c.integer(shape[i], at + "/shape/" + std::to_string(i), 0);
    }
    t.shape.push_back(d);
  }
  t.dtype = c.string(c.key(v, at, "dtype"), at + "/dtype");
  return t;
}

SegmentSpec parse_segment(const Check& c, const std::string& name, const json& v, const std::string& at) {
  SegmentSpec s;
  s.name = name;
  s.file = c.string(c.key(v, at, "file"), at + "/file");
  const json& inputs = c.key(v, at, "inputs");
  c.array(inputs, at + "/inputs");
  for (size_t i = 0; i < inputs.size(); ++i) s.inputs.push_back(parse_tensor(c, inputs[i], at + "/inputs/" + std::to_string(i)));
  const json& outputs = c.key(v, at, "outputs");
  c.array(outputs, at + "/outputs");
  for (size_t i = 0; i < outputs.size(); ++i)
    s.outputs.push_back(parse_tensor(c, outputs[i], at + "/outputs/" + std::to_string(i)));
  const json& blocks = c.key(v, at, "blocks");
  if (!blocks.is_null()) s.blocks = c.pair(blocks, at + "/blocks", 0);
  return s;
}

std::map<std::string, SegmentSpec> parse_segments(const Check& c, const json& v, const std::string& at) {
  c.object(v, at);
  std::map<std::string, SegmentSpec> out;
  for (auto& [name, spec] : v.items()) out[name] = parse_segment(c, name, spec, at + "/" + name);
  return out;
}

std::vector<std::pair<int, int>> parse_sizes(const Check& c, const json& v, const std::string& at) {
  c.array(v, at);
  std::vector<std::pair<int, int>> out;
  for (size_t i = 0; i < v.size(); ++i) out.push_back(c.pair(v[i], at + "/" + std::to_string(i), 1));
  return out;
}

Manifest parse_manifest(const json& d, const std::string& where) {
  Check c(where, "manifest");
  Manifest m;
  m.schema_version = static_cast<int>(c.key(d, "", "schema_version").get<double>());  // Bundle::load checked it
  m.architecture = c.string(c.key(d, "", "architecture"), "architecture");
  m.config_hash = c.string(c.key(d, "", "config_hash"), "config_hash");

  const json& model = c.key(d, "", "model");
  c.object(model, "model");
  std::vector<int*> ints = {&m.model.num_blocks,  &m.model.latent_channels,  &m.model.out_channels,
                            &m.model.patch_size,  &m.model.sample_size,      &m.model.vae_scale_factor,
                            &m.model.default_image_size};
  for (size_t i = 0; i < kModelInts.size(); ++i)
    *ints[i] = c.int32(c.key(model, "model", kModelInts[i]), "model/" + kModelInts[i], 1);
  const json& context = c.key(model, "model", "context_inputs");
  c.array(context, "model/context_inputs");
  for (size_t i = 0; i < context.size(); ++i)
    m.model.context_inputs.push_back(c.string(context[i], "model/context_inputs/" + std::to_string(i)));
  m.model.uses_size_conditions = c.boolean(c.key(model, "model", "uses_size_conditions"), "model/uses_size_conditions");
  if (model.contains("num_classes")) m.model.num_classes = c.int32(model["num_classes"], "model/num_classes", 1);
  if (model.contains("state")) {  // schema 4 to 6 only, as state_init, token_layout, guidance, position_ids
    const json& state = model["state"];
    c.array(state, "model/state");
    m.model.state.clear();
    for (size_t i = 0; i < state.size(); ++i) m.model.state.push_back(c.string(state[i], "model/state/" + std::to_string(i)));
  }
  if (model.contains("state_init")) {
    c.object(model["state_init"], "model/state_init");
    for (auto& [name, entry] : model["state_init"].items())
      m.model.state_init[name] = c.string(entry, "model/state_init/" + name);
  }
  if (model.contains("token_layout")) m.model.token_layout = c.string(model["token_layout"], "model/token_layout");
  if (model.contains("guidance")) m.model.guidance = c.string(model["guidance"], "model/guidance");
  if (model.contains("position_ids")) m.model.position_ids = c.boolean(model["position_ids"], "model/position_ids");

  const json& feedback = c.key(d, "", "feedback");
  if (!feedback.is_null()) {
    c.object(feedback, "feedback");
    m.loop = c.pair(c.key(feedback, "feedback", "loop"), "feedback/loop", 0);
  }
  m.precision = c.string(c.key(d, "", "precision"), "precision");
  m.max_batch = c.int32(c.key(d, "", "max_batch"), "max_batch", 1);
  m.resolutions = parse_sizes(c, c.key(d, "", "resolutions"), "resolutions");
  m.latent_sizes = parse_sizes(c, c.key(d, "", "latent_sizes"), "latent_sizes");
  const json& cut_points = c.key(d, "", "cut_points");
  c.array(cut_points, "cut_points");
  for (size_t i = 0; i < cut_points.size(); ++i)
    m.cut_points.push_back(c.int32(cut_points[i], "cut_points/" + std::to_string(i), 0));
  m.segments = parse_segments(c, c.key(d, "", "segments"), "segments");

  const json& plans = c.key(d, "", "plans");
  c.object(plans, "plans");
  for (auto& [name, file] : plans.items()) m.plans.emplace_back(name, c.string(file, "plans/" + name));

  const json& tokenizer = c.key(d, "", "tokenizer");
  if (!tokenizer.is_null()) {
    c.object(tokenizer, "tokenizer");
    TokenizerSpec t;
    t.file = c.string(c.key(tokenizer, "tokenizer", "file"), "tokenizer/file");
    t.max_length = c.int32(c.key(tokenizer, "tokenizer", "max_length"), "tokenizer/max_length", 1);
    t.pad_id = c.int32(c.key(tokenizer, "tokenizer", "pad_id"), "tokenizer/pad_id", 0);
    if (tokenizer.contains("openvino") && !tokenizer["openvino"].is_null())
      t.openvino = c.string(tokenizer["openvino"], "tokenizer/openvino");
    if (tokenizer.contains("instruction")) {  // schema 5, with instruction_max_length
      t.instruction = c.string(tokenizer["instruction"], "tokenizer/instruction");
      t.instruction_max_length =
          c.int32(c.key(tokenizer, "tokenizer", "instruction_max_length"), "tokenizer/instruction_max_length", 1);
    }
    m.tokenizer = t;
  }
  if (d.contains("tokenizers")) {  // schema 4 to 6
    const json& tokenizers = d["tokenizers"];
    c.array(tokenizers, "tokenizers");
    for (size_t i = 0; i < tokenizers.size(); ++i) {
      std::string at = "tokenizers/" + std::to_string(i);
      const json& v = tokenizers[i];
      c.object(v, at);
      TokenizerSpec t;
      t.file = c.string(c.key(v, at, "file"), at + "/file");
      t.max_length = c.int32(c.key(v, at, "max_length"), at + "/max_length", 1);
      t.pad_id = c.int32(c.key(v, at, "pad_id"), at + "/pad_id", 0);
      t.input = c.string(c.key(v, at, "input"), at + "/input");
      if (v.contains("openvino")) t.openvino = c.string(v["openvino"], at + "/openvino");  // schema 6
      m.tokenizers.push_back(t);
    }
  }
  const json& files = c.key(d, "", "files");
  c.object(files, "files");
  for (auto& [name, digest] : files.items()) m.files[name] = c.string(digest, "files/" + name);

  if (d.contains("variants")) {
    const json& variants = d["variants"];
    c.object(variants, "variants");
    for (auto& [name, v] : variants.items()) {
      std::string at = "variants/" + name;
      c.object(v, at);
      VariantSpec spec;
      spec.name = name;
      spec.mode = c.string(c.key(v, at, "mode"), at + "/mode");  // bf16: not in schema 2 (the schema says)
      spec.segments = parse_segments(c, c.key(v, at, "segments"), at + "/segments");
      m.variants[name] = spec;
    }
  }
  std::vector<std::string> named;  // every file a field names must be hashed
  for (auto& [_, s] : m.segments) named.push_back(s.file);
  for (auto& [_, f] : m.plans) named.push_back(f);
  for (auto& [_, v] : m.variants)
    for (auto& [__, s] : v.segments) named.push_back(s.file);
  if (d.contains("engines")) {
    c.object(d["engines"], "engines");
    for (auto& [key, set] : d["engines"].items()) {
      if (!set.is_object() || !set.contains("segments") || !set["segments"].is_object()) continue;
      for (auto& [_, e] : set["segments"].items())
        if (e.is_object() && e.contains("file") && e["file"].is_string()) named.push_back(e["file"].get<std::string>());
    }
  }
  if (m.tokenizer) {
    named.push_back(m.tokenizer->file);
    if (m.tokenizer->openvino) named.push_back(*m.tokenizer->openvino);
  }
  for (auto& t : m.tokenizers) {
    named.push_back(t.file);
    if (t.openvino) named.push_back(*t.openvino);
  }
  if (d.contains("calibration") && d["calibration"].is_object() && d["calibration"].contains("segments") &&
      d["calibration"]["segments"].is_object())
    for (auto& [_, e] : d["calibration"]["segments"].items())
      if (e.is_object() && e.contains("file") && e["file"].is_string()) named.push_back(e["file"].get<std::string>());
  std::sort(named.begin(), named.end());
  for (auto& f : named)
    if (!m.files.count(f)) detail::bundle_error(where + " names " + f + " but does not list its sha256 in `files`");

  for (const char* name : {"text_encoder", "vae_decoder", "embed", "context", "time", "final"}) {
    const bool textless = !m.tokenizer && m.tokenizers.empty();
    if (!m.segments.count(name) && !(std::string(name) == "text_encoder" && textless))
      detail::bundle_error(where + " has no '" + name + "' segment");
  }
  for (auto& [_, s] : m.segments)
    if (s.blocks && !(0 <= s.blocks->first && s.blocks->first <= s.blocks->second && s.blocks->second < m.model.num_blocks))
      detail::bundle_error(where + ": segment " + s.name + " covers blocks " + std::to_string(s.blocks->first) + ".." +
                           std::to_string(s.blocks->second) + ", outside the model's 0.." +
                           std::to_string(m.model.num_blocks - 1));
  if (m.loop && !m.segments.count("feedback")) detail::bundle_error(where + " has a feedback loop but no 'feedback' segment");
  for (auto& [_, v] : m.variants)
    for (auto& [s, __] : v.segments)
      if (!m.segments.count(s)) detail::bundle_error(where + ": variant " + v.name + " replaces unknown segment " + s);
  return m;
}

std::string strip_slashes(std::string path) {
  while (path.size() > 1 && path.back() == '/') path.pop_back();
  return path;
}

// -- plans --------------------------------------------------------------------------------------

[[noreturn]] void plan_error(const std::string& message) { detail::config_error(message); }

void check_block_range(int start, int end, int num_blocks, const std::string& what) {
  std::string blocks = num_blocks > 0 ? "blocks 0.." + std::to_string(num_blocks - 1) : "no blocks";
  for (int block : {start, end})
    if (block < 0 || block >= num_blocks)
      plan_error(what + " " + std::to_string(start) + ":" + std::to_string(end) + ": block " + std::to_string(block) +
                 " is out of range (the model has " + blocks + ")");
  if (start > end)
    plan_error(what + " " + std::to_string(start) + ":" + std::to_string(end) +
               " is empty: it starts after it ends (B must be <= E)");
}

const char* op_name(OpKind kind) {
  switch (kind) {
    case OpKind::blocks: return "blocks";
    case OpKind::ilf: return "ilf";
    case OpKind::cache_refresh: return "cache_refresh";
    case OpKind::cache_reuse: return "cache_reuse";
    case OpKind::cache_adaptive: return "cache_adaptive";
  }
  return "?";
}

TimeRef parse_time(const Check& c, const json& v, const std::string& at) {
  std::string t = c.string(v, at);
  if (t == "t") return TimeRef::t;
  // cppcheck-suppress missingReturn ; Check::fail is [[noreturn]]
  if (t == "t_post") return TimeRef::t_post;
  c.fail(at, "'" + t + "' is not one of ['t', 't_post']");
}

}  // namespace

// -- specs ----------------------------------------------------------------------------------------

std::vector<std::string> SegmentSpec::input_names() const {
  std::vector<std::string> out;
  for (auto& t : inputs) out.push_back(t.name);
  return out;
}

std::vector<std::string> SegmentSpec::output_names() const {
  std::vector<std::string> out;
  for (auto& t : outputs) out.push_back(t.name);
  return out;
}

bool SegmentSpec::takes_feed() const { return has_input("feed"); }

bool SegmentSpec::has_input(const std::string& name) const {
  return std::any_of(inputs.begin(), inputs.end(), [&](const TensorSpec& t) { return t.name == name; });
}

std::vector<std::string> VariantSpec::engines() const {
  if (mode == "int8-dynamic") return {"onnxruntime"};
  if (mode == "int8-qdq") return {"onnxruntime", "openvino", "tensorrt"};
  if (mode == "fp8-qdq") return {"onnxruntime", "tensorrt"};
  if (mode == "int8-ov") return {"openvino"};
  if (mode == "bf16") return {"openvino"};  // schema 3 and 4: the bundle's own graphs in bf16
  return {};
}

const VariantSpec& Manifest::variant(const std::string& name) const {
  auto it = variants.find(name);
  if (it == variants.end()) {
    std::vector<std::string> names;
    for (auto& [n, _] : variants) names.push_back(n);
    detail::bundle_error("the bundle has no variant '" + name + "' (it has: " + (names.empty() ? "none" : detail::join(names, ", ")) +
                         ")");
  }
  return it->second;
}

const SegmentSpec& Manifest::segment(const std::string& name, const std::string& variant_name) const {
  if (!variant_name.empty()) {
    const VariantSpec& v = variant(variant_name);
    auto it = v.segments.find(name);
    if (it != v.segments.end()) return it->second;
  }
  auto it = segments.find(name);
  if (it == segments.end()) detail::bundle_error("the bundle has no '" + name + "' segment");
  return it->second;
}

std::vector<const SegmentSpec*> Manifest::block_segments() const {
  std::vector<const SegmentSpec*> out;
  for (auto& [_, s] : segments)
    if (s.blocks) out.push_back(&s);
  std::sort(out.begin(), out.end(), [](const SegmentSpec* a, const SegmentSpec* b) { return *a->blocks < *b->blocks; });
  return out;
}

int Op::block_forwards() const {
  int size = end - start + 1;
  switch (kind) {
    case OpKind::blocks:
    case OpKind::cache_refresh:
    case OpKind::cache_adaptive: return size;
    case OpKind::cache_reuse: return 0;
    case OpKind::ilf: return 2 * size + 1;
  }
  return 0;
}

bool Op::stores() const { return keyed && (kind == OpKind::cache_refresh || kind == OpKind::ilf); }

std::string state_output_name(const std::string& state) { return state + "_out"; }
std::string state_feed_name(const std::string& state) { return state == "hidden" ? "feed" : state + "_feed"; }

bool Step::feedback() const {
  return std::any_of(ops.begin(), ops.end(), [](const Op& op) { return op.kind == OpKind::ilf; });
}

int Step::block_forwards() const {
  int n = 0;
  for (auto& op : ops) n += op.block_forwards();
  return n;
}

int Plan::block_forwards() const {
  int n = 0;
  for (auto& s : steps) n += s.block_forwards();
  return n;
}

std::vector<int> Plan::feedback_steps() const {
  std::vector<int> out;
  for (auto& s : steps)
    if (s.feedback()) out.push_back(s.index);
  return out;
}

std::vector<int> Plan::cut_points() const {
  std::set<int> points = {0, num_blocks};
  for (auto& s : steps)
    for (auto& op : s.ops) {
      points.insert(op.start);
      points.insert(op.end + 1);
    }
  return {points.begin(), points.end()};
}

namespace {

Coefficients parse_coefficients(const Check& c, const json& k, const std::string& kat) {
  c.object(k, kat);
  Coefficients co;
  co.timestep = c.number(c.key(k, kat, "timestep"), kat + "/timestep");
  co.prev_timestep = c.number(c.key(k, kat, "prev_timestep"), kat + "/prev_timestep");
  co.x = c.number(c.key(k, kat, "x"), kat + "/x");
  co.eps = c.number(c.key(k, kat, "eps"), kat + "/eps");
  co.x0_x = c.number(c.key(k, kat, "x0_x"), kat + "/x0_x");
  co.x0_eps = c.number(c.key(k, kat, "x0_eps"), kat + "/x0_eps");
  if (k.contains("history")) {
    const json& history = k["history"];
    c.array(history, kat + "/history");
    for (size_t h = 0; h < history.size(); ++h) co.history.push_back(c.number(history[h], kat + "/history/" + std::to_string(h)));
  }
  return co;
}

std::optional<double> parse_t_post(const Check& c, const json& s, const std::string& at) {
  if (s.contains("t_post") && !s["t_post"].is_null()) return c.number(s["t_post"], at + "/t_post");
  return std::nullopt;
}

Op parse_op(const Check& c, const json& o, const std::string& oat, int version) {
  // The schema decided the rest: the op names (cache_adaptive from version 2), a key on cached ops, an
  // adaptive op's rule and no rule on another op.
  c.object(o, oat);
  Op op;
  std::string kind = c.string(c.key(o, oat, "op"), oat + "/op");
  if (kind == "blocks") op.kind = OpKind::blocks;
  else if (kind == "ilf") op.kind = OpKind::ilf;
  else if (kind == "cache_refresh") op.kind = OpKind::cache_refresh;
  else if (kind == "cache_reuse") op.kind = OpKind::cache_reuse;
  else if (kind == "cache_adaptive") op.kind = OpKind::cache_adaptive;
  else c.fail(oat + "/op", "'" + kind + "' is not an op this reader knows");
  op.start = c.int32(c.key(o, oat, "start"), oat + "/start", 0);
  op.end = c.int32(c.key(o, oat, "end"), oat + "/end", 0);
  if (o.contains("time")) op.time = parse_time(c, o["time"], oat + "/time");
  if (o.contains("key")) {
    op.key = c.string(o["key"], oat + "/key");
    op.keyed = !(version == 1 && op.kind == OpKind::ilf);  // version 1 never stored a Δ from the inner loop
    if (!op.keyed) op.key.clear();
  }
  if (op.kind == OpKind::cache_adaptive) {
    op.threshold = c.number(c.key(o, oat, "threshold"), oat + "/threshold");
    op.max_reuse = c.int32(c.key(o, oat, "max_reuse"), oat + "/max_reuse", 1);
  }
  return op;
}

/// The step's cached ranges: runs of consecutive ops with one key (a keyed ilf counts): core/plan/model.py.
std::vector<std::pair<std::string, std::vector<const Op*>>> key_groups(const std::vector<Op>& ops) {
  std::vector<std::pair<std::string, std::vector<const Op*>>> groups;
  for (const Op& op : ops) {
    if (!op.keyed || op.kind == OpKind::blocks || (op.kind == OpKind::ilf && !op.stores())) continue;
    if (!groups.empty() && groups.back().first == op.key && groups.back().second.back()->end + 1 == op.start)
      groups.back().second.push_back(&op);
    else
      groups.push_back({op.key, {&op}});
  }
  return groups;
}

/// The oldest format version that says what the plan does (StepPlan.version).
int needed_version(const Plan& plan) {
  if (!plan.schedules.empty()) return 3;
  for (const Step& step : plan.steps) {
    for (const Op& op : step.ops)
      if (op.kind == OpKind::cache_adaptive || (op.stores() && op.kind == OpKind::ilf)) return 2;
    for (auto& [_, ops] : key_groups(step.ops))
      if (ops.size() > 1) return 2;
  }
  return 1;
}

// core/plan/model.py's bounds (MAX_STEPS, MAX_COEFFICIENT, MAX_TIMESTEP, MAX_HISTORY), in its words: no
// plan can overflow the loop's arithmetic.
constexpr size_t kMaxSteps = 1000;
constexpr double kMaxCoefficient = 1e4, kMaxTimestep = 1e4;
constexpr size_t kMaxHistory = 2;

void check_timing_bounds(double timestep, const std::optional<double>& t_post, const Coefficients& k, size_t position,
                         const std::string& where) {
  const std::vector<std::pair<std::string, std::optional<double>>> times = {
      {"timestep", timestep}, {"t_post", t_post}, {"prev_timestep", k.prev_timestep}};
  for (auto& [name, value] : times)
    if (value && !(std::fabs(*value) <= kMaxTimestep))  // `!(<=)`: NaN fails too
      plan_error(where + ": " + name + " " + detail::py_float(*value) + " is outside -10000..10000");
  std::vector<std::pair<std::string, double>> values = {{"x", k.x}, {"eps", k.eps}, {"x0_x", k.x0_x}, {"x0_eps", k.x0_eps}};
  for (size_t i = 0; i < k.history.size(); ++i) values.emplace_back("history/" + std::to_string(i), k.history[i]);
  for (auto& [name, value] : values)
    if (!(std::fabs(value) <= kMaxCoefficient))
      plan_error(where + ": coefficient " + name + " " + detail::py_float(value) + " is outside -10000..10000");
  if (k.history.size() > std::min(kMaxHistory, position))
    plan_error(where + ": " + std::to_string(k.history.size()) + " history coefficients; a step has at most " +
               std::to_string(kMaxHistory) + " and no more than the steps before it (" + std::to_string(position) + ")");
}

void check_plan_bounds(const Plan& plan) {
  if (plan.steps.size() > kMaxSteps)
    plan_error("plan '" + plan.name + "' has " + std::to_string(plan.steps.size()) + " steps; a plan has at most " +
               std::to_string(kMaxSteps));
  for (size_t i = 0; i < plan.steps.size(); ++i) {
    const Step& step = plan.steps[i];
    const std::string where = "plan '" + plan.name + "' step " + std::to_string(step.index);
    check_timing_bounds(step.timestep, step.t_post, step.coefficients, i, where);
    for (auto& [_, timing] : plan.schedules)
      if (i < timing.size()) check_timing_bounds(timing[i].timestep, timing[i].t_post, timing[i].coefficients, i, where);
  }
}

/// StepPlan._validate_keys: a key covers the same blocks in every step, at most once a step; a reuse
/// follows a refresh of its key; a reused or adaptive range is one op; adaptive ops have their rule.
void validate_keys(const Plan& plan) {
  std::map<std::string, std::pair<int, int>> ranges;
  std::set<std::string> stored;
  for (const Step& step : plan.steps) {
    std::string where = "plan '" + plan.name + "' step " + std::to_string(step.index);
    auto groups = key_groups(step.ops);
    std::set<std::string> keys;
    for (auto& [key, _] : groups) keys.insert(key);
    if (keys.size() != groups.size()) plan_error(where + ": a cache key covers two ranges in one step");
    for (auto& [key, ops] : groups) {
      std::pair<int, int> span(ops.front()->start, ops.back()->end);
      auto known = ranges.emplace(key, span).first->second;
      if (known != span)
        plan_error(where + ": cache key '" + key + "' covers blocks " + std::to_string(span.first) + ":" +
                   std::to_string(span.second) + " here and " + std::to_string(known.first) + ":" +
                   std::to_string(known.second) + " elsewhere");
      bool all_store = std::all_of(ops.begin(), ops.end(), [](const Op* op) { return op->stores(); });
      if (ops.size() > 1 && !all_store) plan_error(where + ": cache key '" + key + "' is reused over more than one op");
      const Op& op = *ops.front();
      if (op.kind == OpKind::cache_reuse && !stored.count(key))
        plan_error(where + ": cache_reuse of key '" + key + "' before any refresh of it");
      if (op.kind == OpKind::cache_adaptive && !(op.threshold >= 0 && std::isfinite(op.threshold)))
        plan_error(where + ": cache_adaptive threshold must be a number >= 0, got " + detail::py_float(op.threshold));
      if (op.kind != OpKind::cache_reuse) stored.insert(key);
    }
  }
}

}  // namespace

Plan Plan::parse(const std::string& text, const std::string& where) {
  json d;
  try {
    d = json::parse(text);
  } catch (const json::exception& e) {
    detail::config_error("cannot read plan " + where + ": " + e.what());
  }
  Check c("plan " + where, "plan");
  const json* version = d.is_object() && d.contains("version") ? &d["version"] : nullptr;
  int v = 0;
  if (version && version->is_number()) {
    const double n = version->get<double>();
    if (n == 1 || n == 2 || n == 3) v = static_cast<int>(n);
  }
  if (!v)
    detail::config_error("unsupported plan version " + (version ? type_name(*version) : std::string("None")) +
                         " (this tool reads 1, 2, 3); rebuild the plan or bundle with this version of ilf-deploy");
  if (auto found = detail::schema_problem(detail::SchemaName::plan, d))
    detail::bundle_error("plan " + where + " does not follow the plan schema " + *found);
  Plan plan;
  plan.version = v;
  plan.name = c.string(c.key(d, "", "name"), "name");
  plan.num_blocks = c.int32(c.key(d, "", "num_blocks"), "num_blocks", 1);
  plan.scheduler = c.string(c.key(d, "", "scheduler"), "scheduler");
  if (d.contains("loop") && !d["loop"].is_null()) plan.loop = c.pair(d["loop"], "loop", 0);
  const json& steps = c.key(d, "", "steps");
  c.array(steps, "steps");
  for (size_t i = 0; i < steps.size(); ++i) {
    std::string at = "steps/" + std::to_string(i);
    const json& s = steps[i];
    c.object(s, at);
    Step step;
    step.index = c.int32(c.key(s, at, "index"), at + "/index", 0);
    step.timestep = c.number(c.key(s, at, "timestep"), at + "/timestep");
    step.t_post = parse_t_post(c, s, at);
    const json& ops = c.key(s, at, "ops");
    c.array(ops, at + "/ops");
    for (size_t j = 0; j < ops.size(); ++j) step.ops.push_back(parse_op(c, ops[j], at + "/ops/" + std::to_string(j), v));
    if (s.contains("final_time")) step.final_time = parse_time(c, s["final_time"], at + "/final_time");
    step.coefficients = parse_coefficients(c, c.key(s, at, "coefficients"), at + "/coefficients");
    plan.steps.push_back(step);
  }
  if (d.contains("schedules")) {  // version 3; keys as '^[1-9][0-9]*$' (the schema)
    const json& schedules = d["schedules"];
    c.object(schedules, "schedules");
    for (auto& [tokens, timing] : schedules.items()) {
      std::string at = "schedules/" + tokens;
      if (tokens.size() > 18) c.fail("schedules", "'" + tokens + "' is more image tokens than this tool counts");
      c.array(timing, at);
      std::vector<StepTiming> entries;
      for (size_t i = 0; i < timing.size(); ++i) {
        std::string eat = at + "/" + std::to_string(i);
        const json& e = timing[i];
        c.object(e, eat);
        StepTiming t;
        t.timestep = c.number(c.key(e, eat, "timestep"), eat + "/timestep");
        t.t_post = parse_t_post(c, e, eat);
        t.coefficients = parse_coefficients(c, c.key(e, eat, "coefficients"), eat + "/coefficients");
        entries.push_back(t);
      }
      plan.schedules[std::stoll(tokens)] = entries;
    }
  }
  // StepPlan.validate
  check_plan_bounds(plan);
  if (plan.loop) check_block_range(plan.loop->first, plan.loop->second, plan.num_blocks, "plan '" + plan.name + "' loop");
  for (const Step& step : plan.steps) {
    std::string at = "plan '" + plan.name + "' step " + std::to_string(step.index);
    int position = 0;
    for (const Op& op : step.ops) {
      check_block_range(op.start, op.end, plan.num_blocks, at + " " + op_name(op.kind));
      if (op.start != position) plan_error(at + ": ops must cover blocks in order");
      if (op.kind == OpKind::ilf && (!plan.loop || std::make_pair(op.start, op.end) != *plan.loop))
        plan_error(at + ": ILF op outside the plan's loop");
      if (op.time == TimeRef::t_post && !step.t_post) plan_error(at + ": t_post op but no t_post");
      position = op.end + 1;
    }
    if (position != plan.num_blocks)
      plan_error(at + ": ops cover " + std::to_string(position) + " of " + std::to_string(plan.num_blocks) + " blocks");
  }
  validate_keys(plan);
  for (auto& [tokens, timing] : plan.schedules) {
    if (timing.size() != plan.steps.size())
      plan_error("plan '" + plan.name + "': the schedule for " + std::to_string(tokens) + " image tokens has " +
                 std::to_string(timing.size()) + " steps, the plan " + std::to_string(plan.steps.size()));
    for (size_t i = 0; i < timing.size(); ++i)
      if (plan.steps[i].t_post.has_value() != timing[i].t_post.has_value())
        plan_error("plan '" + plan.name + "' step " + std::to_string(plan.steps[i].index) + ": t_post at one size, not another");
  }
  if (v == 1 && needed_version(plan) != 1)  // keys shared by consecutive ops: version 2 only
    plan_error("malformed plan '" + plan.name +
               "': consecutive ops share a cache key, which version 1 plans cannot say (write version 2)");
  return plan;
}

Plan Plan::for_image_tokens(int64_t tokens) const {
  if (schedules.empty()) return *this;
  auto it = schedules.find(tokens);
  if (it == schedules.end()) {
    std::vector<std::string> made;
    for (auto& [n, _] : schedules) made.push_back(std::to_string(n));
    detail::config_error("plan '" + name + "' was made for images of " + detail::join(made, ", ") + " tokens, not " +
                         std::to_string(tokens) +
                         " (its schedule depends on the image size): make the plan for this size, or rebuild with --resolutions");
  }
  Plan out = *this;
  for (size_t i = 0; i < out.steps.size(); ++i) {
    out.steps[i].timestep = it->second[i].timestep;
    out.steps[i].t_post = it->second[i].t_post;
    out.steps[i].coefficients = it->second[i].coefficients;
  }
  out.schedules.clear();
  return out;
}

bool Plan::adaptive() const {
  for (auto& s : steps)
    for (auto& op : s.ops)
      if (op.kind == OpKind::cache_adaptive) return true;
  return false;
}

Plan Plan::load(const std::string& path) {
  std::string text;
  try {
    text = detail::read_file(path);
  } catch (const Error& e) {
    detail::config_error(std::string("cannot read plan ") + path + ": " + e.what());
  }
  return parse(text, path);
}

// -- the bundle -----------------------------------------------------------------------------------

struct Bundle::Data {
  std::string path;
  Manifest manifest;
  std::string digest;
};

void check_digest_option(const std::string& digest) {
  if (digest.rfind("sha256:", 0) != 0 || !lower_hex(digest, 7, 64))
    detail::config_error("--digest must look like sha256:<64 lowercase hex digits>, got '" + digest + "'");
}

Bundle Bundle::load(const std::string& given, const LoadOptions& options) {
  if (!options.digest.empty()) check_digest_option(options.digest);
  std::string root = strip_slashes(given);
  std::string manifest_path = detail::join_path(root, kManifest);
  if (!detail::is_file(manifest_path))
    detail::bundle_error(root + " is not a bundle (no manifest.json); build one with `ilf-deploy build`");
  std::string data = detail::read_file(manifest_path);
  json raw;
  try {
    raw = json::parse(data);
  } catch (const json::exception& e) {
    std::string what = e.what();
    detail::bundle_error(manifest_path + " is not valid JSON: " + what);
  }
  if (raw.is_object()) {
    auto version = raw.find("schema_version");
    if (version == raw.end() || !readable_schema(*version))
      detail::bundle_error(manifest_path + ": bundle schema version " + (version == raw.end() ? "None" : type_name(*version)) +
                           " is not supported (this tool reads " + kReadableSchemas +
                           "); rebuild the bundle with this version of ilf-deploy");
  }
  std::string actual = "sha256:" + sha256_hex(data.data(), data.size());
  std::string digest_path = detail::join_path(root, kDigestFile);
  if (!detail::is_file(digest_path))
    detail::bundle_error(root + ": " + kDigestFile + " is missing (a bundle from an older ilf-deploy, or incomplete); rebuild it");
  std::string recorded = detail::read_file(digest_path);
  recorded.erase(0, recorded.find_first_not_of(" \t\r\n"));
  recorded.erase(recorded.find_last_not_of(" \t\r\n") + 1);
  if (recorded != actual)
    detail::bundle_error(root + ": " + kManifest + " does not match the bundle's digest in " + kDigestFile +
                         " (edited or corrupted); rebuild the bundle");
  if (!options.digest.empty() && options.digest != actual)
    detail::bundle_error(root + " has digest " + actual + ", not the pinned --digest " + options.digest);
  if (!raw.is_object())
    detail::bundle_error(manifest_path + ": bundle schema version None is not supported (this tool reads " +
                         kReadableSchemas + "); rebuild the bundle with this version of ilf-deploy");
  if (auto found = detail::schema_problem(detail::SchemaName::manifest, raw))
    detail::bundle_error(manifest_path + " does not follow the manifest schema " + *found);
  auto d = std::make_shared<Data>();
  d->path = root;
  d->manifest = parse_manifest(raw, manifest_path);
  d->digest = actual;
  if (options.verify_hashes) {
    for (auto& [name, digest] : d->manifest.files) {
      std::string file = detail::join_path(root, name);
      if (!detail::is_file(file)) detail::bundle_error(root + ": " + name + " is missing; the bundle is incomplete, rebuild it");
      if (sha256_file(file) != digest)
        detail::bundle_error(root + ": " + name + " does not match its sha256 in the manifest (edited or corrupted)");
    }
  }
  Bundle b;
  b.data_ = d;
  return b;
}

const std::string& Bundle::path() const { return data_->path; }
const Manifest& Bundle::manifest() const { return data_->manifest; }
const std::string& Bundle::digest() const { return data_->digest; }

std::vector<std::string> Bundle::plan_names() const {
  std::vector<std::string> out;
  for (auto& [name, _] : data_->manifest.plans) out.push_back(name);
  return out;
}

std::string Bundle::default_plan() const {
  for (auto& name : plan_names())
    if (name.rfind("ilf", 0) == 0) return name;
  return plan_names().front();
}

Plan Bundle::plan(const std::string& spec) const {
  Plan plan;
  auto& plans = data_->manifest.plans;
  auto it = std::find_if(plans.begin(), plans.end(), [&](auto& p) { return p.first == spec; });
  if (it != plans.end()) {
    plan = Plan::load(detail::join_path(data_->path, it->second));
  } else if (spec.size() > 5 && spec.compare(spec.size() - 5, 5, ".json") == 0 && detail::is_file(spec)) {
    plan = Plan::load(spec);
  } else {
    detail::bundle_error("plan '" + spec + "' is not in this bundle (it has: " + detail::join(plan_names(), ", ") + ")");
  }
  std::vector<int> missing;
  for (int p : plan.cut_points())
    if (std::find(data_->manifest.cut_points.begin(), data_->manifest.cut_points.end(), p) == data_->manifest.cut_points.end())
      missing.push_back(p);
  if (!missing.empty()) {
    std::string list = "[";
    for (size_t i = 0; i < missing.size(); ++i) list += (i ? ", " : "") + std::to_string(missing[i]);
    detail::bundle_error("plan '" + plan.name + "' cuts the model at block(s) " + list +
                         "] where this bundle has no segment boundary; rebuild the bundle with the plan in --plans");
  }
  return plan;
}

std::string Bundle::segment_path(const std::string& name, const std::string& variant) const {
  return detail::join_path(data_->path, data_->manifest.segment(name, variant).file);
}

int64_t Bundle::image_tokens(int latent_height, int latent_width) const {
  const int64_t p = data_->manifest.model.patch_size;
  return (latent_height / p) * (latent_width / p);
}

Tensor Bundle::positions(int latent_height, int latent_width) const {
  std::string path =
      detail::join_path(data_->path, "positions/" + std::to_string(latent_height) + "x" + std::to_string(latent_width) + ".npy");
  if (!detail::is_file(path)) {
    std::vector<std::string> sizes;
    for (auto& [h, w] : data_->manifest.resolutions) sizes.push_back(std::to_string(h) + "x" + std::to_string(w));
    int f = data_->manifest.model.vae_scale_factor;
    detail::bundle_error("the bundle was not built for " + std::to_string(latent_height * f) + "x" +
                         std::to_string(latent_width * f) + " images (it has: " + detail::join(sizes, ", ") + ")");
  }
  Tensor t = read_npy(path);
  if (t.dtype() != DType::f32) detail::bundle_error(path + " is not a float array");
  return t;
}

}  // namespace ilf
