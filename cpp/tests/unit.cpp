// Unit tests of the reader, the file formats and (loop.cpp) the step loop through a fake engine (run
// by ctest and by tests/test_cpp.py).
//   ilf-tests                 run every test; exit 1 on a failure
//   ilf-tests --to-half IN OUT  float32 .npy -> float16 .npy and back -> OUT (pytest compares with numpy)
//   ilf-tests --sha-lengths   print sha256 of bytes(i % 251 for i in range(n)) for n in 0..300 and 2^20+17
//                             (pytest compares them with hashlib)
//   ilf-tests --batch SPEC.json  Generator::generate_batch on OpenVINO f32 (which ilf-run, one request a
//                             run, cannot do): {"bundle", "plan", "height", "width", "out" (.npy), "requests":
//                             [{"latents": .npy, "tokens": {input: ids}, "negative_tokens": {...},
//                             "guidance_scale": G}]}; prints the block forwards each image ran, as JSON
//                             (tests/test_cpp_mmdit.py compares with the Python runtime's generate_batch)
#include <ilf/ilf.hpp>

#include "check.hpp"
#include "detail.hpp"  // cpp/src: the internals these tests check
#include <ilf/ilf.h>
#include <nlohmann/json.hpp>
#include <zlib.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <iostream>
#include <string>
#include <sys/stat.h>
#include <unistd.h>
#include <utility>
#include <vector>

namespace {

using ilf_tests::checks;
using ilf_tests::failures;

std::string tmpdir;

void write(const std::string& path, const std::string& data) {
  std::ofstream f(path, std::ios::binary);
  f << data;
}

std::string hex_of(const std::string& s) { return ilf::detail::sha256_hex(s.data(), s.size()); }

// -- sha256 -----------------------------------------------------------------------------------------

void test_sha256() {
  CHECK(hex_of("") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  CHECK(hex_of("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  CHECK(hex_of("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq") ==
        "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  CHECK(hex_of(std::string(1000000, 'a')) == "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
  write(tmpdir + "/abc", "abc");
  CHECK(ilf::detail::sha256_file(tmpdir + "/abc") == hex_of("abc"));
  EXPECT_ERROR(ilf::check_digest_option("sha256:ABC"), config, "--digest must look like sha256:");
  ilf::check_digest_option("sha256:" + hex_of("x"));
}

// -- npy and png ------------------------------------------------------------------------------------

void test_tensor_values() {
  // copies are copies: writing one (or a reshaped one) leaves the others as they were
  ilf::Tensor a = ilf::Tensor::f32({2, 2}, {1.f, 2.f, 3.f, 4.f});
  ilf::Tensor b = a;
  ilf::Tensor r = a.reshaped({4});
  b.f32_data()[0] = 10.f;
  r.f32_data()[3] = 40.f;
  CHECK(a.f32_data()[0] == 1.f && a.f32_data()[3] == 4.f);
  CHECK(b.f32_data()[0] == 10.f && b.f32_data()[3] == 4.f);
  CHECK(r.f32_data()[0] == 1.f && r.f32_data()[3] == 40.f);
  const ilf::Tensor c = a;  // reading a shared tensor does not copy it
  CHECK(c.f32_data() == std::as_const(a).f32_data());
  ilf::Tensor d = a;
  d.f32_data();  // a write access: storage of its own
  CHECK(std::as_const(d).f32_data() != std::as_const(a).f32_data() && d.f32_data()[2] == 3.f);
  ilf::Tensor e(ilf::DType::i64, {3});
  ilf::Tensor f = e;
  e.i64_data()[1] = 7;
  static_cast<int64_t*>(f.raw())[2] = 9;
  CHECK(e.i64_data()[1] == 7 && e.i64_data()[2] == 0 && f.i64_data()[1] == 0 && f.i64_data()[2] == 9);
}

void test_npy_png() {
  ilf::Tensor t = ilf::Tensor::f32({1, 2, 3}, {0.5f, -1.f, 2.f, 3.f, 4.f, 1e-7f});
  ilf::detail::write_npy(tmpdir + "/t.npy", t);
  ilf::Tensor u = ilf::detail::read_npy(tmpdir + "/t.npy");
  CHECK(u.shape() == t.shape() && std::memcmp(u.raw(), t.raw(), t.nbytes()) == 0);
  CHECK(u.shape_string() == "(1, 2, 3)");
  ilf::Tensor ids = ilf::Tensor::i64({4}, {1, 2, 3, -4});
  ilf::detail::write_npy(tmpdir + "/i.npy", ids);
  ilf::Tensor v = ilf::detail::read_npy(tmpdir + "/i.npy");
  CHECK(v.dtype() == ilf::DType::i64 && v.shape_string() == "(4,)" && v.i64_data()[3] == -4);
  std::ifstream f(tmpdir + "/t.npy", std::ios::binary);
  std::string data((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  CHECK(data.size() == 128 + 24);  // a 64-byte-aligned header, as numpy writes it
  write(tmpdir + "/bad.npy", "not numpy");
  EXPECT_ERROR(ilf::detail::read_npy(tmpdir + "/bad.npy"), config, "not a .npy file");
  EXPECT_ERROR(ilf::detail::read_npy(tmpdir + "/nope.npy"), config, "no such file");

  ilf::Image img;
  img.height = 2;
  img.width = 3;
  for (int i = 0; i < 18; ++i) img.rgb.push_back(static_cast<uint8_t>(i * 14));
  std::vector<uint8_t> png = ilf::detail::encode_png(img);
  CHECK(png.size() > 41 && std::memcmp(png.data(), "\x89PNG\r\n\x1a\n", 8) == 0);
  // IHDR's CRC for a 3x2 8-bit RGB image (zlib.crc32 of b"IHDR" + its 13 bytes), then IDAT's rows back
  CHECK(png[29] == 0x12 && png[30] == 0x16 && png[31] == 0xf1 && png[32] == 0x4d);
  const uint32_t idat = (png[33] << 24) | (png[34] << 16) | (png[35] << 8) | png[36];
  CHECK(std::memcmp(png.data() + 37, "IDAT", 4) == 0);
  std::vector<uint8_t> rows(2 * (1 + 9));
  uLongf rows_size = rows.size();
  CHECK(uncompress(rows.data(), &rows_size, png.data() + 41, idat) == Z_OK && rows_size == rows.size());
  CHECK(rows[0] == 0 && rows[10] == 0 && rows[1] == 0 && rows[9] == 8 * 14 && rows[19] == 17 * 14);
  ilf::write_png(tmpdir + "/img.png", img);
  img.rgb.pop_back();
  EXPECT_ERROR(ilf::detail::encode_png(img), config, "height x width x 3");
}

// -- bundles --------------------------------------------------------------------------------------

struct FakeBundle {
  std::string root;
  std::map<std::string, std::string> files;  // path -> content
  std::string manifest_extra;                // extra top-level JSON members, e.g. ", \"x\": 1"
  int schema_version = 2;
  std::string tokenizer = R"({"file": "tokenizer/tokenizer.json", "max_length": 8, "pad_id": 0})";

  explicit FakeBundle(const std::string& name) : root(tmpdir + "/" + name) {
    for (const char* s : {"text_encoder", "vae_decoder", "embed", "context", "time", "final", "blocks_00_01"})
      files[std::string("onnx/") + s + ".onnx"] = std::string("graph ") + s;
    files["plans/base-2.json"] = plan_json("base-2", {"blocks", 0, 1}, 2);
    files["tokenizer/tokenizer.json"] = "{}";
  }

  static std::string plan_json(const std::string& name, std::tuple<const char*, int, int> op, int blocks,
                               const std::string& version = "1") {
    char step[512];
    std::snprintf(step, sizeof step,
                  R"({"index": 0, "timestep": 999.0, "t_post": null, "feedback": false, "block_forwards": 2,
        "ops": [{"op": "%s", "start": %d, "end": %d, "time": "t"}], "final_time": "t",
        "coefficients": {"timestep": 999.0, "prev_timestep": 0.0, "x": 1.0, "eps": -1.0, "x0_x": 1.0,
                         "x0_eps": -1.0, "history": []}})",
                  std::get<0>(op), std::get<1>(op), std::get<2>(op));
    return R"({"version": )" + version + R"(, "name": ")" + name + R"(", "num_blocks": )" + std::to_string(blocks) +
           R"(, "num_steps": 1, "scheduler": "DPMSolverMultistepScheduler", "loop": null, "block_forwards": 2,
      "settings": {}, "steps": [)" + step + "]}";
  }

  std::string segment(const std::string& name, const char* blocks = "null") const {
    return "\"" + name + R"(": {"file": "onnx/)" + name +
           R"(.onnx", "inputs": [{"name": "x", "shape": ["batch", 4], "dtype": "float32"}],
         "outputs": [{"name": "y", "shape": ["batch"], "dtype": "float32"}], "blocks": )" + blocks + "}";
  }

  std::string manifest() const {
    std::string segments;
    for (const char* s : {"text_encoder", "vae_decoder", "embed", "context", "time", "final"}) segments += segment(s) + ",";
    segments += segment("blocks_00_01", "[0, 1]");
    std::string hashes;
    for (auto& [path, content] : files) hashes += std::string(hashes.empty() ? "" : ", ") + "\"" + path + "\": \"" + hex_of(content) + "\"";
    return R"({"schema_version": )" + std::to_string(schema_version) + R"(, "architecture": "pixart-alpha",
      "config_hash": "x", "model": {"num_blocks": 2, "latent_channels": 4, "out_channels": 8, "patch_size": 2,
      "sample_size": 8, "vae_scale_factor": 4, "default_image_size": 32,
      "context_inputs": ["prompt_embeds", "prompt_mask"], "uses_size_conditions": false},
      "feedback": null, "precision": "fp32", "max_batch": 1, "resolutions": [[32, 32], [48, 32]],
      "latent_sizes": [[8, 8], [12, 8]], "cut_points": [0, 2], "segments": {)" + segments + R"(},
      "plans": {"base-2": "plans/base-2.json"}, "tokenizer": )" + tokenizer + R"(,
      "scheduler": {"lambda_min_clipped": "-inf"}, "torch_model": null, "tools": {}, "files": {)" + hashes + "}" +
           manifest_extra + "}";
  }

  /// Write everything; `edit` may change the tree after the digest is written.
  std::string write_all(const std::function<void(const std::string&)>& edit = {}) const {
    std::string cmd = "rm -rf '" + root + "' && mkdir -p '" + root + "/onnx' '" + root + "/plans' '" + root + "/tokenizer'";
    if (std::system(cmd.c_str()) != 0) std::abort();
    for (auto& [path, content] : files) write(root + "/" + path, content);
    std::string m = manifest();
    write(root + "/manifest.json", m);
    write(root + "/manifest.sha256", "sha256:" + hex_of(m) + "\n");
    if (edit) edit(root);
    return root;
  }
};

void test_bundle_reader() {
  FakeBundle good("good");
  std::string root = good.write_all();
  ilf::Bundle b = ilf::Bundle::load(root + "/");
  CHECK(b.path() == root);
  CHECK(b.digest().rfind("sha256:", 0) == 0 && b.digest().size() == 71);
  CHECK(b.manifest().resolutions.size() == 2 && b.manifest().resolutions[1] == std::make_pair(48, 32));
  CHECK(b.default_plan() == "base-2");
  CHECK(b.manifest().block_segments().size() == 1);
  CHECK(!b.manifest().tokenizer->openvino);
  ilf::Plan p = b.plan("base-2");
  CHECK(p.block_forwards() == 2 && p.cut_points() == std::vector<int>({0, 2}) && p.feedback_steps().empty());
  ilf::LoadOptions pinned;
  pinned.digest = b.digest();
  ilf::Bundle::load(root, pinned);
  pinned.digest = "sha256:" + std::string(64, '0');
  EXPECT_ERROR(ilf::Bundle::load(root, pinned), bundle, "not the pinned --digest");
  EXPECT_ERROR(b.plan("ilf-9"), bundle, "plan 'ilf-9' is not in this bundle (it has: base-2)");
  EXPECT_ERROR(b.positions(8, 8), bundle, "the bundle was not built for 32x32 images (it has: 32x32, 48x32)");

  EXPECT_ERROR(ilf::Bundle::load(tmpdir + "/nothing"), bundle, "is not a bundle (no manifest.json)");
  EXPECT_ERROR(good.write_all([](const std::string& r) { write(r + "/manifest.json", "{"); }); ilf::Bundle::load(root),
               bundle, "is not valid JSON");
  FakeBundle v3("v3");
  v3.schema_version = 3;
  EXPECT_ERROR(ilf::Bundle::load(v3.write_all()), bundle, "bundle schema version 3 is not supported (this tool reads 2 and 4 and 5 and 6 and 7)");
  FakeBundle v8("v8");
  v8.schema_version = 8;
  EXPECT_ERROR(ilf::Bundle::load(v8.write_all()), bundle, "bundle schema version 8 is not supported (this tool reads 2 and 4 and 5 and 6 and 7)");
  EXPECT_ERROR(ilf::Bundle::load(good.write_all([](const std::string& r) { std::remove((r + "/manifest.sha256").c_str()); })),
               bundle, "manifest.sha256 is missing");
  EXPECT_ERROR(ilf::Bundle::load(good.write_all([](const std::string& r) {
                 std::ofstream(r + "/manifest.json", std::ios::app) << " ";
               })),
               bundle, "manifest.json does not match the bundle's digest in manifest.sha256 (edited or corrupted)");
  EXPECT_ERROR(ilf::Bundle::load(good.write_all([](const std::string& r) { std::remove((r + "/onnx/embed.onnx").c_str()); })),
               bundle, "onnx/embed.onnx is missing; the bundle is incomplete, rebuild it");
  EXPECT_ERROR(ilf::Bundle::load(good.write_all([](const std::string& r) { write(r + "/onnx/final.onnx", "edited"); })),
               bundle, "onnx/final.onnx does not match its sha256 in the manifest (edited or corrupted)");
  ilf::LoadOptions no_hashes;
  no_hashes.verify_hashes = false;
  ilf::Bundle::load(good.write_all([](const std::string& r) { write(r + "/onnx/final.onnx", "edited"); }), no_hashes);

  FakeBundle extra("extra");
  extra.manifest_extra = R"(, "surprise": 1)";
  EXPECT_ERROR(ilf::Bundle::load(extra.write_all()), bundle, "does not follow the manifest schema at (top level): Object contains a property that could not be validated using 'properties' or 'additionalProperties' constraints: 'surprise'");
  FakeBundle badtok("badtok");
  badtok.tokenizer = R"({"file": "tokenizer/tokenizer.json", "max_length": "8", "pad_id": 0})";
  EXPECT_ERROR(ilf::Bundle::load(badtok.write_all()), bundle, "does not follow the manifest schema at tokenizer/max_length: Value type not permitted by 'type' constraint (got '8')");
  FakeBundle unlisted("unlisted");
  unlisted.tokenizer = R"({"file": "tokenizer/tokenizer.json", "max_length": 8, "pad_id": 0, "openvino": "tokenizer/ov.xml"})";
  EXPECT_ERROR(ilf::Bundle::load(unlisted.write_all()), bundle, "names tokenizer/ov.xml but does not list its sha256 in `files`");
  FakeBundle escape("escape");
  escape.tokenizer = R"({"file": "../tokenizer.json", "max_length": 8, "pad_id": 0})";
  EXPECT_ERROR(ilf::Bundle::load(escape.write_all()), bundle, "at tokenizer/file: Failed to match regex specified by 'pattern' constraint (got '../tokenizer.json')");
  FakeBundle nosegment("nosegment");
  nosegment.files.erase("onnx/time.onnx");
  {
    // drop the time segment from the manifest too
    std::string m = nosegment.manifest();
    auto at = m.find("\"time\": {");
    auto end = m.find("},", m.find("\"blocks\": null", at)) + 2;
    m.erase(at, end - at);
    std::string r = nosegment.write_all();
    write(r + "/manifest.json", m);
    write(r + "/manifest.sha256", "sha256:" + hex_of(m));
    EXPECT_ERROR(ilf::Bundle::load(r), bundle, "has no 'time' segment");
  }

  // plans: validation as StepPlan.validate
  FakeBundle plans("plans");
  plans.files["plans/gap.json"] = FakeBundle::plan_json("gap", {"blocks", 1, 1}, 2);
  plans.files["plans/short.json"] = FakeBundle::plan_json("short", {"blocks", 0, 0}, 2);
  plans.files["plans/v2.json"] = FakeBundle::plan_json("v2", {"blocks", 0, 1}, 2, "2");
  plans.files["plans/v4.json"] = FakeBundle::plan_json("v4", {"blocks", 0, 1}, 2, "4");
  plans.files["plans/vtrue.json"] = FakeBundle::plan_json("vtrue", {"blocks", 0, 1}, 2, "true");
  plans.files["plans/wide.json"] = FakeBundle::plan_json("wide", {"blocks", 0, 5}, 2);
  plans.files["plans/ilf.json"] = FakeBundle::plan_json("ilf", {"ilf", 0, 1}, 2);
  std::string pr = plans.write_all();
  EXPECT_ERROR(ilf::Plan::load(pr + "/plans/gap.json"), config, "plan 'gap' step 0: ops must cover blocks in order");
  EXPECT_ERROR(ilf::Plan::load(pr + "/plans/short.json"), config, "plan 'short' step 0: ops cover 1 of 2 blocks");
  CHECK(ilf::Plan::load(pr + "/plans/v2.json").version == 2);
  EXPECT_ERROR(ilf::Plan::load(pr + "/plans/v4.json"), config, "unsupported plan version 4 (this tool reads 1, 2, 3); rebuild");
  EXPECT_ERROR(ilf::Plan::load(pr + "/plans/vtrue.json"), config, "unsupported plan version True (this tool reads 1, 2, 3)");
  EXPECT_ERROR(ilf::Plan::load(pr + "/plans/wide.json"), config, "block 5 is out of range (the model has blocks 0..1)");
  EXPECT_ERROR(ilf::Plan::load(pr + "/plans/ilf.json"), config, "ILF op outside the plan's loop");
  EXPECT_ERROR(ilf::Plan::load(pr + "/plans/none.json"), config, "cannot read plan");
  ilf::Bundle pb = ilf::Bundle::load(pr);
  CHECK(pb.plan(pr + "/plans/base-2.json").name == "base-2");  // a plan file whose cut points the bundle has
}

/// A plan document with `steps` (JSON list items) and extra top-level members.
std::string plan_doc(int version, const std::string& steps, const std::string& extra = "", int blocks = 4) {
  return R"({"version": )" + std::to_string(version) + R"(, "name": "p", "num_blocks": )" + std::to_string(blocks) +
         R"(, "scheduler": "FlowMatchEulerDiscreteScheduler", "loop": [2, 3], "steps": [)" + steps + "]" + extra + "}";
}

std::string step_doc(int index, const std::string& ops, const char* t_post = "null") {
  return R"({"index": )" + std::to_string(index) + R"(, "timestep": 1000.0, "t_post": )" + t_post + R"(, "ops": [)" + ops +
         R"(], "coefficients": {"timestep": 1000.0, "prev_timestep": 500.0, "x": 1.0, "eps": -0.5, "x0_x": 1.0, "x0_eps": -1.0}})";
}

std::string timing_doc(double timestep, const char* t_post = "null") {
  return R"({"timestep": )" + std::to_string(timestep) + R"(, "t_post": )" + t_post +
         R"(, "coefficients": {"timestep": 1.0, "prev_timestep": 0.0, "x": 1.0, "eps": -0.25, "x0_x": 1.0, "x0_eps": -1.0}})";
}

void test_plan_versions() {
  const std::string plain = R"({"op": "blocks", "start": 0, "end": 3})";
  const std::string refresh = R"({"op": "blocks", "start": 0, "end": 0}, {"op": "cache_refresh", "start": 1, "end": 3, "key": "k"})";
  const std::string reuse = R"({"op": "blocks", "start": 0, "end": 0}, {"op": "cache_reuse", "start": 1, "end": 3, "key": "k"})";
  const std::string adaptive =
      R"({"op": "blocks", "start": 0, "end": 0}, {"op": "cache_adaptive", "start": 1, "end": 3, "key": "k", "threshold": 0.1, "max_reuse": 2})";
  // version 2: a keyed ilf joins the cached range of the op before it; adaptive ops carry their rule
  const std::string keyed_ilf = R"({"op": "blocks", "start": 0, "end": 0}, {"op": "cache_refresh", "start": 1, "end": 1, "key": "k"},
      {"op": "ilf", "start": 2, "end": 3, "key": "k"})";
  ilf::Plan v2 = ilf::Plan::parse(plan_doc(2, step_doc(0, keyed_ilf) + "," + step_doc(1, adaptive)), "v2");
  CHECK(v2.version == 2 && v2.adaptive() && v2.steps[0].ops[2].stores() && v2.steps[1].ops[1].kind == ilf::OpKind::cache_adaptive);
  CHECK(v2.steps[1].ops[1].threshold == 0.1 && v2.steps[1].ops[1].max_reuse == 2 && v2.block_forwards() == 1 + 1 + 5 + 4);
  EXPECT_ERROR(ilf::Plan::parse(plan_doc(1, step_doc(0, adaptive)), "v1"), bundle, "plan v1 does not follow the plan schema at steps/0/ops/1/op: Target should not validate against schema specified in 'not' constraint (got 'cache_adaptive')");
  // a version 1 plan's ilf key meant nothing: dropped, so the refresh's range is 1..1 alone
  CHECK(!ilf::Plan::parse(plan_doc(1, step_doc(0, keyed_ilf)), "v1").steps[0].ops[2].keyed);
  const std::string shared = R"({"op": "blocks", "start": 0, "end": 0}, {"op": "cache_refresh", "start": 1, "end": 1, "key": "k"},
      {"op": "cache_refresh", "start": 2, "end": 3, "key": "k"})";
  EXPECT_ERROR(ilf::Plan::parse(plan_doc(1, step_doc(0, shared)), "v1"), config,
               "malformed plan 'p': consecutive ops share a cache key, which version 1 plans cannot say (write version 2)");
  CHECK(ilf::Plan::parse(plan_doc(2, step_doc(0, shared)), "v2").version == 2);
  EXPECT_ERROR(ilf::Plan::parse(plan_doc(2, step_doc(0, reuse)), "v2"), config, "step 0: cache_reuse of key 'k' before any refresh of it");
  const std::string moved = R"({"op": "blocks", "start": 0, "end": 1}, {"op": "cache_refresh", "start": 2, "end": 3, "key": "k"})";
  EXPECT_ERROR(ilf::Plan::parse(plan_doc(2, step_doc(0, refresh) + "," + step_doc(1, moved)), "v2"), config,
               "step 1: cache key 'k' covers blocks 2:3 here and 1:3 elsewhere");
  const std::string twice = R"({"op": "cache_refresh", "start": 0, "end": 0, "key": "k"}, {"op": "blocks", "start": 1, "end": 1},
      {"op": "cache_refresh", "start": 2, "end": 3, "key": "k"})";
  EXPECT_ERROR(ilf::Plan::parse(plan_doc(2, step_doc(0, twice)), "v2"), config, "step 0: a cache key covers two ranges in one step");
  const std::string reused_pair = R"({"op": "blocks", "start": 0, "end": 0}, {"op": "cache_refresh", "start": 1, "end": 1, "key": "k"},
      {"op": "cache_reuse", "start": 2, "end": 3, "key": "k"})";
  EXPECT_ERROR(ilf::Plan::parse(plan_doc(2, step_doc(0, reused_pair)), "v2"), config, "cache key 'k' is reused over more than one op");
  std::string no_rule = adaptive;
  no_rule.replace(no_rule.find(", \"max_reuse\": 2"), 16, "");
  EXPECT_ERROR(ilf::Plan::parse(plan_doc(2, step_doc(0, no_rule)), "v2"), bundle, "at steps/0/ops/1: Missing required property 'max_reuse'");
  EXPECT_ERROR(ilf::Plan::parse(plan_doc(2, step_doc(0, R"({"op": "blocks", "start": 0, "end": 3, "threshold": 0.1})")), "v2"), bundle,
               "at steps/0/ops/0/threshold: Failed to validate against schema associated with property name 'threshold' (got 0.1)");

  // version 3: one timing per step for each image token count
  const std::string steps = step_doc(0, plain) + "," + step_doc(1, plain);
  const std::string schedules = R"(, "schedules": {"16": [)" + timing_doc(900) + "," + timing_doc(400) + R"(], "32": [)" +
                                timing_doc(950) + "," + timing_doc(500) + "]}";
  ilf::Plan v3 = ilf::Plan::parse(plan_doc(3, steps, schedules), "v3");
  CHECK(v3.version == 3 && v3.schedules.size() == 2 && v3.schedules.count(32));
  ilf::Plan at32 = v3.for_image_tokens(32);
  CHECK(at32.schedules.empty() && at32.steps[0].timestep == 950 && at32.steps[1].timestep == 500 &&
        at32.steps[1].coefficients.eps == -0.25 && at32.steps[1].ops.size() == 1);
  EXPECT_ERROR(v3.for_image_tokens(24), config,
               "plan 'p' was made for images of 16, 32 tokens, not 24 (its schedule depends on the image size): make the plan "
               "for this size, or rebuild with --resolutions");
  CHECK(v2.for_image_tokens(24).steps.size() == 2);  // no schedule: the plan itself
  EXPECT_ERROR(ilf::Plan::parse(plan_doc(2, steps, schedules), "v2"), bundle, "plan v2 does not follow the plan schema at (top level): Target should not validate against schema specified in 'not' constraint");
  EXPECT_ERROR(ilf::Plan::parse(plan_doc(3, steps, R"(, "schedules": {"16": [)" + timing_doc(900) + "]}"), "v3"), config,
               "plan 'p': the schedule for 16 image tokens has 1 steps, the plan 2");
  EXPECT_ERROR(ilf::Plan::parse(plan_doc(3, steps, R"(, "schedules": {"16": [)" + timing_doc(900, "300.0") + "," + timing_doc(400) + "]}"),
                                "v3"),
               config, "plan 'p' step 0: t_post at one size, not another");
  EXPECT_ERROR(ilf::Plan::parse(plan_doc(3, steps, R"(, "schedules": {"016": [)" + timing_doc(900) + "," + timing_doc(400) + "]}"),
                                "v3"),
               bundle, "plan v3 does not follow the plan schema at schedules: Failed to validate");
  EXPECT_ERROR(ilf::Plan::parse(plan_doc(3, steps, R"(, "schedules": {"16": [{"timestep": 1.0, "coefficients": {}, "x": 1}, {}]})"),
                                "v3"),
               bundle, "at schedules/16/0/coefficients: Missing required property 'eps'");
}

// Issue 31: integers read as 64 bits and range-checked, plans bounded as plan/model.py bounds them,
// .npy headers checked against the file, the request contract's limits and words.
void test_bounds_and_contract() {
  const std::string plain = R"({"op": "blocks", "start": 0, "end": 3})";
  EXPECT_ERROR(ilf::Plan::parse(plan_doc(1, step_doc(0, R"({"op": "blocks", "start": 0, "end": 4294967298})")), "big"), bundle,
               "at steps/0/ops/0/end: 4294967298 is greater than the maximum of 2147483647");
  CHECK(ilf::Plan::parse(plan_doc(1, step_doc(0, plain)), "ok").steps.size() == 1);
  EXPECT_ERROR(ilf::Plan::parse(R"({"version": 1, "name": "p", "num_blocks": 18446744073709551615, "scheduler": "s", "steps": []})", "u64"),
               bundle, "at num_blocks: 18446744073709551615 is greater than the maximum of 9223372036854775807");
  std::string coef = step_doc(0, plain);
  coef.replace(coef.find(R"("x": 1.0)"), 8, R"("x": 1e308)");
  EXPECT_ERROR(ilf::Plan::parse(plan_doc(1, coef), "coef"), config, "plan 'p' step 0: coefficient x 1e+308 is outside -10000..10000");
  std::string history = step_doc(0, plain);
  history.replace(history.find(R"("x0_eps": -1.0)"), 14, R"("x0_eps": -1.0, "history": [0.5])");
  EXPECT_ERROR(ilf::Plan::parse(plan_doc(1, history), "h"), config, "1 history coefficients; a step has at most 2");
  std::string steps;
  for (int i = 0; i < 1001; ++i) steps += (i ? "," : "") + step_doc(i, plain);
  EXPECT_ERROR(ilf::Plan::parse(plan_doc(1, steps), "long"), config, "plan 'p' has 1001 steps; a plan has at most 1000");

  const std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 4, 100000, 100000), }";
  std::string npy = std::string("\x93NUMPY\x01\x00", 8) + static_cast<char>(header.size() + 1) + '\0' + header + "\n";
  write(tmpdir + "/claims.npy", npy + std::string(64, '\0'));
  EXPECT_ERROR(ilf::detail::read_npy(tmpdir + "/claims.npy"), config, "its header claims (1, 4, 100000, 100000) <f4 (160000000000 bytes) but the file holds 64");
  write(tmpdir + "/empty.npy", "");
  EXPECT_ERROR(ilf::detail::read_npy(tmpdir + "/empty.npy"), config, "the file is empty");

  ilf::Manifest pixart;
  pixart.architecture = "pixart-sigma";
  ilf::RequestFields fields;
  CHECK(!ilf::request_problem(pixart, fields));
  fields.guidance_scale = 31;
  CHECK(ilf::request_problem(pixart, fields)->message == "guidance_scale must be in 0..30, got 31");
  fields.guidance_scale = 1e308;
  CHECK(ilf::request_problem(pixart, fields)->message == "guidance_scale must be in 0..30, got 1e+308");
  fields.guidance_scale.reset();
  fields.prompt = "\t\u3000";
  CHECK(ilf::request_problem(pixart, fields)->message == "prompt must not be empty");
  fields.prompt = std::string("a \xed\xa0\x80 b");  // a UTF-8-encoded surrogate: not text
  CHECK(ilf::request_problem(pixart, fields)->message == "prompt is not valid UTF-8 text");
  fields.prompt = std::string(4001, 'a');
  CHECK(ilf::request_problem(pixart, fields)->message == "prompt is 4001 characters long; at most 4000 are accepted");
  fields.prompt = "a cat";
  fields.seed = 4294967296;
  CHECK(ilf::request_problem(pixart, fields)->message == "seed must be <= 4294967295, got 4294967296");
  fields.seed = 0;
  fields.height = 4294967360;
  auto side = ilf::request_problem(pixart, fields);
  CHECK(side->param == "height" && side->message == "height must be in 1..4096 pixels, got 4294967360");
}

void test_state_manifest() {
  // schema 4: the model's state fields and several tokenizers (an MMDiT); refused in a schema 2 manifest
  FakeBundle mmdit("mmdit");
  mmdit.schema_version = 4;
  mmdit.tokenizer = "null";
  mmdit.files["tokenizer/tokenizer_2.json"] = "{}";
  const std::string state = R"("state": ["hidden", "text"], "state_init": {"text": "text_context"}, "token_layout": "packed",
      "guidance": "embedded", "position_ids": true, )";
  const std::string tokenizers = R"(, "tokenizers": [{"file": "tokenizer/tokenizer.json", "max_length": 8, "pad_id": 0, "input": "input_ids"},
      {"file": "tokenizer/tokenizer_2.json", "max_length": 16, "pad_id": 1, "input": "input_ids_2"}])";
  mmdit.manifest_extra = tokenizers;
  auto with_state = [&](FakeBundle& b) {
    return [&b, state](const std::string& r) {
      std::string m = b.manifest();
      m.insert(m.find("\"context_inputs\""), state);
      write(r + "/manifest.json", m);
      write(r + "/manifest.sha256", "sha256:" + hex_of(m));
    };
  };
  ilf::Bundle b = ilf::Bundle::load(mmdit.write_all(with_state(mmdit)));
  const ilf::Manifest& m = b.manifest();
  CHECK(m.schema_version == 4 && m.model.state == std::vector<std::string>({"hidden", "text"}));
  CHECK(m.model.state_init.at("text") == "text_context" && m.model.token_layout == "packed" && m.model.guidance == "embedded");
  CHECK(m.model.position_ids && !m.tokenizer && m.tokenizers.size() == 2 && m.tokenizers[1].input == "input_ids_2" &&
        m.tokenizers[1].max_length == 16 && m.tokenizers[1].pad_id == 1);
  CHECK(b.image_tokens(8, 12) == 24);
  ilf_bundle* cb = ilf_bundle_open(mmdit.root.c_str(), nullptr);
  CHECK(cb && ilf_bundle_num_tokenizers(cb) == 2 && std::string(ilf_bundle_tokenizer_input(cb, 1)) == "input_ids_2");
  CHECK(ilf_bundle_tokenizer_max_length(cb, 0) == 8 && ilf_bundle_tokenizer_input(cb, 2) == nullptr);
  ilf_bundle_free(cb);

  FakeBundle old("old-state");  // schema 2 with a schema 4 field
  EXPECT_ERROR(ilf::Bundle::load(old.write_all(with_state(old))), bundle,
               "does not follow the manifest schema at (top level): Target should not validate against schema specified in 'not' constraint");
  FakeBundle old_tok("old-tokenizers");
  old_tok.manifest_extra = R"(, "tokenizers": [])";
  EXPECT_ERROR(ilf::Bundle::load(old_tok.write_all()), bundle, "does not follow the manifest schema at (top level): Target should not validate");
  FakeBundle unhashed("unhashed");
  unhashed.schema_version = 4;
  unhashed.manifest_extra = R"(, "tokenizers": [{"file": "tokenizer_9/tokenizer.json", "max_length": 8, "pad_id": 0, "input": "x"}])";
  EXPECT_ERROR(ilf::Bundle::load(unhashed.write_all()), bundle, "names tokenizer_9/tokenizer.json but does not list its sha256");
  FakeBundle open_tok("open-tokenizer");
  open_tok.schema_version = 4;
  open_tok.manifest_extra = R"(, "tokenizers": [{"file": "tokenizer/tokenizer.json", "max_length": 8, "pad_id": 0, "input": "x", "y": 1}])";
  EXPECT_ERROR(ilf::Bundle::load(open_tok.write_all()), bundle, "at tokenizers/0: Object contains a property that could not be validated using 'properties' or 'additionalProperties' constraints: 'y'");
  FakeBundle layout("layout");
  layout.schema_version = 4;
  EXPECT_ERROR(ilf::Bundle::load(layout.write_all([&](const std::string& r) {
                 std::string text = layout.manifest();
                 text.insert(text.find("\"context_inputs\""), R"("token_layout": "rows", )");
                 write(r + "/manifest.json", text);
                 write(r + "/manifest.sha256", "sha256:" + hex_of(text));
               })),
               bundle, "at model/token_layout: Failed to match against any enum values (got 'rows')");
}

void test_preprocess_and_c_api() {
  CHECK(ilf::preprocess_prompt("  A Red CIRCLE\t\n") == "a red circle");
  CHECK(ilf::preprocess_prompt("\xc3\x9c" "BER Stra\xc3\x9f" "e ") == "\xc3\xbc" "ber stra\xc3\x9f" "e");  // ÜBER Straße
  CHECK(ilf::preprocess_prompt("\xe3\x80\x80x\xc2\xa0") == "x");  // ideographic and no-break spaces
  CHECK(ilf::preprocess_prompt("") == "");

  CHECK(std::string(ilf_version()) == ilf::version());
  CHECK(ilf_bundle_open((tmpdir + "/nothing").c_str(), nullptr) == nullptr);
  CHECK(std::string(ilf_last_error()).find("is not a bundle") != std::string::npos);
  FakeBundle good("capi");
  ilf_bundle* b = ilf_bundle_open(good.write_all().c_str(), nullptr);
  CHECK(b != nullptr && std::string(ilf_last_error()).empty());
  CHECK(std::string(ilf_bundle_default_plan(b)) == "base-2" && std::string(ilf_bundle_architecture(b)) == "pixart-alpha");
  ilf_bundle_free(b);
  ilf_request r;
  ilf_request_init(&r);
  CHECK(r.struct_size == sizeof r && r.class_label == -1 && std::isnan(r.guidance_scale) && r.prompt == nullptr);
  CHECK(ilf_generate(nullptr, nullptr, &r, nullptr, 0, nullptr) == ILF_ERROR_CONFIG);
  CHECK(std::string(ilf_last_error()) == "generator is NULL");
  ilf_image img = ILF_IMAGE_INIT;
  CHECK(ilf_write_png((tmpdir + "/x.png").c_str(), &img) == ILF_ERROR_CONFIG);
  CHECK(std::string(ilf_last_error()) == "image->rgb is NULL");
  // versioned structs: a struct_size this library does not know is refused, not read past
  uint8_t rgb[3] = {1, 2, 3};
  ilf_image old_image = {sizeof(ilf_image) - 8, rgb, 1, 1};
  CHECK(ilf_write_png((tmpdir + "/x.png").c_str(), &old_image) == ILF_ERROR_CONFIG);
  CHECK(std::string(ilf_last_error()).find("image.struct_size is " + std::to_string(sizeof(ilf_image) - 8) + ", not " +
                                           std::to_string(sizeof(ilf_image)) + " (set it with ILF_IMAGE_INIT") == 0);
  ilf_image one_pixel = {sizeof(ilf_image), rgb, 1, 1};
  CHECK(ilf_write_png((tmpdir + "/x.png").c_str(), &one_pixel) == ILF_OK);
  ilf_request bigger;
  ilf_request_init_sized(&bigger, sizeof bigger + 8);  // as a program built against a newer ilf.h
  CHECK(bigger.struct_size == sizeof bigger + 8);
  ilf_openvino_options options;
  ilf_openvino_options_init(&options);
  CHECK(options.struct_size == sizeof options && options.cache == 1 && options.device == nullptr);
  ilf_images none = ILF_IMAGES_INIT;
  ilf_images_free(&none);  // nothing decoded: nothing to free
  CHECK(none.images == nullptr && none.count == 0);
}

int generate_batch(const std::string& spec_path) {
  nlohmann::json spec;
  std::ifstream(spec_path) >> spec;
  ilf::Bundle bundle = ilf::Bundle::load(spec.at("bundle").get<std::string>());
  ilf::Generator generator(bundle, ilf::make_openvino_engine(bundle));
  std::vector<ilf::Request> requests;
  std::vector<ilf::Tensor> latents;
  for (auto& r : spec.at("requests")) {
    ilf::Request request;
    request.height = spec.at("height").get<int>();
    request.width = spec.at("width").get<int>();
    if (r.contains("guidance_scale")) request.guidance_scale = r["guidance_scale"].get<double>();
    for (auto& [name, ids] : r.at("tokens").items()) request.tokens.inputs[name] = ids.get<std::vector<int64_t>>();
    if (r.contains("negative_tokens"))
      for (auto& [name, ids] : r["negative_tokens"].items()) request.negative_tokens.inputs[name] = ids.get<std::vector<int64_t>>();
    requests.push_back(request);
    latents.push_back(ilf::detail::read_npy(r.at("latents").get<std::string>()));
  }
  ilf::Tensor out = generator.generate_batch(bundle.plan(spec.at("plan").get<std::string>()), requests, &latents);
  ilf::detail::write_npy(spec.at("out").get<std::string>(), out);
  std::cout << nlohmann::json(generator.last_block_forwards()).dump() << "\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 3 && std::string(argv[1]) == "--batch") {
    try {
      return generate_batch(argv[2]);
    } catch (const std::exception& e) {
      std::cerr << "error: " << e.what() << "\n";
      return 2;
    }
  }
  if (argc == 4 && std::string(argv[1]) == "--to-half") {
    ilf::Tensor in = ilf::detail::read_npy(argv[2]);
    ilf::Tensor half(ilf::DType::f16, in.shape()), back(ilf::DType::f32, {2, in.numel()});
    for (int64_t i = 0; i < in.numel(); ++i) {
      half.f16_data()[i] = ilf::detail::float_to_half(in.f32_data()[i]);
      back.f32_data()[i] = ilf::detail::half_to_float(half.f16_data()[i]);
      back.f32_data()[in.numel() + i] = half.value(i);
    }
    ilf::detail::write_npy(std::string(argv[3]) + ".f16.npy", half);
    ilf::detail::write_npy(argv[3], back);
    return 0;
  }
  if (argc > 1 && std::string(argv[1]) == "--sha-lengths") {
    std::string data;
    for (int n = 0; n <= 300; ++n) {
      std::cout << n << " " << ilf::detail::sha256_hex(data.data(), data.size()) << "\n";
      data += static_cast<char>(n % 251);
    }
    std::string big(1048593, '\0');
    for (size_t i = 0; i < big.size(); ++i) big[i] = static_cast<char>(i % 251);
    std::cout << big.size() << " " << ilf::detail::sha256_hex(big.data(), big.size()) << "\n";
    return 0;
  }
  char tmpl[] = "/tmp/ilf-tests-XXXXXX";
  if (!mkdtemp(tmpl)) return 2;
  tmpdir = tmpl;
  test_sha256();
  test_tensor_values();
  test_npy_png();
  test_bundle_reader();
  test_plan_versions();
  test_state_manifest();
  test_bounds_and_contract();
  test_preprocess_and_c_api();
  ilf_tests::test_denoise(tmpdir);
  std::string cleanup = "rm -rf '" + tmpdir + "'";
  if (std::system(cleanup.c_str()) != 0) std::cerr << "could not remove " << tmpdir << "\n";
  std::cout << checks - failures << "/" << checks << " checks passed\n";
  return failures ? 1 : 0;
}
