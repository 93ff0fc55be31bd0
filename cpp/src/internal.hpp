// Helpers shared by the library's sources; not installed.
#pragma once

#include <chrono>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "detail.hpp"
#include "ilf/ilf.hpp"

namespace ilf::detail {

[[noreturn]] inline void bundle_error(const std::string& message) { throw Error(Error::Kind::bundle, message); }
[[noreturn]] inline void config_error(const std::string& message) { throw Error(Error::Kind::config, message); }
[[noreturn]] inline void engine_error(const std::string& message) { throw Error(Error::Kind::engine, message); }

inline double now_s() {
  using clock = std::chrono::steady_clock;
  return std::chrono::duration<double>(clock::now().time_since_epoch()).count();
}

/// Python's repr of a list of strings: ['a', 'b'].
inline std::string py_list(const std::vector<std::string>& items) {
  std::string out = "[";
  for (size_t i = 0; i < items.size(); ++i) out += (i ? ", '" : "'") + items[i] + "'";
  return out + "]";
}

inline std::string join(const std::vector<std::string>& items, const std::string& sep) {
  std::string out;
  for (size_t i = 0; i < items.size(); ++i) out += (i ? sep : "") + items[i];
  return out;
}

/// A double as Python's repr prints it (shortest round-trip form).
std::string py_float(double value);

/// A message of the request contract (ilf_deploy/core/schemas/request-contract.json) with its fields filled:
/// {name} and {name!r} from `text`, {name:g} from `numbers` (request.cpp).
std::string request_message(const std::string& verdict, const std::map<std::string, std::string>& text,
                            const std::map<std::string, double>& numbers = {});

std::string read_file(const std::string& path);  // Error(bundle) naming the file
bool is_file(const std::string& path);
bool is_dir(const std::string& path);
std::string join_path(const std::string& a, const std::string& b);

}  // namespace ilf::detail

namespace ilf {
// The library's sources call these unqualified, as they did when they were public.
using detail::cpu_flags;
using detail::cpu_has_flag;
using detail::cpu_model;
using detail::float_to_half;
using detail::half_to_float;
using detail::read_npy;
using detail::sha256_file;
using detail::sha256_hex;
}  // namespace ilf
