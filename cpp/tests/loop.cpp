// ilf::denoise through a fake engine: every segment computes a known function of its inputs and
// records its call, so a test can check that a plan's steps run the segments in the order and the
// count the plan says, and that the scheduler's coefficients give the latents a hand computation
// gives (runtime/loop.py's contract, without OpenVINO or a model).
//
// The fake model (a schema 4 bundle: the state is `hidden` and `text`, as an MMDiT's):
//   context:  text_context = prompt_embeds                  (B, 1): the text stream's start
//   time:     temb = timestep                               (B,)
//   embed:    hidden = the latents as tokens                (B, h*w, C), patch 1
//   a segment of n blocks:  hidden += n * text (per row) + feed;  text += n + text_feed
//   feedback: feed = hidden / 2, text_feed = text / 2       (the inner loop's output, eqs. 2-3)
//   final:    tokens = hidden                               (so eps = the hidden tokens, unpacked)
// so an image's eps at each latent element x is a scalar function of x and the prompt value, which
// `Model` below computes by hand.
#include <ilf/ilf.hpp>

#include <nlohmann/json.hpp>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "check.hpp"
#include "detail.hpp"

namespace ilf_tests {

namespace {

using json = nlohmann::json;

constexpr int kBlocks = 4;                        // blocks 0..3 in two segments: 0-1 and 2-3
constexpr std::pair<int, int> kLoop = {2, 3};     // the ILF inner loop, m = 2 blocks
constexpr int kChannels = 2, kSide = 2;           // latents (B, 2, 2, 2)

/// What the fake engine saw: "segment@timestep" per call, in order (context and vae: the name).
class FakeEngine : public ilf::Engine {
 public:
  std::string name() const override { return "fake"; }

  ilf::Feeds run(const std::string& segment, const ilf::Feeds& in) override {
    const bool timed = in.count("temb") || in.count("timestep");
    const ilf::Tensor& when = in.count("temb") ? in.at("temb") : in.count("timestep") ? in.at("timestep") : ilf::Tensor();
    calls.push_back(segment + (timed ? "@" + std::to_string(static_cast<int>(when.value(0))) : ""));
    if (segment == "context") return {{"text_context", in.at("prompt_embeds")}};
    if (segment == "time") return {{"temb", in.at("timestep")}};
    if (segment == "embed") return {{"hidden", tokens_of(in.at("latents"))}};
    if (segment == "feedback") return {{"feed", scaled(in.at("hidden"), 0.5f)}, {"text_feed", scaled(in.at("text"), 0.5f)}};
    if (segment == "final") {
      ilf::Tensor tokens = in.at("hidden");
      if (poison_final_at && static_cast<int>(in.at("temb").value(0)) == *poison_final_at)
        tokens.f32_data()[0] = std::numeric_limits<float>::quiet_NaN();
      return {{"tokens", tokens}};
    }
    const int n = 2;  // blocks_00_01 and blocks_02_03 cover two blocks each
    block_forwards += n;
    ilf::Tensor hidden = in.at("hidden"), text = in.at("text");
    const int64_t rows = hidden.dim(0), per_row = hidden.numel() / rows;
    float* h = hidden.f32_data();
    float* t = text.f32_data();
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t i = 0; i < per_row; ++i)
        h[r * per_row + i] += n * t[r] + (in.count("feed") ? in.at("feed").f32_data()[r * per_row + i] : 0.f);
      t[r] += n + (in.count("text_feed") ? in.at("text_feed").f32_data()[r] : 0.f);
    }
    return {{"hidden_out", hidden}, {"text_out", text}};
  }

  std::vector<std::string> calls;
  int block_forwards = 0;             // blocks run (the feedback module not counted)
  std::optional<int> poison_final_at;  // the final layer returns a NaN at this timestep

 private:
  static ilf::Tensor tokens_of(const ilf::Tensor& latents) {  // (B, C, h, w) -> (B, h*w, C)
    const int64_t b = latents.dim(0), c = latents.dim(1), hw = latents.dim(2) * latents.dim(3);
    ilf::Tensor out(ilf::DType::f32, {b, hw, c});
    for (int64_t n = 0; n < b; ++n)
      for (int64_t ch = 0; ch < c; ++ch)
        for (int64_t i = 0; i < hw; ++i) out.f32_data()[(n * hw + i) * c + ch] = latents.f32_data()[(n * c + ch) * hw + i];
    return out;
  }
  static ilf::Tensor scaled(const ilf::Tensor& x, float c) {
    ilf::Tensor out = x.clone();
    for (int64_t i = 0; i < out.numel(); ++i) out.f32_data()[i] *= c;
    return out;
  }
};

// -- the bundle the fake engine runs ----------------------------------------------------------------

json tensor(const std::string& name) { return {{"name", name}, {"shape", {"batch"}}, {"dtype", "float32"}}; }

json segment(const std::string& name, const std::vector<std::string>& inputs, const std::vector<std::string>& outputs,
             json blocks = nullptr) {
  json s = {{"file", "onnx/" + name + ".onnx"}, {"inputs", json::array()}, {"outputs", json::array()}, {"blocks", blocks}};
  for (auto& n : inputs) s["inputs"].push_back(tensor(n));
  for (auto& n : outputs) s["outputs"].push_back(tensor(n));
  return s;
}

std::string write_bundle(const std::string& root) {
  namespace fs = std::filesystem;
  fs::remove_all(root);
  fs::create_directories(root + "/onnx");
  fs::create_directories(root + "/plans");
  json segments = {
      {"text_encoder", segment("text_encoder", {"input_ids"}, {"prompt_embeds"})},
      {"vae_decoder", segment("vae_decoder", {"latents"}, {"images"})},
      {"context", segment("context", {"prompt_embeds"}, {"text_context"})},
      {"time", segment("time", {"timestep"}, {"temb"})},
      {"embed", segment("embed", {"latents"}, {"hidden"})},
      {"blocks_00_01", segment("blocks_00_01", {"hidden", "text", "temb"}, {"hidden_out", "text_out"}, {0, 1})},
      {"blocks_02_03",
       segment("blocks_02_03", {"hidden", "text", "temb", "feed", "text_feed"}, {"hidden_out", "text_out"}, {2, 3})},
      {"feedback", segment("feedback", {"hidden", "text", "temb"}, {"feed", "text_feed"})},
      {"final", segment("final", {"hidden", "temb"}, {"tokens"})},
  };
  std::map<std::string, std::string> files;
  for (auto& [name, _] : segments.items()) files["onnx/" + name + ".onnx"] = "fake " + name;
  files["plans/base.json"] = R"({"version": 1, "name": "base", "num_blocks": 4, "scheduler": "s", "loop": [2, 3], "steps": [
      {"index": 0, "timestep": 900.0, "ops": [{"op": "blocks", "start": 0, "end": 3}],
       "coefficients": {"timestep": 900.0, "prev_timestep": 0.0, "x": 1.0, "eps": -1.0, "x0_x": 1.0, "x0_eps": -1.0}}]})";
  json hashes = json::object();
  for (auto& [path, content] : files) {
    std::ofstream(root + "/" + path, std::ios::binary) << content;
    hashes[path] = ilf::detail::sha256_hex(content.data(), content.size());
  }
  json manifest = {
      {"schema_version", 4}, {"architecture", "sd3"}, {"config_hash", "fake"},
      {"model",
       {{"num_blocks", kBlocks}, {"latent_channels", kChannels}, {"out_channels", kChannels}, {"patch_size", 1},
        {"sample_size", kSide}, {"vae_scale_factor", 8}, {"default_image_size", 8 * kSide},
        {"context_inputs", {"prompt_embeds"}}, {"uses_size_conditions", false}, {"state", {"hidden", "text"}},
        {"state_init", {{"text", "text_context"}}}, {"token_layout", "patch"}, {"guidance", "cfg"}}},
      {"feedback", {{"loop", {kLoop.first, kLoop.second}}}}, {"precision", "fp32"}, {"max_batch", 2},
      {"resolutions", {{8 * kSide, 8 * kSide}}}, {"latent_sizes", {{kSide, kSide}}}, {"cut_points", {0, 2, 4}},
      {"segments", segments}, {"plans", {{"base", "plans/base.json"}}}, {"tokenizer", nullptr},
      {"scheduler", json::object()}, {"torch_model", nullptr}, {"tools", json::object()}, {"files", hashes}};
  const std::string text = manifest.dump(2);
  std::ofstream(root + "/manifest.json", std::ios::binary) << text;
  std::ofstream(root + "/manifest.sha256") << "sha256:" << ilf::detail::sha256_hex(text.data(), text.size()) << "\n";
  return root;
}

// -- plans and the hand computation -----------------------------------------------------------------

struct StepSpec {
  double timestep;
  std::optional<double> t_post;
  std::string ops;  // JSON list items
  double x, eps, x0_x, x0_eps;
  std::vector<double> history;
};

ilf::Plan plan_of(int version, const std::vector<StepSpec>& steps) {
  json doc = {{"version", version}, {"name", "p"}, {"num_blocks", kBlocks}, {"scheduler", "s"},
              {"loop", {kLoop.first, kLoop.second}}, {"steps", json::array()}};
  for (size_t i = 0; i < steps.size(); ++i) {
    const StepSpec& s = steps[i];
    doc["steps"].push_back({{"index", i}, {"timestep", s.timestep}, {"t_post", s.t_post ? json(*s.t_post) : json(nullptr)},
                            {"ops", json::parse("[" + s.ops + "]")},
                            {"coefficients", {{"timestep", s.timestep}, {"prev_timestep", 0.0}, {"x", s.x}, {"eps", s.eps},
                                              {"x0_x", s.x0_x}, {"x0_eps", s.x0_eps}, {"history", s.history}}}});
  }
  return ilf::Plan::parse(doc.dump(), "test");
}

/// The fake model's arithmetic on one latent element x of an image whose prompt value is `text`
/// (a state: the element's hidden token value and its row's text value), and the Δ-cache of it.
struct Scalar {
  double h, t;
};
Scalar blocks2(Scalar s, Scalar feed = {0, 0}) { return {s.h + 2 * s.t + feed.h, s.t + 2 + feed.t}; }
Scalar ilf_loop(Scalar s) {  // eqs. 2-3: the loop's blocks, the feedback, the blocks again with its feed
  Scalar mid = blocks2(s);
  return blocks2(s, {mid.h / 2, mid.t / 2});
}

/// The scheduler's update over a plan's steps, with eps(step, x) from the caller (runtime/loop.py).
double integrate(const std::vector<StepSpec>& steps, double x, const std::function<double(size_t, double)>& eps_of) {
  std::vector<double> x0s;
  for (size_t i = 0; i < steps.size(); ++i) {
    const StepSpec& k = steps[i];
    const double eps = eps_of(i, x);
    double next = k.x * x + k.eps * eps;
    for (size_t j = 0; j < k.history.size() && j < x0s.size(); ++j) next += k.history[j] * x0s[x0s.size() - 1 - j];
    x0s.push_back(k.x0_x * x + k.x0_eps * eps);
    x = next;
  }
  return x;
}

ilf::Tensor latents_of(int images) {
  std::vector<float> values;
  for (int i = 0; i < images * kChannels * kSide * kSide; ++i) values.push_back(0.25f * static_cast<float>(i % 7) - 0.5f);
  return ilf::Tensor::f32({images, kChannels, kSide, kSide}, values);
}

ilf::Feeds prompts_of(const std::vector<float>& values) {
  return {{"prompt_embeds", ilf::Tensor::f32({static_cast<int64_t>(values.size()), 1}, values)}};
}

/// The final latents against `expected(image, x)` element by element (float32 glue: 1e-5 relative).
bool near_all(const ilf::Tensor& got, const ilf::Tensor& start, const std::function<double(int64_t, double)>& expected) {
  const int64_t per_image = got.numel() / got.dim(0);
  bool ok = got.shape() == start.shape();
  for (int64_t i = 0; ok && i < got.numel(); ++i) {
    const double want = expected(i / per_image, start.value(i));
    if (std::fabs(got.value(i) - want) > 1e-5 * std::max(1.0, std::fabs(want))) {
      std::cerr << "element " << i << ": " << got.value(i) << ", by hand " << want << "\n";
      ok = false;
    }
  }
  return ok;
}

/// One step's calls at `time` (the embed segment takes no time: it is named alone).
std::vector<std::string> calls_of(const std::string& time, const std::vector<std::string>& segments) {
  std::vector<std::string> out;
  for (auto& s : segments) out.push_back(s == "embed" ? s : s + "@" + time);
  return out;
}
std::vector<std::string> operator+(std::vector<std::string> a, const std::vector<std::string>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

const std::string kAll = R"({"op": "blocks", "start": 0, "end": 3})";
const std::string kHead = R"({"op": "blocks", "start": 0, "end": 1})";
const std::string kIlf = R"({"op": "ilf", "start": 2, "end": 3})";
const std::string kRefresh = R"({"op": "cache_refresh", "start": 2, "end": 3, "key": "k"})";
const std::string kReuse = R"({"op": "cache_reuse", "start": 2, "end": 3, "key": "k"})";

// -- the tests --------------------------------------------------------------------------------------

void test_base_and_feedback_steps(const ilf::Bundle& bundle) {
  // step 0: all four blocks; step 1: blocks 0-1, then the ILF loop over 2-3 with its second pass at t_post
  const std::vector<StepSpec> steps = {
      {900, std::nullopt, kAll, 0.5, -0.25, 1.0, -1.0, {}},
      {600, 550.0, kHead + "," + kIlf, 0.75, 0.5, 2.0, 0.25, {0.125}},
  };
  ilf::Plan plan = plan_of(1, steps);
  FakeEngine engine;
  ilf::Segments segments(bundle, engine);
  const ilf::Tensor x = latents_of(1);
  std::vector<int> forwards;
  std::vector<int> seen_steps;
  ilf::Tensor out = ilf::denoise(segments, plan, x, prompts_of({0.5f}), {1.0f}, [&](int i) { seen_steps.push_back(i); },
                                 &forwards);
  // the order and the count the plan says: a feedback step runs N + m + 1 = 4 + 2 + 1 block forwards
  const std::vector<std::string> want =
      std::vector<std::string>{"context"} + calls_of("900", {"time", "embed", "blocks_00_01", "blocks_02_03", "final"}) +
      std::vector<std::string>{"time@600", "time@550", "embed", "blocks_00_01@600", "blocks_02_03@600", "feedback@600",
                               "blocks_02_03@550", "final@600"};
  CHECK(engine.calls == want);
  CHECK(plan.steps[1].block_forwards() == kBlocks + 2 + 1 && plan.block_forwards() == 4 + 7);
  CHECK(forwards == std::vector<int>({plan.block_forwards()}));
  CHECK(engine.block_forwards == 4 + 6);  // + the feedback module: the plan's 11
  CHECK(seen_steps == std::vector<int>({0, 1}));
  // by hand: step 0's eps = x + 2*0.5 + 2*2.5 (blocks 0-1 see text 0.5, blocks 2-3 see 2.5) = x + 6;
  // step 1's blocks 0-1 give (x + 1, 2.5), the loop: mid = (x + 6, 4.5), then (x + 6 + (x + 6)/2, 4.5 + 2.25)
  auto expected = [&](int64_t, double x0) {
    return integrate(steps, x0, [](size_t i, double x) { return i == 0 ? x + 6 : 1.5 * (x + 6); });
  };
  CHECK(near_all(out, x, expected));
  // the same through the scalar model of the fake (the hand computation above, spelled as the ops)
  auto by_ops = [&](int64_t, double x0) {
    return integrate(steps, x0, [](size_t i, double x) {
      Scalar s = blocks2({x, 0.5});
      return (i == 0 ? blocks2(s) : ilf_loop(s)).h;
    });
  };
  CHECK(near_all(out, x, by_ops));
}

void test_cache_steps(const ilf::Bundle& bundle) {
  // step 0 refreshes the Δ-cache over blocks 2-3, step 1 reuses it (no blocks 2-3 call), two images
  const std::vector<StepSpec> steps = {
      {900, std::nullopt, kHead + "," + kRefresh, 1.0, -0.5, 1.0, -1.0, {}},
      {500, std::nullopt, kHead + "," + kReuse, 0.25, 1.0, 1.0, -1.0, {}},
  };
  ilf::Plan plan = plan_of(2, steps);
  FakeEngine engine;
  ilf::Segments segments(bundle, engine);
  const ilf::Tensor x = latents_of(2);
  std::vector<int> forwards;
  ilf::Tensor out = ilf::denoise(segments, plan, x, prompts_of({0.5f, -1.0f}), {1.0f}, {}, &forwards);
  CHECK(engine.calls == std::vector<std::string>{"context"} +
                            calls_of("900", {"time", "embed", "blocks_00_01", "blocks_02_03", "final"}) +
                            calls_of("500", {"time", "embed", "blocks_00_01", "final"}));
  CHECK(forwards == std::vector<int>({6, 6}) && engine.block_forwards == 6);
  const float text[2] = {0.5f, -1.0f};
  auto expected = [&](int64_t image, double x0) {
    const double t = text[image];
    double delta = 0;  // step 0's Δ over blocks 2-3 (of the hidden stream): out - in
    return integrate(steps, x0, [&](size_t i, double x) {
      Scalar head = blocks2({x, t});
      if (i == 0) {
        Scalar tail = blocks2(head);
        delta = tail.h - head.h;
        return tail.h;
      }
      return head.h + delta;
    });
  };
  CHECK(near_all(out, x, expected));
}

void test_adaptive_steps(const ilf::Bundle& bundle) {
  // cache_adaptive over blocks 2-3 (runtime/cache.py): an image reuses the range's Δ where its probe
  // (the range's input) moved by at most `threshold` (relative L1) since the refresh, and it has not
  // reused max_reuse = 1 times in a row. Here eps' coefficient is 0 at steps 0 and 1, so the latents
  // and the probes stay: both images reuse at step 1 and run the blocks again at step 2.
  const std::string adaptive = R"({"op": "cache_adaptive", "start": 2, "end": 3, "key": "k", "threshold": 0.05, "max_reuse": 1})";
  const std::vector<StepSpec> steps = {
      {900, std::nullopt, kHead + "," + adaptive, 1.0, 0.0, 1.0, -1.0, {}},
      {800, std::nullopt, kHead + "," + adaptive, 1.0, 0.0, 1.0, -1.0, {}},
      {700, std::nullopt, kHead + "," + adaptive, 1.0, -0.5, 1.0, -1.0, {}},
  };
  ilf::Plan plan = plan_of(2, steps);
  FakeEngine engine;
  ilf::Segments segments(bundle, engine);
  ilf::Tensor x = latents_of(2);
  std::vector<int> forwards;
  ilf::Tensor out = ilf::denoise(segments, plan, x, prompts_of({0.5f, 100.0f}), {1.0f}, {}, &forwards);
  CHECK(engine.calls == std::vector<std::string>{"context"} +
                            calls_of("900", {"time", "embed", "blocks_00_01", "blocks_02_03", "final"}) +
                            calls_of("800", {"time", "embed", "blocks_00_01", "final"}) +
                            calls_of("700", {"time", "embed", "blocks_00_01", "blocks_02_03", "final"}));
  CHECK(forwards == std::vector<int>({10, 10}));
  CHECK(plan.adaptive() && plan.block_forwards() == 12);  // an adaptive plan's most

  // one image reuses, the other runs (its rows alone): step 0 moves the latents by 1% of eps = x + 8;
  // image 0 (x = -2: the probe's hidden tokens are x + 2 = 0) moves by 16% of its probe, image 1
  // (x = 1e4) by 1%.
  FakeEngine engine2;
  ilf::Segments segments2(bundle, engine2);
  const std::vector<StepSpec> moving = {
      {900, std::nullopt, kHead + "," + adaptive, 1.0, 0.01, 1.0, -1.0, {}},
      {800, std::nullopt, kHead + "," + adaptive, 1.0, -0.5, 1.0, -1.0, {}},
  };
  std::vector<float> values;
  for (int i = 0; i < 2 * kChannels * kSide * kSide; ++i) values.push_back(i < kChannels * kSide * kSide ? -2.f : 1e4f);
  ilf::Tensor y = ilf::Tensor::f32({2, kChannels, kSide, kSide}, values);
  ilf::Tensor out2 = ilf::denoise(segments2, plan_of(2, moving), y, prompts_of({1.0f, 1.0f}), {1.0f}, {}, &forwards);
  CHECK(forwards == std::vector<int>({8, 6}));  // image 0 ran blocks 2-3 twice, image 1 once
  CHECK(engine2.block_forwards == 2 + 2 + 2 + 2);  // step 1: blocks 0-1 for both, blocks 2-3 for image 0's rows
  auto expected = [&](int64_t image, double x0) {
    double delta = 0;
    return integrate(moving, x0, [&](size_t i, double x) {
      Scalar head = blocks2({x, 1.0});
      if (i == 0 || image == 0) {
        Scalar tail = blocks2(head);
        delta = tail.h - head.h;
        return tail.h;
      }
      return head.h + delta;
    });
  };
  CHECK(near_all(out2, y, expected));
  CHECK(near_all(out, x, [&](int64_t image, double x0) {  // steps 0 and 1 leave x; step 1 reused step 0's eps
    const double t = image == 0 ? 0.5 : 100.0;
    return x0 - 0.5 * blocks2(blocks2({x0, t})).h;
  }));
}

void test_non_finite(const ilf::Bundle& bundle) {
  const std::vector<StepSpec> steps = {
      {900, std::nullopt, kAll, 1.0, -0.5, 1.0, -1.0, {}},
      {600, std::nullopt, kAll, 1.0, -0.5, 1.0, -1.0, {}},
      {300, std::nullopt, kAll, 1.0, -0.5, 1.0, -1.0, {}},
  };
  FakeEngine engine;
  engine.poison_final_at = 600;
  ilf::Segments segments(bundle, engine);
  std::vector<int> seen_steps;
  EXPECT_ERROR(ilf::denoise(segments, plan_of(1, steps), latents_of(1), prompts_of({0.5f}), {1.0f},
                            [&](int i) { seen_steps.push_back(i); }),
               config, "non-finite latents after step 1 of plan 'p' (3 steps)");
  CHECK(seen_steps == std::vector<int>({0}));  // stopped at the step that made them: no step 2
  CHECK(engine.calls.back() == "final@600");
  // a plan for another depth or loop is refused before any segment runs
  FakeEngine idle;
  ilf::Segments idle_segments(bundle, idle);
  ilf::Plan deeper = plan_of(1, steps);
  deeper.num_blocks = 6;
  EXPECT_ERROR(ilf::denoise(idle_segments, deeper, latents_of(1), prompts_of({0.5f}), {1.0f}), config,
               "plan 'p' is for 6 blocks; the model has 4");
  CHECK(idle.calls.empty());
}

}  // namespace

void test_denoise(const std::string& tmpdir) {
  ilf::Bundle bundle = ilf::Bundle::load(write_bundle(tmpdir + "/fake-engine"));
  test_base_and_feedback_steps(bundle);
  test_cache_steps(bundle);
  test_adaptive_steps(bundle);
  test_non_finite(bundle);
}

}  // namespace ilf_tests
