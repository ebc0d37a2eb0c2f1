// CPU stand-in for CUDA's f16 type (see ../cuda_emu.h): g++'s _Float16 rounds to nearest even.
#pragma once

struct __half {
    _Float16 v;
};

inline float __half2float(__half h) { return float(h.v); }
inline __half __float2half(float f) { return {_Float16(f)}; }
