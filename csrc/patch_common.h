// Host-side tables shared by the CPU (.cpp) and CUDA (.cu) implementations of the patch ops.
//
// Every resampling here is separable: an output pixel (oy, ox) is
//     sum_j sum_i wy[oy][j] * wx[ox][i] * in[iy[oy][j], ix[ox][i]]
// so each mode reduces to building one tap table per axis. The tables reproduce PyTorch's
// own index/weight arithmetic (aten/src/ATen/native/UpSample.h, UpSampleKernel.cpp,
// AdaptivePooling.h) in the same float precision, and Pillow's (libImaging/Resample.c)
// fixed-point coefficients for the uint8 image resize.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace comm_fast {

enum class Mode { Bilinear, Bicubic, Area, BicubicAA };

inline Mode parse_mode(const std::string& name) {
  if (name == "bilinear") return Mode::Bilinear;
  if (name == "bicubic") return Mode::Bicubic;
  if (name == "area") return Mode::Area;
  if (name == "bicubic_aa") return Mode::BicubicAA;
  throw std::invalid_argument("mode: expected bilinear, bicubic, area or bicubic_aa, got '" + name + "'");
}

// Taps of output index o: entries [offset[o], offset[o + 1]) of index / weight.
struct AxisTaps {
  std::vector<int32_t> offset;
  std::vector<int32_t> index;
  std::vector<float> weight;
};

// PyTorch's area_pixel_compute_scale for align_corners=False: 1/scale_factor when one is
// given (computed in double, then rounded to float), else in/out.
inline float torch_scale(int64_t in, int64_t out, double scale_factor) {
  return scale_factor > 0.0 ? static_cast<float>(1.0 / scale_factor)
                            : static_cast<float>(in) / static_cast<float>(out);
}

inline float cubic1(float x, float a) { return ((a + 2) * x - (a + 3)) * x * x + 1; }
inline float cubic2(float x, float a) { return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a; }

// Antialiasing filter of PyTorch (and Pillow): Keys cubic with a = -0.5.
inline float aa_cubic(float x) {
  x = std::fabs(x);
  if (x < 1.0f) return cubic1(x, -0.5f);
  if (x < 2.0f) return cubic2(x, -0.5f);
  return 0.0f;
}

// scale_factor <= 0 means size-based (the only option for area and antialias).
inline AxisTaps make_taps(Mode mode, int64_t in, int64_t out, double scale_factor = 0.0) {
  AxisTaps t;
  t.offset.reserve(out + 1);
  t.offset.push_back(0);
  auto push = [&](int64_t idx, float w) {
    t.index.push_back(static_cast<int32_t>(idx));
    t.weight.push_back(w);
  };
  const float scale = torch_scale(in, out, scale_factor);
  for (int64_t o = 0; o < out; ++o) {
    if (mode == Mode::Bilinear) {
      // compute_source_index_and_lambda (an unchanged size is the identity).
      if (in == out && scale_factor <= 0.0) {
        push(o, 1.0f);
      } else {
        float real = std::max(scale * (static_cast<float>(o) + 0.5f) - 0.5f, 0.0f);
        int64_t i0 = std::min(static_cast<int64_t>(std::floor(real)), in - 1);
        float l1 = std::min(std::max(real - static_cast<float>(i0), 0.0f), 1.0f);
        int64_t i1 = i0 + (i0 < in - 1 ? 1 : 0);
        push(i0, 1.0f - l1);
        push(i1, l1);
      }
    } else if (mode == Mode::Bicubic) {
      // HelperInterpCubic: A = -0.75, source index not clamped, taps clamped to the edge.
      const float a = -0.75f;
      float real = scale * (static_cast<float>(o) + 0.5f) - 0.5f;
      int64_t i0 = std::min(static_cast<int64_t>(std::floor(real)), in - 1);
      float tt = std::min(std::max(real - static_cast<float>(i0), 0.0f), 1.0f);
      const float w[4] = {cubic2(tt + 1.0f, a), cubic1(tt, a), cubic1(1.0f - tt, a), cubic2((1.0f - tt) + 1.0f, a)};
      for (int k = 0; k < 4; ++k) push(std::min(std::max(i0 - 1 + k, int64_t(0)), in - 1), w[k]);
    } else if (mode == Mode::Area) {
      // adaptive_avg_pool2d windows [start, end).
      int64_t start = (o / out) * in + ((o % out) * in) / out;
      int64_t end = 1 + ((o + 1) * in - 1) / out;
      const float w = 1.0f / static_cast<float>(end - start);
      for (int64_t i = start; i < end; ++i) push(i, w);
    } else {
      // _compute_indices_min_size_weights_aa: support widened by the downscale factor,
      // weights renormalised over the window (no edge replication).
      const float support = scale >= 1.0f ? 2.0f * scale : 2.0f;
      const float invscale = scale >= 1.0f ? 1.0f / scale : 1.0f;
      const float center = scale * (static_cast<float>(o) + 0.5f);
      int64_t xmin = std::max(static_cast<int64_t>(center - support + 0.5f), int64_t(0));
      int64_t xsize = std::min(static_cast<int64_t>(center + support + 0.5f), in) - xmin;
      std::vector<float> w(std::max<int64_t>(xsize, 0));
      float total = 0.0f;
      for (int64_t j = 0; j < xsize; ++j) {
        w[j] = aa_cubic(static_cast<float>((j + xmin - center + 0.5) * invscale));
        total += w[j];
      }
      for (int64_t j = 0; j < xsize; ++j) push(xmin + j, total != 0.0f ? w[j] / total : w[j]);
    }
    t.offset.push_back(static_cast<int32_t>(t.index.size()));
  }
  return t;
}

// ---- Pillow's BICUBIC resize of uint8 images (ImagingResample, 8 bits per channel) ----

constexpr int kPilPrecisionBits = 32 - 8 - 2;

// Fixed-point coefficients of one axis, restricted to outputs [first, first + count):
// output o reads inputs [start[o], start[o] + size[o]) with weights coef[o * ksize + k].
struct PilTaps {
  int ksize = 0;
  std::vector<int32_t> start, size, coef;
};

inline double pil_bicubic(double x) {
  const double a = -0.5;
  if (x < 0.0) x = -x;
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}

// precompute_coeffs + normalize_coeffs_8bpc of Resample.c, for out_size outputs of which
// only [first, first + count) are kept (a center crop: each output depends only on its own taps).
inline PilTaps pil_taps(int64_t in_size, int64_t out_size, int64_t first, int64_t count) {
  PilTaps t;
  const double scale = static_cast<double>(in_size) / static_cast<double>(out_size);
  const double filterscale = std::max(scale, 1.0);
  const double support = 2.0 * filterscale;
  t.ksize = static_cast<int>(std::ceil(support)) * 2 + 1;
  t.start.resize(count);
  t.size.resize(count);
  t.coef.assign(count * t.ksize, 0);
  std::vector<double> k(t.ksize);
  for (int64_t o = 0; o < count; ++o) {
    const double center = (static_cast<double>(first + o) + 0.5) * scale;
    const double ss = 1.0 / filterscale;
    int64_t xmin = static_cast<int64_t>(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    int64_t xmax = static_cast<int64_t>(center + support + 0.5);
    if (xmax > in_size) xmax = in_size;
    xmax -= xmin;
    double ww = 0.0;
    for (int64_t x = 0; x < xmax; ++x) {
      k[x] = pil_bicubic((static_cast<double>(x + xmin) - center + 0.5) * ss);
      ww += k[x];
    }
    for (int64_t x = 0; x < xmax; ++x) {
      const double v = ww != 0.0 ? k[x] / ww : k[x];
      t.coef[o * t.ksize + x] = v < 0 ? static_cast<int32_t>(-0.5 + v * (1 << kPilPrecisionBits))
                                      : static_cast<int32_t>(0.5 + v * (1 << kPilPrecisionBits));
    }
    t.start[o] = static_cast<int32_t>(xmin);
    t.size[o] = static_cast<int32_t>(xmax);
  }
  return t;
}

// Resample.c's clip8 on an accumulator that started at 1 << (PRECISION_BITS - 1).
inline uint8_t pil_clip8(int32_t acc) {
  int32_t v = acc >> kPilPrecisionBits;
  return static_cast<uint8_t>(v < 0 ? 0 : (v > 255 ? 255 : v));
}

// transformers' get_resize_output_image_size(default_to_square=False): the short side becomes
// `size`, the long side int(size * long / short); returns {new_h, new_w}.
inline std::pair<int64_t, int64_t> shortest_edge_size(int64_t h, int64_t w, int64_t size) {
  const bool w_short = w <= h;
  const int64_t shorter = w_short ? w : h, longer = w_short ? h : w;
  const int64_t new_long = static_cast<int64_t>(static_cast<double>(size * longer) / static_cast<double>(shorter));
  return w_short ? std::make_pair(new_long, size) : std::make_pair(size, new_long);
}

// One image's resize + center-crop plan for a square output of side `size`.
struct CropPlan {
  int64_t size = 0;
  PilTaps tx, ty;              // crop columns / crop rows (an unchanged axis gives exact identity taps)
  bool vertical_first = false;  // Pillow's pass order (below)
  int64_t row0 = 0, rows = 0;  // source rows the crop reads
  int64_t col0 = 0, cols = 0;  // source columns the crop reads
};

inline CropPlan make_crop_plan(int64_t h, int64_t w, int64_t size) {
  CropPlan p;
  p.size = size;
  auto nhw = shortest_edge_size(h, w, size);
  const int64_t nh = nhw.first, nw = nhw.second;
  const int64_t top = (nh - size) / 2, left = (nw - size) / 2;  // numpy center_crop offsets
  p.tx = pil_taps(w, nw, left, size);
  p.ty = pil_taps(h, nh, top, size);
  // Recent Pillow (13 here; ImagingResampleInner) runs the vertical pass first when the height shrinks
  // by more than twice what the width does; the uint8 rounding between passes makes the order
  // visible. Older Pillow always went horizontal first.
  p.vertical_first = (h - nh) > 0 && (h - nh) > (w - nw) * 2;
  p.row0 = p.ty.start[0];
  p.rows = p.ty.start[size - 1] + p.ty.size[size - 1] - p.row0;
  p.col0 = p.tx.start[0];
  p.cols = p.tx.start[size - 1] + p.tx.size[size - 1] - p.col0;
  return p;
}

}  // namespace comm_fast
