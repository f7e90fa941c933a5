// CUDA emulator: ops to configure the emulated device and read launch statistics from Python.
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

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
}
