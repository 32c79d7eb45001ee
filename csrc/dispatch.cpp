// Runtime ISA dispatch (hf_isa.h): picks one of the per-ISA kernel tables once, by CPU features or
// $HYPERFLOW_ISA, and defines the hf:: CpuTag entry points the bindings call. Compiled without ISA
// flags (baseline x86-64), so it runs on any x86-64 CPU whatever the tables hold.
#include "hf_isa.h"

#include <atomic>
#include <cstdlib>
#include <mutex>
#include <stdexcept>

namespace hf {
namespace {

struct IsaEntry {
  const char* name;
  const CpuKernels& (*table)();
  bool (*supported)();
};

// The features each ISA's translation units are compiled for (setup.py, ISA_FLAGS): the CPU must have
// them all. __builtin_cpu_supports also checks that the OS saves the vector state (XCR0).
bool cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("f16c") &&
         __builtin_cpu_supports("popcnt");
}
bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi") &&
         __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("f16c") && __builtin_cpu_supports("popcnt");
}
bool cpu_has_baseline() { return true; }

// Best first.
const IsaEntry kIsas[] = {
    {"avx512", &avx512::cpu_kernels, &cpu_has_avx512},
    {"avx2", &avx2::cpu_kernels, &cpu_has_avx2},
    {"baseline", &baseline::cpu_kernels, &cpu_has_baseline},
};

std::string known_names() {
  std::string s;
  for (const auto& e : kIsas) s += (s.empty() ? "" : ", ") + std::string(e.name);
  return s;
}

const IsaEntry& find(const std::string& name, const char* origin) {
  for (const auto& e : kIsas) {
    if (name != e.name) continue;
    if (!e.supported())
      throw std::invalid_argument(std::string(origin) + name + ": this CPU lacks the instructions of the " + name +
                                  " path (supported here: " + [] {
                                    std::string s;
                                    for (const auto& f : kIsas)
                                      if (f.supported()) s += (s.empty() ? "" : ", ") + std::string(f.name);
                                    return s;
                                  }() + ")");
    return e;
  }
  throw std::invalid_argument(std::string(origin) + "'" + name + "' is not a known ISA path (expected one of " +
                              known_names() + ")");
}

std::atomic<const CpuKernels*> g_active{nullptr};
std::once_flag g_env_once;
std::string g_env_error;  // set once when $HYPERFLOW_ISA is bad; every call then raises it

const CpuKernels& active() {
  const CpuKernels* k = g_active.load(std::memory_order_acquire);
  if (k) return *k;
  std::call_once(g_env_once, [] {
    const char* env = std::getenv("HYPERFLOW_ISA");
    const CpuKernels* pick = nullptr;
    if (env && *env && std::string(env) != "auto") {
      try {
        pick = &find(env, "HYPERFLOW_ISA=").table();
      } catch (const std::invalid_argument& e) {
        g_env_error = e.what();
        return;
      }
    } else {
      for (const auto& e : kIsas)
        if (e.supported()) { pick = &e.table(); break; }
    }
    const CpuKernels* expected = nullptr;
    g_active.compare_exchange_strong(expected, pick, std::memory_order_acq_rel);  // isa_select may have won
  });
  k = g_active.load(std::memory_order_acquire);
  if (!k) throw std::invalid_argument(g_env_error);
  return *k;
}

}  // namespace

std::vector<std::string> isa_compiled() {
  std::vector<std::string> names;
  for (const auto& e : kIsas) names.emplace_back(e.name);
  return names;
}

bool isa_supported(const std::string& isa) {
  for (const auto& e : kIsas)
    if (isa == e.name) return e.supported();
  return false;
}

std::string isa_active() { return active().isa; }

void isa_select(const std::string& isa) {
  const CpuKernels& k = find(isa, "isa_select: ").table();
  g_active.store(&k, std::memory_order_release);
}

#define HF_KERNEL_FORWARD(op, P) \
  void op(CpuTag t, const P& p) { active().op(t, p); }
HF_CPU_OPS(HF_KERNEL_FORWARD)
#undef HF_KERNEL_FORWARD

std::int64_t sparse_conv2d_batch_block(const SparseConvParams& p) { return active().sparse_conv2d_batch_block(p); }
bool sparse_conv2d_offsets(const SparseConvParams& p) { return active().sparse_conv2d_offsets(p); }

}  // namespace hf
