// ilf-run: run a bundle's step plan from C++ on OpenVINO (the C++ twin of `ilf-deploy generate BUNDLE
// --backend openvino`). Bad input is one line on stderr and exit status 2.
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cerrno>
#include <cctype>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include "detail.hpp"  // cpp/src: read_npy, write_npy, cpu_model, cpu_flags
#include "ilf/ilf.hpp"

namespace {

const char* kUsage = R"(usage: ilf-run BUNDLE [--plan P] (--prompt TEXT | --token-ids FILE | --class-label N) [options]

Run a step plan of an ilf-deploy bundle on OpenVINO (every file's sha256 and the digest checked first).

  --plan, -p P            a bundled plan (default: the first ILF plan) or a plan .json file
  --prompt TEXT           the prompt, tokenised by the bundle's OpenVINO tokenizer (SD3, Flux: one per
                          tokenizer); a bundle built without them: pass --token-ids
  --token-ids FILE        token ids instead of --prompt. PixArt: a .npy of integers shaped (L,), (1, L)
                          or (2, L) = [negative; prompt] (mask: up to the trailing padding), or a .json
                          {"input_ids": [...], "attention_mask": [...]} with the same rows.
                          SD3, Flux (several tokenizers): a .json with each tokenizer's ids by the
                          text_encoder input they feed, each padded to its max_length, e.g.
                          {"input_ids": [...], "input_ids_2": [...]}; every input one row (the
                          prompt) or, for SD3 with guidance, two rows [negative; prompt]
                          Sana: as PixArt's .json, the prompt's row = tokenizer.instruction + the
                          prompt (instruction_max_length ids), a negative row its own (max_length)
  --negative-prompt TEXT  PixArt, SD3 and Sana, with guidance (default "")
  --class-label N         DiT: the ImageNet class
  --guidance-scale G      guidance (default 4.5 PixArt, 4.0 DiT, 7.0 SD3: classifier-free, <= 1
                          disables; 3.5 Flux.1-dev: embedded in the model; Flux.1-schnell has none)
  --seed S                seed of this runtime's noise (not numpy's: use --latents-in for parity)
  --height H, --width W   image size in pixels (default: the bundle's first resolution)
  --latents-in FILE       start from these latents (.npy, (B, C, H, W) with B = 1: the VAE's latent
                          layout; Flux too: unpacked, not diffusers' packed `latents=`) instead of noise
  --latents-out FILE      write the final latents (.npy, (B, C, H, W) as --latents-in)
  --out, -o FILE          write the image (.png; default image.png unless only --latents-out)
  --variant V             f32 / bf16, or a bundle variant OpenVINO reads (mode int8-ov, int8-qdq, bf16)
  --precision P           f32 (default, pinned) or bf16 (needs AVX512_BF16 or AMX)
  --device D              OpenVINO device (default CPU; GPU/NPU passed through, untested)
  --threads N             OpenVINO inference threads (default: OpenVINO's choice)
  --no-cache              do not cache compiled models in BUNDLE/openvino_cache
  --digest sha256:HEX     refuse any bundle but this one
  --json FILE             write timings (per run, step, segment) as JSON
  --force                 replace the outputs (--out, --latents-out, --json) where they exist; without
                          it an output that exists is refused before any work
  --runs N                generate N times in this process (timings per run; default 1)
  --quiet, -q             print nothing on success
  --version, --help, -h
)";

struct Args {
  std::string bundle, plan, prompt, negative_prompt, token_ids, latents_in, latents_out, out, variant, precision, device = "CPU",
      json, digest;
  bool has_prompt = false, has_class = false, has_guidance = false, has_height = false, has_width = false, no_cache = false,
       quiet = false, force = false;
  int64_t class_label = 0, seed = 0, height = 0, width = 0;  // 64-bit until the request contract passed them
  double guidance = 0;
  int threads = 0, runs = 1;
};

[[noreturn]] void usage_error(const std::string& message) { throw ilf::Error(ilf::Error::Kind::config, message); }

int64_t parse_int(const std::string& option, const std::string& text, int64_t minimum) {
  char* end = nullptr;
  errno = 0;
  long long v = std::strtoll(text.c_str(), &end, 10);
  if (text.empty() || *end || errno) usage_error(option + " must be an integer, got '" + text + "'");
  if (v < minimum) usage_error(option + " must be >= " + std::to_string(minimum) + ", got " + text);
  return v;
}

/// A number as Python's float() reads it (nan and inf too: the request contract refuses them in its words).
double parse_float(const std::string& option, const std::string& text) {
  char* end = nullptr;
  double v = std::strtod(text.c_str(), &end);
  if (text.empty() || *end) usage_error(option + " must be a number, got '" + text + "'");
  return v;
}

bool is_directory(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

std::string parent_dir(const std::string& path) {
  auto slash = path.rfind('/');
  return slash == std::string::npos ? "." : slash == 0 ? "/" : path.substr(0, slash);
}

/// An output path checked before any work, in cli/paths.py's words: not a directory, the right
/// ending, in an existing directory this process can write; one that exists only with --force
/// (`force`: the project's --force rule, docs/cli-guide.md "Outputs and --force").
void check_output(const std::string& path, const std::string& flag, const std::string& suffix, bool force) {
  if (path.empty()) return;
  if (is_directory(path)) usage_error(flag + " " + path + " is a directory; give a file name");
  std::string ending = path.size() >= suffix.size() ? path.substr(path.size() - suffix.size()) : "";
  std::transform(ending.begin(), ending.end(), ending.begin(), [](unsigned char c) { return std::tolower(c); });
  if (!suffix.empty() && ending != suffix) usage_error(flag + " " + path + ": the file name must end in " + suffix);
  const std::string dir = parent_dir(path);
  if (!is_directory(dir)) usage_error(flag + " " + path + ": directory " + dir + " does not exist");
  if (::access(dir.c_str(), W_OK | X_OK) != 0) usage_error(flag + " " + path + ": cannot write in " + dir + " (permission denied)");
  struct stat st {};
  if (!force && ::lstat(path.c_str(), &st) == 0)  // a dangling link too: it would be replaced as a file
    usage_error(flag + " " + path + " exists; pass --force to replace it");
  if (::access(path.c_str(), F_OK) == 0 && ::access(path.c_str(), W_OK) != 0) usage_error(flag + " " + path + ": the file is not writable");
}

Args parse(int argc, char** argv) {
  Args a;
  std::vector<std::string> positional;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i], value;
    bool inline_value = false;
    if (arg.rfind("--", 0) == 0 && arg.find('=') != std::string::npos) {
      value = arg.substr(arg.find('=') + 1);
      arg.resize(arg.find('='));
      inline_value = true;
    }
    auto next = [&]() -> std::string {
      if (inline_value) return value;
      if (i + 1 >= argc) usage_error(arg + " needs a value");
      return argv[++i];
    };
    if (arg == "--help" || arg == "-h") {
      std::cout << kUsage;
      std::exit(0);
    } else if (arg == "--version") {
      std::cout << "ilf-run " << ilf::version() << " (OpenVINO " << ilf::openvino_version() << ")\n";
      std::exit(0);
    } else if (arg == "--plan" || arg == "-p") a.plan = next();
    else if (arg == "--prompt") { a.prompt = next(); a.has_prompt = true; }
    else if (arg == "--negative-prompt") a.negative_prompt = next();
    else if (arg == "--token-ids") a.token_ids = next();
    else if (arg == "--class-label") { a.class_label = parse_int(arg, next(), INT64_MIN); a.has_class = true; }
    else if (arg == "--guidance-scale") { a.guidance = parse_float(arg, next()); a.has_guidance = true; }
    else if (arg == "--seed") a.seed = parse_int(arg, next(), INT64_MIN);
    else if (arg == "--height") { a.height = parse_int(arg, next(), INT64_MIN); a.has_height = true; }
    else if (arg == "--width") { a.width = parse_int(arg, next(), INT64_MIN); a.has_width = true; }
    else if (arg == "--latents-in") a.latents_in = next();
    else if (arg == "--latents-out") a.latents_out = next();
    else if (arg == "--out" || arg == "-o") a.out = next();
    else if (arg == "--variant") a.variant = next();
    else if (arg == "--precision") a.precision = next();
    else if (arg == "--device") a.device = next();
    else if (arg == "--threads") a.threads = static_cast<int>(parse_int(arg, next(), 1));
    else if (arg == "--json") a.json = next();
    else if (arg == "--digest") a.digest = next();
    else if (arg == "--runs") a.runs = static_cast<int>(parse_int(arg, next(), 1));
    else if (arg == "--no-cache") a.no_cache = true;
    else if (arg == "--quiet" || arg == "-q") a.quiet = true;
    else if (arg == "--force") a.force = true;
    else if (arg.size() > 1 && arg[0] == '-') usage_error("unknown option " + arg + " (see ilf-run --help)");
    else positional.push_back(arg);
    if (inline_value && (arg == "--no-cache" || arg == "--quiet" || arg == "--force")) usage_error(arg + " takes no value");
  }
  if (positional.empty()) usage_error("missing BUNDLE (see ilf-run --help)");
  if (positional.size() > 1) usage_error("one BUNDLE only, got also '" + positional[1] + "'");
  a.bundle = positional[0];
  if (a.has_prompt + !a.token_ids.empty() + a.has_class > 1)
    usage_error("give one of --prompt, --token-ids and --class-label");
  if (!a.precision.empty() && a.precision != "f32" && a.precision != "bf16")
    usage_error("--precision must be f32 or bf16, got '" + a.precision + "'");
  if (!a.digest.empty()) ilf::check_digest_option(a.digest);
  if (a.out.empty() && a.latents_out.empty()) a.out = "image.png";  // generate's default, checked as given
  check_output(a.latents_out, "--latents-out", ".npy", a.force);
  check_output(a.out, "--out", ".png", a.force);  // PNG only: a .jpg name is refused, never given PNG bytes
  check_output(a.json, "--json", "", a.force);
  return a;
}

/// The request contract (runtime/request.py), with `generate`'s option names: what it refuses, this
/// refuses in the same words ("--guidance-scale: guidance_scale must be in 0..30, got 31").
void check_request(const Args& a, const ilf::Manifest& m) {
  if (a.has_prompt && a.prompt.empty()) usage_error("--prompt: prompt is required");  // as generate's ""
  ilf::RequestFields fields;
  if (a.has_prompt) fields.prompt = a.prompt;
  if (!a.negative_prompt.empty()) fields.negative_prompt = a.negative_prompt;
  if (a.has_class) fields.class_label = a.class_label;
  if (a.has_guidance) fields.guidance_scale = a.guidance;
  if (a.has_height) fields.height = a.height;
  if (a.has_width) fields.width = a.width;
  fields.seed = a.seed;
  auto problem = ilf::request_problem(m, fields);
  if (!problem) return;
  std::string option = "--" + problem->param;
  std::replace(option.begin(), option.end(), '_', '-');
  usage_error(option + ": " + problem->message);
}

double cpu_seconds() {  // this process's user + system CPU time (steadier than wall time on a shared machine)
  rusage u {};
  getrusage(RUSAGE_SELF, &u);
  return u.ru_utime.tv_sec + u.ru_stime.tv_sec + 1e-6 * (u.ru_utime.tv_usec + u.ru_stime.tv_usec);
}

bool is_json(const std::string& path) { return path.size() > 5 && path.compare(path.size() - 5, 5, ".json") == 0; }

/// The JSON document in `path`, or `fail(why)` (which does not return).
template <typename Fail>
nlohmann::json read_json(const std::string& path, Fail fail) {
  std::ifstream in(path);
  if (!in) fail(std::strerror(errno));
  nlohmann::json d;
  try {
    in >> d;
  } catch (const std::exception& e) {
    fail(e.what());
  }
  return d;
}

/// --token-ids: rows of (ids, mask); the mask of a .npy is 1 up to the trailing run of pad ids. With a
/// prompt format (Sana, schema 5) the prompt's row is instruction_max_length long, a negative row max_length.
std::vector<ilf::TokenIds> read_token_ids(const std::string& path, const ilf::TokenizerSpec* spec) {
  const int pad_id = spec ? spec->pad_id : 0;
  std::vector<ilf::TokenIds> rows;
  auto fail = [&](const std::string& why) -> void { usage_error("cannot read token ids " + path + ": " + why); };
  if (is_json(path)) {
    nlohmann::json d = read_json(path, fail);
    if (!d.is_object() || !d.contains("input_ids")) fail("expected {\"input_ids\": [...], \"attention_mask\": [...]}");
    auto as_rows = [&](const nlohmann::json& v) {
      std::vector<std::vector<int64_t>> out;
      if (!v.is_array() || v.empty()) fail("ids must be a non-empty list (or list of lists)");
      try {
        if (v[0].is_array())
          for (auto& r : v) out.push_back(r.get<std::vector<int64_t>>());
        else
          out.push_back(v.get<std::vector<int64_t>>());
      } catch (const std::exception&) {
        fail("ids must be integers");
      }
      return out;
    };
    auto ids = as_rows(d["input_ids"]);
    std::vector<std::vector<int64_t>> masks;
    if (d.contains("attention_mask")) masks = as_rows(d["attention_mask"]);
    for (size_t i = 0; i < ids.size(); ++i) {
      ilf::TokenIds t;
      t.input_ids = ids[i];
      t.attention_mask = i < masks.size() ? masks[i] : std::vector<int64_t>(ids[i].size(), 1);
      if (t.attention_mask.size() != t.input_ids.size()) fail("input_ids and attention_mask differ in length");
      rows.push_back(t);
    }
  } else {
    ilf::Tensor t = ilf::detail::read_npy(path);
    if (t.dtype() != ilf::DType::i64) fail("token ids must be integers");
    int64_t n = t.shape().size() == 1 ? 1 : t.dim(0), len = t.shape().empty() ? 0 : t.dim(-1);
    if (t.shape().empty() || t.shape().size() > 2 || len == 0) fail("expected a shape (L,), (1, L) or (2, L), got " + t.shape_string());
    for (int64_t r = 0; r < n; ++r) {
      ilf::TokenIds row;
      row.input_ids.assign(t.i64_data() + r * len, t.i64_data() + (r + 1) * len);
      int64_t end = len;
      while (end > 0 && row.input_ids[end - 1] == pad_id) --end;
      row.attention_mask.assign(len, 0);
      std::fill(row.attention_mask.begin(), row.attention_mask.begin() + end, 1);
      rows.push_back(row);
    }
  }
  if (rows.empty() || rows.size() > 2) fail("expected 1 row (the prompt) or 2 rows (negative; prompt)");
  if (spec && spec->instruction) {
    auto length = [&](size_t row, int want, const std::string& what) {
      if (rows[row].input_ids.size() != static_cast<size_t>(want))
        fail(what + " row must be " + std::to_string(want) + " ids long, got " + std::to_string(rows[row].input_ids.size()));
    };
    length(rows.size() - 1, spec->instruction_max_length, "the prompt's (instruction + prompt)");
    if (rows.size() == 2) length(0, spec->max_length, "the negative prompt's");
  } else if (rows.size() == 2 && rows[0].input_ids.size() != rows[1].input_ids.size()) {
    fail("both rows must have the same length");
  }
  return rows;
}

/// --token-ids for a text encoder that reads several tokenizers (schema 4 `tokenizers`): a .json with
/// the ids of each by its input, one row (the prompt) or two [negative; prompt] each; a .npy where
/// there is one tokenizer.
std::vector<ilf::TokenIds> read_named_token_ids(const std::string& path, const std::vector<ilf::TokenizerSpec>& specs) {
  auto fail = [&](const std::string& why) -> void { usage_error("cannot read token ids " + path + ": " + why); };
  std::vector<std::string> names;
  for (auto& spec : specs) names.push_back(spec.input);
  std::string form = "{";
  for (size_t i = 0; i < names.size(); ++i) form += std::string(i ? ", " : "") + "\"" + names[i] + "\": [...]";
  form += "}";
  std::map<std::string, std::vector<std::vector<int64_t>>> by_input;
  if (is_json(path)) {
    nlohmann::json d = read_json(path, fail);
    if (!d.is_object()) fail("expected " + form + " (this bundle's text encoder reads several tokenizers' ids)");
    for (auto& [name, v] : d.items()) {
      if (std::find(names.begin(), names.end(), name) == names.end())
        fail("'" + name + "' is not an input of this bundle's text encoder (it reads " + form + ")");
      if (!v.is_array() || v.empty()) fail(name + ": ids must be a non-empty list (or list of lists)");
      try {
        if (v[0].is_array())
          for (auto& r : v) by_input[name].push_back(r.get<std::vector<int64_t>>());
        else
          by_input[name].push_back(v.get<std::vector<int64_t>>());
      } catch (const std::exception&) {
        fail(name + ": ids must be integers");
      }
    }
    for (auto& name : names)
      if (!by_input.count(name)) fail("no ids for " + name + " (this bundle's text encoder reads " + form + ")");
  } else if (specs.size() == 1) {
    ilf::Tensor t = ilf::detail::read_npy(path);
    if (t.dtype() != ilf::DType::i64) fail("token ids must be integers");
    if (t.shape().empty() || t.shape().size() > 2 || t.dim(-1) == 0)
      fail("expected a shape (L,), (1, L) or (2, L), got " + t.shape_string());
    int64_t n = t.shape().size() == 1 ? 1 : t.dim(0), len = t.dim(-1);
    for (int64_t r = 0; r < n; ++r) by_input[names[0]].emplace_back(t.i64_data() + r * len, t.i64_data() + (r + 1) * len);
  } else {
    fail("this bundle's text encoder reads several tokenizers' ids: give a .json " + form);
  }
  const size_t rows = by_input.at(names[0]).size();
  for (auto& [name, r] : by_input)
    if (r.size() != rows) fail("every input needs the same rows (" + names[0] + " has " + std::to_string(rows) + ", " + name + " " + std::to_string(r.size()) + ")");
  if (rows > 2) fail("expected 1 row (the prompt) or 2 rows (negative; prompt)");
  std::vector<ilf::TokenIds> out(rows);
  for (size_t i = 0; i < rows; ++i)
    for (auto& [name, r] : by_input) out[i].inputs[name] = r[i];
  return out;
}

nlohmann::json stage_table(const ilf::Timings& timings) {
  nlohmann::json out = nlohmann::json::object();
  for (auto& [name, calls] : timings.calls()) {
    double total = 0;
    for (double s : calls) total += s;
    out[name] = {{"calls", calls.size()}, {"total_s", total}};
  }
  return out;
}

int run(int argc, char** argv) {
  Args a = parse(argc, argv);
  ilf::Tensor initial;
  if (!a.latents_in.empty()) initial = ilf::detail::read_npy(a.latents_in);
  if (!initial.empty() && initial.dtype() != ilf::DType::f32)
    usage_error("cannot read latents " + a.latents_in + ": not a float array");
  if (!initial.empty() && !std::all_of(initial.f32_data(), initial.f32_data() + initial.numel(), [](float v) { return std::isfinite(v); }))
    usage_error("--latents-in " + a.latents_in + " holds NaN or infinite values");  // generate's words

  double t0 = std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
  auto clock = [] { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); };
  ilf::LoadOptions load;
  load.digest = a.digest;
  ilf::Bundle bundle = ilf::Bundle::load(a.bundle, load);
  double loaded = clock();
  const ilf::Manifest& m = bundle.manifest();
  const bool dit = m.architecture == "dit";
  const std::string family = m.architecture.rfind("pixart", 0) == 0 ? "PixArt" : m.architecture;
  if (dit && (a.has_prompt || !a.token_ids.empty())) usage_error("DiT models take --class-label, not a prompt");
  if (dit && !a.has_class) usage_error("DiT models need --class-label");
  if (!dit && a.has_class) usage_error(family + " models take --prompt or --token-ids, not --class-label");
  if (!dit && !a.has_prompt && a.token_ids.empty()) usage_error(family + " models need --prompt (or --token-ids)");
  check_request(a, m);
  std::vector<std::string> inputs;  // schema 4: the text encoder's inputs, one per tokenizer
  for (auto& spec : m.tokenizers) inputs.push_back(spec.input);
  // a prompt without the converted tokenizers: the generator refuses it (ilf::make_openvino_tokenizer)
  // the request contract (runtime/request.py): a negative prompt needs classifier-free guidance, a
  // guidance scale some guidance
  const std::string kind = m.model.guidance == "embedded"
                               ? m.architecture + " models (their guidance is embedded, not classifier-free)"
                               : m.architecture + " models without guidance (schnell)";
  if (m.model.guidance != "cfg" && !a.negative_prompt.empty())
    usage_error("--negative-prompt: negative_prompt does not apply to " + kind);
  if (m.model.guidance == "none" && a.has_guidance && a.guidance != 1.0)
    usage_error("--guidance-scale: guidance_scale does not apply to " + kind);

  ilf::Request request;
  request.prompt = a.prompt;
  request.negative_prompt = a.negative_prompt;
  if (a.has_class) request.class_label = a.class_label;
  if (a.has_guidance) request.guidance_scale = a.guidance;
  request.seed = static_cast<uint64_t>(a.seed);  // the contract has held them to its ranges
  request.height = static_cast<int>(a.height);
  request.width = static_cast<int>(a.width);
  if (!a.token_ids.empty()) {
    auto rows = inputs.empty() ? read_token_ids(a.token_ids, m.tokenizer ? &*m.tokenizer : nullptr)
                               : read_named_token_ids(a.token_ids, m.tokenizers);
    request.tokens = rows.back();
    if (rows.size() == 2) request.negative_tokens = rows.front();
    if (rows.size() == 2 && m.model.guidance != "cfg")
      usage_error("--token-ids: 2 rows [negative; prompt], but negative_prompt does not apply to " + kind +
                  ": give the prompt's row only");
    double scale = a.has_guidance ? a.guidance : ilf::default_guidance(m.architecture, m.model.guidance == "none");
    if (rows.size() == 1 && scale > 1.0 && m.model.guidance == "cfg" && !(m.tokenizer && m.tokenizer->openvino))
      usage_error("guidance needs the negative prompt's ids too: give --token-ids 2 rows [negative; prompt], or --guidance-scale 1");
  }
  ilf::Plan plan = bundle.plan(a.plan.empty() ? bundle.default_plan() : a.plan);

  ilf::OpenVinoOptions options;
  options.device = a.device;
  options.precision = a.precision;
  options.variant = a.variant;
  options.threads = a.threads;
  options.cache = !a.no_cache;
  ilf::Generator generator(bundle, ilf::make_openvino_engine(bundle, options));
  auto latent_hw = generator.latent_size(request);  // a size the bundle was built for
  check_plan(plan.for_image_tokens(bundle.image_tokens(latent_hw.first, latent_hw.second)), generator.segments());
  double opened = clock();

  nlohmann::json runs = nlohmann::json::array();
  ilf::Tensor latents;
  std::vector<ilf::Image> images;
  const bool want_image = !a.out.empty();
  for (int r = 0; r < a.runs; ++r) {
    generator.timings().clear();
    ilf::Timings* infer = generator.engine().inference_timings();
    if (infer) infer->clear();
    std::vector<double> marks;
    double start = clock(), cpu_start = cpu_seconds();
    marks.push_back(start);
    latents = generator.generate_latents(plan, request, initial.empty() ? nullptr : &initial,
                                         [&](int) { marks.push_back(clock()); });
    double denoised = clock();
    if (want_image) images = generator.decode(latents);
    double done = clock();
    std::vector<double> steps;
    for (size_t i = 1; i < marks.size(); ++i) steps.push_back(marks[i] - marks[i - 1]);
    double text = generator.timings().total("text_encoder") + generator.timings().total("tokenizer");
    runs.push_back({{"total_s", done - start},
                    {"cpu_s", cpu_seconds() - cpu_start},
                    {"latents_s", denoised - start},
                    {"encode_s", text},
                    {"decode_s", done - denoised},
                    {"step_s", steps},
                    {"block_forwards", generator.last_block_forwards()},
                    {"segments", stage_table(generator.timings())},
                    {"inference", infer ? stage_table(*infer) : nlohmann::json::object()}});
  }
  if (!a.latents_out.empty()) {
    ilf::detail::write_npy(a.latents_out, latents);
    if (!a.quiet) std::cout << "latents → " << a.latents_out << "\n";
  }
  if (want_image) {
    ilf::write_png(a.out, images.at(0));
    if (!a.quiet) std::cout << "image → " << a.out << "\n";
  }
  if (!a.json.empty()) {
    nlohmann::json report = {{"ilf_run", ilf::version()},
                             {"openvino", ilf::openvino_version()},
                             {"engine", generator.engine().describe()},
                             {"bundle", bundle.path()},
                             {"digest", bundle.digest()},
                             {"plan", plan.name},
                             {"steps", plan.steps.size()},
                             {"block_forwards", plan.block_forwards()},  // an adaptive plan's most; runs: what ran
                             {"cpu", ilf::detail::cpu_model()},
                             {"cpu_flags", ilf::detail::cpu_flags()},
                             {"load_s", loaded - t0},
                             {"open_s", opened - loaded},
                             {"runs", runs}};
    std::string why;
    if (!ilf::detail::write_atomic(a.json, report.dump(2) + "\n", &why)) usage_error("cannot write " + a.json + ": " + why);
  }
  if (!a.quiet) {
    const auto& ran = generator.last_block_forwards();  // an adaptive plan decides them as it runs
    std::cout << plan.name << ": " << (ran.empty() ? plan.block_forwards() : ran.front()) << " block forwards"
              << (plan.adaptive() ? " (at most " + std::to_string(plan.block_forwards()) + ")" : std::string()) << ", seed "
              << a.seed << " (" << generator.engine().describe() << ")\n";
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const ilf::Error& e) {
    std::cerr << "error: " << e.what() << "\n";
    return e.kind() == ilf::Error::Kind::engine ? 1 : 2;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
}
