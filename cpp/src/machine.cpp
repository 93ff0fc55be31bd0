// What this machine is: CPU model and instruction-set flags (as ilf_deploy/backends/machine.py reads them).
#include <algorithm>
#include <fstream>
#include <regex>
#include <sstream>

#include "internal.hpp"

namespace ilf {
namespace {

std::string cpuinfo_field(const std::regex& key) {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    auto colon = line.find(':');
    if (colon == std::string::npos) continue;
    std::string name = line.substr(0, colon);
    name.erase(name.find_last_not_of(" \t") + 1);
    if (std::regex_match(name, key)) {
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
    std::string m = cpuinfo_field(std::regex("model name|Model|Hardware"));
    return m.empty() ? std::string("unknown") : m;
  }();
  return model;
}

std::vector<std::string> cpu_flags() {
  static const std::vector<std::string> flags = [] {
    static const std::regex isa("^(sse4_[12]|ssse3|avx\\w*|fma|f16c|amx\\w*|asimd\\w*|sve\\w*|sme\\w*|neon)$");
    std::istringstream in(cpuinfo_field(std::regex("flags|Features")));
    std::vector<std::string> out;
    std::string flag;
    while (in >> flag)
      if (std::regex_match(flag, isa)) out.push_back(flag);
    std::sort(out.begin(), out.end());
    return out;
  }();
  return flags;
}

bool cpu_has_flag(const std::string& flag) {
  auto flags = cpu_flags();
  return std::find(flags.begin(), flags.end(), flag) != flags.end();
}

}  // namespace ilf
