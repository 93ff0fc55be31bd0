// What this machine is: CPU model and instruction-set flags (as ilf_deploy/engines/backends/machine.py reads them).
#include <algorithm>
#include <fstream>
#include <sstream>

#include "internal.hpp"

namespace ilf::detail {
namespace {

std::string cpuinfo_field(std::initializer_list<const char*> keys) {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    auto colon = line.find(':');
    if (colon == std::string::npos) continue;
    std::string name = line.substr(0, colon);
    name.erase(name.find_last_not_of(" \t") + 1);
    if (std::any_of(keys.begin(), keys.end(), [&](const char* k) { return name == k; })) {
      std::string value = line.substr(colon + 1);
      value.erase(0, value.find_first_not_of(" \t"));
      return value;
    }
  }
  return "";
}

}  // namespace

std::string cpu_model() {
  static const std::string model = [] {
    std::string m = cpuinfo_field({"model name", "Model", "Hardware"});
    return m.empty() ? std::string("unknown") : m;
  }();
  return model;
}

std::vector<std::string> cpu_flags() {
  static const std::vector<std::string> flags = [] {
    // machine.py's ^(sse4_[12]|ssse3|avx\w*|fma|f16c|amx\w*|asimd\w*|sve\w*|sme\w*|neon)$
    auto isa = [](const std::string& f) {
      for (const char* exact : {"sse4_1", "sse4_2", "ssse3", "fma", "f16c", "neon"})
        if (f == exact) return true;
      for (const char* prefix : {"avx", "amx", "asimd", "sve", "sme"})
        if (f.rfind(prefix, 0) == 0) return true;
      return false;
    };
    std::istringstream in(cpuinfo_field({"flags", "Features"}));
    std::vector<std::string> out;
    std::string flag;
    while (in >> flag)
      if (isa(flag)) out.push_back(flag);
    std::sort(out.begin(), out.end());
    return out;
  }();
  return flags;
}

bool cpu_has_flag(const std::string& flag) {
  auto flags = cpu_flags();
  return std::find(flags.begin(), flags.end(), flag) != flags.end();
}

}  // namespace ilf::detail
