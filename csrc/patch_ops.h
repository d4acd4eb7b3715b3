// Device kernels behind the patch ops. Validation happens once, in patch_ops.cpp; these assume
// checked arguments: tokens/out [B, N, C] with unit channel stride, images [H, W, 3] uint8 views.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <vector>

#include "patch_common.h"

namespace comm_fast {

// Per-channel lookup from a uint8 value to the normalised output: (v / 255 - mean) / std.
using NormLut = std::array<std::array<float, 256>, 3>;

// One requested output of joint_preprocess: side, destination [B, 3, S, S], normalisation.
struct PreprocOutput {
  int64_t size;
  at::Tensor dst;
  NormLut lut;
};

void resample_cpu(const at::Tensor& in, const at::Tensor& out, int64_t sw, int64_t dh, int64_t dw,
                  const AxisTaps& ty, const AxisTaps& tx);
// outputs: one entry, or two sharing the resize when their sizes are equal (outputs[i].size).
void preprocess_cpu(const std::vector<at::Tensor>& images, std::vector<PreprocOutput>& outputs);

#ifdef COMM_FAST_WITH_CUDA
void resample_cuda(const at::Tensor& in, const at::Tensor& out, int64_t sw, int64_t dh, int64_t dw,
                   const AxisTaps& ty, const AxisTaps& tx);
void preprocess_cuda(const std::vector<at::Tensor>& images, std::vector<PreprocOutput>& outputs);
#endif

}  // namespace comm_fast
