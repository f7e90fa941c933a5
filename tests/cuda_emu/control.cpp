// CUDA emulator: ops to configure the emulated device and read launch statistics from Python.
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

#include "fot_cuda.h"
#include "runtime.h"

std::string fot_emu_selftest(int which, int64_t* checksum);  // selftest.cu

namespace {

std::tuple<std::string, int64_t> selftest(int64_t which) {
  int64_t checksum = 0;
  std::string err = fot_emu_selftest((int)which, &checksum);
  return {err, checksum};
}

void configure(int64_t num_sms, int64_t smem_optin, int64_t schedule, int64_t seed) {
  TORCH_CHECK(num_sms >= 1 && smem_optin >= 1024, "num_sms must be >= 1 and smem_optin >= 1024");
  TORCH_CHECK(schedule >= 0 && schedule <= 2, "schedule must be 0 (forward), 1 (reverse) or 2 (shuffle)");
  fot_emu::Config& c = fot_emu::config();
  c.num_sms = (int)num_sms;
  c.smem_optin = (int)smem_optin;
  c.schedule = (int)schedule;
  c.seed = (uint64_t)seed;
  fot_emu::stats() = fot_emu::Stats{};  // a freshly configured device starts its statistics anew
}

// The launch plan csrc/cuda would pick on a device with `num_sms` SMs and `smem_optin` bytes of
// opt-in shared memory per block: {bm, bn, dynamic shared memory bytes, splits}, or {0, 0, 0, 0}
// with the plan's reason when nothing fits. kind: "knn" (knn_scan; k >= 1), "flash" (flash_scan),
// "flash_bwd_dq" / "flash_bwd_dkv" (the two kernels of flash_scan_backward; splits = 1).
std::tuple<std::vector<int64_t>, std::string> plan(const std::string& kind, int64_t rows, int64_t head_dim,
                                                   int64_t k, bool tensor_cores, int64_t num_sms, int64_t smem_optin,
                                                   int64_t slots) {
  const fot_cuda::DeviceLimits lim{(int)num_sms, (int)smem_optin};
  const char* why = "";
  if (kind == "flash_bwd_dq" || kind == "flash_bwd_dkv") {
    fot_cuda::FlashBwdParams b{};
    b.B = b.H = 1;
    b.N = (int)rows;
    b.D = (int)head_dim;
    b.M = slots;
    b.tc = tensor_cores;
    if (!fot_cuda::flash_backward_plan(b, lim, &why)) return {{0, 0, 0, 0}, why};
    if (kind == "flash_bwd_dq") return {{b.dq_bm, b.dq_bn, (int64_t)b.dq_smem, 1}, ""};
    return {{b.kv_bm, b.kv_bn, (int64_t)b.kv_smem, 1}, ""};
  }
  fot_cuda::ScanParams* p = nullptr;
  fot_cuda::KnnParams knn{};
  fot_cuda::FlashParams flash{};
  bool ok = false;
  if (kind == "knn") {
    p = &knn;
  } else {
    TORCH_CHECK(kind == "flash", "kind must be 'knn', 'flash', 'flash_bwd_dq' or 'flash_bwd_dkv', got ", kind);
    p = &flash;
  }
  p->B = p->H = 1;
  p->N = (int)rows;
  p->D = (int)head_dim;
  p->M = slots;
  p->tc = tensor_cores;
  if (kind == "knn") {
    knn.k = (int)k;
    ok = fot_cuda::knn_plan(knn, lim, &why);
  } else {
    ok = fot_cuda::flash_plan(flash, lim, &why);
  }
  if (!ok) return {{0, 0, 0, 0}, why};
  return {{p->bm, p->bn, (int64_t)p->smem, p->splits}, ""};
}

std::vector<int64_t> stats() {
  const fot_emu::Stats& s = fot_emu::stats();
  return {s.launches, s.blocks, s.max_dynamic_smem};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fot_cuda_emu, m) {
  m.def("emu_configure(int num_sms, int smem_optin, int schedule, int seed) -> ()", &configure);
  m.def("emu_stats() -> int[]", &stats);
  m.def("emu_selftest(int which) -> (str, int)", &selftest);
  m.def("emu_plan(str kind, int rows, int head_dim, int k, bool tensor_cores, int num_sms, int smem_optin, int slots) "
        "-> (int[], str)",
        &plan);
}
