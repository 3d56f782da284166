// Test runner entry point: Catch2 2 needs CATCH_CONFIG_MAIN in one translation unit; Catch2 3
// links Catch2::Catch2WithMain instead.
#if !__has_include(<catch2/catch_all.hpp>)
#define CATCH_CONFIG_MAIN
#endif
#include "catch.hpp"
