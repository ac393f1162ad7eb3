// The single main() of the host test executable `tropd-tests`.
// Every tests/test_*.cpp is compiled into the same binary (see tests/CMakeLists.txt).
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>
