/* ILF_API: what libilf exports. The library is built with -fvisibility=hidden, so only the
 * declarations marked ILF_API (the C API, the public C++ classes and functions) are in its dynamic
 * symbol table; everything else (ilf::detail, OpenVINO, nlohmann-json) stays inside it. */
#ifndef ILF_EXPORT_H
#define ILF_EXPORT_H

#if defined(__GNUC__) || defined(__clang__)
#define ILF_API __attribute__((visibility("default")))
#else
#define ILF_API
#endif

#endif /* ILF_EXPORT_H */
