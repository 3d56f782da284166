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
  std::string out;  ///< stdout
};

/// Path of a scratch file in the temporary directory.
inline std::string tmp(const std::string& name) { return (std::filesystem::temp_directory_path() / name).string(); }

inline CliRun run_cli(const std::string& args) {
  const std::string errf = tmp("ctxcomp_cli_stderr.txt"), outf = tmp("ctxcomp_cli_stdout.txt");
  const std::string cmd = std::string(CTXCOMP_CLI_PATH) + " " + args + " 2> " + errf + " > " + outf;
  const int rc = std::system(cmd.c_str());
  auto slurp = [](const std::string& p) {
    std::ifstream f(p);
    return std::string((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  };
  return {rc, slurp(errf), slurp(outf)};
}

}  // namespace ctxcomp::test
