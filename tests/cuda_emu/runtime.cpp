// CUDA emulator, host side: blocks run one after another; a block's threads are fibers on the
// calling CPU thread (a hand-written context switch on x86-64, ucontext elsewhere). A fiber runs until it reaches __syncthreads, a warp collective or
// its end; when every live fiber waits, the scheduler releases the barriers that all their
// participants reached, and reports a deadlock (a divergent barrier or collective) otherwise.
#include "runtime.h"

#if !defined(__x86_64__)
#include <ucontext.h>
#endif
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
// A fiber that ends switches away without unwinding: its frames' redzones stay poisoned in the
// shadow memory, so a stack is unpoisoned before it is reused (AddressSanitizer builds).
#define FOT_EMU_UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION(p, n)
#else
#define FOT_EMU_UNPOISON(p, n) ((void)(p), (void)(n))
#endif

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "device.h"

uint3 threadIdx, blockIdx;
dim3 blockDim, gridDim;

// ------------------------------------------------------------------------- context switch
#if defined(__x86_64__)
// fot_emu_switch(&from_sp, to_sp): saves the callee-saved registers, MXCSR and the x87 control
// word on the current stack, stores the stack pointer in *from_sp, and resumes to_sp (System V).
extern "C" void fot_emu_switch(void** from_sp, void* to_sp);
asm(R"(
  .text
  .globl fot_emu_switch
  .type fot_emu_switch, @function
fot_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size fot_emu_switch, .-fot_emu_switch
)");
struct Context {
  void* sp = nullptr;
};
inline void switch_context(Context& from, Context& to) { fot_emu_switch(&from.sp, to.sp); }
// A fresh context that starts entry() on the stack [base, base + size); entry never returns.
inline void make_context(Context& c, char* base, size_t size, void (*entry)()) {
  FOT_EMU_UNPOISON(base, size);
  uintptr_t top = (reinterpret_cast<uintptr_t>(base) + size) & ~uintptr_t(15);
  auto* sp = reinterpret_cast<uint64_t*>(top);
  *--sp = 0;                                         // entry's (never used) return address
  *--sp = reinterpret_cast<uint64_t>(entry);         // popped by fot_emu_switch's ret
  for (int i = 0; i < 6; ++i) *--sp = 0;             // rbp rbx r12 r13 r14 r15
  *--sp = 0x1F80ull | (0x037Full << 32);             // default MXCSR, x87 control word
  c.sp = sp;
}
#else
struct Context {
  ucontext_t uc;
};
inline void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
inline void make_context(Context& c, char* base, size_t size, void (*entry)()) {
  FOT_EMU_UNPOISON(base, size);
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = base;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
#endif

namespace fot_emu {
namespace {

enum class State { Runnable, WaitBlock, WaitWarp, Done };

struct AsyncCopy {
  void* dst;
  const void* src;
  size_t bytes, zfill;
  void land() const {
    std::memcpy(dst, src, bytes - zfill);
    std::memset(static_cast<char*>(dst) + (bytes - zfill), 0, zfill);
  }
};

struct Fiber {
  Context ctx;
  State state;
  uint3 tid;
  Op op;
  unsigned mask;
  uint64_t value;
  int param;
  const char* what;
  uint64_t result;
  WarpFn fn;
  std::vector<AsyncCopy> open;                  // cp.async copies not yet committed
  std::deque<std::vector<AsyncCopy>> groups;    // committed, not yet landed (oldest first)
};

constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kDefaultSmem = 48 * 1024;  // dynamic shared memory allowed without the attribute
constexpr size_t kGuard = 4096;  // canary bytes around the dynamic shared memory
constexpr unsigned char kCanary = 0xA5;

struct Run {
  const char* kernel = "";
  const std::function<void()>* body = nullptr;
  std::vector<Fiber> fibers;
  Fiber* cur = nullptr;
  Context sched;
  unsigned char* smem = nullptr;
  std::map<const void*, std::unique_ptr<unsigned char[]>> statics;  // static __shared__, per block
  bool fault = false;
};

Run* g_run = nullptr;
cudaError_t g_last = cudaSuccess;
std::string g_message;  // of the last error, kept after cudaGetLastError for cudaGetErrorString
std::map<const void*, int> g_max_dynamic_smem;
std::vector<std::unique_ptr<char[]>> g_stacks;  // uninitialised: only touched pages count
std::mt19937_64 g_async_rng;                    // when cp.async copies land under the shuffled schedule

cudaError_t set_error(cudaError_t err, const std::string& msg) {
  if (g_last == cudaSuccess) {
    g_last = err;
    g_message = msg;
  }
  return err;
}

std::string where(const Fiber* f) {
  char buf[160];
  std::snprintf(buf, sizeof(buf), " (block (%u, %u, %u), thread (%u, %u, %u))", blockIdx.x, blockIdx.y, blockIdx.z,
                f ? f->tid.x : 0, f ? f->tid.y : 0, f ? f->tid.z : 0);
  return buf;
}

[[noreturn]] void fiber_entry() {
  (*g_run->body)();
  Fiber* f = g_run->cur;
  bool pending = !f->open.empty();
  for (const auto& g : f->groups) pending |= !g.empty();
  if (pending) fault("thread exited with cp.async copies it never waited for");
  f->state = State::Done;
  switch_context(f->ctx, g_run->sched);  // never resumed
  __builtin_unreachable();
}

void yield(State st) {
  Fiber* f = g_run->cur;
  f->state = st;
  switch_context(f->ctx, g_run->sched);
}

void block_fault(const std::string& what) {
  if (!g_run->fault) {
    g_run->fault = true;
    char buf[64];
    std::snprintf(buf, sizeof(buf), " (block (%u, %u, %u))", blockIdx.x, blockIdx.y, blockIdx.z);
    set_error(cudaErrorLaunchFailure, std::string(g_run->kernel) + ": " + what + buf);
  }
}

// Releases the warp's lanes if all wait at the same collective; false if they do not all wait.
bool try_release_warp(std::vector<Fiber>& fs, size_t lo, size_t hi) {
  size_t waiting = 0, done = 0;
  for (size_t i = lo; i < hi; ++i) {
    waiting += fs[i].state == State::WaitWarp;
    done += fs[i].state == State::Done;
  }
  if (waiting == 0) return false;
  if (waiting != hi - lo) {
    if (waiting + done == hi - lo) {
      block_fault(std::string(fs[lo].state == State::WaitWarp ? fs[lo].what : "a warp collective") +
                  " reached by a warp some of whose lanes have exited");
    }
    return false;  // the others are on their way, or at __syncthreads (a deadlock found later)
  }
  const Fiber& first = fs[lo];
  for (size_t i = lo; i < hi; ++i) {
    const Fiber& f = fs[i];
    if (f.op != first.op || f.param != first.param || f.mask != first.mask || f.fn != first.fn) {
      block_fault(std::string("lanes of one warp reached different collectives: ") + first.what + " (param " +
                  std::to_string(first.param) + ") and " + f.what + " (param " + std::to_string(f.param) + ")");
      return false;
    }
    if (f.mask != 0xffffffffu) block_fault(std::string(f.what) + " with a partial mask is not emulated");
  }
  uint64_t ballot = 0;
  for (size_t i = lo; i < hi; ++i) ballot |= (fs[i].value & 1u) << (i - lo);
  if (first.op == Op::Call) {
    void* args[32];
    for (size_t i = lo; i < hi; ++i) args[i - lo] = reinterpret_cast<void*>(fs[i].value);
    first.fn(args, (int)(hi - lo));
  }
  for (size_t i = lo; i < hi; ++i) {
    Fiber& f = fs[i];
    switch (f.op) {
      case Op::ShflXor: {
        const size_t src = lo + ((i - lo) ^ (size_t)(f.param & 31));
        f.result = src < hi ? fs[src].value : f.value;
        break;
      }
      case Op::Ballot:
        f.result = ballot;
        break;
      default:
        f.result = 0;
    }
    f.state = State::Runnable;
  }
  return true;
}

void run_block(Run& run, std::mt19937_64& rng, std::vector<size_t>& order) {
  auto& fs = run.fibers;
  const size_t n = fs.size();
  for (size_t t = 0; t < n; ++t) {
    Fiber& f = fs[t];
    f.state = State::Runnable;
    f.open.clear();
    f.groups.clear();
    make_context(f.ctx, g_stacks[t].get(), kStackBytes, fiber_entry);
  }
  for (;;) {
    if (config().schedule == 2) std::shuffle(order.begin(), order.end(), rng);
    for (size_t idx : order) {
      Fiber& f = fs[idx];
      if (f.state != State::Runnable) continue;
      run.cur = &f;
      threadIdx = f.tid;
      switch_context(run.sched, f.ctx);
    }
    run.cur = nullptr;
    if (run.fault) return;
    if (std::all_of(fs.begin(), fs.end(), [](const Fiber& f) { return f.state == State::Done; })) return;
    bool released = false;
    for (size_t lo = 0; lo < n; lo += 32) released |= try_release_warp(fs, lo, std::min(n, lo + 32));
    if (run.fault) return;
    if (released) continue;
    size_t at_barrier = 0, done = 0;
    for (const Fiber& f : fs) {
      at_barrier += f.state == State::WaitBlock;
      done += f.state == State::Done;
    }
    if (at_barrier + done == n) {
      if (done > 0) {
        block_fault("__syncthreads reached by " + std::to_string(at_barrier) + " threads while " +
                    std::to_string(done) + " have exited");
        return;
      }
      for (Fiber& f : fs) f.state = State::Runnable;
      continue;
    }
    std::string states;
    for (size_t lo = 0; lo < n; lo += 32) {
      const Fiber& f = fs[lo];
      states += " warp " + std::to_string(lo / 32) + ": " +
                (f.state == State::WaitBlock ? std::string("__syncthreads")
                 : f.state == State::WaitWarp ? std::string(f.what)
                                              : std::string("exited")) +
                ";";
    }
    block_fault("deadlock: threads wait at barriers the others never reach (lane 0 of" + states + ")");
    return;
  }
}

}  // namespace

Config& config() {
  static Config c;
  return c;
}

Stats& stats() {
  static Stats s;
  return s;
}

void fault(const char* what) {
  if (g_run == nullptr) {
    set_error(cudaErrorLaunchFailure, std::string("device fault outside a launch: ") + what);
    return;
  }
  if (!g_run->fault) {
    g_run->fault = true;
    set_error(cudaErrorLaunchFailure, std::string(g_run->kernel) + ": " + what + where(g_run->cur));
  }
}

void sync_threads() { yield(State::WaitBlock); }

namespace {
// Whether a copy lands when issued (else at the wait that covers it), by schedule.
bool land_early() {
  switch (config().schedule) {
    case 1:
      return true;
    case 2:
      return (g_async_rng() & 1) != 0;
    default:
      return false;
  }
}
}  // namespace

void async_copy(void* dst, const void* src, size_t bytes, size_t zfill) {
  const AsyncCopy c{dst, src, bytes, zfill};
  if (land_early()) {
    c.land();
  } else {
    g_run->cur->open.push_back(c);
  }
}

void async_commit() {
  Fiber* f = g_run->cur;
  f->groups.push_back(std::move(f->open));
  f->open.clear();
}

void async_wait_prior(size_t n) {
  Fiber* f = g_run->cur;
  while (f->groups.size() > n) {
    for (const AsyncCopy& c : f->groups.front()) c.land();
    f->groups.pop_front();
  }
}

void warp_call(WarpFn fn, void* arg, const char* what) {
  Fiber* f = g_run->cur;
  f->fn = fn;
  f->op = Op::Call;
  f->mask = 0xffffffffu;
  f->value = reinterpret_cast<uint64_t>(arg);
  f->param = 0;
  f->what = what;
  yield(State::WaitWarp);
}

uint64_t warp_collective(Op op, unsigned mask, uint64_t value, int param, const char* what) {
  Fiber* f = g_run->cur;
  f->fn = nullptr;
  f->op = op;
  f->mask = mask;
  f->value = value;
  f->param = param;
  f->what = what;
  yield(State::WaitWarp);
  return f->result;
}

unsigned char* dynamic_smem() { return g_run->smem; }

void* static_smem(const void* site, size_t bytes, size_t align) {
  auto& slot = g_run->statics[site];
  if (!slot) {
    slot.reset(new unsigned char[bytes + align]);
    std::memset(slot.get(), 0xFF, bytes + align);
  }
  const uintptr_t p = reinterpret_cast<uintptr_t>(slot.get());
  return reinterpret_cast<void*>((p + align - 1) / align * align);
}

cudaError_t launch(const void* func, const char* name, dim3 grid, dim3 block, size_t dynamic_smem_bytes,
                   const std::function<void()>& body) {
  const std::string kernel = name;
  const uint64_t threads = (uint64_t)block.x * block.y * block.z;
  if (threads == 0 || threads > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu ||
      grid.y > 65535 || grid.z > 65535) {
    return set_error(cudaErrorInvalidConfiguration,
                     kernel + ": invalid launch configuration grid (" + std::to_string(grid.x) + ", " +
                         std::to_string(grid.y) + ", " + std::to_string(grid.z) + ") block " +
                         std::to_string(threads));
  }
  auto it = g_max_dynamic_smem.find(func);
  const size_t allowed = it == g_max_dynamic_smem.end() ? kDefaultSmem : (size_t)it->second;
  if (dynamic_smem_bytes > allowed) {
    return set_error(cudaErrorInvalidValue, kernel + ": " + std::to_string(dynamic_smem_bytes) +
                                                " bytes of dynamic shared memory, more than the " +
                                                std::to_string(allowed) + " allowed (cudaFuncSetAttribute)");
  }
  Stats& st = stats();
  st.launches += 1;
  st.max_dynamic_smem = std::max<int64_t>(st.max_dynamic_smem, (int64_t)dynamic_smem_bytes);

  Run run;
  run.kernel = name;
  run.body = &body;
  run.fibers.resize(threads);
  for (unsigned z = 0, t = 0; z < block.z; ++z)
    for (unsigned y = 0; y < block.y; ++y)
      for (unsigned x = 0; x < block.x; ++x, ++t) run.fibers[t].tid = uint3{x, y, z};
  while (g_stacks.size() < threads) g_stacks.emplace_back(new char[kStackBytes]);
  std::vector<unsigned char> smem_buf(dynamic_smem_bytes + 2 * kGuard + 128);
  unsigned char* base = smem_buf.data();
  base += (128 - reinterpret_cast<uintptr_t>(base) % 128) % 128;
  run.smem = base + kGuard;

  const Config& cfg = config();
  std::mt19937_64 rng(cfg.seed);
  g_async_rng.seed(cfg.seed ^ 0x9E3779B97F4A7C15ull);
  std::vector<size_t> order(threads);
  std::iota(order.begin(), order.end(), 0);
  if (cfg.schedule == 1) std::reverse(order.begin(), order.end());
  std::vector<uint3> blocks;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) blocks.push_back(uint3{x, y, z});
  if (cfg.schedule == 1) std::reverse(blocks.begin(), blocks.end());
  if (cfg.schedule == 2) std::shuffle(blocks.begin(), blocks.end(), rng);

  Run* const saved = g_run;
  g_run = &run;
  blockDim = block;
  gridDim = grid;
  for (const uint3& bi : blocks) {
    blockIdx = bi;
    // shared memory starts as garbage on a GPU: 0xFF bytes read as NaN / all-ones keys here
    std::memset(base, kCanary, kGuard);
    std::memset(run.smem, 0xFF, dynamic_smem_bytes);
    std::memset(run.smem + dynamic_smem_bytes, kCanary, kGuard);
    run.statics.clear();
    run_block(run, rng, order);
    for (size_t i = 0; i < kGuard && !run.fault; ++i)
      if (base[i] != kCanary || run.smem[dynamic_smem_bytes + i] != kCanary)
        block_fault("write outside the block's dynamic shared memory");
    st.blocks += 1;
    if (run.fault) break;
  }
  g_run = saved;
  return run.fault ? cudaErrorLaunchFailure : cudaSuccess;
}

}  // namespace fot_emu

// --------------------------------------------------------------------------- runtime API
const char* cudaGetErrorString(cudaError_t err) {
  if (err == cudaSuccess) return "no error";
  return fot_emu::g_message.empty() ? "unknown error" : fot_emu::g_message.c_str();
}

cudaError_t cudaGetLastError() {
  const cudaError_t err = fot_emu::g_last;
  fot_emu::g_last = cudaSuccess;  // the message stays for cudaGetErrorString
  return err;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int /*device*/) {
  switch (attr) {
    case cudaDevAttrMultiProcessorCount:
      *value = fot_emu::config().num_sms;
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = fot_emu::config().smem_optin;
      return cudaSuccess;
  }
  return fot_emu::set_error(cudaErrorInvalidValue, "cudaDeviceGetAttribute: attribute not emulated");
}

cudaError_t fot_emu_func_set_attribute(const void* func, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize)
    return fot_emu::set_error(cudaErrorInvalidValue, "cudaFuncSetAttribute: attribute not emulated");
  if (value < 0 || value > fot_emu::config().smem_optin)
    return fot_emu::set_error(cudaErrorInvalidValue,
                              "cudaFuncSetAttribute: " + std::to_string(value) +
                                  " bytes of dynamic shared memory exceed the device's opt-in limit " +
                                  std::to_string(fot_emu::config().smem_optin));
  fot_emu::g_max_dynamic_smem[func] = value;
  return cudaSuccess;
}
