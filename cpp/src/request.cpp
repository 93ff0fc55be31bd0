// The request contract (ilf_deploy/core/runtime/request.py): the limits and one-line messages of
// ilf_deploy/core/schemas/request-contract.json, embedded at build time (CMakeLists.txt), so that ilf-run
// and every Python front door refuse the same requests in the same words.
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <set>

#include "internal.hpp"
#include "request_contract.hpp"  // generated: kRequestContractJson

namespace ilf {

namespace {

using json = nlohmann::json;

const json& contract() {
  static const json data = json::parse(detail::kRequestContractJson);
  return data;
}

/// UTF-8 -> code points; false for anything Python's strict decoder refuses (overlong forms,
/// surrogates, beyond U+10FFFF, truncated sequences).
bool decode_utf8(const std::string& text, std::vector<char32_t>* out) {
  const auto* s = reinterpret_cast<const unsigned char*>(text.data());
  const size_t n = text.size();
  for (size_t i = 0; i < n;) {
    const unsigned char c = s[i];
    int extra = c < 0x80 ? 0 : (c >> 5) == 0x6 ? 1 : (c >> 4) == 0xe ? 2 : (c >> 3) == 0x1e ? 3 : -1;
    if (extra < 0 || i + extra >= n + (extra == 0 ? 1 : 0)) return false;
    char32_t cp = extra == 0 ? c : extra == 1 ? (c & 0x1f) : extra == 2 ? (c & 0x0f) : (c & 0x07);
    for (int k = 1; k <= extra; ++k) {
      if ((s[i + k] & 0xc0) != 0x80) return false;
      cp = (cp << 6) | (s[i + k] & 0x3f);
    }
    static const char32_t kMin[] = {0, 0x80, 0x800, 0x10000};
    if (cp < kMin[extra] || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return false;
    out->push_back(cp);
    i += extra + 1;
  }
  return true;
}

std::string format_g(double value) {
  char buffer[64];
  std::snprintf(buffer, sizeof buffer, "%g", value);
  return buffer;
}

}  // namespace

/// A message template with Python's format fields: {name}, {name!r} (a quoted string), {name:g}.
std::string detail::request_message(const std::string& verdict, const std::map<std::string, std::string>& text,
                                    const std::map<std::string, double>& numbers) {
  const std::string& tpl = contract()["messages"][verdict].get_ref<const std::string&>();
  std::string out;
  for (size_t i = 0; i < tpl.size(); ++i) {
    size_t close = tpl.find('}', i);
    if (tpl[i] != '{' || close == std::string::npos) {
      out += tpl[i];
      continue;
    }
    std::string field = tpl.substr(i + 1, close - i - 1), spec;
    size_t mark = field.find_first_of("!:");
    if (mark != std::string::npos) spec = field.substr(mark), field.resize(mark);
    if (spec == ":g") out += format_g(numbers.at(field));
    else if (spec == "!r") out += "'" + text.at(field) + "'";
    else out += text.at(field);
    i = close;
  }
  return out;
}

namespace {

std::string render(const std::string& verdict, const std::map<std::string, std::string>& text,
                   const std::map<std::string, double>& numbers = {}) {
  return detail::request_message(verdict, text, numbers);
}

int64_t limit(const char* name) { return contract()["limits"][name].get<int64_t>(); }

std::optional<RequestProblem> check_text(const std::string& param, const std::string& value, bool must_not_be_blank) {
  std::vector<char32_t> chars;
  if (!decode_utf8(value, &chars)) return RequestProblem{param, render("utf8", {{"param", param}})};
  const int64_t most = limit("max_prompt_chars");
  if (static_cast<int64_t>(chars.size()) > most)
    return RequestProblem{param, render("chars", {{"param", param},
                                                   {"count", std::to_string(chars.size())},
                                                   {"limit", std::to_string(most)}})};
  static const std::set<char32_t> spaces = [] {
    std::vector<char32_t> cps;
    decode_utf8(contract()["spaces"].get<std::string>(), &cps);
    return std::set<char32_t>(cps.begin(), cps.end());
  }();
  const bool blank = std::all_of(chars.begin(), chars.end(), [](char32_t c) { return spaces.count(c) > 0; });
  if (must_not_be_blank && blank) return RequestProblem{param, render("empty", {{"param", param}})};
  return std::nullopt;
}

}  // namespace

std::optional<RequestProblem> request_problem(const Manifest& manifest, const RequestFields& r) {
  const bool dit = manifest.architecture == "dit";
  if (!dit && r.prompt) {  // RequestContract.check's order: texts, class label, size, guidance, seed
    if (auto p = check_text("prompt", *r.prompt, true)) return p;
  }
  if (!dit && r.negative_prompt) {
    if (auto p = check_text("negative_prompt", *r.negative_prompt, false)) return p;
  }
  if (dit && r.class_label && !(0 <= *r.class_label && *r.class_label < manifest.model.num_classes))
    return RequestProblem{"class_label", render("class_label", {{"limit", std::to_string(manifest.model.num_classes - 1)},
                                                                {"value", std::to_string(*r.class_label)}})};
  const int64_t side = limit("max_side");
  for (auto& [name, value] : {std::make_pair(std::string("height"), r.height), std::make_pair(std::string("width"), r.width)})
    if (value && !(1 <= *value && *value <= side))  // 0 is refused, not taken for "the default"
      return RequestProblem{name, render("side", {{"param", name}, {"limit", std::to_string(side)}, {"value", std::to_string(*value)}})};
  const double most = contract()["limits"]["max_guidance"].get<double>();
  if (r.guidance_scale && !(std::isfinite(*r.guidance_scale) && 0.0 <= *r.guidance_scale && *r.guidance_scale <= most))
    return RequestProblem{"guidance_scale", render("guidance_scale", {}, {{"limit", most}, {"value", *r.guidance_scale}})};
  if (r.seed && *r.seed < 0) return RequestProblem{"seed", render("seed_low", {{"value", std::to_string(*r.seed)}})};
  if (r.seed && *r.seed > limit("max_seed"))
    return RequestProblem{"seed", render("seed_high", {{"limit", std::to_string(limit("max_seed"))}, {"value", std::to_string(*r.seed)}})};
  return std::nullopt;
}

}  // namespace ilf
