/* The README's C example: the same through the C API (opaque handles, status codes, error strings).
 *   ilf-example-c BUNDLE PROMPT|CLASS OUT.png [PLAN] */
#include <ilf/ilf.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char** argv) {
  if (argc < 4) {
    fprintf(stderr, "usage: %s BUNDLE PROMPT|CLASS OUT.png [PLAN]\n", argv[0]);
    return 2;
  }
  ilf_bundle* bundle = ilf_bundle_open(argv[1], NULL); /* NULL: any digest */
  if (!bundle) {
    fprintf(stderr, "error: %s\n", ilf_last_error());
    return 2;
  }
  ilf_generator* generator = ilf_generator_open(bundle, NULL); /* OpenVINO CPU f32 */
  int dit = strcmp(ilf_bundle_architecture(bundle), "dit") == 0;
  ilf_bundle_free(bundle);
  if (!generator) {
    fprintf(stderr, "error: %s\n", ilf_last_error());
    return 2;
  }
  ilf_request request;
  ilf_request_init(&request);
  if (dit) request.class_label = atoll(argv[2]);
  else request.prompt = argv[2];
  request.seed = 7;

  ilf_latents latents = ILF_LATENTS_INIT; /* struct_size first: the library checks it */
  ilf_images images = ILF_IMAGES_INIT;
  int status = ilf_generate(generator, argc > 4 ? argv[4] : NULL, &request, NULL, 0, &latents);
  if (status == ILF_OK) status = ilf_decode(generator, &latents, &images); /* one image per latent row */
  if (status == ILF_OK) status = ilf_write_png(argv[3], &images.images[0]);
  if (status == ILF_OK)
    printf("latents (%lld, %lld, %lld, %lld) -> %dx%d image %s\n", (long long)latents.shape[0],
           (long long)latents.shape[1], (long long)latents.shape[2], (long long)latents.shape[3],
           images.images[0].height, images.images[0].width, argv[3]);
  else
    fprintf(stderr, "error (%d): %s\n", status, ilf_last_error());
  ilf_latents_free(&latents);
  ilf_images_free(&images);
  ilf_generator_free(generator);
  return status == ILF_OK ? 0 : 2;
}
