// The C API (include/ilf/ilf.h): every entry point catches everything; errors become status codes
// and a per-thread message.
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>

#include "ilf/ilf.h"
#include "internal.hpp"

struct ilf_bundle {
  ilf::Bundle bundle;
  std::string default_plan;
};

struct ilf_generator {
  std::unique_ptr<ilf::Generator> generator;
  std::map<std::string, ilf::Plan> plans;
};

namespace {

thread_local std::string last_error;

int fail(int code, const std::string& message) {
  last_error = message;
  return code;
}

template <class F>
int guard(F&& body) {
  last_error.clear();
  try {
    body();
    return ILF_OK;
  } catch (const ilf::Error& e) {
    switch (e.kind()) {
      case ilf::Error::Kind::bundle: return fail(ILF_ERROR_BUNDLE, e.what());
      case ilf::Error::Kind::config: return fail(ILF_ERROR_CONFIG, e.what());
      case ilf::Error::Kind::engine: return fail(ILF_ERROR_ENGINE, e.what());
    }
    return fail(ILF_ERROR_INTERNAL, e.what());
  } catch (const std::bad_alloc&) {
    return fail(ILF_ERROR_INTERNAL, "out of memory");
  } catch (const std::exception& e) {
    return fail(ILF_ERROR_INTERNAL, e.what());
  } catch (...) {
    return fail(ILF_ERROR_INTERNAL, "unknown error");
  }
}

void require(const void* p, const char* what) {
  if (!p) ilf::detail::config_error(std::string(what) + " is NULL");
}

/// The caller's struct is the one this library was built with (ilf.h: struct_size first).
template <class T>
void require_size(const T* given, const char* what, const char* how) {
  if (given->struct_size != sizeof(T))
    ilf::detail::config_error(std::string(what) + ".struct_size is " + std::to_string(given->struct_size) + ", not " +
                              std::to_string(sizeof(T)) + " (set it with " + how +
                              "; a program built against another ilf.h needs that version's libilf)");
}

ilf::Request to_request(const ilf_request* r) {
  ilf::Request out;
  if (!r) return out;
  require_size(r, "request", "ilf_request_init");
  out.prompt = r->prompt ? r->prompt : "";
  out.negative_prompt = r->negative_prompt ? r->negative_prompt : "";
  if (r->class_label >= 0) out.class_label = r->class_label;
  if (!std::isnan(r->guidance_scale)) out.guidance_scale = r->guidance_scale;
  out.seed = r->seed;
  out.height = r->height;
  out.width = r->width;
  if (r->token_ids && r->num_tokens) {
    out.tokens.input_ids.assign(r->token_ids, r->token_ids + r->num_tokens);
    if (r->attention_mask) out.tokens.attention_mask.assign(r->attention_mask, r->attention_mask + r->num_tokens);
    else out.tokens.attention_mask.assign(r->num_tokens, 1);
  }
  auto named = [](const ilf_token_ids* given, size_t count, const char* what, ilf::TokenIds& into) {
    if (count && !given) ilf::detail::config_error(std::string(what) + " is NULL");
    for (size_t i = 0; i < count; ++i) {
      require_size(&given[i], (std::string(what) + "[" + std::to_string(i) + "]").c_str(), "ILF_TOKEN_IDS");
      if (!given[i].input) ilf::detail::config_error(std::string(what) + "[" + std::to_string(i) + "].input is NULL");
      if (!given[i].ids && given[i].num_tokens) ilf::detail::config_error(std::string(what) + "[" + std::to_string(i) + "].ids is NULL");
      if (into.inputs.count(given[i].input))
        ilf::detail::config_error(std::string(what) + " gives " + given[i].input + " twice");
      into.inputs[given[i].input].assign(given[i].ids, given[i].ids + given[i].num_tokens);
    }
  };
  named(r->token_inputs, r->num_token_inputs, "token_inputs", out.tokens);
  named(r->negative_token_inputs, r->num_negative_token_inputs, "negative_token_inputs", out.negative_tokens);
  return out;
}

/// The caller's latents as a tensor of the shape they claim, checked against the bundle first:
/// 4 dimensions, at least one image, the model's latent channels, a latent size the bundle has.
ilf::Tensor checked_latents(const ilf::Generator& generator, const ilf_latents& latents) {
  const ilf::Manifest& m = generator.bundle().manifest();
  const int64_t* s = latents.shape;
  auto shape_text = [&] {
    return "(" + std::to_string(s[0]) + ", " + std::to_string(s[1]) + ", " + std::to_string(s[2]) + ", " +
           std::to_string(s[3]) + ")";
  };
  const int64_t factor = m.model.vae_scale_factor;
  bool size_ok = false;
  for (auto [h, w] : m.resolutions) size_ok = size_ok || (s[2] == h / factor && s[3] == w / factor);
  if (s[0] < 1 || s[0] > m.max_batch || s[1] != m.model.latent_channels || !size_ok)
    ilf::detail::config_error("latents of shape " + shape_text() + " do not fit this bundle: (B, " +
                              std::to_string(m.model.latent_channels) + ", h, w) with B in 1.." +
                              std::to_string(m.max_batch) + " and (h, w) one of its latent sizes");
  ilf::Tensor x(ilf::DType::f32, ilf::Shape(s, s + 4));
  std::memcpy(x.f32_data(), latents.data, x.nbytes());
  return x;
}

}  // namespace

extern "C" {

const char* ilf_version(void) { return ilf::version(); }
const char* ilf_last_error(void) { return last_error.c_str(); }

ilf_bundle* ilf_bundle_open(const char* path, const char* digest) {
  ilf_bundle* out = nullptr;
  guard([&] {
    require(path, "path");
    ilf::LoadOptions options;
    if (digest) options.digest = digest;
    auto b = std::make_unique<ilf_bundle>(ilf_bundle{ilf::Bundle::load(path, options), ""});
    b->default_plan = b->bundle.default_plan();
    out = b.release();
  });
  return out;
}

void ilf_bundle_free(ilf_bundle* bundle) { delete bundle; }
const char* ilf_bundle_digest(const ilf_bundle* b) { return b ? b->bundle.digest().c_str() : ""; }
const char* ilf_bundle_architecture(const ilf_bundle* b) { return b ? b->bundle.manifest().architecture.c_str() : ""; }
const char* ilf_bundle_default_plan(const ilf_bundle* b) { return b ? b->default_plan.c_str() : ""; }
size_t ilf_bundle_num_tokenizers(const ilf_bundle* b) { return b ? b->bundle.manifest().tokenizers.size() : 0; }
const char* ilf_bundle_tokenizer_input(const ilf_bundle* b, size_t i) {
  return b && i < b->bundle.manifest().tokenizers.size() ? b->bundle.manifest().tokenizers[i].input.c_str() : nullptr;
}
int64_t ilf_bundle_tokenizer_max_length(const ilf_bundle* b, size_t i) {
  return b && i < b->bundle.manifest().tokenizers.size() ? b->bundle.manifest().tokenizers[i].max_length : 0;
}

void ilf_openvino_options_init_sized(ilf_openvino_options* o, size_t struct_size) {
  if (!o) return;
  o->struct_size = struct_size;
  o->device = nullptr;
  o->precision = nullptr;
  o->variant = nullptr;
  o->threads = 0;
  o->cache = 1;
}

ilf_generator* ilf_generator_open(const ilf_bundle* bundle, const ilf_openvino_options* o) {
  ilf_generator* out = nullptr;
  guard([&] {
    require(bundle, "bundle");
    ilf::OpenVinoOptions options;
    if (o) {
      require_size(o, "options", "ilf_openvino_options_init");
      if (o->device) options.device = o->device;
      if (o->precision) options.precision = o->precision;
      if (o->variant) options.variant = o->variant;
      options.threads = o->threads;
      options.cache = o->cache != 0;
    }
    auto g = std::make_unique<ilf_generator>();
    g->generator = std::make_unique<ilf::Generator>(bundle->bundle, ilf::make_openvino_engine(bundle->bundle, options));
    out = g.release();
  });
  return out;
}

void ilf_generator_free(ilf_generator* generator) { delete generator; }

void ilf_request_init_sized(ilf_request* r, size_t struct_size) {
  if (!r || struct_size != sizeof *r) {  // a struct of another ilf.h: ilf_generate says so
    if (r && struct_size >= sizeof r->struct_size) r->struct_size = struct_size;
    return;
  }
  *r = ilf_request{};  // every pointer NULL, every number 0
  r->struct_size = struct_size;
  r->class_label = -1;
  r->guidance_scale = std::nan("");
}

int ilf_generate(ilf_generator* g, const char* plan, const ilf_request* request, const float* latents_in,
                 size_t latents_in_len, ilf_latents* out) {
  return guard([&] {
    require(g, "generator");
    require(out, "out");
    require_size(out, "out", "ILF_LATENTS_INIT");
    out->data = nullptr;
    ilf::Generator& gen = *g->generator;
    std::string name = plan ? plan : gen.bundle().default_plan();
    auto it = g->plans.find(name);
    if (it == g->plans.end()) it = g->plans.emplace(name, gen.bundle().plan(name)).first;
    ilf::Request r = to_request(request);
    ilf::Tensor result;
    if (latents_in) {
      auto [h, w] = gen.latent_size(r);
      ilf::Shape shape = {1, gen.bundle().manifest().model.latent_channels, h, w};
      ilf::Tensor x(ilf::DType::f32, shape);
      if (latents_in_len != static_cast<size_t>(x.numel()))
        ilf::detail::config_error("latents must have " + std::to_string(x.numel()) + " floats (shape " + x.shape_string() + "), got " +
                                  std::to_string(latents_in_len));
      std::memcpy(x.f32_data(), latents_in, x.nbytes());
      result = gen.generate_latents(it->second, r, &x);
    } else {
      result = gen.generate_latents(it->second, r);
    }
    float* data = static_cast<float*>(std::malloc(result.nbytes()));
    if (!data) throw std::bad_alloc();
    std::memcpy(data, result.f32_data(), result.nbytes());
    out->data = data;
    for (int i = 0; i < 4; ++i) out->shape[i] = result.dim(i);
  });
}

int ilf_decode(ilf_generator* g, const ilf_latents* latents, ilf_images* out) {
  return guard([&] {
    require(g, "generator");
    require(latents, "latents");
    require_size(latents, "latents", "ILF_LATENTS_INIT");
    require(latents->data, "latents->data");
    require(out, "out");
    require_size(out, "out", "ILF_IMAGES_INIT");
    out->images = nullptr;
    out->count = 0;
    const ilf::Tensor x = checked_latents(*g->generator, *latents);
    std::vector<ilf::Image> images = g->generator->decode(x);
    auto* list = static_cast<ilf_image*>(std::calloc(images.size(), sizeof(ilf_image)));
    if (!list) throw std::bad_alloc();
    ilf_images result = {sizeof(ilf_images), list, 0};
    for (const ilf::Image& img : images) {
      auto* rgb = static_cast<uint8_t*>(std::malloc(img.rgb.size()));
      if (!rgb) {
        ilf_images_free(&result);
        throw std::bad_alloc();
      }
      std::memcpy(rgb, img.rgb.data(), img.rgb.size());
      list[result.count++] = ilf_image{sizeof(ilf_image), rgb, img.height, img.width};
    }
    *out = result;
  });
}

int ilf_write_png(const char* path, const ilf_image* image) {
  return guard([&] {
    require(path, "path");
    require(image, "image");
    require_size(image, "image", "ILF_IMAGE_INIT");
    require(image->rgb, "image->rgb");
    if (image->height <= 0 || image->width <= 0) ilf::detail::config_error("image height and width must be positive");
    ilf::Image img;
    img.height = image->height;
    img.width = image->width;
    img.rgb.assign(image->rgb, image->rgb + static_cast<size_t>(image->height) * image->width * 3);
    ilf::write_png(path, img);
  });
}

void ilf_latents_free(ilf_latents* latents) {
  if (latents) {
    std::free(latents->data);
    latents->data = nullptr;
  }
}

void ilf_images_free(ilf_images* images) {
  if (!images || images->struct_size != sizeof *images) return;  // not one ilf_decode filled
  for (size_t i = 0; images->images && i < images->count; ++i) std::free(images->images[i].rgb);
  std::free(images->images);
  images->images = nullptr;
  images->count = 0;
}

}  // extern "C"
