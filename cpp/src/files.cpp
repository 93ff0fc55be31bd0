// The small file helpers of internal.hpp.
#include <sys/stat.h>
#include <unistd.h>

#include <charconv>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <random>

#include "internal.hpp"

namespace ilf::detail {

// -- files --------------------------------------------------------------------------------------


std::string py_float(double value) {
  char buf[64];
  auto res = std::to_chars(buf, buf + sizeof buf, value);
  std::string s(buf, res.ptr);
  if (s.find_first_of(".en") == std::string::npos) s += ".0";
  return s;
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) bundle_error(path + " is unreadable: " + std::strerror(errno));
  std::string data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) bundle_error(path + " is unreadable: " + std::strerror(errno));
  return data;
}

bool is_file(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

bool is_dir(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

std::string join_path(const std::string& a, const std::string& b) {
  if (a.empty()) return b;
  return a.back() == '/' ? a + b : a + "/" + b;
}

bool write_atomic(const std::string& path, const std::string& data, std::string* why) {
  auto slash = path.rfind('/');
  std::string dir = slash == std::string::npos ? "." : path.substr(0, slash);
  std::string name = slash == std::string::npos ? path : path.substr(slash + 1);
  std::random_device rd;
  std::string tmp = dir + "/." + name + "." + std::to_string(::getpid()) + "." + std::to_string(rd());
  FILE* f = std::fopen(tmp.c_str(), "wb");
  if (!f) {
    if (why) *why = std::strerror(errno);
    return false;
  }
  bool ok = std::fwrite(data.data(), 1, data.size(), f) == data.size();
  ok = (std::fclose(f) == 0) && ok;
  if (ok) ok = std::rename(tmp.c_str(), path.c_str()) == 0;
  if (!ok) {
    if (why) *why = std::strerror(errno);
    std::remove(tmp.c_str());
  }
  return ok;
}


}  // namespace ilf::detail
