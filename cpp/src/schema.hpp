// The bundle format's published JSON Schemas (ilf_deploy/core/schemas/*.schema.json, embedded at build
// time), checked with valijson: what core/runtime/schemas' problem() does with the jsonschema library.
#pragma once

#include <nlohmann/json.hpp>

#include <optional>
#include <string>

namespace ilf::detail {

enum class SchemaName { manifest, plan };

/// The first place where `document` breaks the schema, in one line ("at model/num_blocks: Value type
/// not permitted by 'type' constraint (got '4')"); nullopt where it conforms. An integer beyond int64
/// is refused here too: every integer is read as 64 bits.
std::optional<std::string> schema_problem(SchemaName schema, const nlohmann::ordered_json& document);

}  // namespace ilf::detail
