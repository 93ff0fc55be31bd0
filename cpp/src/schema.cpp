// The published JSON Schemas checked by a schema library (valijson), not by a hand copy of them.
//
// valijson implements draft 7; the schemas are 2020-12. The two 2020-12 keywords they use are renamed
// to their draft 7 spelling when the schema is compiled (prefixItems -> the array form of items,
// dependentRequired -> dependencies): the same rules, so the published file stays the one source.
#include "schema.hpp"

#include <valijson/adapters/nlohmann_json_adapter.hpp>
#include <valijson/schema.hpp>
#include <valijson/schema_parser.hpp>
#include <valijson/validation_results.hpp>
#include <valijson/validator.hpp>

#include <cstdint>
#include <limits>
#include <memory>
#include <utility>
#include <vector>

#include "schemas.hpp"  // generated: kManifestSchemaJson, kPlanSchemaJson

namespace ilf::detail {

namespace {

using json = nlohmann::json;

/// 2020-12 keywords -> draft 7's, in place (see the file's comment).
void to_draft7(json& node) {
  if (node.is_object()) {
    if (node.contains("prefixItems") && !node.contains("items")) {
      node["items"] = std::move(node["prefixItems"]);
      node.erase("prefixItems");
    }
    if (node.contains("dependentRequired")) {
      node["dependencies"] = std::move(node["dependentRequired"]);
      node.erase("dependentRequired");
    }
    for (auto& [_, child] : node.items()) to_draft7(child);
  } else if (node.is_array()) {
    for (auto& child : node) to_draft7(child);
  }
}

std::unique_ptr<valijson::Schema> compile(const char* text) {
  json document = json::parse(text);
  to_draft7(document);
  auto schema = std::make_unique<valijson::Schema>();
  valijson::SchemaParser parser(valijson::SchemaParser::kDraft7);
  valijson::adapters::NlohmannJsonAdapter adapter(document);
  parser.populateSchema(adapter, *schema);
  return schema;
}

const valijson::Schema& compiled(SchemaName name) {
  // Compiled once per process, on first use (thread-safe: function-local statics).
  if (name == SchemaName::manifest) {
    static const std::unique_ptr<valijson::Schema> manifest = compile(kManifestSchemaJson);
    return *manifest;
  }
  static const std::unique_ptr<valijson::Schema> plan = compile(kPlanSchemaJson);
  return *plan;
}

/// Python's repr of a scalar, as the reader's other messages print values.
std::string shown(const json& v) {
  if (v.is_null()) return "None";
  if (v.is_boolean()) return v.get<bool>() ? "True" : "False";
  if (v.is_string()) return "'" + v.get<std::string>() + "'";
  std::string s = v.dump();
  return s.size() > 60 ? s.substr(0, 60) + "…" : s;
}

/// The first integer beyond int64 (nlohmann keeps it as uint64, which a validator would misread).
std::optional<std::string> beyond_int64(const json& node, const std::string& at) {
  if (node.is_number_unsigned() && node.get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
    return "at " + (at.empty() ? std::string("(top level)") : at) + ": " + node.dump() +
           " is greater than the maximum of " + std::to_string(std::numeric_limits<int64_t>::max());
  if (node.is_structured())
    for (auto& [key, child] : node.items())
      if (auto found = beyond_int64(child, at.empty() ? key : at + "/" + key)) return found;
  return std::nullopt;
}

/// valijson's context ("<root>", "[model]", "[0]") -> the path ("model/0") and the value there.
std::pair<std::string, const json*> locate(const json& document, const std::vector<std::string>& context) {
  std::string path;
  const json* node = &document;
  for (const std::string& part : context) {
    if (part.size() < 2 || part.front() != '[' || part.back() != ']') continue;  // "<root>"
    std::string key = part.substr(1, part.size() - 2);
    path += (path.empty() ? "" : "/") + key;
    if (node && node->is_object() && node->contains(key)) {
      node = &(*node)[key];
    } else if (node && node->is_array() && !key.empty() && key.size() < 19 &&
               key.find_first_not_of("0123456789") == std::string::npos &&
               std::stoull(key) < node->size()) {
      node = &(*node)[std::stoull(key)];
    } else {
      node = nullptr;
    }
  }
  return {path, node};
}

/// How telling an error is: a rule broken at a value (0), a wrong type (1: in a oneOf, every other
/// branch's type fails too), or one that only says a child failed (2).
int vagueness(const std::string& description) {
  if (description.rfind("Failed to validate", 0) == 0 || description.rfind("Cannot validate", 0) == 0) return 2;
  if (description.rfind("Value type not permitted", 0) == 0) return 1;
  return 0;
}

}  // namespace

std::optional<std::string> schema_problem(SchemaName name, const nlohmann::ordered_json& given) {
  const json document = given;
  if (auto found = beyond_int64(document, "")) return found;
  valijson::Validator validator(valijson::Validator::kStrongTypes);
  valijson::ValidationResults results;
  valijson::adapters::NlohmannJsonAdapter adapter(document);
  if (validator.validate(compiled(name), adapter, &results)) return std::nullopt;
  // valijson lists the broken rule and every ancestor that failed because of it: the deepest error is
  // the rule; among errors as deep (a oneOf's branches), the most telling
  const valijson::ValidationResults::Error* best = nullptr;
  for (const auto& error : results)
    if (!best || error.context.size() > best->context.size() ||
        (error.context.size() == best->context.size() && vagueness(error.description) < vagueness(best->description)))
      best = &error;
  std::vector<std::string> context = best->context;
  // A child that fails with no error of its own (a `false` schema, propertyNames): name the child
  const std::string wrapper = "Failed to validate against schema associated with property name '";
  if (best->description.rfind(wrapper, 0) == 0) {
    const std::string child = best->description.substr(wrapper.size(), best->description.rfind('\'') - wrapper.size());
    auto [_, parent] = locate(document, context);
    if (parent && parent->is_object() && parent->contains(child)) context.push_back("[" + child + "]");
  }
  auto [path, node] = locate(document, context);
  std::string message = best->description;
  while (!message.empty() && (message.back() == '.' || message.back() == ' ')) message.pop_back();
  if (node && node->is_primitive()) message += " (got " + shown(*node) + ")";
  return "at " + (path.empty() ? std::string("(top level)") : path) + ": " + message;
}

}  // namespace ilf::detail
