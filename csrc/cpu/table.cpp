// This ISA's table of CPU kernels (hf_isa.h): compiled once per ISA like every csrc/cpu/*.cpp, so
// each copy points at its own ISA's entry points.
#include "hf_isa.h"

#if !defined(HF_ISA)
#error "csrc/cpu/table.cpp is compiled once per ISA with -DHF_ISA=<isa>"
#endif

#define HF_STR2(x) #x
#define HF_STR(x) HF_STR2(x)

namespace hf {
namespace HF_ISA {

const CpuKernels& cpu_kernels() {
#define HF_KERNEL_ENTRY(op, P) &op,
  static const CpuKernels table{HF_STR(HF_ISA), HF_CPU_OPS(HF_KERNEL_ENTRY) & sparse_conv2d_batch_block,
                                &sparse_conv2d_offsets};
#undef HF_KERNEL_ENTRY
  return table;
}

}  // namespace HF_ISA
}  // namespace hf
