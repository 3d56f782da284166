// The one include shim between the tests and Catch2 (2.13 from Debian, or 3.x).
#pragma once
#if __has_include(<catch2/catch_all.hpp>)
#include <catch2/catch_all.hpp>
#define CTXCOMP_CATCH3 1
#else
#include <catch2/catch.hpp>
#endif
