# Run by CTest (label `install`) as `cmake -D... -P run_consumer_test.cmake`.
# Inputs: TROPD_SOURCE_DIR TROPD_BINARY_DIR WORK_DIR MODE (find_package |
# add_subdirectory) CONFIG GENERATOR MAKE_PROGRAM CXX_COMPILER Eigen3_DIR
# EXPECTED_VERSION.
cmake_minimum_required(VERSION 3.25)

foreach(var TROPD_SOURCE_DIR TROPD_BINARY_DIR WORK_DIR MODE GENERATOR EXPECTED_VERSION)
  if(NOT DEFINED ${var} OR "${${var}}" STREQUAL "")
    message(FATAL_ERROR "run_consumer_test.cmake: ${var} is not set")
  endif()
endforeach()
if(NOT CONFIG)
  set(CONFIG Release)
endif()

set(prefix "${WORK_DIR}/prefix")
set(build "${WORK_DIR}/consumer-${MODE}")
file(REMOVE_RECURSE "${build}")

function(run)
  string(REPLACE ";" " " shown "${ARGV}")
  message(STATUS "run: ${shown}")
  execute_process(COMMAND ${ARGV} RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "FAILED (${rc}): ${shown}")
  endif()
endfunction()

set(configure_args -S "${TROPD_SOURCE_DIR}/tests/consumer" -B "${build}" -G "${GENERATOR}"
  "-DCMAKE_BUILD_TYPE=${CONFIG}" "-DTROPD_CONSUMER_MODE=${MODE}")
if(MAKE_PROGRAM)
  list(APPEND configure_args "-DCMAKE_MAKE_PROGRAM=${MAKE_PROGRAM}")
endif()
if(CXX_COMPILER)
  list(APPEND configure_args "-DCMAKE_CXX_COMPILER=${CXX_COMPILER}")
endif()
if(Eigen3_DIR)
  list(APPEND configure_args "-DEigen3_DIR=${Eigen3_DIR}")
endif()

if(MODE STREQUAL "find_package")
  file(REMOVE_RECURSE "${prefix}")
  run("${CMAKE_COMMAND}" --install "${TROPD_BINARY_DIR}" --prefix "${prefix}" --config "${CONFIG}")
  if(NOT EXISTS "${prefix}/include/tropd/version.hpp")
    message(FATAL_ERROR "install did not put tropd/version.hpp under ${prefix}/include")
  endif()
  list(APPEND configure_args "-DCMAKE_PREFIX_PATH=${prefix}")
elseif(MODE STREQUAL "add_subdirectory")
  list(APPEND configure_args "-DTROPD_CONSUMER_SOURCE_DIR=${TROPD_SOURCE_DIR}")
else()
  message(FATAL_ERROR "run_consumer_test.cmake: unknown MODE '${MODE}'")
endif()

run("${CMAKE_COMMAND}" ${configure_args})
run("${CMAKE_COMMAND}" --build "${build}" --config "${CONFIG}")

# Single-config generators put the executable at the top of the build tree,
# multi-config ones under <config>/.
set(exe "${build}/tropd_consumer")
if(NOT EXISTS "${exe}")
  set(exe "${build}/${CONFIG}/tropd_consumer")
endif()
execute_process(COMMAND "${exe}" RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
message(STATUS "consumer output: ${out}")
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "consumer exited with ${rc}")
endif()
if(NOT out MATCHES "tropd ${EXPECTED_VERSION} ")
  message(FATAL_ERROR "consumer did not print 'tropd ${EXPECTED_VERSION}'")
endif()
message(STATUS "tropd consumer (${MODE}): OK")
