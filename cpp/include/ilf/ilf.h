/* ilf: the C API of the ilf-deploy bundle runtime (docs/cpp.md).
 *
 * Opaque handles, integer status codes and a per-thread error string; no C++ exception crosses this
 * API. Every function returning int returns ILF_OK (0) or an ILF_ERROR_* code, and then
 * ilf_last_error() says why in one line. Handles are not thread-safe: one generator per thread.
 * Memory the library allocates for results (ilf_latents, ilf_images) is freed with the matching
 * ilf_*_free function.
 *
 * Every struct starts with `struct_size`, the sizeof the caller compiled against: set it with the
 * ilf_*_init macros (requests, options) or the ILF_*_INIT initializers (results, token ids). The
 * library refuses a size it does not know (ILF_ERROR_CONFIG) instead of reading past the caller's
 * struct; a struct that changes changes the ABI version (ILF_ABI_VERSION, libilf.so.ILF_ABI_VERSION).
 */
#ifndef ILF_H
#define ILF_H

#include <stddef.h>
#include <stdint.h>

#include "ilf/export.h"

#ifdef __cplusplus
extern "C" {
#endif

enum {
  ILF_OK = 0,
  ILF_ERROR_BUNDLE = 1,  /* missing, edited or incomplete bundle; unknown schema version */
  ILF_ERROR_CONFIG = 2,  /* a request or option that cannot work */
  ILF_ERROR_ENGINE = 3,  /* the engine failed while running */
  ILF_ERROR_INTERNAL = 4 /* anything else (out of memory, a bug) */
};

/* The C ABI's version: the soname's number (libilf.so.1). */
#define ILF_ABI_VERSION 1

typedef struct ilf_bundle ilf_bundle;
typedef struct ilf_generator ilf_generator;

/* The library's version, e.g. "0.1.0". */
ILF_API const char* ilf_version(void);
/* The last error of this thread, one line ("" when none); valid until this thread's next call. */
ILF_API const char* ilf_last_error(void);

/* Open a bundle: the digest of manifest.json and every file's sha256 are checked. `digest`
 * ("sha256:<hex>") pins the bundle; NULL accepts any. Returns NULL on error. */
ILF_API ilf_bundle* ilf_bundle_open(const char* path, const char* digest);
ILF_API void ilf_bundle_free(ilf_bundle* bundle);
/* Strings owned by the bundle handle. */
ILF_API const char* ilf_bundle_digest(const ilf_bundle* bundle);
ILF_API const char* ilf_bundle_architecture(const ilf_bundle* bundle);
ILF_API const char* ilf_bundle_default_plan(const ilf_bundle* bundle);
/* Bundles whose text encoder reads several tokenizers (SD3, Flux; none of them has an OpenVINO
 * tokenizer, so a request gives token ids): how many, and tokenizer i's text_encoder input name
 * ("input_ids", "input_ids_2", ...) and max_length (the length of its ids), in the manifest's order.
 * 0 tokenizers for PixArt (one tokenizer: token_ids below) and DiT; NULL / 0 for an i out of range. */
ILF_API size_t ilf_bundle_num_tokenizers(const ilf_bundle* bundle);
ILF_API const char* ilf_bundle_tokenizer_input(const ilf_bundle* bundle, size_t i);
ILF_API int64_t ilf_bundle_tokenizer_max_length(const ilf_bundle* bundle, size_t i);

typedef struct ilf_openvino_options {
  size_t struct_size;    /* sizeof(ilf_openvino_options): ilf_openvino_options_init sets it */
  const char* device;    /* "CPU" (NULL: CPU); GPU, NPU, AUTO are passed to OpenVINO, untested */
  const char* precision; /* "f32" (NULL: f32, pinned) or "bf16" */
  const char* variant;   /* a bundle variant OpenVINO reads (int8-ov, int8-qdq), or NULL */
  int threads;           /* 0: OpenVINO's choice */
  int cache;             /* nonzero: cache compiled models in BUNDLE/openvino_cache */
} ilf_openvino_options;

ILF_API /* The defaults (CPU, f32, the bundle's variant, OpenVINO's threads, cache on) and struct_size. */
#define ilf_openvino_options_init(options) ilf_openvino_options_init_sized((options), sizeof *(options))
ILF_API void ilf_openvino_options_init_sized(ilf_openvino_options* options, size_t struct_size);

/* A generator on the OpenVINO engine; `options` may be NULL. The bundle handle may be freed after. */
ILF_API ilf_generator* ilf_generator_open(const ilf_bundle* bundle, const ilf_openvino_options* options);
ILF_API void ilf_generator_free(ilf_generator* generator);

/* One tokenizer's ids for a text encoder that reads several (ilf_bundle_num_tokenizers > 0). */
typedef struct ilf_token_ids {
  size_t struct_size;     /* sizeof(ilf_token_ids): ILF_TOKEN_IDS(input, ids, num_tokens) sets it */
  const char* input;      /* the text_encoder input they feed (ilf_bundle_tokenizer_input) */
  const int64_t* ids;     /* padded to that tokenizer's max_length */
  size_t num_tokens;
} ilf_token_ids;
#define ILF_TOKEN_IDS(input, ids, num_tokens) {sizeof(ilf_token_ids), (input), (ids), (num_tokens)}

typedef struct ilf_request {
  size_t struct_size;          /* sizeof(ilf_request): ilf_request_init sets it */
  const char* prompt;          /* PixArt, SD3, Flux, Sana: tokenised by the bundle's OpenVINO tokenizer(s) (NULL: "") */
  const char* negative_prompt; /* PixArt, SD3 and Sana, with guidance (NULL: "") */
  int64_t class_label;         /* DiT; -1: none */
  double guidance_scale;       /* NaN: the default (4.5 PixArt, 4.0 DiT, 7.0 SD3, 3.5 Flux.1-dev: embedded;
                                  Flux.1-schnell: none, only 1 is accepted); classifier-free: <= 1 disables */
  uint64_t seed;               /* of this library's noise (not numpy's stream: pass latents for that) */
  int height, width;           /* pixels; 0: the bundle's first resolution */
  const int64_t* token_ids;    /* optional: the prompt's ids, used instead of tokenising `prompt` */
  const int64_t* attention_mask;
  size_t num_tokens;
  /* SD3, Flux (several tokenizers): the prompt's ids, one entry per tokenizer; with classifier-free
   * guidance (SD3) the negative prompt's too. NULL / 0: none. */
  const ilf_token_ids* token_inputs;
  size_t num_token_inputs;
  const ilf_token_ids* negative_token_inputs;
  size_t num_negative_token_inputs;
} ilf_request;

ILF_API /* The defaults (no prompt, no class label, the default guidance, seed 0, the bundle's size) and struct_size. */
#define ilf_request_init(request) ilf_request_init_sized((request), sizeof *(request))
ILF_API void ilf_request_init_sized(ilf_request* request, size_t struct_size);

typedef struct ilf_latents {
  size_t struct_size; /* sizeof(ilf_latents): ILF_LATENTS_INIT */
  float* data;      /* shape[0] * shape[1] * shape[2] * shape[3] floats, C order */
  int64_t shape[4]; /* (1, C, h, w): the VAE's latent layout (Flux too: unpacked, not diffusers' packed) */
} ilf_latents;
#define ILF_LATENTS_INIT {sizeof(ilf_latents), NULL, {0, 0, 0, 0}}

typedef struct ilf_image {
  size_t struct_size; /* sizeof(ilf_image): ILF_IMAGE_INIT (ilf_decode sets it on the images it returns) */
  uint8_t* rgb;       /* height * width * 3, row-major */
  int height, width;
} ilf_image;
#define ILF_IMAGE_INIT {sizeof(ilf_image), NULL, 0, 0}

/* The images of a batch of latents, one per latent row, in order. */
typedef struct ilf_images {
  size_t struct_size; /* sizeof(ilf_images): ILF_IMAGES_INIT */
  ilf_image* images;  /* `count` images */
  size_t count;
} ilf_images;
#define ILF_IMAGES_INIT {sizeof(ilf_images), NULL, 0}

/* Run `plan` (a bundled plan's name, or a plan .json file; NULL: the bundle's default plan) for
 * `request`. `latents_in` (NULL: seeded noise) holds `latents_in_len` floats of the latent shape.
 * On success `out` holds the final latents (free with ilf_latents_free). */
ILF_API int ilf_generate(ilf_generator* generator, const char* plan, const ilf_request* request, const float* latents_in,
                 size_t latents_in_len, ilf_latents* out);
/* Final latents (B, C, h, w) -> B RGB images (the VAE decoder), every one; free with ilf_images_free.
 * The shape is checked against the bundle (C its latent channels, (h, w) one of its sizes) and
 * `latents->data` must hold that many floats. */
ILF_API int ilf_decode(ilf_generator* generator, const ilf_latents* latents, ilf_images* out);
ILF_API int ilf_write_png(const char* path, const ilf_image* image);
ILF_API void ilf_latents_free(ilf_latents* latents);
ILF_API void ilf_images_free(ilf_images* images);

#ifdef __cplusplus
}
#endif

#endif /* ILF_H */
