// Launchers of the CUDA kernels (csrc/cuda/patch_kernels.cu). Plain C++ on raw pointers so that
// the .cu needs no torch headers: CPU builds of torch ship none of c10's CUDA headers, and the
// sm_90 compile check must run there. The ATen side is csrc/patch_cuda_host.cpp; the index math
// the kernels run is csrc/patch_math.h, shared with the CPU kernels.
#pragma once

#include <cstdint>

#include "../patch_math.h"

namespace comm_fast {
namespace cuda {

enum class DType { kFloat, kHalf, kBFloat16, kDouble };

// out[b, oy*dw + ox, c] = sum over taps of in[b, iy*sw + ix, c], fp32 accumulation. Strides are
// in elements, channel stride 1; ty / tx: device tables, ky / kx their uniform tap counts (0 if
// they vary). Returns nullptr or a CUDA error string.
const char* resample(DType dtype, const void* in, int64_t in_sb, int64_t in_sn, void* out, int64_t out_sb,
                     int64_t out_sn, int64_t B, int64_t C, int64_t sw, int64_t dh, int64_t dw, TapView ty, int ky,
                     TapView tx, int kx, void* stream);

// One Pillow pass over an [R, X] grid of RGB pixels of src (byte strides sy, sx, sc). rows: taps
// run down rows (vertical pass, table indexed by r), else along columns; src[0] stands for source
// index `shift` of the tap axis. Writes uint8 [R, X, 3] to tmp or, when tmp is null, the
// normalised values ([3, R, X] of out_dtype) to out0 (output out0_id) and out1 (output 1, may be
// null) through luts (kLutSize floats).
const char* pil_pass(bool rows, const uint8_t* src, int64_t sy, int64_t sx, int64_t sc, int64_t R, int64_t X,
                     PilView taps, int64_t shift, uint8_t* tmp, DType out_dtype, void* out0, int out0_id, void* out1,
                     const float* luts, void* stream);

// Whether work queued on the stream is being captured into a CUDA graph.
bool stream_capturing(void* stream);

}  // namespace cuda
}  // namespace comm_fast
