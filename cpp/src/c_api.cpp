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

ilf::Request to_request(const ilf_request* r) {
  ilf::Request out;
  if (!r) return out;
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

void ilf_openvino_options_init(ilf_openvino_options* o) {
  if (!o) return;
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

void ilf_request_init(ilf_request* r) {
  if (!r) return;
  std::memset(r, 0, sizeof *r);
  r->class_label = -1;
  r->guidance_scale = std::nan("");
}

int ilf_generate(ilf_generator* g, const char* plan, const ilf_request* request, const float* latents_in,
                 size_t latents_in_len, ilf_latents* out) {
  return guard([&] {
    require(g, "generator");
    require(out, "out");
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

int ilf_decode(ilf_generator* g, const ilf_latents* latents, ilf_image* out) {
  return guard([&] {
    require(g, "generator");
    require(latents, "latents");
    require(latents->data, "latents->data");
    require(out, "out");
    out->rgb = nullptr;
    ilf::Shape shape(latents->shape, latents->shape + 4);
    ilf::Tensor x(ilf::DType::f32, shape);
    std::memcpy(x.f32_data(), latents->data, x.nbytes());
    auto images = g->generator->decode(x);
    const ilf::Image& img = images.at(0);
    auto* rgb = static_cast<uint8_t*>(std::malloc(img.rgb.size()));
    if (!rgb) throw std::bad_alloc();
    std::memcpy(rgb, img.rgb.data(), img.rgb.size());
    out->rgb = rgb;
    out->height = img.height;
    out->width = img.width;
  });
}

int ilf_write_png(const char* path, const ilf_image* image) {
  return guard([&] {
    require(path, "path");
    require(image, "image");
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

void ilf_image_free(ilf_image* image) {
  if (image) {
    std::free(image->rgb);
    image->rgb = nullptr;
  }
}

}  // extern "C"
