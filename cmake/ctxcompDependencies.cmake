# The library's own dependencies: Eigen 3.4 and xsimd 8.1. find_package first; with network,
# FetchContent fetches them when they are not installed (FIND_PACKAGE_ARGS).
include(FetchContent)

# Debian 12's xsimd 8.1 package exports a target that links a library `xtl` which Debian does not
# ship; an empty imported target satisfies it.
if(NOT TARGET xtl)
  add_library(xtl INTERFACE IMPORTED)
endif()

FetchContent_Declare(Eigen3
  GIT_REPOSITORY https://gitlab.com/libeigen/eigen.git
  GIT_TAG 3.4.0
  GIT_SHALLOW TRUE
  FIND_PACKAGE_ARGS 3.4 NO_MODULE)
FetchContent_Declare(xsimd
  GIT_REPOSITORY https://github.com/xtensor-stack/xsimd.git
  GIT_TAG 8.1.0
  GIT_SHALLOW TRUE
  FIND_PACKAGE_ARGS 8.1)
set(EIGEN_BUILD_DOC OFF CACHE BOOL "" FORCE)
set(BUILD_TESTING_SAVED ${BUILD_TESTING})
set(BUILD_TESTING OFF)
FetchContent_MakeAvailable(Eigen3 xsimd)
set(BUILD_TESTING ${BUILD_TESTING_SAVED})
if(NOT TARGET Eigen3::Eigen)
  add_library(Eigen3::Eigen ALIAS eigen)
endif()
