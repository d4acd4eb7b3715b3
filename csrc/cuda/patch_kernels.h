// Launchers of the CUDA kernels (csrc/cuda/patch_kernels.cu). Plain C++ on raw pointers so that
// the .cu needs no torch headers: CPU builds of torch ship none of c10's CUDA headers, and the
// sm_90 compile check must run there. The ATen side is csrc/patch_cuda_host.cpp.
#pragma once

#include <cstdint>

namespace comm_fast {
namespace cuda {

enum class DType { kFloat, kHalf, kBFloat16, kDouble };

struct Taps {  // one axis of AxisTaps, on the device
  const int32_t* offset;
  const int32_t* index;
  const float* weight;
};

// out[b, oy*dw + ox, c] = sum over taps of in[b, iy*sw + ix, c], fp32 accumulation. Strides are
// in elements, channel stride 1. Returns nullptr or a CUDA error string.
const char* resample(DType dtype, const void* in, int64_t in_sb, int64_t in_sn, void* out, int64_t out_sb,
                     int64_t out_sn, int64_t B, int64_t C, int64_t sw, int64_t dh, int64_t dw, Taps ty, Taps tx,
                     void* stream);

struct PilAxis {  // one axis of PilTaps, on the device
  const int32_t* start;
  const int32_t* size;
  const int32_t* coef;
  int ksize;
};

// One Pillow pass over an [R, X] grid of RGB pixels of src (byte strides sy, sx, sc). rows: taps
// run down rows (vertical pass, table indexed by r), else along columns. Tap t of output o reads
// source index start[o] - shift + t. Writes uint8 [R, X, 3] to tmp or, when tmp is null, the
// normalised values to out0 / out1 ([3, R, X] of out_dtype; out1 may be null) through
// lut [2, 3, 256].
const char* pil_pass(bool rows, const uint8_t* src, int64_t sy, int64_t sx, int64_t sc, int64_t R, int64_t X,
                     PilAxis taps, int64_t shift, uint8_t* tmp, DType out_dtype, void* out0, void* out1,
                     const float* lut, void* stream);

}  // namespace cuda
}  // namespace comm_fast
