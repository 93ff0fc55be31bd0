// Another engine behind ilf::Engine: run one segment by name, named tensors in, named tensors out,
// then hand it to ilf::Generator. This one wraps the OpenVINO engine and counts the calls; a
// TensorRT engine would run BUNDLE/engines/NAME.plan per segment instead (docs/cpp.md).
//   ilf-example-engine BUNDLE PROMPT|CLASS [PLAN]
#include <ilf/ilf.hpp>

#include <iostream>
#include <map>
#include <memory>
#include <string>

class CountingEngine : public ilf::Engine {
 public:
  explicit CountingEngine(std::unique_ptr<ilf::Engine> inner) : inner_(std::move(inner)) {}
  std::string name() const override { return "counting " + inner_->describe(); }
  std::string variant() const override { return inner_->variant(); }  // the bundle variant it runs
  ilf::Feeds run(const std::string& segment, const ilf::Feeds& inputs) override {
    ++calls[segment];  // `inputs` are exactly the segment's declared inputs (manifest `segments`)
    return inner_->run(segment, inputs);
  }
  std::map<std::string, int> calls;

 private:
  std::unique_ptr<ilf::Engine> inner_;
};

int main(int argc, char** argv) {
  if (argc < 3) {
    std::cerr << "usage: " << argv[0] << " BUNDLE PROMPT|CLASS [PLAN]\n";
    return 2;
  }
  try {
    ilf::Bundle bundle = ilf::Bundle::load(argv[1]);
    auto engine = std::make_unique<CountingEngine>(ilf::make_openvino_engine(bundle));
    CountingEngine& counter = *engine;
    ilf::Generator generator(bundle, std::move(engine));
    ilf::Plan plan = bundle.plan(argc > 3 ? argv[3] : bundle.default_plan());
    ilf::Request request;
    if (bundle.manifest().architecture == "dit") request.class_label = std::stoll(argv[2]);
    else request.prompt = argv[2];
    generator.generate_latents(plan, request);
    std::cout << counter.name() << ", " << plan.name << " (" << plan.block_forwards() << " block forwards):";
    for (const auto& [segment, n] : counter.calls) std::cout << " " << segment << "=" << n;
    std::cout << "\n";
    return 0;
  } catch (const ilf::Error& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 2;
  }
}
