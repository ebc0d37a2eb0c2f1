// kiln's own CUDA kernels, for the CUDA build (build.rs compiles this file to PTX with nvcc
// when the `cuda` feature is on; src/cuda/mod.rs loads and launches them).
//
// candle has no fused optimizer and no dropout that a run can seed: AdamW written as candle
// tensor ops is a dozen kernels per parameter per step, each allocating its output, and the
// global gradient norm three more; a MiniLM step has about a hundred parameters, so that is
// over a thousand launches for the update alone, more than the forward and backward together.
// Dropout's masks were made on the host and copied over (151 MB a step for the decoder
// benchmark's LoRA inputs), a LayerNorm was some 11 kernels forward and 25 backward, and a
// softmax 5 and 8, an activation's backward 6 to 10. Here the update of up to 48 parameters
// is one kernel, as is their share of the norm, dropout one kernel that hashes its mask as it goes,
// a norm one kernel forward and three backward, and a softmax (attention's scale and mask
// taken in), an activation or a rotary embedding one each way.

#include <stddef.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

// The optimizer's kernels take many tensors per launch, as PyTorch's fused AdamW does: a list
// of up to KILN_LIST tensors passed by value as the kernel's argument (well under the 4 KB a
// kernel's arguments may take), each cut into chunks of KILN_LIST_CHUNK elements, a block per
// chunk. `block_start[t]` is tensor t's first block; `block_start[count]` is the grid's size.
// A MiniLM step's ~105 parameters are then 3 launches for the update and 3 for the norm, where
// one kernel per tensor was ~210.
#define KILN_LIST 48
#define KILN_LIST_CHUNK 4096

// The tensor block `block` works on.
__device__ __forceinline__ int kiln_list_tensor(
    const unsigned int *block_start,
    const int count,
    const unsigned int block) {
    int t = 0;
    while (t + 1 < count && block_start[t + 1] <= block) {
        ++t;
    }
    return t;
}

struct KilnAdamWList {
    float *theta[KILN_LIST];
    float *m[KILN_LIST];
    float *v[KILN_LIST];
    const float *grad[KILN_LIST];
    unsigned long long n[KILN_LIST];
    float decay[KILN_LIST];
    float step_size[KILN_LIST];
    float inv_sqrt_bc2[KILN_LIST];
    unsigned int block_start[KILN_LIST + 1];
    int count;
};

// One AdamW update of every tensor of `list`, in place: the same arithmetic, in the same order,
// as `adamw_chunk` in src/train/optim.rs (PyTorch's torch.optim.AdamW), so the CPU and a GPU
// agree to rounding. Each tensor has its own decay (1 - lr * weight_decay), step size
// (lr / (1 - beta1^t)) and 1 / sqrt(1 - beta2^t), its group's and its step's.
extern "C" __global__ void kiln_adamw_list_f32(
    const KilnAdamWList list,
    const float beta1,
    const float beta2,
    const float eps,
    const float grad_scale) {
    const int t = kiln_list_tensor(list.block_start, list.count, blockIdx.x);
    const size_t start = (size_t)(blockIdx.x - list.block_start[t]) * KILN_LIST_CHUNK;
    const size_t n = (size_t)list.n[t];
    const size_t end = start + KILN_LIST_CHUNK < n ? start + KILN_LIST_CHUNK : n;
    float *__restrict__ theta = list.theta[t];
    float *__restrict__ m = list.m[t];
    float *__restrict__ v = list.v[t];
    const float *__restrict__ grad = list.grad[t];
    const float decay = list.decay[t];
    const float step_size = list.step_size[t];
    const float inv_sqrt_bc2 = list.inv_sqrt_bc2[t];
    const float c1 = 1.0f - beta1;
    const float c2 = 1.0f - beta2;
    for (size_t i = start + threadIdx.x; i < end; i += blockDim.x) {
        const float g = grad[i] * grad_scale;
        const float mi = beta1 * m[i] + c1 * g;
        const float vi = beta2 * v[i] + c2 * g * g;
        m[i] = mi;
        v[i] = vi;
        const float denom = sqrtf(vi) * inv_sqrt_bc2 + eps;
        theta[i] = theta[i] * decay - step_size * mi / denom;
    }
}

struct KilnSumList {
    const float *x[KILN_LIST];
    unsigned long long n[KILN_LIST];
    unsigned int block_start[KILN_LIST + 1];
    int count;
};

// Adds the sum of the squares of every element of the tensors of `list` to `*out` (in f64):
// each block sums its chunk (warp shuffles, then one warp over the warps' sums) and adds it
// atomically. `*out` is zeroed by the caller; the blocks' additions come in no fixed order, so
// the last bits of the sum may differ from run to run.
extern "C" __global__ void kiln_sum_squares_list_f32(
    const KilnSumList list,
    double *__restrict__ out) {
    __shared__ double warp_sums[32];
    const int t = kiln_list_tensor(list.block_start, list.count, blockIdx.x);
    const size_t start = (size_t)(blockIdx.x - list.block_start[t]) * KILN_LIST_CHUNK;
    const size_t n = (size_t)list.n[t];
    const size_t end = start + KILN_LIST_CHUNK < n ? start + KILN_LIST_CHUNK : n;
    const float *__restrict__ x = list.x[t];
    double acc = 0.0;
    for (size_t i = start + threadIdx.x; i < end; i += blockDim.x) {
        const double xi = (double)x[i];
        acc += xi * xi;
    }
    for (int offset = 16; offset > 0; offset >>= 1) {
        acc += __shfl_down_sync(0xffffffffu, acc, offset);
    }
    const unsigned lane = threadIdx.x & 31u;
    const unsigned warp = threadIdx.x >> 5;
    if (lane == 0) {
        warp_sums[warp] = acc;
    }
    __syncthreads();
    if (warp == 0) {
        const unsigned warps = (blockDim.x + 31u) >> 5;
        acc = lane < warps ? warp_sums[lane] : 0.0;
        for (int offset = 16; offset > 0; offset >>= 1) {
            acc += __shfl_down_sync(0xffffffffu, acc, offset);
        }
        if (lane == 0) {
            atomicAdd(out, acc);
        }
    }
}

// Inverted dropout with the hashed mask of kiln's CPU kernels (`Dropout` in src/nn/mlp.rs):
// element i is kept when the top 32 bits of splitmix64(seed ^ i * 2^64/phi) fall below
// `threshold` (keep * 2^32), and then scaled by `scale` (1 / keep); the product is taken in
// f32 and rounded once to the element type. The same seed gives the same mask on every device,
// and the backward is the same kernel applied to the gradient.
__device__ __forceinline__ unsigned long long kiln_splitmix64(unsigned long long x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

__device__ __forceinline__ float kiln_dropout_factor(
    const size_t i,
    const unsigned long long seed,
    const unsigned long long threshold,
    const float scale) {
    const unsigned long long bits =
        kiln_splitmix64(seed ^ ((unsigned long long)i * 0x9E3779B97F4A7C15ull));
    return (bits >> 32) < threshold ? scale : 0.0f;
}

#define KILN_DROPOUT(NAME, T, TO_F32, FROM_F32)                                               \
    extern "C" __global__ void NAME(                                                          \
        const T *__restrict__ x,                                                              \
        T *__restrict__ y,                                                                    \
        const size_t n,                                                                       \
        const unsigned long long seed,                                                        \
        const unsigned long long threshold,                                                   \
        const float scale) {                                                                  \
        const size_t stride = (size_t)blockDim.x * gridDim.x;                                 \
        for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {  \
            y[i] = FROM_F32(TO_F32(x[i]) * kiln_dropout_factor(i, seed, threshold, scale));   \
        }                                                                                     \
    }

#define KILN_ID(v) (v)
KILN_DROPOUT(kiln_dropout_f32, float, KILN_ID, KILN_ID)
KILN_DROPOUT(kiln_dropout_bf16, __nv_bfloat16, __bfloat162float, __float2bfloat16)
KILN_DROPOUT(kiln_dropout_f16, __half, __half2float, __float2half)

// ---------------------------------------------------------------------------------------------
// LayerNorm and RMSNorm over the last dimension (f32), forward and backward, for
// `nn::ops::layer_norm` / `rms_norm` on a GPU, where candle's ops take about 11 kernels forward
// and twice that backward per norm. `centered` 1 is LayerNorm (x - mean, then a shift `b`),
// 0 RMSNorm (no mean, no shift). One block per row; the row's sums are block reductions.

// The sum of `v` over the block (every thread gets it). `shared` holds 32 floats; the block is
// a multiple of 32 threads, at most 1024.
__device__ float kiln_block_sum(float v, float *shared) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        v += __shfl_down_sync(0xffffffffu, v, offset);
    }
    const unsigned lane = threadIdx.x & 31u;
    const unsigned warp = threadIdx.x >> 5;
    if (lane == 0) {
        shared[warp] = v;
    }
    __syncthreads();
    if (warp == 0) {
        v = lane < (blockDim.x >> 5) ? shared[lane] : 0.0f;
        for (int offset = 16; offset > 0; offset >>= 1) {
            v += __shfl_down_sync(0xffffffffu, v, offset);
        }
        if (lane == 0) {
            shared[0] = v;
        }
    }
    __syncthreads();
    const float sum = shared[0];
    __syncthreads();
    return sum;
}

// The mean (0 unless centered) and 1/sqrt(variance + eps) of one row.
__device__ void kiln_row_stats(
    const float *__restrict__ xr,
    const int dim,
    const float eps,
    const int centered,
    float *shared,
    float *mean_out,
    float *rstd_out) {
    float mean = 0.0f;
    if (centered) {
        float s = 0.0f;
        for (int j = threadIdx.x; j < dim; j += blockDim.x) {
            s += xr[j];
        }
        mean = kiln_block_sum(s, shared) / (float)dim;
    }
    float s2 = 0.0f;
    for (int j = threadIdx.x; j < dim; j += blockDim.x) {
        const float d = xr[j] - mean;
        s2 += d * d;
    }
    const float var = kiln_block_sum(s2, shared) / (float)dim;
    *mean_out = mean;
    *rstd_out = 1.0f / sqrtf(var + eps);
}

// y = (x - mean) * rstd * w (+ b), row by row (grid: one block per row).
extern "C" __global__ void kiln_norm_fwd_f32(
    const float *__restrict__ x,
    const float *__restrict__ w,
    const float *__restrict__ b,
    float *__restrict__ y,
    const int dim,
    const float eps,
    const int centered) {
    __shared__ float shared[32];
    const size_t row = blockIdx.x;
    const float *xr = x + row * (size_t)dim;
    float *yr = y + row * (size_t)dim;
    float mean, rstd;
    kiln_row_stats(xr, dim, eps, centered, shared, &mean, &rstd);
    for (int j = threadIdx.x; j < dim; j += blockDim.x) {
        const float v = (xr[j] - mean) * rstd * w[j];
        yr[j] = centered ? v + b[j] : v;
    }
}

// The input's gradient, row by row: with gw = dy * w and xhat = (x - mean) * rstd,
// dx = rstd * (gw - mean(gw) - xhat * mean(gw * xhat)) (RMSNorm: no mean(gw) term).
// Each row's (mean, rstd) also goes to `stats` for the weight gradients.
extern "C" __global__ void kiln_norm_bwd_dx_f32(
    const float *__restrict__ x,
    const float *__restrict__ w,
    const float *__restrict__ dy,
    float *__restrict__ dx,
    float *__restrict__ stats,
    const int dim,
    const float eps,
    const int centered) {
    __shared__ float shared[32];
    const size_t row = blockIdx.x;
    const float *xr = x + row * (size_t)dim;
    const float *gr = dy + row * (size_t)dim;
    float *dxr = dx + row * (size_t)dim;
    float mean, rstd;
    kiln_row_stats(xr, dim, eps, centered, shared, &mean, &rstd);
    float s_gw = 0.0f, s_gw_xhat = 0.0f;
    for (int j = threadIdx.x; j < dim; j += blockDim.x) {
        const float gw = gr[j] * w[j];
        s_gw += gw;
        s_gw_xhat += gw * ((xr[j] - mean) * rstd);
    }
    const float mean_gw = centered ? kiln_block_sum(s_gw, shared) / (float)dim : 0.0f;
    const float mean_gw_xhat = kiln_block_sum(s_gw_xhat, shared) / (float)dim;
    for (int j = threadIdx.x; j < dim; j += blockDim.x) {
        const float xhat = (xr[j] - mean) * rstd;
        dxr[j] = rstd * (gr[j] * w[j] - mean_gw - xhat * mean_gw_xhat);
    }
    if (threadIdx.x == 0) {
        stats[2 * row] = mean;
        stats[2 * row + 1] = rstd;
    }
}

// The weight (and shift) gradients' partial sums over a chunk of `chunk` rows: grid
// (column blocks, row chunks), a thread per column; partial[c * dim + j] for chunk c.
extern "C" __global__ void kiln_norm_bwd_dw_partial_f32(
    const float *__restrict__ x,
    const float *__restrict__ dy,
    const float *__restrict__ stats,
    float *__restrict__ partial_dw,
    float *__restrict__ partial_db,
    const size_t rows,
    const int dim,
    const int chunk,
    const int centered) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= dim) {
        return;
    }
    const size_t first = (size_t)blockIdx.y * chunk;
    size_t last = first + chunk;
    if (last > rows) {
        last = rows;
    }
    float s_dw = 0.0f, s_db = 0.0f;
    for (size_t r = first; r < last; ++r) {
        const float g = dy[r * dim + j];
        const float xhat = (x[r * dim + j] - stats[2 * r]) * stats[2 * r + 1];
        s_dw += g * xhat;
        s_db += g;
    }
    partial_dw[(size_t)blockIdx.y * dim + j] = s_dw;
    if (centered) {
        partial_db[(size_t)blockIdx.y * dim + j] = s_db;
    }
}

// The chunks' partial sums added up, a thread per column, in chunk order (deterministic).
extern "C" __global__ void kiln_norm_bwd_dw_final_f32(
    const float *__restrict__ partial_dw,
    const float *__restrict__ partial_db,
    float *__restrict__ dw,
    float *__restrict__ db,
    const int chunks,
    const int dim,
    const int centered) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= dim) {
        return;
    }
    float s_dw = 0.0f, s_db = 0.0f;
    for (int c = 0; c < chunks; ++c) {
        s_dw += partial_dw[(size_t)c * dim + j];
        if (centered) {
            s_db += partial_db[(size_t)c * dim + j];
        }
    }
    dw[j] = s_dw;
    if (centered) {
        db[j] = s_db;
    }
}

// ---------------------------------------------------------------------------------------------
// Softmax over the last dimension (f32), forward and backward, for `nn::ops::softmax_last_dim`
// and `nn::ops::attention_softmax` on a GPU (attention's probabilities, the scores' scale and
// additive mask taken in), where candle's ops take 5 kernels forward and about 8 backward (and
// 2 and 5 more for the scale and mask), each reading and writing the whole scores tensor. One
// block per row (its threads a
// multiple of 32 no larger than the row needs, at most 256); `kiln_block_max` as
// `kiln_block_sum`.

__device__ float kiln_block_max(float v, float *shared) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        v = fmaxf(v, __shfl_down_sync(0xffffffffu, v, offset));
    }
    const unsigned lane = threadIdx.x & 31u;
    const unsigned warp = threadIdx.x >> 5;
    if (lane == 0) {
        shared[warp] = v;
    }
    __syncthreads();
    if (warp == 0) {
        v = lane < (blockDim.x >> 5) ? shared[lane] : -INFINITY;
        for (int offset = 16; offset > 0; offset >>= 1) {
            v = fmaxf(v, __shfl_down_sync(0xffffffffu, v, offset));
        }
        if (lane == 0) {
            shared[0] = v;
        }
    }
    __syncthreads();
    const float max = shared[0];
    __syncthreads();
    return max;
}

// y = softmax(scale * x + mask) row by row: exp(v - max) / sum(exp(v - max)). `mask` (additive,
// f32) may be null. Row r of a [batch, .., q, s] tensor is of batch r / per_batch and query
// r % q; its mask row is batch * mask_batch + query * mask_query (strides in rows, 0 where the
// mask is broadcast). v is rounded as candle's ops round it: the product, then the sum.
__device__ __forceinline__ const float *kiln_mask_row(
    const float *mask,
    const size_t row,
    const long long per_batch,
    const int q,
    const long long mask_batch,
    const int mask_query,
    const int dim) {
    if (mask == nullptr) {
        return nullptr;
    }
    const size_t batch = row / (size_t)per_batch;
    const size_t query = row % (size_t)q;
    return mask + (batch * (size_t)mask_batch + query * (size_t)mask_query) * (size_t)dim;
}

extern "C" __global__ void kiln_softmax_fwd_f32(
    const float *__restrict__ x,
    float *__restrict__ y,
    const int dim,
    const float scale,
    const float *__restrict__ mask,
    const long long per_batch,
    const int q,
    const long long mask_batch,
    const int mask_query) {
    __shared__ float shared[32];
    const size_t row = blockIdx.x;
    const float *xr = x + row * (size_t)dim;
    const float *mr = kiln_mask_row(mask, row, per_batch, q, mask_batch, mask_query, dim);
    float *yr = y + row * (size_t)dim;
    float m = -INFINITY;
    for (int j = threadIdx.x; j < dim; j += blockDim.x) {
        const float v = xr[j] * scale;
        m = fmaxf(m, mr == nullptr ? v : v + mr[j]);
    }
    m = kiln_block_max(m, shared);
    float s = 0.0f;
    for (int j = threadIdx.x; j < dim; j += blockDim.x) {
        const float v = xr[j] * scale;
        const float e = expf((mr == nullptr ? v : v + mr[j]) - m);
        yr[j] = e;
        s += e;
    }
    const float inv = 1.0f / kiln_block_sum(s, shared);
    for (int j = threadIdx.x; j < dim; j += blockDim.x) {
        yr[j] *= inv;
    }
}

// dx = (y * (dy - sum(dy * y))) * scale, row by row, from the forward's output y (the mask is
// a constant: it has no gradient).
extern "C" __global__ void kiln_softmax_bwd_f32(
    const float *__restrict__ y,
    const float *__restrict__ dy,
    float *__restrict__ dx,
    const int dim,
    const float scale) {
    __shared__ float shared[32];
    const size_t row = blockIdx.x;
    const float *yr = y + row * (size_t)dim;
    const float *gr = dy + row * (size_t)dim;
    float *dxr = dx + row * (size_t)dim;
    float s = 0.0f;
    for (int j = threadIdx.x; j < dim; j += blockDim.x) {
        s += gr[j] * yr[j];
    }
    const float dot = kiln_block_sum(s, shared);
    for (int j = threadIdx.x; j < dim; j += blockDim.x) {
        dxr[j] = (yr[j] * (gr[j] - dot)) * scale;
    }
}

// ---------------------------------------------------------------------------------------------
// The MLPs' activations, forward and backward, for `nn::ops::gelu_erf` (BERT, ViT) and
// `nn::ops::silu_mul` (Llama/Qwen's gated MLP) on a GPU, where the backward of candle's
// gelu_erf is about 10 kernels and silu's about 6 plus the product's. In f32, bf16 and f16
// (mixed precision's activations): computed in f32, each result rounded once.
//
//   kiln_gelu_fwd_T(x, y, n):              y = x * Phi(x)
//   kiln_gelu_bwd_T(x, dy, dx, n):         dx = dy * (Phi(x) + x * phi(x))
//   kiln_silu_mul_fwd_T(g, u, y, n):       y = silu(g) * u, silu(g) = g * sigmoid(g)
//   kiln_silu_mul_bwd_T(g, u, dy, out, n): out[i] = dy * u * s * (1 + g * (1 - s)) (the gate's
//                                          gradient), out[n + i] = dy * silu(g) (the up's)

__device__ __forceinline__ float kiln_phi_cdf(float v) {
    return 0.5f * (1.0f + erff(v * 0.70710678118654752f));
}

__device__ __forceinline__ float kiln_sigmoid(float g) { return 1.0f / (1.0f + expf(-g)); }

#define KILN_ACTIVATIONS(SUFFIX, T, TO_F32, FROM_F32)                                           \
    extern "C" __global__ void kiln_gelu_fwd_##SUFFIX(                                          \
        const T *__restrict__ x, T *__restrict__ y, const size_t n) {                           \
        const size_t stride = (size_t)blockDim.x * gridDim.x;                                   \
        for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {    \
            const float v = TO_F32(x[i]);                                                       \
            y[i] = FROM_F32(v * kiln_phi_cdf(v));                                               \
        }                                                                                       \
    }                                                                                           \
    extern "C" __global__ void kiln_gelu_bwd_##SUFFIX(                                          \
        const T *__restrict__ x, const T *__restrict__ dy, T *__restrict__ dx, const size_t n) { \
        const size_t stride = (size_t)blockDim.x * gridDim.x;                                   \
        for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {    \
            const float v = TO_F32(x[i]);                                                       \
            const float pdf = 0.39894228040143268f * expf(-0.5f * v * v);                       \
            dx[i] = FROM_F32(TO_F32(dy[i]) * (kiln_phi_cdf(v) + v * pdf));                      \
        }                                                                                       \
    }                                                                                           \
    extern "C" __global__ void kiln_silu_mul_fwd_##SUFFIX(                                      \
        const T *__restrict__ gate, const T *__restrict__ up, T *__restrict__ y,                \
        const size_t n) {                                                                       \
        const size_t stride = (size_t)blockDim.x * gridDim.x;                                   \
        for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {    \
            const float g = TO_F32(gate[i]);                                                    \
            y[i] = FROM_F32(g * kiln_sigmoid(g) * TO_F32(up[i]));                               \
        }                                                                                       \
    }                                                                                           \
    extern "C" __global__ void kiln_silu_mul_bwd_##SUFFIX(                                      \
        const T *__restrict__ gate, const T *__restrict__ up, const T *__restrict__ dy,         \
        T *__restrict__ out, const size_t n) {                                                  \
        const size_t stride = (size_t)blockDim.x * gridDim.x;                                   \
        for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {    \
            const float g = TO_F32(gate[i]);                                                    \
            const float d = TO_F32(dy[i]);                                                      \
            const float s = kiln_sigmoid(g);                                                    \
            out[i] = FROM_F32(d * TO_F32(up[i]) * s * (1.0f + g * (1.0f - s)));                 \
            out[n + i] = FROM_F32(d * g * s);                                                   \
        }                                                                                       \
    }

KILN_ACTIVATIONS(f32, float, KILN_ID, KILN_ID)
KILN_ACTIVATIONS(bf16, __nv_bfloat16, __bfloat162float, __float2bfloat16)
KILN_ACTIVATIONS(f16, __half, __half2float, __float2half)

// ---------------------------------------------------------------------------------------------
// Rotary position embeddings (the non-interleaved form of Llama/Qwen), forward and backward,
// for `nn::ops::rope` on a GPU (decoders' queries and keys, laid out [.., t, d]), where candle's
// ops take about 6 kernels forward and about 20 backward, the tables' products included. In
// f32, bf16 and f16 (the tables in the same type), computed in f32, each result rounded once.
//
//   kiln_rope_T(x, cos, sin, y, pairs, t, half, sign): for each row (of d = 2 half elements,
//   at position row % t) and j < half, with c = cos[p, j] and s = sign * sin[p, j]:
//     y[j] = x[j] c - x[j + half] s,   y[j + half] = x[j + half] c + x[j] s.
//   sign -1 is the inverse rotation: the backward, applied to the output's gradient.

#define KILN_ROPE(SUFFIX, T, TO_F32, FROM_F32)                                                  \
    extern "C" __global__ void kiln_rope_##SUFFIX(                                              \
        const T *__restrict__ x, const T *__restrict__ cos, const T *__restrict__ sin,          \
        T *__restrict__ y, const size_t pairs, const int t, const int half, const float sign) { \
        const size_t stride = (size_t)blockDim.x * gridDim.x;                                   \
        for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < pairs; i += stride) { \
            const size_t row = i / (size_t)half;                                                \
            const size_t j = i % (size_t)half;                                                  \
            const size_t at = (row % (size_t)t) * (size_t)half + j;                             \
            const size_t base = row * 2 * (size_t)half + j;                                     \
            const float c = TO_F32(cos[at]);                                                    \
            const float s = sign * TO_F32(sin[at]);                                             \
            const float x1 = TO_F32(x[base]);                                                   \
            const float x2 = TO_F32(x[base + half]);                                            \
            y[base] = FROM_F32(x1 * c - x2 * s);                                                \
            y[base + half] = FROM_F32(x2 * c + x1 * s);                                         \
        }                                                                                       \
    }

KILN_ROPE(f32, float, KILN_ID, KILN_ID)
KILN_ROPE(bf16, __nv_bfloat16, __bfloat162float, __float2bfloat16)
KILN_ROPE(f16, __half, __half2float, __float2half)
