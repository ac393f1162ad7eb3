// tropd/config.hpp: compiler and platform switches shared by every header.
//
// TROPD_HD marks a function that runs on the host and, under nvcc, on the device.
// Host headers never include CUDA headers: a plain C++20 compiler sees TROPD_HD as empty.
#pragma once

#include <tropd/version.hpp>

#if defined(__CUDACC__)
#define TROPD_HD __host__ __device__
#define TROPD_DEVICE_COMPILE 1
#else
#define TROPD_HD
#define TROPD_DEVICE_COMPILE 0
#endif

#if defined(__CUDA_ARCH__)
#define TROPD_ON_DEVICE 1
#else
#define TROPD_ON_DEVICE 0
#endif

namespace tropd {
/// Signed size type used for every extent and index (tokens, vocabulary, top-k).
using index_t = long long;
}  // namespace tropd
