// Device kernels behind the patch ops. Validation happens once, in patch_ops.cpp; these assume
// checked arguments: tokens/out [B, N, C] with unit channel stride, images [H, W, 3] uint8 views.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "patch_tables.h"

namespace comm_fast {

// What joint_preprocess computes: two outputs [B, 3, S_i, S_i] (0: CLIP, 1: DINOv2) normalised
// through `lut` (lut_tables). Outputs of equal side share one resize.
struct PreprocJob {
  at::Tensor dst[2];
  int64_t size[2];
  std::shared_ptr<Tables> lut;
  int only = -1;  // >= 0: compute that output alone (padded images differ per encoder)
  // The resizes to run: {output, whether output 1 shares it}.
  std::vector<std::pair<int, bool>> groups() const {
    if (only >= 0) return {{only, false}};
    if (size[0] == size[1]) return {{0, true}};
    return {{0, false}, {1, false}};
  }
};

// Crop tables of one image size for output side S on `device` (cached).
std::shared_ptr<Tables> crop_tables_for(int64_t h, int64_t w, int64_t S, const at::Device& device);

void resample_cpu(const at::Tensor& in, const at::Tensor& out, int64_t sw, int64_t dh, int64_t dw, const Tables& t);
void preprocess_cpu(const std::vector<at::Tensor>& images, const PreprocJob& job);

#ifdef COMM_FAST_WITH_CUDA
void resample_cuda(const at::Tensor& in, const at::Tensor& out, int64_t sw, int64_t dh, int64_t dw, Tables& t);
void preprocess_cuda(const std::vector<at::Tensor>& images, const PreprocJob& job);
#endif

}  // namespace comm_fast
