// The README's C++ example: open a bundle, run one of its plans on OpenVINO (f32), write a PNG.
//   ilf-example-cpp BUNDLE PROMPT|CLASS OUT.png [PLAN]
#include <ilf/ilf.hpp>

#include <iostream>
#include <string>

int main(int argc, char** argv) {
  if (argc < 4) {
    std::cerr << "usage: " << argv[0] << " BUNDLE PROMPT|CLASS OUT.png [PLAN]\n";
    return 2;
  }
  try {
    ilf::Bundle bundle = ilf::Bundle::load(argv[1]);  // the digest and every file's sha256 checked
    ilf::OpenVinoOptions options;                      // CPU, f32 pinned, compiled-model cache on
    ilf::Generator generator(bundle, ilf::make_openvino_engine(bundle, options));
    ilf::Plan plan = bundle.plan(argc > 4 ? argv[4] : bundle.default_plan());

    ilf::Request request;  // size and guidance left to the bundle's defaults
    if (bundle.manifest().architecture == "dit") request.class_label = std::stoll(argv[2]);
    else request.prompt = argv[2];
    request.seed = 7;
    ilf::Tensor latents = generator.generate_latents(plan, request);
    ilf::write_png(argv[3], generator.decode(latents).at(0));

    std::cout << plan.name << ": " << plan.block_forwards() << " block forwards, latents " << latents.shape_string()
              << " -> " << argv[3] << "\n";
    for (const auto& [segment, calls] : generator.timings().calls())
      std::cout << "  " << segment << " x" << calls.size() << ", " << generator.timings().total(segment) * 1e3 << " ms\n";
    return 0;
  } catch (const ilf::Error& e) {  // one line: a bad bundle, request or option
    std::cerr << "error: " << e.what() << "\n";
    return 2;
  }
}
