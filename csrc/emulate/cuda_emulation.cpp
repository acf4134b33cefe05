// Runtime of the CPU emulation (cuda_emulation.h): blocks run one after another, a block's
// threads are ucontext fibers on one OS thread, switched at collectives only. Also the few CUDA
// runtime calls the kernels' host code makes (no libcudart is linked).
#include "cuda_emulation.h"

#include <ucontext.h>

#include <cstdlib>
#include <deque>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace lowrank_ops {
namespace emu {
namespace {

constexpr size_t kStackBytes = 256 * 1024;

struct Copy {
  void* dst;
  const void* src;
  int bytes;
};

struct Thread {
  ucontext_t context;
  uint3 index;
  int warp = 0, lane = 0;
  bool finished = false, waiting = false;
  std::vector<Copy> open;                   // cp.async issued since the last commit
  std::deque<std::vector<Copy>> committed;  // committed groups, oldest first
};

struct Warp {
  std::vector<int> members;
  int arrived = 0;
  Collective kind = Collective::kSyncWarp;
  uint32_t in[kWarpSize][kExchangeWords] = {};
  uint32_t out[kWarpSize][kExchangeWords] = {};
};

struct Aborted {};  // unwinds a fiber after the block has failed

struct Block {
  dim3 grid, dim;
  uint3 index;
  const std::function<void()>* body = nullptr;
  std::vector<Thread> threads;
  std::vector<Warp> warps;
  int barrier_arrived = 0;
  int current = -1;
  ucontext_t scheduler;
  std::string error;
  bool copies_at_issue = false;
  unsigned char* dynamic_smem = nullptr;
};

thread_local Block* g_block = nullptr;
thread_local std::vector<std::unique_ptr<char[]>> g_stacks;

Block& block() {
  if (!g_block) throw std::logic_error("CUDA emulation: a device function ran outside a launch");
  return *g_block;
}
Thread& self() { return block().threads[block().current]; }

void fail(const std::string& why) {
  Block& b = block();
  if (b.error.empty()) b.error = why;
  throw Aborted{};
}

void yield() {
  Block& b = block();
  Thread& t = self();
  swapcontext(&t.context, &b.scheduler);
  if (!b.error.empty()) throw Aborted{};
}

void perform(const std::vector<Copy>& copies) {
  for (const Copy& c : copies) std::memcpy(c.dst, c.src, c.bytes);
}

int live_members(const Warp& w) {
  int n = 0;
  for (int i : w.members) n += !block().threads[i].finished;
  return n;
}

void complete_warp(Warp& w) {
  std::memcpy(w.out, w.in, sizeof(w.in));
  w.arrived = 0;
  for (int i : w.members) block().threads[i].waiting = false;
}

int live_threads() {
  int n = 0;
  for (const Thread& t : block().threads) n += !t.finished;
  return n;
}

void complete_barrier() {
  Block& b = block();
  b.barrier_arrived = 0;
  for (Thread& t : b.threads) t.waiting = false;
}

// a thread that returns no longer takes part: collectives it would complete now complete
void retire(Thread& t) {
  for (auto& group : t.committed) perform(group);
  perform(t.open);
  t.committed.clear();
  t.open.clear();
  t.finished = true;
  Warp& w = block().warps[t.warp];
  if (w.arrived > 0 && w.arrived == live_members(w)) complete_warp(w);
  if (block().barrier_arrived > 0 && block().barrier_arrived == live_threads()) complete_barrier();
}

void fiber_entry() {
  Block& b = block();
  Thread& t = self();
  try {
    (*b.body)();
  } catch (const Aborted&) {
  } catch (const std::exception& e) {
    if (b.error.empty()) b.error = std::string("exception in device code: ") + e.what();
  }
  retire(t);
}  // returns to the scheduler (uc_link)

const char* kind_name(Collective k) {
  switch (k) {
    case Collective::kShuffle: return "shuffle";
    case Collective::kVote: return "vote";
    case Collective::kSyncWarp: return "__syncwarp";
    case Collective::kMma: return "mma";
    case Collective::kLdmatrix: return "ldmatrix";
    case Collective::kMovmatrix: return "movmatrix";
  }
  return "?";
}

void run_block(Block& b, bool reverse) {
  const int n = int(b.dim.x * b.dim.y * b.dim.z);
  b.threads.assign(n, Thread{});
  b.warps.assign((n + kWarpSize - 1) / kWarpSize, Warp{});
  while (int(g_stacks.size()) < n) g_stacks.emplace_back(new char[kStackBytes]);
  for (int i = 0; i < n; ++i) {
    Thread& t = b.threads[i];
    t.index = uint3{unsigned(i % b.dim.x), unsigned(i / b.dim.x % b.dim.y), unsigned(i / (b.dim.x * b.dim.y))};
    t.warp = i / kWarpSize;
    t.lane = i % kWarpSize;
    b.warps[t.warp].members.push_back(i);
    getcontext(&t.context);
    t.context.uc_stack.ss_sp = g_stacks[i].get();
    t.context.uc_stack.ss_size = kStackBytes;
    t.context.uc_link = &b.scheduler;
    makecontext(&t.context, fiber_entry, 0);
  }
  for (;;) {
    bool live = false, ran = false;
    for (int k = 0; k < n && b.error.empty(); ++k) {
      const int i = reverse ? n - 1 - k : k;
      if (b.threads[i].finished) continue;
      live = true;
      if (b.threads[i].waiting) continue;
      b.current = i;
      swapcontext(&b.scheduler, &b.threads[i].context);
      ran = true;
    }
    if (!b.error.empty() || !live) break;
    if (!ran) {
      std::string where;
      for (const Warp& w : b.warps)
        if (w.arrived) where += " warp waits at " + std::string(kind_name(w.kind)) + ";";
      b.error = "deadlock: every live thread waits (" + where + " barrier: " + std::to_string(b.barrier_arrived) +
                " arrived)";
    }
  }
  if (!b.error.empty()) {
    // fibers stuck in a collective are abandoned (their stacks are reused); a block's state is PODs
    const uint3 i = b.index;
    throw std::runtime_error("CUDA emulation, block (" + std::to_string(i.x) + ", " + std::to_string(i.y) + ", " +
                             std::to_string(i.z) + "): " + b.error);
  }
}

bool env_is(const char* name, const char* value) {
  const char* v = std::getenv(name);
  return v && std::string(v) == value;
}

}  // namespace

uint3 thread_index() { return self().index; }
uint3 block_index() { return block().index; }
dim3 block_dim() { return block().dim; }
dim3 grid_dim() { return block().grid; }
unsigned char* dynamic_shared_memory() { return block().dynamic_smem; }

const uint32_t (*warp_exchange(Collective kind, const uint32_t* words, int n))[kExchangeWords] {
  Block& b = block();
  Thread& t = self();
  Warp& w = b.warps[t.warp];
  if (w.arrived > 0 && w.kind != kind)
    fail(std::string("warp divergence: lane ") + std::to_string(t.lane) + " reached " + kind_name(kind) +
         " while others wait at " + kind_name(w.kind));
  w.kind = kind;
  for (int i = 0; i < n; ++i) w.in[t.lane][i] = words[i];
  if (++w.arrived == live_members(w)) {
    complete_warp(w);
  } else {
    t.waiting = true;
    yield();
  }
  return w.out;
}

void sync_threads() {
  Block& b = block();
  Thread& t = self();
  if (++b.barrier_arrived == live_threads()) {
    complete_barrier();
  } else {
    t.waiting = true;
    yield();
  }
}

void cp_async(void* dst, const void* src, int bytes) {
  if (reinterpret_cast<uintptr_t>(dst) % bytes || reinterpret_cast<uintptr_t>(src) % bytes)
    fail("cp.async of " + std::to_string(bytes) + " bytes from or to an address not aligned to its size");
  if (block().copies_at_issue) {
    std::memcpy(dst, src, bytes);
  } else {
    self().open.push_back(Copy{dst, src, bytes});
  }
}

void cp_async_commit() {
  Thread& t = self();
  t.committed.push_back(std::move(t.open));
  t.open.clear();
}

void cp_async_wait(int newest_pending) {
  Thread& t = self();
  while (int(t.committed.size()) > newest_pending) {
    perform(t.committed.front());
    t.committed.pop_front();
  }
}

void launch(dim3 grid, dim3 dim, size_t smem_bytes, const std::function<void()>& body) {
  if (g_block) throw std::logic_error("CUDA emulation: a launch from device code");
  std::vector<uint4> smem((smem_bytes + sizeof(uint4) - 1) / sizeof(uint4));  // 16-byte aligned
  const bool copies_at_issue = env_is("LOWRANK_OPS_EMULATE_COPIES", "issue");
  const bool reverse = env_is("LOWRANK_OPS_EMULATE_ORDER", "reverse");
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        Block b;
        b.grid = grid;
        b.dim = dim;
        b.index = uint3{x, y, z};
        b.body = &body;
        b.copies_at_issue = copies_at_issue;
        b.dynamic_smem = reinterpret_cast<unsigned char*>(smem.data());
        std::memset(b.dynamic_smem, 0xA5, smem.size() * sizeof(uint4));
        g_block = &b;
        try {
          run_block(b, reverse);
        } catch (...) {
          g_block = nullptr;
          throw;
        }
        g_block = nullptr;
      }
}

}  // namespace emu
}  // namespace lowrank_ops

// ------------------------------------------------------------------ CUDA runtime calls, emulated
cudaError_t cudaGetLastError() { return cudaSuccess; }
const char* cudaGetErrorString(cudaError_t) { return "no error (CUDA emulation)"; }
const char* cudaGetErrorName(cudaError_t) { return "cudaSuccess"; }
cudaError_t cudaFuncSetAttribute(const void*, cudaFuncAttribute, int) { return cudaSuccess; }
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(int* blocks, const void*, int, size_t, unsigned) {
  *blocks = 2;  // the emulation runs one block at a time; this sizes grids like a GPU that fits two
  return cudaSuccess;
}
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, const void* kernel, int threads, size_t smem) {
  return cudaOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(blocks, kernel, threads, smem, 0);
}
cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
