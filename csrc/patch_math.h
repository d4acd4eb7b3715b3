// The index math of the patch ops, shared by the C++ (CPU) kernels and the CUDA kernels: tap
// computation, crop geometry, and the per-pixel logic (one output pixel of a resampling, one output
// sample of a Pillow pass, one normalised pixel). Every function is COMM_HD (__host__ __device__
// under nvcc, plain inline for the C++ compiler), so the CPU tests run the code the GPU runs; the
// .cu files only map threads onto these functions and launch them.
//
// Plain C++ on raw pointers (no torch, no std:: containers): nvcc compiles it in device code.
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define COMM_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define COMM_HD inline __attribute__((always_inline))  // inlined into the CPU's per-ISA clones too
#else
#define COMM_HD inline
#endif

namespace comm_fast {

enum class Mode : int { Bilinear = 0, Bicubic = 1, Area = 2, BicubicAA = 3 };

// ---- tap computation (PyTorch's index/weight arithmetic, aten/src/ATen/native/UpSample.h,
// UpSampleKernel.cpp, AdaptivePooling.h, in the same float precision) ----

// area_pixel_compute_scale for align_corners=False: 1/scale_factor when one is given (computed in
// double, then rounded to float), else in/out.
COMM_HD float torch_scale(int64_t in, int64_t out, double scale_factor) {
  return scale_factor > 0.0 ? static_cast<float>(1.0 / scale_factor)
                            : static_cast<float>(in) / static_cast<float>(out);
}

COMM_HD float cubic1(float x, float a) { return ((a + 2) * x - (a + 3)) * x * x + 1; }
COMM_HD float cubic2(float x, float a) { return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a; }

// Antialiasing filter of PyTorch (and Pillow): Keys cubic with a = -0.5.
COMM_HD float aa_cubic(float x) {
  x = x < 0.0f ? -x : x;
  if (x < 1.0f) return cubic1(x, -0.5f);
  if (x < 2.0f) return cubic2(x, -0.5f);
  return 0.0f;
}

COMM_HD int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
COMM_HD int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// Upper bound on the taps of any output of one axis (the size of the idx / w buffers below).
COMM_HD int64_t max_taps(Mode mode, int64_t in, int64_t out, double scale_factor) {
  if (mode == Mode::Bilinear) return 2;
  if (mode == Mode::Bicubic) return 4;
  if (mode == Mode::Area) return (in + out - 1) / out + 1;
  const float scale = torch_scale(in, out, scale_factor);
  const float support = scale >= 1.0f ? 2.0f * scale : 2.0f;
  return min64(static_cast<int64_t>(ceilf(2.0f * support)) + 2, in);
}

// Taps of output o of one axis: writes idx[k], w[k] and returns their count. scale_factor <= 0
// means size-based (the only option for area and antialias).
COMM_HD int axis_taps(Mode mode, int64_t in, int64_t out, double scale_factor, int64_t o, int32_t* idx, float* w) {
  const float scale = torch_scale(in, out, scale_factor);
  if (mode == Mode::Bilinear) {
    // compute_source_index_and_lambda (an unchanged size is the identity).
    if (in == out && scale_factor <= 0.0) {
      idx[0] = static_cast<int32_t>(o);
      w[0] = 1.0f;
      return 1;
    }
    const float s = scale * (static_cast<float>(o) + 0.5f) - 0.5f;
    const float real = s > 0.0f ? s : 0.0f;
    const int64_t i0 = min64(static_cast<int64_t>(floorf(real)), in - 1);
    const float l = real - static_cast<float>(i0);
    const float l1 = l < 0.0f ? 0.0f : (l > 1.0f ? 1.0f : l);
    idx[0] = static_cast<int32_t>(i0);
    idx[1] = static_cast<int32_t>(i0 + (i0 < in - 1 ? 1 : 0));
    w[0] = 1.0f - l1;
    w[1] = l1;
    return 2;
  }
  if (mode == Mode::Bicubic) {
    // HelperInterpCubic: A = -0.75, source index not clamped, taps clamped to the edge.
    const float a = -0.75f;
    const float real = scale * (static_cast<float>(o) + 0.5f) - 0.5f;
    const int64_t i0 = min64(static_cast<int64_t>(floorf(real)), in - 1);
    const float l = real - static_cast<float>(i0);
    const float t = l < 0.0f ? 0.0f : (l > 1.0f ? 1.0f : l);
    w[0] = cubic2(t + 1.0f, a);
    w[1] = cubic1(t, a);
    w[2] = cubic1(1.0f - t, a);
    w[3] = cubic2((1.0f - t) + 1.0f, a);
    for (int k = 0; k < 4; ++k) idx[k] = static_cast<int32_t>(min64(max64(i0 - 1 + k, 0), in - 1));
    return 4;
  }
  if (mode == Mode::Area) {
    // adaptive_avg_pool2d windows [start, end).
    const int64_t start = (o / out) * in + ((o % out) * in) / out;
    const int64_t end = 1 + ((o + 1) * in - 1) / out;
    const float wt = 1.0f / static_cast<float>(end - start);
    for (int64_t i = start; i < end; ++i) {
      idx[i - start] = static_cast<int32_t>(i);
      w[i - start] = wt;
    }
    return static_cast<int>(end - start);
  }
  // _compute_indices_min_size_weights_aa: support widened by the downscale factor, weights
  // renormalised over the window (no edge replication).
  const float support = scale >= 1.0f ? 2.0f * scale : 2.0f;
  const float invscale = scale >= 1.0f ? 1.0f / scale : 1.0f;
  const float center = scale * (static_cast<float>(o) + 0.5f);
  const int64_t xmin = max64(static_cast<int64_t>(center - support + 0.5f), 0);
  const int64_t xsize = min64(static_cast<int64_t>(center + support + 0.5f), in) - xmin;
  float total = 0.0f;
  for (int64_t j = 0; j < xsize; ++j) {
    w[j] = aa_cubic(static_cast<float>((j + xmin - center + 0.5) * invscale));
    total += w[j];
  }
  for (int64_t j = 0; j < xsize; ++j) {
    idx[j] = static_cast<int32_t>(xmin + j);
    if (total != 0.0f) w[j] /= total;
  }
  return static_cast<int>(xsize > 0 ? xsize : 0);
}

// One axis of tap tables (CSR): taps of output o are entries [offset[o], offset[o + 1]).
struct TapView {
  const int32_t* offset;
  const int32_t* index;
  const float* weight;
};

// ---- Pillow's BICUBIC resize of uint8 images (libImaging/Resample.c, 8 bits per channel) ----

constexpr int kPilPrecisionBits = 32 - 8 - 2;

COMM_HD double pil_bicubic(double x) {
  const double a = -0.5;
  if (x < 0.0) x = -x;
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}

// Filter geometry of one axis resized from in_size to out_size.
struct PilGeom {
  double scale, filterscale, support;
  int ksize;
};

COMM_HD PilGeom pil_geom(int64_t in_size, int64_t out_size) {
  PilGeom g;
  g.scale = static_cast<double>(in_size) / static_cast<double>(out_size);
  g.filterscale = g.scale > 1.0 ? g.scale : 1.0;
  g.support = 2.0 * g.filterscale;
  g.ksize = static_cast<int>(ceil(g.support)) * 2 + 1;
  return g;
}

// precompute_coeffs + normalize_coeffs_8bpc of Resample.c for output o: writes ksize fixed-point
// coefficients (zero past the taps) and the first source index; returns the tap count. k: ksize
// doubles of scratch.
COMM_HD int pil_taps(const PilGeom& g, int64_t in_size, int64_t o, double* k, int32_t* coef, int32_t* start) {
  const double center = (static_cast<double>(o) + 0.5) * g.scale;
  const double ss = 1.0 / g.filterscale;
  int64_t xmin = static_cast<int64_t>(center - g.support + 0.5);
  if (xmin < 0) xmin = 0;
  int64_t xmax = static_cast<int64_t>(center + g.support + 0.5);
  if (xmax > in_size) xmax = in_size;
  xmax -= xmin;
  double ww = 0.0;
  for (int64_t x = 0; x < xmax; ++x) {
    k[x] = pil_bicubic((static_cast<double>(x + xmin) - center + 0.5) * ss);
    ww += k[x];
  }
  for (int x = 0; x < g.ksize; ++x) {
    const double v = x < xmax ? (ww != 0.0 ? k[x] / ww : k[x]) : 0.0;
    coef[x] = v < 0 ? static_cast<int32_t>(-0.5 + v * (1 << kPilPrecisionBits))
                    : static_cast<int32_t>(0.5 + v * (1 << kPilPrecisionBits));
  }
  *start = static_cast<int32_t>(xmin);
  return static_cast<int>(xmax);
}

// One axis of Pillow coefficients: output o reads sources [start[o], start[o] + size[o]) with
// weights coef[o * ksize + t].
struct PilView {
  const int32_t* start;
  const int32_t* size;
  const int32_t* coef;
  int ksize;
};

// Resample.c's clip8 on an accumulator that started at 1 << (PRECISION_BITS - 1).
COMM_HD uint8_t pil_clip8(int32_t acc) {
  const int32_t v = acc >> kPilPrecisionBits;
  return static_cast<uint8_t>(v < 0 ? 0 : (v > 255 ? 255 : v));
}

// The lane loop of a Pillow tap, acc[l] += p[l * lane_step] * k: the generic one (the GPU's three
// channels, the CPU's row of bytes); the CPU's widened-row pass supplies a vector one.
struct LaneLoop {
  template <typename S>
  COMM_HD static void mac(int32_t* acc, const S* p, int64_t lane_step, int32_t k, int64_t lanes) {
    for (int64_t l = 0; l < lanes; ++l) acc[l] += static_cast<int32_t>(p[l * lane_step]) * k;
  }
};

// Output o of a Pillow pass over n lanes (L > 0: n = L, known at compile time): lane l of tap t
// is src[(start[o] - shift + t) * tap_step + l * lane_step] (S: uint8 pixels, or the CPU's
// int32-widened rows); writes out[l * out_step]. `shift` is the source index src[0] stands for;
// acc: n int32 of scratch. K > 0 runs all K = ksize taps (zero past the window, so the sum is the
// same) with a compile-time count: the caller guarantees that src is readable that far.
template <int L, int K = 0, typename Lanes = LaneLoop, typename S>
COMM_HD void pil_output(const S* src, const PilView& t, int64_t o, int64_t shift, int64_t tap_step,
                        int64_t lane_step, int64_t n, int32_t* acc, uint8_t* out, int64_t out_step) {
  const int64_t lanes = L > 0 ? L : n;
  const S* p = src + (static_cast<int64_t>(t.start[o]) - shift) * tap_step;
  const int32_t* k = t.coef + o * t.ksize;
  const int taps = K > 0 ? K : t.size[o];
  for (int64_t l = 0; l < lanes; ++l) acc[l] = 1 << (kPilPrecisionBits - 1);
  for (int j = 0; j < taps; ++j, p += tap_step) Lanes::mac(acc, p, lane_step, k[j], lanes);
  for (int64_t l = 0; l < lanes; ++l) out[l * out_step] = pil_clip8(acc[l]);
}

// ---- joint_preprocess geometry ----

// transformers' get_resize_output_image_size(default_to_square=False): the short side becomes
// `size`, the long side int(size * long / short).
struct CropGeom {
  int64_t nh, nw;       // resized image
  int64_t top, left;    // numpy center_crop offsets into it
  bool vertical_first;  // Pillow's pass order (below)
};

COMM_HD CropGeom crop_geom(int64_t h, int64_t w, int64_t size) {
  CropGeom g;
  const bool w_short = w <= h;
  const int64_t shorter = w_short ? w : h, longer = w_short ? h : w;
  const int64_t new_long = static_cast<int64_t>(static_cast<double>(size * longer) / static_cast<double>(shorter));
  g.nh = w_short ? new_long : size;
  g.nw = w_short ? size : new_long;
  g.top = (g.nh - size) / 2;
  g.left = (g.nw - size) / 2;
  // Recent Pillow (ImagingResampleInner) runs the vertical pass first when the height shrinks by
  // more than twice what the width does; the uint8 rounding between passes makes the order visible.
  g.vertical_first = (h - g.nh) > 0 && (h - g.nh) > (w - g.nw) * 2;
  return g;
}

// ---- normalisation ----

// The lookup tables of joint_preprocess: [2 outputs][3 channels][256 values], output 0 CLIP's,
// output 1 DINOv2's. The processors' arithmetic: rescale by 1/255 (float64, stored as float32),
// then (x - mean) / std in float32.
constexpr int kLutSize = 2 * 3 * 256;

COMM_HD float lut_value(int v, double mean, double std) {
  return (static_cast<float>(v / 255.0) - static_cast<float>(mean)) / static_cast<float>(std);
}

COMM_HD const float* norm_lut(const float* luts, int output, int channel) { return luts + (output * 3 + channel) * 256; }

// Writes one resized pixel (3 uint8 values) normalised to element i of the planes of output
// `out0_id` (out0) and, when out1 is non-null, of output 1 (out1, which shares the resize).
// IO::store(T*, float) converts to the output dtype.
template <typename IO, typename T>
COMM_HD void write_pixel(const uint8_t* v, const float* luts, int out0_id, T* out0, T* out1, int64_t plane,
                         int64_t i) {
  for (int c = 0; c < 3; ++c) {
    IO::store(out0 + c * plane + i, norm_lut(luts, out0_id, c)[v[c]]);
    if (out1 != nullptr) IO::store(out1 + c * plane + i, norm_lut(luts, 1, c)[v[c]]);
  }
}

// ---- resampling ----

// One output pixel of a resampling over n channels: acc[c] = sum_j sum_i wy[j] wx[i]
// img[iy[j], ix[i], c], fp32. KY / KX > 0: the tap counts are known at compile time (bilinear 2,
// bicubic 4). The taps go in groups of up to four to
//   IO::accumulate(acc, p, w, k, n, first): acc[c] = (first ? 0 : acc[c]) + sum_{t<k} w[t] p[t][c],
// the platform's channel loop (vectorised over the row on the CPU, one 16-byte vector per thread
// on the GPU), so the accumulator is read and written once per four taps.
template <int KY, int KX, typename IO, typename T>
COMM_HD void resample_pixel(const T* img, int64_t row_step, int64_t col_step, const TapView& ty, int64_t oy,
                            const TapView& tx, int64_t ox, float* acc, int64_t n) {
  const int32_t j0 = ty.offset[oy], i0 = tx.offset[ox];
  const int ny = KY > 0 ? KY : ty.offset[oy + 1] - j0;
  const int nx = KX > 0 ? KX : tx.offset[ox + 1] - i0;
  const T* p[4];
  float w[4];
  int k = 0;
  bool first = true;
  for (int j = 0; j < ny; ++j) {
    const T* row = img + static_cast<int64_t>(ty.index[j0 + j]) * row_step;
    const float wy = ty.weight[j0 + j];
    for (int i = 0; i < nx; ++i) {
      p[k] = row + static_cast<int64_t>(tx.index[i0 + i]) * col_step;
      w[k++] = wy * tx.weight[i0 + i];
      if (k == 4) {
        IO::accumulate(acc, p, w, 4, n, first);
        k = 0;
        first = false;
      }
    }
  }
  if (k > 0 || first) IO::accumulate(acc, p, w, k, n, first);  // k = 0 and first: no taps, zeros
}

// The uniform tap count of one axis table (every output the same), or 0.
inline int uniform_taps(const int32_t* offset, int64_t n) {
  if (n <= 0) return 0;
  const int32_t k = offset[1] - offset[0];
  for (int64_t o = 1; o < n; ++o)
    if (offset[o + 1] - offset[o] != k) return 0;
  return k;
}

}  // namespace comm_fast
