// Runtime ISA dispatch of the CPU kernels (STYLE.md 4b: one binary, every CPU).
//
// setup.py compiles every csrc/cpu/*.cpp once per ISA below, each with only that ISA's flags and
// -DHF_ISA=<name>, so each copy lives in its own inline namespace hf::<name> (hf_common.h). Each copy
// fills a CpuKernels table (csrc/cpu/table.cpp); csrc/dispatch.cpp, compiled for baseline x86-64,
// checks the CPU's features once, picks the best table (or the one HYPERFLOW_ISA names) and defines
// the hf:: CpuTag entry points the bindings call as one indirect call through it.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "hf_conv.h"
#include "hf_conv_net.h"
#include "hf_core.h"
#include "hf_drift.h"
#include "hf_flowacc.h"
#include "hf_norm.h"
#include "hf_sparse.h"

namespace hf {

// Every `void op(CpuTag, const Params&)` entry point of the CPU module: X(op, Params).
#define HF_CPU_OPS(X)                                 \
  X(sparse_conv2d, SparseConvParams)                  \
  X(sparse_conv_net, ConvNetParams)                   \
  X(euler_axpy, EulerParams)                          \
  X(csr_spmm, CsrSpmmParams)                          \
  X(drift_integrate, DriftParams)                     \
  X(flow_step, FlowStepParams)                        \
  X(group_norm_, GroupNormParams)                     \
  X(masked_matmul, MaskedMatmulParams)                \
  X(masked_matmul_grad_input, MaskedGradInputParams)  \
  X(csr_linear, CsrLinearParams)                      \
  X(csr_spmm_batched, CsrSpmmBatchedParams)           \
  X(score_mask, ScoreMaskParams)

// One ISA's CPU kernels.
struct CpuKernels {
  const char* isa;  // "avx512", "avx2" or "baseline"
#define HF_KERNEL_SLOT(op, P) void (*op)(CpuTag, const P&);
  HF_CPU_OPS(HF_KERNEL_SLOT)
#undef HF_KERNEL_SLOT
  std::int64_t (*sparse_conv2d_batch_block)(const SparseConvParams&);
  bool (*sparse_conv2d_offsets)(const SparseConvParams&);
};

// The tables, one per ISA translation-unit set (defined by csrc/cpu/table.cpp in each).
namespace avx512 { const CpuKernels& cpu_kernels(); }
namespace avx2 { const CpuKernels& cpu_kernels(); }
namespace baseline { const CpuKernels& cpu_kernels(); }

// ---- csrc/dispatch.cpp ----------------------------------------------------------------------
// The ISAs this build holds, best first, and whether this CPU (and OS) can run each.
std::vector<std::string> isa_compiled();
bool isa_supported(const std::string& isa);
// The active ISA's name. The first call picks it: $HYPERFLOW_ISA when set (std::invalid_argument
// naming the problem when the value is unknown or this CPU lacks it; every kernel call then raises
// the same), else the best this CPU supports.
std::string isa_active();
// Make `isa` the active path (tests and benchmarks switch paths within one process); raises
// std::invalid_argument like isa_active. Not thread-safe against kernels running concurrently
// in other threads: those finish on the table they started with.
void isa_select(const std::string& isa);

}  // namespace hf
