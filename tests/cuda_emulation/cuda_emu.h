// A CPU stand-in for the CUDA features src/cuda/kernels.cu uses, so that its kernels can be
// compiled by g++ and run on machines with no GPU (src/cuda_emulated.rs). Each block runs on
// its own OS threads, one per CUDA thread, the blocks one after another: `__syncthreads` is a
// barrier over the block, `__shfl_down_sync` an exchange through memory with a barrier over
// the warp, `__shared__` memory a static (one block runs at a time), `atomicAdd` a lock.
// It checks what the kernels compute, not how fast, nor anything about memory ordering
// beyond what these barriers give.
#pragma once

#include <barrier>
#include <cstdint>
#include <cstring>
#include <math.h>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

inline thread_local dim3 threadIdx;
inline thread_local dim3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static

namespace kiln_emu {
inline std::barrier<> *block_barrier = nullptr;
inline std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
// One 8-byte slot per thread of the block, for the warp exchanges.
inline std::vector<uint64_t> exchange;
inline std::mutex atomic_lock;
}  // namespace kiln_emu

inline void __syncthreads() { kiln_emu::block_barrier->arrive_and_wait(); }

template <class T>
T __shfl_down_sync(unsigned, T v, int offset) {
    static_assert(sizeof(T) <= 8, "an exchange slot is 8 bytes");
    const unsigned lane = threadIdx.x & 31u;
    const unsigned warp = threadIdx.x >> 5;
    std::memcpy(&kiln_emu::exchange[threadIdx.x], &v, sizeof(T));
    kiln_emu::warp_barriers[warp]->arrive_and_wait();
    T r = v;
    if (lane + offset < 32) {
        std::memcpy(&r, &kiln_emu::exchange[threadIdx.x + offset], sizeof(T));
    }
    kiln_emu::warp_barriers[warp]->arrive_and_wait();
    return r;
}

inline double atomicAdd(double *address, double v) {
    std::lock_guard<std::mutex> guard(kiln_emu::atomic_lock);
    const double old = *address;
    *address = old + v;
    return old;
}

// Runs `kernel` (a callable with no arguments) over a 2-D grid of 1-D blocks.
template <class F>
void kiln_launch(dim3 grid, unsigned threads, F kernel) {
    if (threads == 0 || threads % 32 != 0 || threads > 1024) {
        throw std::runtime_error("blocks of 32 to 1024 threads, a multiple of 32");
    }
    gridDim = grid;
    blockDim = dim3{threads, 1, 1};
    kiln_emu::exchange.assign(threads, 0);
    for (unsigned by = 0; by < grid.y; ++by) {
        for (unsigned bx = 0; bx < grid.x; ++bx) {
            std::barrier<> block(threads);
            kiln_emu::block_barrier = &block;
            kiln_emu::warp_barriers.clear();
            for (unsigned w = 0; w < threads / 32; ++w) {
                kiln_emu::warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
            }
            std::vector<std::thread> pool;
            pool.reserve(threads);
            for (unsigned t = 0; t < threads; ++t) {
                pool.emplace_back([=] {
                    threadIdx = dim3{t, 0, 0};
                    blockIdx = dim3{bx, by, 0};
                    kernel();
                });
            }
            for (auto &t : pool) {
                t.join();
            }
        }
    }
}
