// ilf: the C++ runtime for ilf-deploy bundles (https://github.com/.../ilf-deploy, docs/cpp.md).
//
// A bundle (manifest.json + manifest.sha256 + plans/ + onnx/ + positions/ + tokenizer/) is read per the
// published schemas (ilf_deploy/core/schemas/*.schema.json, schema_version 2, and 4 for the two-stream
// MMDiTs SD3 and Flux.1): every file's sha256 and the manifest's digest are checked before anything
// runs. A step plan (plans/NAME.json, version 1, 2 or 3) is then executed exactly as
// ilf_deploy/core/runtime/loop.py does: segment calls on the model's state (the named tensors between
// blocks: image tokens, and an MMDiT's text tokens), the ILF inner loop with t_post conditioning, the
// Δ-cache (refresh/reuse, keyed ranges over several ops, adaptive reuse decided per image),
// classifier-free or embedded guidance and the plan's precomputed scheduler coefficients (multistep
// history included; a version 3 plan's schedule for the image's token count). Segments run on an
// `Engine` (OpenVINO here; anything that can run a named graph on named tensors can implement it).
// Link ilf::ilf (find_package(ilf)) or `pkg-config --cflags --libs ilf`, and include this header or
// the ones it gathers, one per concept. Nothing here includes OpenVINO or a JSON library.
#pragma once

#include "ilf/version.hpp"  // ILF_VERSION_*, ilf::version()
#include "ilf/error.hpp"    // ilf::Error
#include "ilf/tensor.hpp"   // Tensor, Feeds
#include "ilf/image.hpp"    // Image, write_png
#include "ilf/bundle.hpp"   // Manifest, Plan, Bundle
#include "ilf/engine.hpp"   // Engine, make_openvino_engine
#include "ilf/loop.hpp"     // Segments, denoise
#include "ilf/generator.hpp"  // Request, Tokenizer, Generator
