# Dependencies of the command-line tool, the tests and the I/O headers' users in this project:
# nlohmann-json (safetensors headers, config.json) and CLI11 (the `ctxcomp` tool).
include(FetchContent)
FetchContent_Declare(nlohmann_json
  GIT_REPOSITORY https://github.com/nlohmann/json.git
  GIT_TAG v3.11.2
  GIT_SHALLOW TRUE
  FIND_PACKAGE_ARGS 3.10)
FetchContent_Declare(CLI11
  GIT_REPOSITORY https://github.com/CLIUtils/CLI11.git
  GIT_TAG v2.1.2
  GIT_SHALLOW TRUE
  FIND_PACKAGE_ARGS 2.1)
FetchContent_MakeAvailable(nlohmann_json CLI11)
