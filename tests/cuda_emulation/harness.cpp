// Runs one of src/cuda/kernels.cu's kernels on the CPU (cuda_emu.h), for src/cuda_emulated.rs:
//
//   harness OP DIR
//
// DIR/params.txt holds the sizes and scalars (floats as their IEEE bit patterns, so they
// arrive exactly); the arrays are raw little-endian files in DIR, read as NAME.bin and written
// as NAME.out. The launch shapes are those of src/cuda/mod.rs.
#include "cuda_emu.h"

#include "../../src/cuda/kernels.cu"

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <string>

namespace {

constexpr unsigned THREADS = 256;
constexpr size_t MAX_BLOCKS = 4096;

std::string dir;

template <class T>
std::vector<T> read(const std::string &name) {
    std::ifstream f(dir + "/" + name + ".bin", std::ios::binary);
    if (!f) throw std::runtime_error("cannot read " + name + ".bin");
    std::vector<char> bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    std::vector<T> out(bytes.size() / sizeof(T));
    std::memcpy(out.data(), bytes.data(), out.size() * sizeof(T));
    return out;
}

template <class T>
void write(const std::string &name, const std::vector<T> &v) {
    std::ofstream f(dir + "/" + name + ".out", std::ios::binary);
    f.write(reinterpret_cast<const char *>(v.data()), std::streamsize(v.size() * sizeof(T)));
    if (!f) throw std::runtime_error("cannot write " + name + ".out");
}

std::vector<uint64_t> params() {
    std::ifstream f(dir + "/params.txt");
    std::vector<uint64_t> out;
    for (std::string s; f >> s;) out.push_back(std::stoull(s));
    return out;
}

float f32(uint64_t bits) {
    const uint32_t b = uint32_t(bits);
    float f;
    std::memcpy(&f, &b, 4);
    return f;
}

// src/cuda/mod.rs's `config`: a thread per element up to MAX_BLOCKS blocks (or fewer, given).
dim3 elementwise(size_t n, size_t blocks) {
    if (blocks == 0) blocks = std::min(std::max<size_t>((n + THREADS - 1) / THREADS, 1), MAX_BLOCKS);
    return dim3{unsigned(blocks), 1, 1};
}

template <class T, class K>
void dropout(K kernel, const std::vector<uint64_t> &p) {
    const size_t n = p[1];
    auto x = read<T>("x");
    std::vector<T> y(n);
    const uint64_t seed = p[3], threshold = p[4];
    const float scale = f32(p[5]);
    kiln_launch(elementwise(n, p[2]), THREADS,
                [&] { kernel(x.data(), y.data(), n, seed, threshold, scale); });
    write("y", y);
}

template <class T, class F1, class B1, class F2, class B2>
void activations(F1 gelu_fwd, B1 gelu_bwd, F2 silu_fwd, B2 silu_bwd, const std::vector<uint64_t> &p) {
    const size_t n = p[1];
    auto x = read<T>("x"), u = read<T>("u"), dy = read<T>("dy");
    std::vector<T> gelu(n), gelu_dx(n), silu(n), silu_d(2 * n);
    const dim3 grid = elementwise(n, p[2]);
    kiln_launch(grid, THREADS, [&] { gelu_fwd(x.data(), gelu.data(), n); });
    kiln_launch(grid, THREADS, [&] { gelu_bwd(x.data(), dy.data(), gelu_dx.data(), n); });
    kiln_launch(grid, THREADS, [&] { silu_fwd(x.data(), u.data(), silu.data(), n); });
    kiln_launch(grid, THREADS, [&] { silu_bwd(x.data(), u.data(), dy.data(), silu_d.data(), n); });
    write("gelu", gelu);
    write("gelu_dx", gelu_dx);
    write("silu", silu);
    write("silu_d", silu_d);
}

template <class T, class K>
void rope(K kernel, const std::vector<uint64_t> &p) {
    // dtype rows t half blocks: the forward of x, then the backward (sign -1) of dy
    const size_t pairs = p[1] * p[3];
    const int t = int(p[2]), half = int(p[3]);
    auto x = read<T>("x"), cos = read<T>("cos"), sin = read<T>("sin"), dy = read<T>("dy");
    std::vector<T> y(2 * pairs), dx(2 * pairs);
    const dim3 grid = elementwise(pairs, p[4]);
    kiln_launch(grid, THREADS, [&] {
        kernel(x.data(), cos.data(), sin.data(), y.data(), pairs, t, half, 1.0f);
    });
    kiln_launch(grid, THREADS, [&] {
        kernel(dy.data(), cos.data(), sin.data(), dx.data(), pairs, t, half, -1.0f);
    });
    write("y", y);
    write("dx", dx);
}

}  // namespace

int main(int argc, char **argv) try {
    if (argc != 3) throw std::runtime_error("usage: harness OP DIR");
    const std::string op = argv[1];
    dir = argv[2];
    const auto p = params();
    if (op == "adamw") {
        // count, then per tensor: n decay step_size inv_sqrt_bc2; then beta1 beta2 eps
        // grad_scale. The tensors' elements one after another in each file. One launch per
        // KILN_LIST tensors, as src/train/optim_cuda.rs makes them.
        const size_t count = p[0];
        auto theta = read<float>("theta"), m = read<float>("m"), v = read<float>("v"),
             g = read<float>("grad");
        const size_t k = 1 + 4 * count;
        size_t offset = 0;
        for (size_t first = 0; first < count; first += KILN_LIST) {
            KilnAdamWList list{};
            unsigned int blocks = 0;
            for (size_t t = first; t < count && t < first + KILN_LIST; ++t) {
                const size_t i = t - first, n = p[1 + 4 * t];
                list.theta[i] = theta.data() + offset;
                list.m[i] = m.data() + offset;
                list.v[i] = v.data() + offset;
                list.grad[i] = g.data() + offset;
                list.n[i] = n;
                list.decay[i] = f32(p[2 + 4 * t]);
                list.step_size[i] = f32(p[3 + 4 * t]);
                list.inv_sqrt_bc2[i] = f32(p[4 + 4 * t]);
                list.block_start[i] = blocks;
                blocks += unsigned((n + KILN_LIST_CHUNK - 1) / KILN_LIST_CHUNK);
                list.count = int(i + 1);
                offset += n;
            }
            list.block_start[list.count] = blocks;
            kiln_launch(dim3{blocks, 1, 1}, THREADS, [&] {
                kiln_adamw_list_f32(list, f32(p[k]), f32(p[k + 1]), f32(p[k + 2]),
                                    f32(p[k + 3]));
            });
        }
        write("theta", theta);
        write("m", m);
        write("v", v);
    } else if (op == "sum_squares") {
        // count n_0 .. n_count-1: one sum over every tensor, a launch per KILN_LIST of them
        const size_t count = p[0];
        auto x = read<float>("x");
        std::vector<double> out{0.0};
        size_t offset = 0;
        for (size_t first = 0; first < count; first += KILN_LIST) {
            KilnSumList list{};
            unsigned int blocks = 0;
            for (size_t t = first; t < count && t < first + KILN_LIST; ++t) {
                const size_t i = t - first, n = p[1 + t];
                list.x[i] = x.data() + offset;
                list.n[i] = n;
                list.block_start[i] = blocks;
                blocks += unsigned((n + KILN_LIST_CHUNK - 1) / KILN_LIST_CHUNK);
                list.count = int(i + 1);
                offset += n;
            }
            list.block_start[list.count] = blocks;
            kiln_launch(dim3{blocks, 1, 1}, THREADS,
                        [&] { kiln_sum_squares_list_f32(list, out.data()); });
        }
        write("sum", out);
    } else if (op == "dropout") {
        // dtype (0 f32, 1 bf16, 2 f16) n blocks seed threshold scale
        switch (p[0]) {
            case 0: dropout<float>(kiln_dropout_f32, p); break;
            case 1: dropout<__nv_bfloat16>(kiln_dropout_bf16, p); break;
            case 2: dropout<__half>(kiln_dropout_f16, p); break;
            default: throw std::runtime_error("dtype 0, 1 or 2");
        }
    } else if (op == "norm") {
        // rows dim eps centered chunk: the forward, then the backward as norm_backward runs it
        const size_t rows = p[0];
        const int dim = int(p[1]);
        const float eps = f32(p[2]);
        const int centered = int(p[3]);
        const int chunk = int(p[4]);
        auto x = read<float>("x"), w = read<float>("w"), b = read<float>("b"), dy = read<float>("dy");
        std::vector<float> y(rows * dim), dx(rows * dim), stats(2 * rows), dw(dim), db(dim);
        const dim3 per_row{unsigned(rows), 1, 1};
        kiln_launch(per_row, THREADS, [&] {
            kiln_norm_fwd_f32(x.data(), w.data(), b.data(), y.data(), dim, eps, centered);
        });
        kiln_launch(per_row, THREADS, [&] {
            kiln_norm_bwd_dx_f32(x.data(), w.data(), dy.data(), dx.data(), stats.data(), dim, eps,
                                 centered);
        });
        const int chunks = int((rows + chunk - 1) / chunk);
        const unsigned column_blocks = unsigned((dim + THREADS - 1) / THREADS);
        std::vector<float> partial_dw(size_t(chunks) * dim), partial_db(size_t(chunks) * dim);
        kiln_launch(dim3{column_blocks, unsigned(chunks), 1}, THREADS, [&] {
            kiln_norm_bwd_dw_partial_f32(x.data(), dy.data(), stats.data(), partial_dw.data(),
                                         partial_db.data(), rows, dim, chunk, centered);
        });
        kiln_launch(dim3{column_blocks, 1, 1}, THREADS, [&] {
            kiln_norm_bwd_dw_final_f32(partial_dw.data(), partial_db.data(), dw.data(), db.data(),
                                       chunks, dim, centered);
        });
        write("y", y);
        write("dx", dx);
        write("dw", dw);
        write("db", db);
    } else if (op == "activations") {
        // dtype (0 f32, 1 bf16, 2 f16) n blocks: GELU forward and backward of x; silu(x) * u
        // forward and backward
        switch (p[0]) {
            case 0:
                activations<float>(kiln_gelu_fwd_f32, kiln_gelu_bwd_f32, kiln_silu_mul_fwd_f32,
                                   kiln_silu_mul_bwd_f32, p);
                break;
            case 1:
                activations<__nv_bfloat16>(kiln_gelu_fwd_bf16, kiln_gelu_bwd_bf16,
                                           kiln_silu_mul_fwd_bf16, kiln_silu_mul_bwd_bf16, p);
                break;
            case 2:
                activations<__half>(kiln_gelu_fwd_f16, kiln_gelu_bwd_f16, kiln_silu_mul_fwd_f16,
                                    kiln_silu_mul_bwd_f16, p);
                break;
            default: throw std::runtime_error("dtype 0, 1 or 2");
        }
    } else if (op == "rope") {
        switch (p[0]) {
            case 0: rope<float>(kiln_rope_f32, p); break;
            case 1: rope<__nv_bfloat16>(kiln_rope_bf16, p); break;
            case 2: rope<__half>(kiln_rope_f16, p); break;
            default: throw std::runtime_error("dtype 0, 1 or 2");
        }
    } else if (op == "softmax") {
        // rows dim scale-bits masked per_batch q batch_rows query_rows: the forward (with
        // mask.bin when masked, else a null mask), then the backward from its output, as mod.rs
        // launches them
        const size_t rows = p[0];
        const int dim = int(p[1]);
        const float scale = f32(p[2]);
        auto x = read<float>("x"), dy = read<float>("dy");
        std::vector<float> mask;
        if (p[3] != 0) mask = read<float>("mask");
        const float *m = p[3] != 0 ? mask.data() : nullptr;
        std::vector<float> y(rows * dim), dx(rows * dim);
        const unsigned threads = std::min(std::max((dim + 31) / 32 * 32, 32), int(THREADS));
        const dim3 per_row{unsigned(rows), 1, 1};
        kiln_launch(per_row, threads, [&] {
            kiln_softmax_fwd_f32(x.data(), y.data(), dim, scale, m, (long long)p[4], int(p[5]),
                                 (long long)p[6], int(p[7]));
        });
        kiln_launch(per_row, threads,
                    [&] { kiln_softmax_bwd_f32(y.data(), dy.data(), dx.data(), dim, scale); });
        write("y", y);
        write("dx", dx);
    } else {
        throw std::runtime_error("unknown op " + op);
    }
    return 0;
} catch (const std::exception &e) {
    std::fprintf(stderr, "harness: %s\n", e.what());
    return 1;
}
