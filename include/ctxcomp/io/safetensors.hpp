// safetensors reader and writer: an 8-byte little-endian header length, a JSON header
// {name: {dtype, shape, data_offsets}, "__metadata__": {str: str}}, then the data. Files are
// memory-mapped (POSIX) or read; every offset, size and dtype is checked before use.
// Needs nlohmann-json. Format: https://github.com/huggingface/safetensors (README, "Format").
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "../core/error.hpp"
#include "../core/types.hpp"

#if __has_include(<sys/mman.h>) && __has_include(<unistd.h>)
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#define CTXCOMP_HAS_MMAP 1
#endif

namespace ctxcomp::io {

enum class DType { F64, F32, F16, BF16, I64, I32 };

inline std::size_t dtype_size(DType t) noexcept {
  switch (t) {
    case DType::F64: case DType::I64: return 8;
    case DType::F32: case DType::I32: return 4;
    default: return 2;
  }
}
inline const char* dtype_name(DType t) noexcept {
  switch (t) {
    case DType::F64: return "F64";
    case DType::F32: return "F32";
    case DType::F16: return "F16";
    case DType::BF16: return "BF16";
    case DType::I64: return "I64";
    default: return "I32";
  }
}
template <class T>
constexpr DType dtype_of() noexcept {
  if constexpr (std::is_same_v<T, double>) return DType::F64;
  else if constexpr (std::is_same_v<T, float>) return DType::F32;
  else if constexpr (std::is_same_v<T, fp16>) return DType::F16;
  else if constexpr (std::is_same_v<T, bf16>) return DType::BF16;
  else if constexpr (std::is_same_v<T, std::int64_t>) return DType::I64;
  else {
    static_assert(std::is_same_v<T, std::int32_t>, "safetensors: unsupported element type");
    return DType::I32;
  }
}

/// One tensor of a safetensors header.
struct TensorInfo {
  std::string name;                 ///< tensor name
  DType dtype = DType::F32;         ///< stored element type
  std::vector<std::int64_t> shape;  ///< dimensions
  /// Byte range within the data section.
  ///@{
  std::size_t begin = 0, end = 0;
  ///@}
  /// Number of elements.
  std::int64_t numel() const noexcept {
    std::int64_t n = 1;
    for (auto d : shape) n *= d;
    return n;
  }
};

/// A parsed safetensors file. Tensors are read through `read<T>` (converting to T) or viewed
/// through `raw` (bytes as stored). The file stays mapped (or loaded) while the object lives.
class SafeTensors {
 public:
  /// Memory-map the file, or read it into memory.
  enum class Mode { Map, Read };

  /// Opens and parses `path`; every offset, size and dtype is checked.
  static SafeTensors open(const std::string& path, Mode mode = Mode::Map) {
    SafeTensors st;
    st.path_ = path;
#if defined(CTXCOMP_HAS_MMAP)
    if (mode == Mode::Map) {
      const int fd = ::open(path.c_str(), O_RDONLY);
      if (fd < 0) fail("safetensors: cannot open '", path, "': ", std::strerror(errno));
      struct stat sb {};
      if (::fstat(fd, &sb) != 0) {
        ::close(fd);
        fail("safetensors: cannot stat '", path, "'");
      }
      const std::size_t size = static_cast<std::size_t>(sb.st_size);
      void* p = size ? ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0) : nullptr;
      ::close(fd);
      if (size && p == MAP_FAILED) fail("safetensors: cannot map '", path, "'");
      st.mapping_ = std::shared_ptr<void>(p, [size](void* q) {
        if (q) ::munmap(q, size);
      });
      st.bytes_ = static_cast<const std::uint8_t*>(p);
      st.size_ = size;
      st.parse();
      return st;
    }
#endif
    (void)mode;
    std::ifstream f(path, std::ios::binary);
    if (!f) fail("safetensors: cannot open '", path, "'");
    auto buf = std::make_shared<std::vector<std::uint8_t>>(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
    st.owned_ = buf;
    st.bytes_ = buf->data();
    st.size_ = buf->size();
    st.parse();
    return st;
  }

  /// Parses bytes held by the caller (copied).
  static SafeTensors from_bytes(std::vector<std::uint8_t> bytes, std::string name = "<memory>") {
    SafeTensors st;
    st.path_ = std::move(name);
    auto buf = std::make_shared<std::vector<std::uint8_t>>(std::move(bytes));
    st.owned_ = buf;
    st.bytes_ = buf->data();
    st.size_ = buf->size();
    st.parse();
    return st;
  }

  /// The file's path (or the name given to from_bytes).
  const std::string& path() const noexcept { return path_; }
  /// Every tensor, in header order.
  const std::vector<TensorInfo>& tensors() const noexcept { return tensors_; }
  /// The __metadata__ strings.
  const std::map<std::string, std::string>& metadata() const noexcept { return metadata_; }
  /// Whether a tensor `name` exists.
  bool contains(const std::string& name) const { return find(name) != nullptr; }
  /// The tensor `name`, or nullptr.
  const TensorInfo* find(const std::string& name) const {
    for (const auto& t : tensors_)
      if (t.name == name) return &t;
    return nullptr;
  }
  /// The tensor `name`, or an error naming it.
  const TensorInfo& info(const std::string& name) const {
    const TensorInfo* t = find(name);
    if (!t) fail("safetensors '", path_, "': no tensor named '", name, "'");
    return *t;
  }
  /// Metadata value, or an error naming the key.
  const std::string& meta(const std::string& key) const {
    auto it = metadata_.find(key);
    if (it == metadata_.end()) fail("safetensors '", path_, "': no metadata key '", key, "'");
    return it->second;
  }
  /// The stored bytes of a tensor.
  const std::uint8_t* raw(const TensorInfo& t) const noexcept { return data_ + t.begin; }

  /// The tensor converted to T (float, double, bf16, fp16, int64, int32). Floating tensors convert
  /// to floating T; integer tensors to integer or floating T.
  template <class T>
  std::vector<T> read(const std::string& name) const {
    const TensorInfo& t = info(name);
    std::vector<T> out(static_cast<std::size_t>(t.numel()));
    convert_into(t, out.data());
    return out;
  }
  /// Same, checking the shape first ("expected [a, b], found [c]").
  template <class T>
  std::vector<T> read(const std::string& name, const std::vector<std::int64_t>& shape) const {
    const TensorInfo& t = info(name);
    if (t.shape != shape)
      fail("safetensors '", path_, "': tensor '", name, "' has shape ", shape_str(t.shape), ", expected ", shape_str(shape));
    return read<T>(name);
  }

  /// Converts tensor `t` into out[numel] of type T.
  template <class T>
  void convert_into(const TensorInfo& t, T* out) const {
    const std::uint8_t* p = raw(t);
    const std::size_t n = static_cast<std::size_t>(t.numel());
    constexpr bool floating = std::is_floating_point_v<T> || std::is_same_v<T, bf16> || std::is_same_v<T, fp16>;
    auto each = [&](auto tag) {
      using S = decltype(tag);
      for (std::size_t i = 0; i < n; ++i) {
        S s;
        std::memcpy(&s, p + i * sizeof(S), sizeof(S));
        if constexpr (std::is_same_v<S, bf16> || std::is_same_v<S, fp16>) {
          if constexpr (std::is_same_v<T, double>) out[i] = static_cast<double>(to_float(s));
          else out[i] = from_float<T>(to_float(s));
        } else if constexpr (std::is_same_v<T, bf16> || std::is_same_v<T, fp16>) {
          out[i] = from_float<T>(static_cast<float>(s));
        } else {
          out[i] = static_cast<T>(s);
        }
      }
    };
    switch (t.dtype) {
      case DType::F64: case DType::F32: case DType::F16: case DType::BF16:
        if constexpr (!floating) fail("safetensors '", path_, "': tensor '", t.name, "' is ", dtype_name(t.dtype), ", not an integer tensor");
        else {
          if (t.dtype == DType::F64) each(double{});
          else if (t.dtype == DType::F32) each(float{});
          else if (t.dtype == DType::F16) each(fp16{});
          else each(bf16{});
        }
        break;
      case DType::I64: each(std::int64_t{}); break;
      case DType::I32: each(std::int32_t{}); break;
    }
  }

  /// "[a, b, c]", for messages.
  static std::string shape_str(const std::vector<std::int64_t>& s) {
    std::string r = "[";
    for (std::size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
    return r + "]";
  }

 private:
  void parse() {
    auto bad = [&](const auto&... parts) { fail("safetensors '", path_, "': ", parts...); };
    if (size_ < 8) bad("file is ", size_, " bytes, too short for the 8-byte header length");
    std::uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | bytes_[i];
    if (n == 0 || n > size_ - 8) bad("header length ", n, " does not fit in a file of ", size_, " bytes");
    if (n > (std::uint64_t{100} << 20)) bad("header length ", n, " exceeds the 100 MB limit");
    // Parsed without exceptions (so this also builds with -fno-exceptions); errors are ours.
    nlohmann::json h = nlohmann::json::parse(bytes_ + 8, bytes_ + 8 + n, nullptr, /*allow_exceptions=*/false);
    if (h.is_discarded()) bad("header is not valid JSON");
    if (!h.is_object()) bad("header is not a JSON object");
    data_ = bytes_ + 8 + n;
    const std::size_t data_size = size_ - 8 - static_cast<std::size_t>(n);
    for (auto it = h.begin(); it != h.end(); ++it) {
      if (it.key() == "__metadata__") {
        if (!it->is_object()) bad("__metadata__ is not an object");
        for (auto m = it->begin(); m != it->end(); ++m) {
          if (!m->is_string()) bad("__metadata__ value of '", m.key(), "' is not a string");
          metadata_[m.key()] = m->get<std::string>();
        }
        continue;
      }
      const auto& e = *it;
      TensorInfo t;
      t.name = it.key();
      if (!e.is_object() || !e.contains("dtype") || !e.contains("shape") || !e.contains("data_offsets"))
        bad("tensor '", t.name, "' lacks dtype, shape or data_offsets");
      if (!e["dtype"].is_string()) bad("tensor '", t.name, "' dtype is not a string");
      const std::string dt = e["dtype"].get<std::string>();
      if (dt == "F64") t.dtype = DType::F64;
      else if (dt == "F32") t.dtype = DType::F32;
      else if (dt == "F16") t.dtype = DType::F16;
      else if (dt == "BF16") t.dtype = DType::BF16;
      else if (dt == "I64") t.dtype = DType::I64;
      else if (dt == "I32") t.dtype = DType::I32;
      else bad("tensor '", t.name, "' has unsupported dtype '", dt, "' (supported: F64, F32, F16, BF16, I64, I32)");
      if (!e["shape"].is_array()) bad("tensor '", t.name, "' shape is not an array");
      std::uint64_t numel = 1;
      for (const auto& d : e["shape"]) {
        if (!d.is_number_integer() || d.get<std::int64_t>() < 0) bad("tensor '", t.name, "' has a negative or non-integer dimension");
        const auto v = d.get<std::uint64_t>();
        if (v != 0 && numel > (std::uint64_t{1} << 62) / v) bad("tensor '", t.name, "' shape overflows");
        numel *= v;
        t.shape.push_back(static_cast<std::int64_t>(v));
      }
      const auto& off = e["data_offsets"];
      if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() || !off[1].is_number_unsigned())
        bad("tensor '", t.name, "' data_offsets is not a pair of non-negative integers");
      const auto b = off[0].get<std::uint64_t>(), en = off[1].get<std::uint64_t>();
      if (b > en || en > data_size)
        bad("tensor '", t.name, "' data_offsets [", b, ", ", en, "] out of range (data section is ", data_size, " bytes)");
      if (en - b != numel * dtype_size(t.dtype))
        bad("tensor '", t.name, "' has ", en - b, " bytes but shape ", shape_str(t.shape), " of ", dt, " needs ",
            numel * dtype_size(t.dtype));
      t.begin = static_cast<std::size_t>(b);
      t.end = static_cast<std::size_t>(en);
      tensors_.push_back(std::move(t));
    }
    std::vector<const TensorInfo*> order;
    for (const auto& t : tensors_) order.push_back(&t);
    std::sort(order.begin(), order.end(), [](auto* a, auto* b) { return a->begin < b->begin; });
    for (std::size_t i = 1; i < order.size(); ++i)
      if (order[i]->begin < order[i - 1]->end)
        bad("tensors '", order[i - 1]->name, "' and '", order[i]->name, "' overlap");
  }

  std::string path_;
  std::shared_ptr<void> mapping_;
  std::shared_ptr<std::vector<std::uint8_t>> owned_;
  const std::uint8_t* bytes_ = nullptr;
  const std::uint8_t* data_ = nullptr;
  std::size_t size_ = 0;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;
};

/// A tensor to write: its name, shape and data (of the dtype named by T).
struct TensorOut {
  std::string name;                 ///< tensor name
  DType dtype;                      ///< element type of `data`
  std::vector<std::int64_t> shape;  ///< dimensions
  const void* data;                 ///< the elements (the caller's)

  /// A tensor of elements of type T.
  template <class T>
  static TensorOut of(std::string name, std::vector<std::int64_t> shape, const T* data) {
    return {std::move(name), dtype_of<T>(), std::move(shape), data};
  }
};

/// Serialises tensors (in the given order) and metadata into safetensors bytes.
inline std::vector<std::uint8_t> to_safetensors_bytes(const std::vector<TensorOut>& tensors,
                                                      const std::map<std::string, std::string>& metadata = {}) {
  nlohmann::json h = nlohmann::json::object();
  if (!metadata.empty()) h["__metadata__"] = metadata;
  std::uint64_t offset = 0;
  for (const auto& t : tensors) {
    CTXCOMP_CHECK(!t.name.empty() && t.name != "__metadata__", "safetensors writer: bad tensor name '", t.name, "'");
    CTXCOMP_CHECK(!h.contains(t.name), "safetensors writer: tensor '", t.name, "' given twice");
    std::uint64_t n = 1;
    for (auto d : t.shape) {
      CTXCOMP_CHECK(d >= 0, "safetensors writer: tensor '", t.name, "' has a negative dimension");
      n *= static_cast<std::uint64_t>(d);
    }
    const std::uint64_t bytes = n * dtype_size(t.dtype);
    h[t.name] = {{"dtype", dtype_name(t.dtype)}, {"shape", t.shape}, {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  std::string header = h.dump();
  while (header.size() % 8) header.push_back(' ');  // data starts 8-byte aligned, as the spec pads
  std::vector<std::uint8_t> out(8 + header.size() + offset);
  const std::uint64_t hn = header.size();
  for (int i = 0; i < 8; ++i) out[std::size_t(i)] = static_cast<std::uint8_t>(hn >> (8 * i));
  std::memcpy(out.data() + 8, header.data(), header.size());
  std::uint8_t* p = out.data() + 8 + header.size();
  for (const auto& t : tensors) {
    const auto& o = h[t.name]["data_offsets"];
    const auto b = o[0].get<std::uint64_t>(), e = o[1].get<std::uint64_t>();
    if (e > b) std::memcpy(p + b, t.data, static_cast<std::size_t>(e - b));
  }
  return out;
}

/// Writes a safetensors file (to a temporary name first, then renamed into place).
inline void write_safetensors(const std::string& path, const std::vector<TensorOut>& tensors,
                              const std::map<std::string, std::string>& metadata = {}) {
  const auto bytes = to_safetensors_bytes(tensors, metadata);
  const std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    if (!f) fail("safetensors writer: cannot create '", tmp, "'");
    f.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
    if (!f) fail("safetensors writer: cannot write '", tmp, "'");
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) fail("safetensors writer: cannot rename '", tmp, "' to '", path, "'");
}

}  // namespace ctxcomp::io
