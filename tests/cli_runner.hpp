// Runs the `ctxcomp` tool built with the tests and captures its exit status and stderr.
#pragma once
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>

namespace ctxcomp::test {

struct CliRun {
  int status;
  std::string err;
};

/// Path of a scratch file in the temporary directory.
inline std::string tmp(const std::string& name) { return (std::filesystem::temp_directory_path() / name).string(); }

inline CliRun run_cli(const std::string& args) {
  const std::string errf = tmp("ctxcomp_cli_stderr.txt");
  const std::string cmd = std::string(CTXCOMP_CLI_PATH) + " " + args + " 2> " + errf + " > /dev/null";
  const int rc = std::system(cmd.c_str());
  std::ifstream f(errf);
  return {rc, std::string((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>())};
}

}  // namespace ctxcomp::test
