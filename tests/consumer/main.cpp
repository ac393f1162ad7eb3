// Consumer of an installed (or add_subdirectory'd) tropd: prints the version.
#include <tropd/version.hpp>

// Once the umbrella header exists, the consumer also proves it compiles from the
// installed tree with nothing but tropd::tropd's usage requirements.
#if __has_include(<tropd/tropd.hpp>)
#include <tropd/tropd.hpp>
#endif

#include <Eigen/Core>  // tropd::tropd must carry Eigen's include path

#include <cstdio>

static_assert(__cplusplus >= 202002L, "tropd::tropd must request C++20");
static_assert(tropd::version_major == TROPD_VERSION_MAJOR);
static_assert(tropd::version_minor == TROPD_VERSION_MINOR);
static_assert(tropd::version_patch == TROPD_VERSION_PATCH);

int main() {
  const Eigen::Vector2d v(1.0, 2.0);
  std::printf("tropd %d.%d.%d (%s), eigen sum %g\n", tropd::version_major, tropd::version_minor,
              tropd::version_patch, tropd::version_string, v.sum());
  return v.sum() == 3.0 ? 0 : 1;
}
