# The llama.cpp bridge (CTXCOMP_LLAMACPP): finds a user's llama.cpp (find_package(llama), with
# CTXCOMP_LLAMACPP_ROOT added to the search path), or else fetches and builds stock llama.cpp
# v0.4.0 with cmake/llamacpp/fetch_llamacpp.sh (kept in CTXCOMP_LLAMACPP_CACHE between runs).
# Defines ctxcomp::llamacpp: the library plus llama.cpp, for code that includes
# <ctxcomp/engines/llamacpp.hpp>.
set(CTXCOMP_LLAMACPP_ROOT "" CACHE PATH "A llama.cpp install prefix (holds lib/cmake/llama); empty: find_package, then fetch")
set(CTXCOMP_LLAMACPP_CACHE "$ENV{HOME}/.cache/ctxcomp/llamacpp-v0.4.0" CACHE PATH
    "Where fetch_llamacpp.sh keeps the llama.cpp v0.4.0 it builds")
if(CTXCOMP_LLAMACPP_ROOT)
  list(PREPEND CMAKE_PREFIX_PATH "${CTXCOMP_LLAMACPP_ROOT}")
endif()
find_package(llama CONFIG QUIET)
if(NOT llama_FOUND)
  if(CTXCOMP_LLAMACPP_ROOT)
    message(FATAL_ERROR "CTXCOMP_LLAMACPP_ROOT=${CTXCOMP_LLAMACPP_ROOT} holds no llama.cpp install (lib/cmake/llama/llama-config.cmake)")
  endif()
  message(STATUS "llama.cpp: none found; fetching and building v0.4.0 into ${CTXCOMP_LLAMACPP_CACHE} (once)")
  execute_process(COMMAND bash "${PROJECT_SOURCE_DIR}/cmake/llamacpp/fetch_llamacpp.sh" "${CTXCOMP_LLAMACPP_CACHE}"
                  OUTPUT_VARIABLE _ctxcomp_llama_prefix OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE _rc)
  if(NOT _rc EQUAL 0)
    message(FATAL_ERROR "llama.cpp: cmake/llamacpp/fetch_llamacpp.sh failed (${_rc}); see its output above")
  endif()
  string(REGEX REPLACE ".*\n" "" _ctxcomp_llama_prefix "${_ctxcomp_llama_prefix}")
  list(PREPEND CMAKE_PREFIX_PATH "${_ctxcomp_llama_prefix}")
  find_package(llama CONFIG REQUIRED)
endif()
message(STATUS "llama.cpp: ${llama_DIR}")
add_library(ctxcomp_llamacpp INTERFACE)
add_library(ctxcomp::llamacpp ALIAS ctxcomp_llamacpp)
target_link_libraries(ctxcomp_llamacpp INTERFACE ctxcomp::ctxcomp llama)
