// Argument-check messages of the extension, built without iostreams.
//
// On the H200 machine (torch 2.11.0+cu130, the extension built there) a TORCH_CHECK whose
// message streamed an integer, or a shape (printed integer by integer), killed the process
// with a segmentation fault, while messages made of strings and dtypes raised normally:
// c10::str formats its arguments through std::ostringstream, whose number formatting is the
// part that crashed. DOCQA_CHECK_VALUE / DOCQA_CHECK_TYPE turn every argument into a
// std::string first (std::to_string, c10::toString, Device::str), so TORCH_CHECK only ever
// receives one string. The message is built only when the check fails.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <string>
#include <type_traits>

namespace docqa_fast {
namespace detail {

inline std::string piece(const char* s) { return s; }
inline std::string piece(const std::string& s) { return s; }
inline std::string piece(at::ScalarType t) { return c10::toString(t); }
inline std::string piece(const at::Device& d) { return d.str(); }

// Shapes print as c10 prints them: [2, 3].
inline std::string piece(at::IntArrayRef shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) out += ", ";
    out += std::to_string(shape[i]);
  }
  return out + "]";
}

template <typename T, std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, bool>, int> = 0>
std::string piece(T value) {
  return std::to_string(value);
}

}  // namespace detail

template <typename... Args>
std::string message(const Args&... args) {
  std::string out;
  ((out += detail::piece(args)), ...);
  return out;
}

}  // namespace docqa_fast

#define DOCQA_CHECK_VALUE(cond, ...) TORCH_CHECK_VALUE(cond, ::docqa_fast::message(__VA_ARGS__))
#define DOCQA_CHECK_TYPE(cond, ...) TORCH_CHECK_TYPE(cond, ::docqa_fast::message(__VA_ARGS__))
