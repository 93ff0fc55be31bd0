// The denoising loop and generation: ports of ilf_deploy/core/runtime/runner.py (SegmentRunner),
// core/runtime/loop.py (model_output, denoise) and core/runtime/generator.py + pipeline.py (Generator,
// BundleGenerator). Array arithmetic is float32 element by element in numpy's order of operations
// (a Python float times a float32 array is a float32 product), built without FMA contraction, so
// the glue between segment calls computes what numpy computes, bit for bit.
#include <algorithm>
#include <clocale>
#include <cmath>
#include <cstring>
#include <cwctype>
#include <locale.h>

#include "internal.hpp"

namespace ilf {

// -- array operations -----------------------------------------------------------------------------

namespace {

Tensor concat0(const std::vector<Tensor>& parts) {
  if (parts.empty()) detail::config_error("nothing to concatenate");
  Shape shape = parts[0].shape();
  int64_t rows = 0;
  for (auto& p : parts) {
    if (p.dtype() != parts[0].dtype() || p.shape().size() != shape.size() ||
        !std::equal(p.shape().begin() + 1, p.shape().end(), shape.begin() + 1))
      detail::config_error("cannot concatenate " + parts[0].shape_string() + " and " + p.shape_string());
    rows += p.shape()[0];
  }
  shape[0] = rows;
  Tensor out = Tensor::uninitialized(parts[0].dtype(), shape);
  auto* dst = static_cast<unsigned char*>(out.raw());
  for (auto& p : parts) {
    std::memcpy(dst, p.raw(), p.nbytes());
    dst += p.nbytes();
  }
  return out;
}

void same_shape(const Tensor& a, const Tensor& b, const char* what) {
  if (a.shape() != b.shape()) detail::config_error(std::string(what) + ": shapes " + a.shape_string() + " and " + b.shape_string());
}

// numpy's promotion: float16 with float16 stays float16 (each operation computed in float32, then
// rounded to float16, as numpy's half loops do); anything with float32 is float32.
template <class Op>
Tensor binary(const Tensor& a, const Tensor& b, Op op, const char* what) {
  same_shape(a, b, what);
  const int64_t n = a.numel();
  if (a.dtype() == DType::f32 && b.dtype() == DType::f32) {
    Tensor out = Tensor::uninitialized(DType::f32, a.shape());
    const float *x = a.f32_data(), *y = b.f32_data();
    float* o = out.f32_data();
    for (int64_t i = 0; i < n; ++i) o[i] = op(x[i], y[i]);
    return out;
  }
  if (a.dtype() == DType::f16 && b.dtype() == DType::f16) {
    Tensor out = Tensor::uninitialized(DType::f16, a.shape());
    const uint16_t *x = a.f16_data(), *y = b.f16_data();
    uint16_t* o = out.f16_data();
    for (int64_t i = 0; i < n; ++i) o[i] = float_to_half(op(half_to_float(x[i]), half_to_float(y[i])));
    return out;
  }
  Tensor out = Tensor::uninitialized(DType::f32, a.shape());
  float* o = out.f32_data();
  for (int64_t i = 0; i < n; ++i) o[i] = op(a.value(i), b.value(i));
  return out;
}

Tensor sub(const Tensor& a, const Tensor& b) {
  return binary(a, b, [](float x, float y) { return x - y; }, "a - b");
}

Tensor add(const Tensor& a, const Tensor& b) {
  return binary(a, b, [](float x, float y) { return x + y; }, "a + b");
}

/// c * t[i] for a Python float c, as numpy computes it: a float32 product for a float32 array; for a
/// float16 array, c is cast to float16 first and the product rounded to float16.
struct Scaled {
  float c32, c16;
  explicit Scaled(double c) : c32(static_cast<float>(c)), c16(half_to_float(float_to_half(static_cast<float>(c)))) {}
  float operator()(const Tensor& t, int64_t i) const {
    if (t.dtype() == DType::f16) return half_to_float(float_to_half(c16 * half_to_float(t.f16_data()[i])));
    return c32 * t.f32_data()[i];
  }
};

/// p*a + q*b, as numpy evaluates `p * a + q * b` for Python floats p, q and float arrays.
Tensor lincomb(double p, const Tensor& a, double q, const Tensor& b) {
  same_shape(a, b, "p*a + q*b");
  const int64_t n = a.numel();
  if (a.dtype() == DType::f32 && b.dtype() == DType::f32) {
    Tensor out = Tensor::uninitialized(DType::f32, a.shape());
    const float fp = static_cast<float>(p), fq = static_cast<float>(q);
    const float *x = a.f32_data(), *y = b.f32_data();
    float* o = out.f32_data();
    for (int64_t i = 0; i < n; ++i) {
      const float u = fp * x[i];
      const float v = fq * y[i];
      o[i] = u + v;
    }
    return out;
  }
  const Scaled sp(p), sq(q);
  if (a.dtype() == DType::f16 && b.dtype() == DType::f16) {
    Tensor out = Tensor::uninitialized(DType::f16, a.shape());
    uint16_t* o = out.f16_data();
    for (int64_t i = 0; i < n; ++i) o[i] = float_to_half(sp(a, i) + sq(b, i));
    return out;
  }
  Tensor out = Tensor::uninitialized(DType::f32, a.shape());
  float* o = out.f32_data();
  for (int64_t i = 0; i < n; ++i) {
    const float u = sp(a, i);
    const float v = sq(b, i);
    o[i] = u + v;
  }
  return out;
}

/// a + c*b into `a`, a fresh float32 tensor owned by the caller (x_next, which is float32: x is).
void add_scaled(Tensor& a, double c, const Tensor& b) {
  same_shape(a, b, "a + c*b");
  const Scaled sc(c);
  float* x = a.f32_data();
  for (int64_t i = 0, n = a.numel(); i < n; ++i) {
    const float v = sc(b, i);
    x[i] = x[i] + v;
  }
}

/// uncond + g * (text - uncond) over [uncond; text] rows; one g (a Python float) or one per image
/// (a float32 array, so a float16 eps is promoted to float32), as core/runtime/loop.py writes it.
Tensor guide(const Tensor& eps, int64_t n, const std::vector<float>& guidance) {
  const int64_t per = eps.numel() / (2 * n);
  Shape shape = eps.shape();
  shape[0] = n;
  if (eps.dtype() == DType::f16 && guidance.size() == 1) {
    Tensor out = Tensor::uninitialized(DType::f16, shape);
    const uint16_t* uncond = eps.f16_data();
    const uint16_t* text = uncond + n * per;
    uint16_t* o = out.f16_data();
    const float g = half_to_float(float_to_half(guidance[0]));
    for (int64_t i = 0; i < n * per; ++i) {
      const float u = half_to_float(uncond[i]);
      const float d = half_to_float(float_to_half(half_to_float(text[i]) - u));
      const float m = half_to_float(float_to_half(g * d));
      o[i] = float_to_half(u + m);
    }
    return out;
  }
  Tensor out = Tensor::uninitialized(DType::f32, shape);
  float* o = out.f32_data();
  const bool half = eps.dtype() == DType::f16;
  for (int64_t img = 0; img < n; ++img) {
    const float g = guidance.size() == 1 ? guidance[0] : guidance[img];
    for (int64_t i = img * per; i < (img + 1) * per; ++i) {
      const float u = eps.value(i), t = eps.value(n * per + i);
      const float d = half ? half_to_float(float_to_half(t - u)) : t - u;
      const float m = g * d;
      o[i] = u + m;
    }
  }
  return out;
}

const Tensor& output(const Feeds& out, const std::string& name, const std::string& segment) {
  auto it = out.find(name);
  if (it == out.end()) detail::engine_error("segment " + segment + " gave no output '" + name + "'");
  return it->second;
}

const Tensor& state_at(const State& state, const std::string& name) {
  auto it = state.find(name);
  if (it == state.end()) detail::bundle_error("the model's state has no tensor '" + name + "'");
  return it->second;
}

// -- the state as a whole (ilf_deploy/core/state.py) and rows of it (core/runtime/cache.py) -------------------

/// a + b, tensor by tensor (`b` may cover fewer names).
State add_state(const State& a, const State& b) {
  State out;
  for (auto& [name, t] : a) {
    auto it = b.find(name);
    out[name] = it == b.end() ? t : add(t, it->second);
  }
  return out;
}

State sub_state(const State& a, const State& b) {
  State out;
  for (auto& [name, t] : a) out[name] = sub(t, state_at(b, name));
  return out;
}

int64_t state_rows(const State& state) {
  if (state.empty()) detail::config_error("an empty state");
  return state.begin()->second.dim(0);
}

/// Sorted rows as half-open runs of consecutive rows: [0, 1, 4] -> [(0, 2), (4, 5)].
std::vector<std::pair<int64_t, int64_t>> row_runs(const std::vector<int64_t>& rows) {
  std::vector<std::pair<int64_t, int64_t>> runs;
  for (int64_t r : rows) {
    if (!runs.empty() && runs.back().second == r) runs.back().second = r + 1;
    else runs.emplace_back(r, r + 1);
  }
  return runs;
}

/// Rows `first..last-1` of `x`, copied.
Tensor slice_rows(const Tensor& x, int64_t first, int64_t last) {
  Shape shape = x.shape();
  shape[0] = last - first;
  Tensor out = Tensor::uninitialized(x.dtype(), shape);
  const size_t row = x.dim(0) ? x.nbytes() / static_cast<size_t>(x.dim(0)) : 0;
  std::memcpy(out.raw(), static_cast<const unsigned char*>(x.raw()) + first * row, row * (last - first));
  return out;
}

/// Rows `rows` (sorted) of `x` (core/runtime/cache.py take).
Tensor take_rows(const Tensor& x, const std::vector<int64_t>& rows) {
  std::vector<Tensor> parts;
  for (auto [a, b] : row_runs(rows)) parts.push_back(slice_rows(x, a, b));
  return parts.size() == 1 ? parts[0] : concat0(parts);
}

/// `whole` with rows `rows` (sorted) replaced by `part`'s rows, in order (core/runtime/cache.py mix).
Tensor mix_rows(const std::vector<int64_t>& rows, const Tensor& part, const Tensor& whole) {
  std::vector<Tensor> parts;
  int64_t position = 0, done = 0;
  for (auto [a, b] : row_runs(rows)) {
    if (done < a) parts.push_back(slice_rows(whole, done, a));
    parts.push_back(slice_rows(part, position, position + b - a));
    position += b - a;
    done = b;
  }
  if (done < whole.dim(0)) parts.push_back(slice_rows(whole, done, whole.dim(0)));
  return concat0(parts);
}

State mix_state(const std::vector<int64_t>& rows, const State& part, const State& whole) {
  State out;
  for (auto& [name, t] : whole) out[name] = mix_rows(rows, state_at(part, name), t);
  return out;
}

/// Σ|x| of each row (dim 0), in float64 (core/runtime/cache.py row_l1).
std::vector<double> row_l1(const Tensor& x) {
  const int64_t rows = x.dim(0), per = rows ? x.numel() / rows : 0;
  std::vector<double> out(static_cast<size_t>(rows), 0.0);
  for (int64_t r = 0; r < rows; ++r) {
    double sum = 0;
    for (int64_t i = r * per; i < (r + 1) * per; ++i) sum += std::fabs(static_cast<double>(x.value(i)));
    out[static_cast<size_t>(r)] = sum;
  }
  return out;
}

}  // namespace

// -- Segments (core/runtime/runner.py) -----------------------------------------------------------------

Segments::Segments(Bundle bundle, Engine& engine)
    : bundle_(std::move(bundle)),
      engine_(engine),
      block_segments_(bundle_.manifest().block_segments()),
      uses_positions_(bundle_.manifest().segment("embed").has_input("pos_embed")) {}

int Segments::latent_channels() const { return bundle_.manifest().model.latent_channels; }
int Segments::num_blocks() const { return bundle_.manifest().model.num_blocks; }
std::optional<std::pair<int, int>> Segments::loop() const { return bundle_.manifest().loop; }
const std::vector<std::string>& Segments::state_names() const { return bundle_.manifest().model.state; }

Feeds Segments::run(const std::string& name, const Feeds& feeds) {
  auto it = input_names_.find(name);
  if (it == input_names_.end())
    it = input_names_.emplace(name, bundle_.manifest().segment(name, engine_.variant()).input_names()).first;
  std::vector<std::string> missing;
  for (auto& n : it->second)
    if (!feeds.count(n)) missing.push_back(n);
  if (!missing.empty())
    detail::bundle_error("segment " + name + " needs inputs " + detail::py_list(missing) + " the runtime did not give");
  if (recorder) recorder(name, feeds);
  Feeds selected;
  for (auto& n : it->second) selected.emplace(n, feeds.at(n));
  double start = detail::now_s();
  Feeds out = engine_.run(name, selected);
  timings_.add(name, detail::now_s() - start);
  return out;
}

Feeds Segments::context(const Feeds& inputs) {
  // The inputs the time segment reads (size conditions, a pooled prompt, Flux's guidance) stay visible;
  // no other: every entry left has the batch as its first axis, or one row for all (Flux's rotary
  // tables), which the adaptive cache's row picking relies on (as core/runtime/runner.py).
  Feeds merged;
  for (const std::string& name : bundle_.manifest().segment("time").input_names()) {
    auto it = inputs.find(name);
    if (it != inputs.end()) merged[name] = it->second;
  }
  for (auto& [k, v] : run("context", inputs)) merged[k] = v;
  if (bundle_.manifest().segments.count(kCrossKvSegment))  // every block's caption K/V, once per generation
    for (auto& [k, v] : run(kCrossKvSegment, merged)) merged[k] = v;
  return merged;
}

Feeds Segments::conditioning(double timestep, const Feeds& context) {
  if (context.empty()) detail::config_error("no conditioning inputs");
  int64_t batch = 0;  // every entry has the batch rows, or one row for all: the most is the batch
  for (const auto& [name, t] : context)
    if (!t.shape().empty()) batch = std::max(batch, t.dim(0));
  Feeds feeds = context;
  Tensor t(DType::f32, {batch});
  std::fill(t.f32_data(), t.f32_data() + batch, static_cast<float>(timestep));
  feeds["timestep"] = t;
  Feeds out = context;
  for (auto& [k, v] : run("time", feeds)) out[k] = v;
  return out;
}

State Segments::embed(const Tensor& latents, const Feeds& cond) {
  Feeds feeds = {{"latents", latents}};
  if (uses_positions_) {
    std::pair<int, int> size(static_cast<int>(latents.dim(-2)), static_cast<int>(latents.dim(-1)));
    auto it = positions_.find(size);
    if (it == positions_.end()) it = positions_.emplace(size, bundle_.positions(size.first, size.second)).first;
    feeds["pos_embed"] = it->second;
  }
  Tensor hidden = output(run("embed", feeds), "hidden", "embed");
  const auto& init = bundle_.manifest().model.state_init;
  State state;
  for (const std::string& name : state_names()) {
    if (name == "hidden") {
      state[name] = hidden;
      continue;
    }
    auto source = init.find(name);
    if (source == init.end())
      detail::bundle_error("the model's state tensor '" + name + "' is not `hidden` and has no model.state_init entry");
    auto it = cond.find(source->second);
    if (it == cond.end())
      detail::bundle_error("the model's state tensor '" + name + "' starts as '" + source->second +
                           "', which no segment gave (the context segment's outputs: model.state_init)");
    state[name] = it->second;
  }
  return state;
}

State Segments::blocks(int start, int end, const State& state, const Feeds& cond, const State* feed) {
  int position = start;
  State h = state;
  for (const SegmentSpec* spec : block_segments_) {
    auto [first, last] = *spec->blocks;
    if (first < start || last > end) continue;
    if (first != position) break;
    Feeds feeds = cond;
    for (auto& [name, t] : h) feeds[name] = t;
    if (spec->takes_feed())
      for (const std::string& name : state_names()) {
        const Tensor& s = state_at(h, name);
        feeds[state_feed_name(name)] = feed ? state_at(*feed, name) : Tensor(s.dtype(), s.shape());  // zeros_like
      }
    Feeds out = run(spec->name, feeds);
    State next;
    for (const std::string& name : state_names()) next[name] = output(out, state_output_name(name), spec->name);
    h = std::move(next);
    position = last + 1;
  }
  if (position != end + 1)
    detail::config_error("the bundle has no segments covering blocks " + std::to_string(start) + "-" + std::to_string(end) +
                         " exactly");
  return h;
}

State Segments::inner_loop(const State& state, const Feeds& cond, const Feeds& cond_post) {
  auto [start, end] = *loop();  // check_plan guarantees a loop
  Feeds feeds = cond;
  for (auto& [name, t] : blocks(start, end, state, cond)) feeds[name] = t;
  Feeds out = run("feedback", feeds);
  State f_feed;
  for (const std::string& name : state_names()) f_feed[name] = output(out, state_feed_name(name), "feedback");
  return blocks(start, end, state, cond_post, &f_feed);
}

Tensor Segments::final(const State& state, const Feeds& cond, int64_t height, int64_t width) {
  Feeds feeds = cond;
  feeds["hidden"] = state_at(state, "hidden");
  Tensor tokens = output(run("final", feeds), "tokens", "final");
  const ModelSpec& model = bundle_.manifest().model;
  const bool packed = model.token_layout == "packed";
  // patch: reshape (B, h/p, w/p, p, p, C) -> permute (0, 5, 1, 3, 2, 4) -> (B, C, h, w);
  // packed (Flux, as FluxPipeline._unpack_latents): reshape (B, h/2, w/2, C, 2, 2) -> permute (0, 3, 1, 4, 2, 5)
  const int64_t p = packed ? 2 : model.patch_size, c = packed ? model.out_channels / 4 : model.out_channels;
  const int64_t b = tokens.dim(0), hp = height / p, wp = width / p;
  if (tokens.numel() != b * hp * wp * p * p * c)
    detail::engine_error("segment final gave tokens " + tokens.shape_string() + " for a " + std::to_string(height) + "x" +
                         std::to_string(width) + " latent");
  Tensor out = Tensor::uninitialized(tokens.dtype(), {b, c, height, width});
  auto permute = [&](const auto* src, auto* dst) {
    for (int64_t n = 0; n < b; ++n)
      for (int64_t ch = 0; ch < c; ++ch)
        for (int64_t i = 0; i < hp; ++i)
          for (int64_t pi = 0; pi < p; ++pi)
            for (int64_t j = 0; j < wp; ++j)
              for (int64_t pj = 0; pj < p; ++pj)
                *dst++ = packed ? src[((((n * hp + i) * wp + j) * c + ch) * p + pi) * p + pj]
                                : src[((((n * hp + i) * wp + j) * p + pi) * p + pj) * c + ch];
  };
  if (tokens.dtype() == DType::f16) permute(tokens.f16_data(), out.f16_data());
  else permute(tokens.f32_data(), out.f32_data());
  return out;
}

// -- the loop (core/runtime/loop.py) -------------------------------------------------------------------

void check_plan(const Plan& plan, const Segments& segments) {
  if (!plan.schedules.empty())  // the caller picks the image size's schedule (Plan::for_image_tokens)
    detail::config_error("plan '" + plan.name + "' holds one schedule per image size; none was picked");
  if (plan.num_blocks != segments.num_blocks())
    detail::config_error("plan '" + plan.name + "' is for " + std::to_string(plan.num_blocks) + " blocks; the model has " +
                         std::to_string(segments.num_blocks()));
  if (!plan.feedback_steps().empty()) {
    if (!segments.loop())
      detail::config_error("plan '" + plan.name + "' uses ILF feedback but the model has no feedback module");
    if (plan.loop != segments.loop()) {
      auto text = [](const std::optional<std::pair<int, int>>& r) {
        return r ? "(" + std::to_string(r->first) + ", " + std::to_string(r->second) + ")" : std::string("None");
      };
      detail::config_error("plan '" + plan.name + "' loops over blocks " + text(plan.loop) + "; the feedback was trained for " +
                           text(segments.loop()));
    }
  }
}

namespace {

/// One batch's Δ-cache while its plan runs (core/runtime/cache.py CacheState): stored Δs, probes, reuses in
/// a row, and the block forwards each image ran. Images are rows [uncond_1..n; cond_1..n] when guided.
class CacheState {
 public:
  CacheState(int64_t images, bool guided)
      : block_forwards(static_cast<size_t>(images), 0), images_(images), guided_(guided) {}

  void count(int forwards, const std::vector<int64_t>* images = nullptr) {
    if (!images) {
      for (auto& n : block_forwards) n += forwards;
    } else {
      for (int64_t i : *images) block_forwards[static_cast<size_t>(i)] += forwards;
    }
  }

  /// A refresh of `key` for every image: its Δ, its probe, and no reuse since.
  void store(const std::string& key, const State& range_in, const State& range_out) {
    deltas_[key] = sub_state(range_out, range_in);
    probes_[key] = range_in;
    reuses_[key].assign(static_cast<size_t>(images_), 0);
  }

  State reuse(const std::string& key, const State& state, int step) {
    auto it = deltas_.find(key);
    if (it == deltas_.end())
      detail::config_error("step " + std::to_string(step) + " reuses the Δ-cache '" + key + "' before any step refreshed it");
    for (auto& n : reuses_[key]) ++n;
    return add_state(state, it->second);
  }

  /// cache_adaptive: per image, reuse the Δ or run blocks start..end (core/runtime/cache.py).
  State adaptive(Segments& seg, const Op& op, const State& state, const Feeds& cond, int step) {
    const std::string& key = op.key;
    std::vector<bool> reuse(static_cast<size_t>(images_), false);
    if (deltas_.count(key)) {
      std::vector<double> change = this->change(state, probes_.at(key), seg.state_names());
      const std::vector<int>& in_a_row = reuses_.at(key);
      for (size_t i = 0; i < reuse.size(); ++i) reuse[i] = change[i] <= op.threshold && in_a_row[i] < op.max_reuse;
    }
    std::vector<int64_t> fresh;
    for (int64_t i = 0; i < images_; ++i)
      if (!reuse[static_cast<size_t>(i)]) fresh.push_back(i);
    count(op.size(), &fresh);
    if (fresh.empty()) return this->reuse(key, state, step);
    if (static_cast<int64_t>(fresh.size()) == images_) {
      State out = seg.blocks(op.start, op.end, state, cond);
      store(key, state, out);
      return out;
    }
    std::vector<int64_t> picked = rows(fresh);
    const int64_t batch = state_rows(state);
    State part_in;
    for (auto& [name, t] : state) part_in[name] = take_rows(t, picked);
    Feeds part_cond;  // every conditioning entry with the batch as its first axis, as take_cond
    for (auto& [name, t] : cond)
      part_cond[name] = !t.shape().empty() && t.dim(0) == batch ? take_rows(t, picked) : t;
    State part_out = seg.blocks(op.start, op.end, part_in, part_cond);
    State& delta = deltas_.at(key);
    State out = mix_state(picked, part_out, add_state(state, delta));
    delta = mix_state(picked, sub_state(part_out, part_in), delta);
    probes_[key] = mix_state(picked, part_in, probes_.at(key));
    std::vector<int>& in_a_row = reuses_[key];
    for (size_t i = 0; i < in_a_row.size(); ++i) in_a_row[i] = reuse[i] ? in_a_row[i] + 1 : 0;
    return out;
  }

  std::vector<int> block_forwards;

 private:
  /// The batch rows of `images`, in the batch's order.
  std::vector<int64_t> rows(const std::vector<int64_t>& images) const {
    std::vector<int64_t> out = images;
    if (guided_)
      for (int64_t i : images) out.push_back(images_ + i);
    return out;
  }

  /// Per image: Σ|state - reference| / Σ|reference| over its rows and the state's tensors.
  std::vector<double> change(const State& state, const State& reference, const std::vector<std::string>& names) const {
    std::vector<double> diff, norm;
    auto accumulate = [](std::vector<double>& total, const std::vector<double>& part) {
      if (total.empty()) total.assign(part.size(), 0.0);
      for (size_t i = 0; i < part.size(); ++i) total[i] += part[i];
    };
    for (const std::string& name : names) accumulate(diff, row_l1(sub(state_at(state, name), state_at(reference, name))));
    for (const std::string& name : names) accumulate(norm, row_l1(state_at(reference, name)));
    const size_t n = static_cast<size_t>(images_);
    std::vector<double> out(n);
    for (size_t i = 0; i < n; ++i) {
      const double d = guided_ ? diff[i] + diff[n + i] : diff[i];
      const double r = guided_ ? norm[i] + norm[n + i] : norm[i];
      out[i] = d / std::max(r, 1e-30);
    }
    return out;
  }

  int64_t images_;
  bool guided_;
  std::map<std::string, State> deltas_;  // key -> Δ = out - in of its range, all rows
  std::map<std::string, State> probes_;  // key -> the range's input at its last refresh
  std::map<std::string, std::vector<int>> reuses_;  // key -> reuses in a row since the refresh, per image
};

/// One network evaluation as the plan says: the (unguided) epsilon for [uncond; cond]. A keyed range
/// that runs stores what it adds (out - in over all its ops, a keyed inner loop included), a reused
/// one adds it back; an adaptive op decides per image.
Tensor model_output(Segments& seg, const Step& step, const Tensor& x, const Feeds& context, bool guided, CacheState& cache) {
  Feeds cond = seg.conditioning(step.timestep, context);
  Feeds cond_post = step.t_post ? seg.conditioning(*step.t_post, context) : cond;
  State h = seg.embed(guided ? concat0({x, x}) : x, cond);
  std::map<std::string, State> range_in;  // where each keyed range of this step started
  int forwards = 0;
  for (const Op& op : step.ops)
    if (op.kind != OpKind::cache_adaptive) forwards += op.block_forwards();
  cache.count(forwards);
  for (const Op& op : step.ops) {
    const Feeds& c = op.time == TimeRef::t_post ? cond_post : cond;
    State h_in = h;
    switch (op.kind) {
      case OpKind::blocks:
      case OpKind::cache_refresh: h = seg.blocks(op.start, op.end, h, c); break;
      case OpKind::ilf: h = seg.inner_loop(h, cond, cond_post); break;  // eqs. 2-3, second pass at t_post
      case OpKind::cache_reuse: h = cache.reuse(op.key, h, step.index); break;
      case OpKind::cache_adaptive: h = cache.adaptive(seg, op, h, c, step.index); break;
    }
    if (op.stores()) cache.store(op.key, range_in.emplace(op.key, h_in).first->second, h);
  }
  const Feeds& final_cond = step.final_time == TimeRef::t_post ? cond_post : cond;
  Tensor out = seg.final(h, final_cond, x.dim(-2), x.dim(-1));
  const int64_t b = out.dim(0), c = out.dim(1), hw = out.dim(2) * out.dim(3), keep = seg.latent_channels();
  if (keep > c) detail::engine_error("the final layer gave fewer channels than the latents have");
  Tensor eps = Tensor::uninitialized(out.dtype(), {b, keep, out.dim(2), out.dim(3)});  // drop learned-sigma channels
  const size_t item = out.nbytes() / static_cast<size_t>(out.numel());
  for (int64_t n = 0; n < b; ++n)
    std::memcpy(static_cast<unsigned char*>(eps.raw()) + n * keep * hw * item,
                static_cast<const unsigned char*>(out.raw()) + n * c * hw * item, item * keep * hw);
  return eps;
}

/// core/runtime/loop.py's check_finite: stop at the first step whose latents hold NaN or Inf (an all-ones
/// exponent), never decode them into a black image. One pass over the latents a step, branch-free.
void check_finite(const Tensor& x, const Step& step, const Plan& plan) {
  bool bad = false;
  if (x.dtype() == DType::f16) {
    const uint16_t* p = x.f16_data();
    for (int64_t i = 0, n = x.numel(); i < n; ++i) bad |= (p[i] & 0x7c00u) == 0x7c00u;
  } else if (x.dtype() == DType::f32) {
    const uint32_t* p = static_cast<const uint32_t*>(x.raw());
    for (int64_t i = 0, n = x.numel(); i < n; ++i) bad |= (p[i] & 0x7f800000u) == 0x7f800000u;
  }
  if (bad)
    detail::config_error("non-finite latents after step " + std::to_string(step.index) + " of plan '" + plan.name + "' (" +
                         std::to_string(plan.steps.size()) +
                         " steps): NaN or Inf from the inputs, the guidance scale or the plan's coefficients");
}

}  // namespace

Tensor denoise(Segments& seg, const Plan& plan, const Tensor& latents, const Feeds& inputs,
               const std::vector<float>& guidance, const std::function<void(int)>& on_step,
               std::vector<int>* block_forwards) {
  check_plan(plan, seg);
  if (guidance.empty()) detail::config_error("no guidance scale");
  const bool guided = guidance.size() > 1 || guidance[0] > 1.0f;
  const Feeds context = seg.context(inputs);
  Tensor x = latents;
  std::vector<Tensor> x0_history;
  CacheState cache(latents.dim(0), guided);
  for (const Step& step : plan.steps) {
    Tensor eps = model_output(seg, step, x, context, guided, cache);
    if (guided) {
      const int64_t n = x.dim(0);
      if (guidance.size() > 1 && static_cast<int64_t>(guidance.size()) != n)
        detail::config_error("one guidance scale per image, or one for all");
      eps = guide(eps, n, guidance);
    }
    const Coefficients& k = step.coefficients;
    Tensor x0 = lincomb(k.x0_x, x, k.x0_eps, eps);  // the solver's data prediction, for multistep updates
    Tensor x_next = lincomb(k.x, x, k.eps, eps);
    for (size_t j = 0; j < k.history.size() && j < x0_history.size(); ++j)
      add_scaled(x_next, k.history[j], x0_history[x0_history.size() - 1 - j]);
    x0_history.push_back(x0);
    x = x_next;
    check_finite(x, step, plan);
    if (on_step) on_step(step.index);
  }
  if (block_forwards) *block_forwards = cache.block_forwards;
  return x;
}

// -- generation (core/runtime/generator.py, core/runtime/pipeline.py) ---------------------------------------

// The diffusers pipelines' defaults: PixArt 4.5, DiT 4.0, SD3 7.0, Flux.1-dev 3.5 (embedded guidance).
double default_guidance(const std::string& architecture, bool guidance_free) {
  if (guidance_free) return 1.0;
  if (architecture == "dit") return 4.0;
  if (architecture == "sd3") return 7.0;
  if (architecture == "flux") return 3.5;
  return 4.5;
}

namespace {

// xoshiro256** seeded through splitmix64: a documented, portable stream (not numpy's PCG64).
struct Rng {
  uint64_t s[4] = {};
  explicit Rng(uint64_t seed) {
    for (auto& v : s) {
      seed += 0x9e3779b97f4a7c15ULL;
      uint64_t z = seed;
      z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
      z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
      v = z ^ (z >> 31);
    }
  }
  static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
  uint64_t next() {
    uint64_t result = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
  }
  double uniform() { return ((next() >> 11) + 0.5) * (1.0 / 9007199254740992.0); }  // (0, 1)
};

bool python_space(uint32_t c) {
  return (c >= 0x09 && c <= 0x0d) || (c >= 0x1c && c <= 0x20) || c == 0x85 || c == 0xa0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200a) || c == 0x2028 || c == 0x2029 || c == 0x202f || c == 0x205f || c == 0x3000;
}

/// UTF-8 -> code points; false on malformed input.
bool decode_utf8(const std::string& s, std::vector<uint32_t>& out) {
  for (size_t i = 0; i < s.size();) {
    unsigned char c = s[i];
    int extra = c < 0x80 ? 0 : (c >> 5) == 6 ? 1 : (c >> 4) == 14 ? 2 : (c >> 3) == 30 ? 3 : -1;
    if (extra < 0 || i + extra >= s.size()) return false;
    uint32_t cp = extra == 0 ? c : c & (0x3f >> extra);
    for (int k = 1; k <= extra; ++k) {
      unsigned char d = s[i + k];
      if ((d & 0xc0) != 0x80) return false;
      cp = (cp << 6) | (d & 0x3f);
    }
    out.push_back(cp);
    i += extra + 1;
  }
  return true;
}

void encode_utf8(uint32_t cp, std::string& out) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xc0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3f));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xe0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3f));
    out += static_cast<char>(0x80 | (cp & 0x3f));
  } else {
    out += static_cast<char>(0xf0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3f));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3f));
    out += static_cast<char>(0x80 | (cp & 0x3f));
  }
}

}  // namespace

std::string preprocess_prompt(const std::string& prompt) {
  std::vector<uint32_t> cps;
  if (!decode_utf8(prompt, cps)) {  // not UTF-8: ASCII rules only
    std::string s = prompt;
    for (auto& ch : s) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
    size_t a = s.find_first_not_of(" \t\n\v\f\r"), b = s.find_last_not_of(" \t\n\v\f\r");
    return a == std::string::npos ? "" : s.substr(a, b - a + 1);
  }
  static locale_t utf8 = newlocale(LC_CTYPE_MASK, "C.UTF-8", static_cast<locale_t>(nullptr));
  size_t first = 0, last = cps.size();
  while (first < last && python_space(cps[first])) ++first;
  while (last > first && python_space(cps[last - 1])) --last;
  std::string out;
  for (size_t i = first; i < last; ++i) {
    uint32_t c = cps[i];
    if (c < 0x80) c = static_cast<uint32_t>(std::tolower(static_cast<int>(c)));
    else if (utf8) c = static_cast<uint32_t>(towlower_l(static_cast<wint_t>(c), utf8));
    encode_utf8(c, out);
  }
  return out;
}

Generator::Generator(Bundle bundle, std::unique_ptr<Engine> engine)
    : bundle_(std::move(bundle)), engine_(std::move(engine)) {
  if (!engine_) detail::config_error("a generator needs an engine");
  segments_ = std::make_unique<Segments>(bundle_, *engine_);
}

void Generator::set_tokenizer(std::unique_ptr<Tokenizer> tokenizer) {
  tokenizer_ = std::move(tokenizer);
  prompt_cache_.clear();
}

Request Generator::resolve(const Request& request) const {
  Request r = request;
  auto [height, width] = bundle_.manifest().resolutions.front();
  if (!r.height) r.height = height;
  if (!r.width) r.width = width;
  const Manifest& m = bundle_.manifest();
  if (!r.guidance_scale) r.guidance_scale = default_guidance(m.architecture, m.model.guidance == "none");
  return r;
}

void Generator::check_request(const Request& r) const {
  // the request contract's (core/runtime/request.py) limits, for every caller of the library (ilf-run
  // checks them first, naming its options); then: a negative prompt needs classifier-free guidance, a
  // guidance scale some guidance
  const Manifest& m = bundle_.manifest();
  RequestFields fields;
  if (r.tokens.empty() && m.architecture != "dit") fields.prompt = r.prompt;
  if (r.negative_tokens.empty() && !r.negative_prompt.empty()) fields.negative_prompt = r.negative_prompt;
  fields.class_label = r.class_label;
  fields.guidance_scale = r.guidance_scale;
  fields.seed = static_cast<int64_t>(std::min<uint64_t>(r.seed, static_cast<uint64_t>(INT64_MAX)));
  if (r.height) fields.height = r.height;  // 0: the bundle's first size
  if (r.width) fields.width = r.width;
  if (auto problem = request_problem(m, fields)) detail::config_error(problem->message);
  if (m.model.guidance == "cfg") return;
  const std::string kind = m.model.guidance == "embedded"
                               ? m.architecture + " models (their guidance is embedded, not classifier-free)"
                               : m.architecture + " models without guidance (schnell)";
  if (!r.negative_prompt.empty() || !r.negative_tokens.empty()) detail::config_error("negative_prompt does not apply to " + kind);
  if (m.model.guidance == "none" && r.guidance_scale && *r.guidance_scale != 1.0)
    detail::config_error("guidance_scale does not apply to " + kind);
}

std::pair<int, int> Generator::latent_size(const Request& request) const {
  Request r = resolve(request);
  const Manifest& m = bundle_.manifest();
  auto& sizes = m.resolutions;
  if (std::find(sizes.begin(), sizes.end(), std::make_pair(r.height, r.width)) == sizes.end()) {
    std::vector<std::string> built;
    for (auto& [h, w] : sizes) built.push_back(std::to_string(h) + "x" + std::to_string(w));
    detail::config_error("the bundle was built for " + detail::join(built, ", ") + ", not " + std::to_string(r.height) + "x" +
                         std::to_string(r.width) + "; rebuild with --resolutions");
  }
  int factor = m.model.vae_scale_factor * m.model.patch_size;
  if (r.height <= 0 || r.width <= 0 || r.height % factor || r.width % factor)
    detail::config_error("height and width must be positive multiples of " + std::to_string(factor) + ", got " +
                         std::to_string(r.height) + "x" + std::to_string(r.width));
  if (m.architecture == "dit" && r.height != r.width) detail::config_error("DiT generates square images only");
  return {r.height / m.model.vae_scale_factor, r.width / m.model.vae_scale_factor};
}

Tensor Generator::initial_latents(const Request& request) const {
  auto [h, w] = latent_size(request);
  Tensor t(DType::f32, {1, bundle_.manifest().model.latent_channels, h, w});
  Rng rng(request.seed);
  float* d = t.f32_data();
  const double two_pi = 6.283185307179586;
  for (int64_t i = 0, n = t.numel(); i < n; i += 2) {  // Box-Muller
    double r = std::sqrt(-2.0 * std::log(rng.uniform())), a = two_pi * rng.uniform();
    d[i] = static_cast<float>(r * std::cos(a));
    if (i + 1 < n) d[i + 1] = static_cast<float>(r * std::sin(a));
  }
  return t;
}

Feeds Generator::run_text_encoder(const TokenIds& tokens) {
  const Manifest& m = bundle_.manifest();
  if (!m.tokenizers.empty()) {  // SD3, Flux: one (1, max_length) row of ids per tokenizer, no mask
    std::vector<std::string> names;
    for (auto& spec : m.tokenizers) names.push_back(spec.input);
    const std::string reads = "this bundle's text encoder reads the ids of " + detail::join(names, ", ");
    if (tokens.inputs.empty()) detail::config_error("no token ids by tokenizer input: " + reads);
    for (auto& [name, _] : tokens.inputs)
      if (std::find(names.begin(), names.end(), name) == names.end())
        detail::config_error("token ids for '" + name + "', which is no tokenizer input: " + reads);
    Feeds feeds;
    for (auto& spec : m.tokenizers) {
      auto it = tokens.inputs.find(spec.input);
      if (it == tokens.inputs.end()) detail::config_error("token ids for " + spec.input + " are missing: " + reads);
      const int64_t n = static_cast<int64_t>(it->second.size());
      if (n != spec.max_length)
        detail::config_error("token ids for " + spec.input + " must be " + std::to_string(spec.max_length) +
                             " long (its tokenizer pads and truncates to max_length), got " + std::to_string(n));
      feeds[spec.input] = Tensor::i64({1, n}, it->second);
    }
    return segments_->run("text_encoder", feeds);
  }
  if (tokens.input_ids.empty()) detail::config_error("no token ids");
  if (tokens.attention_mask.size() != tokens.input_ids.size())
    detail::config_error("token ids and attention mask differ in length (" + std::to_string(tokens.input_ids.size()) + " and " +
                         std::to_string(tokens.attention_mask.size()) + ")");
  const int64_t n = static_cast<int64_t>(tokens.input_ids.size());
  Tensor ids = Tensor::i64({1, n}, tokens.input_ids), mask = Tensor::i64({1, n}, tokens.attention_mask);
  Feeds out = segments_->run("text_encoder", {{"input_ids", ids}, {"attention_mask", mask}});
  // Sana's text encoder returns the mask of the tokens it keeps (its select-index); PixArt's keeps them all
  auto kept = out.find("prompt_mask");
  return {{"prompt_embeds", output(out, "prompt_embeds", "text_encoder")}, {"prompt_mask", kept == out.end() ? mask : kept->second}};
}

namespace {

std::pair<Tensor, Tensor> embeddings_and_mask(const Bundle& bundle, const Feeds& text) {
  if (!bundle.manifest().tokenizers.empty())
    detail::config_error("this bundle's text inputs are not (embeddings, mask): use Generator::encode_text");
  return {text.at("prompt_embeds"), text.at("prompt_mask")};
}

}  // namespace

std::pair<Tensor, Tensor> Generator::encode_tokens(const TokenIds& tokens) {
  if (tokens.empty()) detail::config_error("no token ids");
  return embeddings_and_mask(bundle_, encode_text("", tokens));
}

std::pair<Tensor, Tensor> Generator::encode_prompt(const std::string& prompt) {
  return embeddings_and_mask(bundle_, encode_text(prompt));
}

namespace {

/// The request contract refuses a prompt longer than the model reads, never truncates it; the
/// OpenVINO tokenizer truncates, so a prompt that fills every position is refused (one of exactly
/// max_length tokens too, which Python's untruncated count accepts).
void refuse_a_full_prompt(const std::vector<int64_t>& mask) {
  if (mask.empty() || !std::all_of(mask.begin(), mask.end(), [](int64_t v) { return v != 0; })) return;
  const std::string most = std::to_string(mask.size());
  detail::config_error(detail::request_message("tokens", {{"param", "prompt"}, {"count", "at least " + most}, {"limit", most}}));
}

}  // namespace

TokenIds Generator::tokenize(const std::string& prompt, bool negative) {
  const Manifest& m = bundle_.manifest();
  if (!tokenizer_) tokenizer_ = make_openvino_tokenizer(bundle_);  // SD3, Flux: one per text_encoder input
  if (!m.tokenizers.empty()) {  // SD3, Flux: the prompt as given; the limit is T5's (the mask encode gives)
    TokenIds ids = tokenizer_->encode(prompt);
    refuse_a_full_prompt(ids.attention_mask);
    return ids;
  }
  const std::string text = preprocess_prompt(prompt);  // as the PixArt and Sana pipelines preprocess
  TokenIds alone = tokenizer_->encode(text);
  const auto& spec = m.tokenizer.value();  // make_openvino_tokenizer refused a bundle without
  if (spec.instruction) {  // Sana: padded to instruction_max_length; alone, its first max_length are its ids
    alone.input_ids.resize(spec.max_length);
    alone.attention_mask.resize(spec.max_length);
  }
  refuse_a_full_prompt(alone.attention_mask);  // the limit counts the prompt alone (request.py)
  if (!spec.instruction || negative) return alone;
  return tokenizer_->encode(*spec.instruction + text);  // Sana: a prompt follows the instruction
}

Feeds Generator::encode_text(const std::string& prompt, const TokenIds& tokens, bool negative) {
  const Manifest& m = bundle_.manifest();
  // Sana tokenises a negative prompt without the instruction; every other model the same way
  std::string key = (negative && m.tokenizer && m.tokenizer->instruction ? "n:" : "p:") + prompt;
  if (!tokens.empty()) {
    key = "t:";
    for (size_t i = 0; i < tokens.input_ids.size(); ++i)
      key += std::to_string(tokens.input_ids[i]) + "/" + std::to_string(tokens.attention_mask.size() > i ? tokens.attention_mask[i] : -1) + ",";
    for (auto& [name, ids] : tokens.inputs) {
      key += ";" + name + ":";
      for (int64_t id : ids) key += std::to_string(id) + ",";
    }
  }
  auto it = prompt_cache_.find(key);
  if (it != prompt_cache_.end()) return it->second;
  Feeds result;
  if (!tokens.empty()) {
    result = run_text_encoder(tokens);
  } else {
    double start = detail::now_s();
    TokenIds ids = tokenize(prompt, negative);
    segments_->timings().add("tokenizer", detail::now_s() - start);
    result = run_text_encoder(ids);
  }
  if (prompt_cache_.size() >= 256) prompt_cache_.clear();
  prompt_cache_[key] = result;
  return result;
}

Feeds Generator::batch_inputs(const std::vector<Request>& requests, bool guided, std::pair<int, int> latent_hw) {
  const Manifest& m = bundle_.manifest();
  if (m.architecture == "dit") {
    const int64_t null = m.model.num_classes;
    std::vector<int64_t> labels;
    for (auto& r : requests) {
      if (!r.class_label) detail::config_error("DiT models need --class-label");
      if (*r.class_label < 0 || *r.class_label >= null)
        detail::config_error("class label must be in 0.." + std::to_string(null - 1) + ", got " + std::to_string(*r.class_label));
      labels.push_back(*r.class_label);
    }
    if (guided) labels.insert(labels.begin(), requests.size(), null);
    return {{"class_labels", Tensor::i64({static_cast<int64_t>(labels.size())}, labels)}};
  }
  std::vector<Feeds> encoded_rows;
  if (guided)
    for (auto& r : requests) encoded_rows.push_back(encode_text(r.negative_prompt, r.negative_tokens, true));
  for (auto& r : requests) encoded_rows.push_back(encode_text(r.prompt, r.tokens));
  Feeds out;
  for (auto& [name, _] : encoded_rows.front()) {
    std::vector<Tensor> parts;
    for (auto& row : encoded_rows) parts.push_back(output(row, name, "text_encoder"));
    out[name] = concat0(parts);
  }
  if (m.model.uses_size_conditions) {
    const int64_t batch = out["prompt_embeds"].dim(0);
    const double height = static_cast<double>(latent_hw.first) * m.model.vae_scale_factor;
    const double width = static_cast<double>(latent_hw.second) * m.model.vae_scale_factor;
    Tensor resolution(DType::f32, {batch, 2}), aspect(DType::f32, {batch, 1});
    for (int64_t i = 0; i < batch; ++i) {
      resolution.f32_data()[2 * i] = static_cast<float>(height);
      resolution.f32_data()[2 * i + 1] = static_cast<float>(width);
      aspect.f32_data()[i] = static_cast<float>(height / width);
    }
    out["resolution"] = resolution;
    out["aspect_ratio"] = aspect;
  }
  if (m.model.position_ids) {  // FluxPipeline's ids: text all 0, image (0, row, col) per 2x2 patch
    const int64_t rows = latent_hw.first / 2, cols = latent_hw.second / 2;
    Tensor img_ids(DType::f32, {rows * cols, 3});
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < cols; ++j) {
        img_ids.f32_data()[(i * cols + j) * 3 + 1] = static_cast<float>(i);
        img_ids.f32_data()[(i * cols + j) * 3 + 2] = static_cast<float>(j);
      }
    auto embeds = out.find("prompt_embeds");
    if (embeds == out.end()) detail::engine_error("segment text_encoder gave no output 'prompt_embeds'");
    out["img_ids"] = img_ids;
    out["txt_ids"] = Tensor(DType::f32, {embeds->second.dim(1), 3});
  }
  if (m.model.guidance == "embedded") {  // Flux.1-dev: the scale is an input of the model, one per image
    Tensor scales(DType::f32, {static_cast<int64_t>(requests.size())});
    for (size_t i = 0; i < requests.size(); ++i) scales.f32_data()[i] = static_cast<float>(requests[i].guidance_scale.value_or(0.0));
    out["guidance"] = scales;
  }
  return out;
}

Tensor Generator::generate_latents(const Plan& plan, const Request& request, const Tensor* latents,
                                   const std::function<void(int)>& on_step) {
  if (!latents) return generate_batch(plan, {request}, nullptr, on_step);
  std::vector<Tensor> given = {*latents};
  return generate_batch(plan, {request}, &given, on_step);
}

Tensor Generator::generate_batch(const Plan& plan, const std::vector<Request>& given_requests,
                                 const std::vector<Tensor>* latents, const std::function<void(int)>& on_step) {
  if (given_requests.empty()) detail::config_error("no requests to generate");
  std::vector<Request> requests;
  for (auto& r : given_requests) {
    check_request(r);
    requests.push_back(resolve(r));
  }
  auto hw = latent_size(requests[0]);
  for (size_t i = 1; i < requests.size(); ++i)
    if (latent_size(requests[i]) != hw) detail::config_error("a batch must share one image size");
  Shape shape = {1, bundle_.manifest().model.latent_channels, hw.first, hw.second};
  std::vector<Tensor> initial;
  if (latents) {
    if (latents->size() != requests.size()) detail::config_error("one latents array per request");
    initial = *latents;
  } else {
    for (auto& r : requests) initial.push_back(initial_latents(r));
  }
  for (auto& a : initial)
    if (a.shape() != shape || a.dtype() != DType::f32)
      detail::config_error("latents must have shape " + Tensor(DType::f32, shape).shape_string() + ", got " + a.shape_string());
  std::vector<float> scales;
  bool guided = false;
  for (auto& r : requests) {
    double s = std::max(r.guidance_scale.value_or(0.0), 1.0);
    scales.push_back(static_cast<float>(s));
    guided = guided || s > 1.0;
  }
  // Embedded guidance (Flux.1-dev) is an input of the model, not [uncond; cond] rows.
  guided = guided && bundle_.manifest().model.guidance == "cfg";
  const Plan picked = plan.for_image_tokens(bundle_.image_tokens(hw.first, hw.second));  // a size-dependent schedule
  Feeds inputs = batch_inputs(requests, guided, hw);
  Tensor x = concat0(initial);
  bool same = std::all_of(scales.begin(), scales.end(), [&](float s) { return s == scales[0]; });
  std::vector<float> guidance = same ? std::vector<float>{scales[0]} : scales;
  return denoise(*segments_, picked, x, inputs, guided ? guidance : std::vector<float>{1.0f}, on_step, &last_block_forwards_);
}

std::vector<Image> Generator::decode(const Tensor& latents) {
  Tensor images = output(segments_->run("vae_decoder", {{"latents", latents}}), "images", "vae_decoder");
  const int64_t b = images.dim(0), c = images.dim(1), h = images.dim(2), w = images.dim(3);
  if (c != 3) detail::engine_error("the VAE decoder gave " + std::to_string(c) + " channels, not 3");
  std::vector<Image> out;
  for (int64_t n = 0; n < b; ++n) {
    Image img;
    img.height = static_cast<int>(h);
    img.width = static_cast<int>(w);
    img.rgb.resize(static_cast<size_t>(h * w * 3));
    for (int64_t ch = 0; ch < 3; ++ch)
      for (int64_t i = 0; i < h * w; ++i) {
        // (x * 255).round().clip(0, 255).astype(uint8): float32 product, round half to even
        const float v = images.value((n * 3 + ch) * h * w + i) * 255.0f;
        float r = std::isnan(v) ? 0.0f : std::nearbyint(v);
        r = r < 0.0f ? 0.0f : (r > 255.0f ? 255.0f : r);
        img.rgb[static_cast<size_t>(i * 3 + ch)] = static_cast<uint8_t>(r);
      }
    out.push_back(std::move(img));
  }
  return out;
}

}  // namespace ilf
