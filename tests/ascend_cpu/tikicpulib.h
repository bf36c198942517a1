// CPU test double of CANN's CPU debug launch (see API.md): ICPU_RUN_KF runs every block index of
// a launch in turn on the calling thread. Kernels are driven from Python through ctypes, so no
// exception may escape a launch: the first failing block stops it and its message is kept for
// tileflow_cpu_double_last_error(). Like the block index, that message belongs to the calling
// thread: ctypes releases the GIL during a launch, so two Python threads may launch at once.
#pragma once

#include <cstdlib>
#include <cstring>
#include <string>

#include "kernel_operator.h"

namespace AscendC {

enum class KernelMode { AIV_MODE, AIC_MODE, MIX_MODE };
inline void SetKernelMode(KernelMode) {}

// GM buffers for host code; fresh bytes are 0xFF like the UB, so unwritten outputs show up.
inline void* GmAlloc(size_t bytes) {
    const size_t rounded = (bytes + 63) / 64 * 64;
    void* p = std::aligned_alloc(64, rounded ? rounded : 64);
    if (p) std::memset(p, 0xFF, rounded);
    return p;
}
inline void GmFree(void* p) { std::free(p); }

namespace detail {
// Per thread, as blockIdx/blockNum/pipeAlive: a launch on another thread must neither clear this
// thread's error nor stop this thread's blocks.
inline thread_local std::string lastError;

template <class F> void RunBlocks(int64_t blockDim, F&& launch) {
    lastError.clear();
    if (blockDim <= 0) {
        lastError = Msg("ICPU_RUN_KF: blockDim ", blockDim, " must be positive");
        return;
    }
    for (int64_t i = 0; i < blockDim && lastError.empty(); ++i) {
        blockIdx = i;
        blockNum = blockDim;
        sysWorkspace = nullptr;  // each kernel invocation sets its own (SetSysWorkspace)
        try {
            launch();
        } catch (const std::exception& e) {
            lastError = Msg("block ", i, ": ", e.what());
        } catch (...) {
            lastError = Msg("block ", i, ": unknown exception");
        }
    }
    blockIdx = 0;
    blockNum = 1;
    sysWorkspace = nullptr;
}
}  // namespace detail
}  // namespace AscendC

// "" when the calling thread's last ICPU_RUN_KF succeeded, else "block <i>: <what went wrong>".
// `used` keeps the symbol in the shared library even when no code in it calls the function.
extern "C" inline __attribute__((used, visibility("default"))) const char* tileflow_cpu_double_last_error() {
    return AscendC::detail::lastError.c_str();
}

#define ICPU_RUN_KF(kernel, blockDim, ...) \
    ::AscendC::detail::RunBlocks(int64_t(blockDim), [&]() { kernel(__VA_ARGS__); })
