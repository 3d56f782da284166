#!/usr/bin/env bash
# Obtains stock llama.cpp v0.4.0 (ggml 0.23.0) as the npm package node-llama-cpp@3.21.1 ships it
# (its source as a git bundle, llama/gitRelease.bundle, one commit 80fb11a), builds only the
# `llama` library (static, no server, tools, tests or examples) and installs it under PREFIX.
# Kept between runs: a PREFIX that already holds the install is reused as it is.
#
#   cmake/llamacpp/fetch_llamacpp.sh [PREFIX]   (default $CTXCOMP_LLAMACPP_CACHE or
#                                                ~/.cache/ctxcomp/llamacpp-v0.4.0)
# Prints the install directory (for CMAKE_PREFIX_PATH) on its last line. Needs npm, git, cmake
# and a C++ compiler; the npm registry is the only network access.
set -euo pipefail
version=3.21.1
commit=80fb11a
prefix=${1:-${CTXCOMP_LLAMACPP_CACHE:-$HOME/.cache/ctxcomp/llamacpp-v0.4.0}}
install=$prefix/install
if [ -f "$install/lib/cmake/llama/llama-config.cmake" ]; then
  echo "llama.cpp: using the build in $install" >&2
  echo "$install"
  exit 0
fi
for tool in npm git cmake; do
  command -v "$tool" >/dev/null || { echo "llama.cpp: '$tool' is needed to fetch and build llama.cpp" >&2; exit 1; }
done
work=$prefix/work
rm -rf "$work"
mkdir -p "$work"
cd "$work"
echo "llama.cpp: fetching node-llama-cpp@$version from the npm registry" >&2
npm pack "node-llama-cpp@$version" --silent >/dev/null
tar xzf "node-llama-cpp-$version.tgz" package/llama/gitRelease.bundle
git clone -q package/llama/gitRelease.bundle src 2>/dev/null
got=$(git -C src rev-parse --short=7 HEAD)
[ "$got" = "$commit" ] || { echo "llama.cpp: the bundle holds commit $got, expected $commit" >&2; exit 1; }
jobs=$(nproc 2>/dev/null || echo 2)
echo "llama.cpp: building the llama library ($jobs jobs)" >&2
cmake -S src -B build -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DCMAKE_POSITION_INDEPENDENT_CODE=ON \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
  -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF -DCMAKE_INSTALL_PREFIX="$install" >&2
cmake --build build --target llama -j "$jobs" >&2
cmake --install build >&2
rm -rf package "node-llama-cpp-$version.tgz"
echo "$install"
