// tropd/version.hpp: the library version, as macros (for #if) and as constants.
//
// Keep in sync with project(tropd VERSION ...) in the top-level CMakeLists.txt:
// configuring checks that both agree.
#pragma once

#define TROPD_VERSION_MAJOR 0
#define TROPD_VERSION_MINOR 1
#define TROPD_VERSION_PATCH 0

/// "MAJOR.MINOR.PATCH"
#define TROPD_VERSION_STRING "0.1.0"

/// MAJOR * 10000 + MINOR * 100 + PATCH, for numeric comparisons in #if.
#define TROPD_VERSION (TROPD_VERSION_MAJOR * 10000 + TROPD_VERSION_MINOR * 100 + TROPD_VERSION_PATCH)

namespace tropd {
inline constexpr int version_major = TROPD_VERSION_MAJOR;
inline constexpr int version_minor = TROPD_VERSION_MINOR;
inline constexpr int version_patch = TROPD_VERSION_PATCH;
inline constexpr int version = TROPD_VERSION;
inline constexpr char version_string[] = TROPD_VERSION_STRING;
}  // namespace tropd
