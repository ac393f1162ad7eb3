# Helpers for tropd's own targets (tests, benchmarks, examples).
# None of them is ever applied to the INTERFACE target `tropd`.

include_guard(GLOBAL)

# Fails configuration when include/tropd/version.hpp disagrees with
# project(tropd VERSION ...).
function(tropd_check_version_header header)
  file(STRINGS "${header}" _lines REGEX "^#define TROPD_VERSION_(MAJOR|MINOR|PATCH) ")
  foreach(_part MAJOR MINOR PATCH)
    set(_value "")
    foreach(_line IN LISTS _lines)
      if(_line MATCHES "^#define TROPD_VERSION_${_part} +([0-9]+)")
        set(_value "${CMAKE_MATCH_1}")
      endif()
    endforeach()
    list(APPEND _header_version "${_value}")
  endforeach()
  list(JOIN _header_version "." _header_version)
  if(NOT _header_version STREQUAL PROJECT_VERSION)
    message(FATAL_ERROR
      "tropd: ${header} says version '${_header_version}' but project() says "
      "'${PROJECT_VERSION}'. Update both together.")
  endif()
endfunction()

# -Wall -Wextra -Wpedantic (-Werror unless TROPD_WARNINGS_AS_ERRORS is OFF) on
# one of tropd's own targets. Third-party headers come in as SYSTEM includes
# (imported targets), so their warnings do not count.
function(tropd_project_warnings target)
  set(_cxx -Wall -Wextra -Wpedantic)
  # nvcc: warnings of the host compiler on the host side of .cu files, plus
  # nvcc's own diagnostics. -Wpedantic is left out there: nvcc's generated
  # host code is not pedantic-clean.
  set(_cuda -Xcompiler=-Wall,-Wextra)
  # GCC 12 reports -Wmaybe-uninitialized inside its own AVX-512 intrinsics
  # (_mm512_undefined_*) when Eigen's vectorised exp is inlined with -march=native
  # (GCC bug 105593, fixed in GCC 13): silence that one false positive there. At -O3
  # (Release benchmarks) the same bug is reported as -Wuninitialized.
  if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU" AND CMAKE_CXX_COMPILER_VERSION VERSION_LESS 13)
    list(APPEND _cxx -Wno-maybe-uninitialized -Wno-uninitialized)
  endif()
  if(TROPD_WARNINGS_AS_ERRORS)
    list(APPEND _cxx -Werror)
    list(APPEND _cuda -Xcompiler=-Werror -Werror=all-warnings)
  endif()
  target_compile_options(${target} PRIVATE
    "$<$<COMPILE_LANGUAGE:CXX>:${_cxx}>"
    "$<$<COMPILE_LANGUAGE:CUDA>:${_cuda}>")
endfunction()

# Sanitizers from TROPD_SANITIZE ("", "address,undefined", "thread") on one of
# tropd's own targets. Host C++ only: nvcc does not take -fsanitize.
function(tropd_project_sanitizers target)
  if(TROPD_SANITIZE STREQUAL "")
    return()
  endif()
  if(NOT TROPD_SANITIZE MATCHES "^(address,undefined|undefined,address|address|undefined|thread)$")
    message(FATAL_ERROR "tropd: TROPD_SANITIZE='${TROPD_SANITIZE}' is not one of "
      "\"\", \"address,undefined\", \"thread\"")
  endif()
  # A comma inside a generator expression must be spelled $<COMMA>.
  string(REPLACE "," "$<COMMA>" _list "${TROPD_SANITIZE}")
  target_compile_options(${target} PRIVATE
    "$<$<COMPILE_LANGUAGE:CXX>:-fsanitize=${_list};-fno-sanitize-recover=all;-fno-omit-frame-pointer>")
  target_link_options(${target} PRIVATE "-fsanitize=${TROPD_SANITIZE}")
endfunction()

# -march=native for host C++ of tests and benchmarks (never the library target).
function(tropd_native_arch target)
  if(TROPD_MARCH_NATIVE)
    target_compile_options(${target} PRIVATE "$<$<COMPILE_LANGUAGE:CXX>:-march=native>")
  endif()
endfunction()

# Options of tropd's own CUDA targets: C++20 for nvcc (CMake 3.25 does not know cuda_std_20
# for nvcc 13, so the flag is passed directly) and, with TROPD_CUDA_LINEINFO, -lineinfo: a
# source-line table in the binary (no change to the generated SASS), read by compute-sanitizer,
# Nsight Compute and scripts/gpu_counts.sh.
function(tropd_cuda_options target)
  target_compile_options(${target} PRIVATE "$<$<COMPILE_LANGUAGE:CUDA>:-std=c++20>")
  if(TROPD_CUDA_LINEINFO)
    target_compile_options(${target} PRIVATE "$<$<COMPILE_LANGUAGE:CUDA>:-lineinfo>")
  endif()
endfunction()

# Everything a tropd-owned target gets: strict C++20 (no GNU extensions),
# warnings and sanitizers.
function(tropd_project_target target)
  set_target_properties(${target} PROPERTIES CXX_EXTENSIONS OFF)
  tropd_project_warnings(${target})
  tropd_project_sanitizers(${target})
endfunction()
