// safetensors reader/writer: round trips of every dtype, and a clear error for each kind of
// malformed file (bad header length, bad JSON, offsets out of range or overlapping, unknown
// dtype, shape/size mismatch).
#include <cstdio>
#include <fstream>

#include <ctxcomp/io/safetensors.hpp>

#include "catch.hpp"
#include "common.hpp"

// Everything of this file in its own namespace: the folder compiles as one unity translation
// unit with its neighbours, whose helpers may share names.
namespace test_io_safetensors {

using namespace ctxcomp;
using Catch::Matchers::Contains;

namespace {
std::vector<std::uint8_t> raw_file(const std::string& header, std::size_t data_bytes, std::uint64_t claimed_len = 0) {
  std::vector<std::uint8_t> b(8 + header.size() + data_bytes, 0);
  const std::uint64_t n = claimed_len ? claimed_len : header.size();
  for (int i = 0; i < 8; ++i) b[std::size_t(i)] = std::uint8_t(n >> (8 * i));
  std::memcpy(b.data() + 8, header.data(), header.size());
  return b;
}
}  // namespace

TEST_CASE("safetensors round trip of every dtype, mapped and read", "[io]") {
  std::vector<double> f64{1.5, -2.25};
  std::vector<float> f32{1.f, 2.f, 3.f, 4.f, 5.f, 6.f};
  std::vector<bf16> b16{bf16(1.5f), bf16(-3.f)};
  std::vector<fp16> h16{fp16(0.5f), fp16(7.f), fp16(-1.f)};
  std::vector<std::int64_t> i64{-5, 1ll << 40};
  std::vector<std::int32_t> i32{7};
  const std::string path = "ctxcomp_test_roundtrip.safetensors";
  io::write_safetensors(path,
                        {io::TensorOut::of("a", {2}, f64.data()), io::TensorOut::of("b", {2, 3}, f32.data()),
                         io::TensorOut::of("c", {2}, b16.data()), io::TensorOut::of("d", {3}, h16.data()),
                         io::TensorOut::of("e", {2}, i64.data()), io::TensorOut::of("f", {1}, i32.data())},
                        {{"note", "hello"}});
  for (auto mode : {io::SafeTensors::Mode::Map, io::SafeTensors::Mode::Read}) {
    auto st = io::SafeTensors::open(path, mode);
    CHECK(st.meta("note") == "hello");
    CHECK(st.read<double>("a") == f64);
    CHECK(st.read<float>("b", {2, 3}) == f32);
    CHECK(st.read<float>("c") == std::vector<float>{1.5f, -3.f});
    CHECK(st.read<float>("d") == std::vector<float>{0.5f, 7.f, -1.f});
    CHECK(st.read<std::int64_t>("e") == i64);
    CHECK(st.read<std::int64_t>("f") == std::vector<std::int64_t>{7});
    CHECK_THROWS_WITH(st.read<float>("b", {3, 2}), Contains("tensor 'b' has shape [2, 3], expected [3, 2]"));
    CHECK_THROWS_WITH(st.read<float>("zz"), Contains("no tensor named 'zz'"));
    CHECK_THROWS_WITH(st.read<std::int64_t>("b"), Contains("not an integer tensor"));
  }
  std::remove(path.c_str());
}

TEST_CASE("malformed safetensors files get clear errors", "[io][errors]") {
  auto parse = [](std::vector<std::uint8_t> b) { return io::SafeTensors::from_bytes(std::move(b), "bad.safetensors"); };
  CHECK_THROWS_WITH(parse({1, 2, 3}), Contains("too short"));
  CHECK_THROWS_WITH(parse(raw_file("{}", 0, 1000)), Contains("header length 1000 does not fit"));
  CHECK_THROWS_WITH(parse(raw_file("{not json", 0)), Contains("not valid JSON"));
  CHECK_THROWS_WITH(parse(raw_file("[1,2]", 0)), Contains("not a JSON object"));
  CHECK_THROWS_WITH(parse(raw_file(R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 4)),
                    Contains("data_offsets [0, 8] out of range"));
  CHECK_THROWS_WITH(parse(raw_file(R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"y":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 12)),
                    Contains("overlap"));
  CHECK_THROWS_WITH(parse(raw_file(R"({"x":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}})", 8)),
                    Contains("unsupported dtype 'Q4'"));
  CHECK_THROWS_WITH(parse(raw_file(R"({"x":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8)),
                    Contains("has 8 bytes but shape [3] of F32 needs 12"));
  CHECK_THROWS_WITH(parse(raw_file(R"({"x":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8)),
                    Contains("negative"));
  CHECK_THROWS_WITH(parse(raw_file(R"({"x":{"dtype":"F32","shape":[2]}})", 8)), Contains("lacks dtype, shape or data_offsets"));
  CHECK_THROWS_WITH(parse(raw_file(R"({"__metadata__":{"a":1}})", 0)), Contains("not a string"));
  CHECK_THROWS_WITH(io::SafeTensors::open("/nonexistent/file.safetensors"), Contains("cannot open"));
}

}  // namespace test_io_safetensors
