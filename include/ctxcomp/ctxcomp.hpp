// ctxcomp: header-only kernels for LLM context compression (IC-Former digests, sentinel-token
// KV folding, SAC anchors). This umbrella includes every block that needs only Eigen and xsimd;
// the I/O headers (<ctxcomp/io/...>) additionally need nlohmann-json and are included separately.
#pragma once

#include "core/bf16dot.hpp"
#include "core/error.hpp"
#include "core/executor.hpp"
#include "core/gemm.hpp"
#include "core/kernels.hpp"
#include "core/kv_views.hpp"
#include "core/memory.hpp"
#include "core/rows.hpp"
#include "core/simd.hpp"
#include "core/tile_gemm.hpp"
#include "core/types.hpp"
#include "core/views.hpp"
#include "core/workspace.hpp"

#include "nn/gelu_mlp.hpp"
#include "nn/layernorm.hpp"
#include "nn/linear.hpp"
#include "nn/rmsnorm.hpp"
#include "nn/rope.hpp"
#include "nn/swiglu.hpp"

#include "attention/fused.hpp"
#include "attention/masks.hpp"
#include "attention/options.hpp"
#include "attention/reference.hpp"

#include "kv/buffers.hpp"
#include "kv/cells.hpp"
#include "kv/compact.hpp"
#include "kv/contiguous.hpp"
#include "kv/kv_cache.hpp"
#include "kv/layout.hpp"
#include "kv/paged.hpp"

#include "digest/icformer.hpp"
#include "digest/prompt.hpp"
#include "fold/roles.hpp"
#include "fold/spans.hpp"
#include "anchor/anchors.hpp"
#include "anchor/compress.hpp"

#define CTXCOMP_VERSION_MAJOR 0
#define CTXCOMP_VERSION_MINOR 1
#define CTXCOMP_VERSION_PATCH 0
