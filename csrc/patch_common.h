// Host-side tap tables of the patch ops, built with the shared math of patch_math.h and cached
// (patch_tables.cpp): one packed int32 buffer per table set, read through views by the CPU kernels
// (host pointer) and the CUDA kernels (the same words copied once to the device).
//
// Every resampling here is separable: an output pixel (oy, ox) is
//     sum_j sum_i wy[oy][j] * wx[ox][i] * in[iy[oy][j], ix[ox][i]]
// so each mode reduces to one tap table per axis.
#pragma once

#include <array>
#include <cstdint>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "patch_math.h"

namespace comm_fast {

inline Mode parse_mode(const std::string& name) {
  if (name == "bilinear") return Mode::Bilinear;
  if (name == "bicubic") return Mode::Bicubic;
  if (name == "area") return Mode::Area;
  if (name == "bicubic_aa") return Mode::BicubicAA;
  throw std::invalid_argument("mode: expected bilinear, bicubic, area or bicubic_aa, got '" + name + "'");
}

// A center-crop plan of joint_preprocess for one image size and output side.
struct CropPlan {
  int64_t size = 0;
  bool vertical_first = false;
  int64_t row0 = 0, rows = 0;  // source rows the crop reads
  int64_t col0 = 0, cols = 0;  // source columns the crop reads
};

// One set of tables in one buffer of 32-bit words (floats stored by their bits): what is cached,
// and what is copied to the device. Views resolve the fields against a base pointer, the host
// words or their device copy.
struct Tables {
  enum Kind : int64_t { kResample = 1, kCrop = 2, kLut = 3 };
  std::vector<int32_t> words;
  int64_t at[6] = {};  // field offsets: per axis (y = 0, x = 1) three fields
  int32_t k[2] = {};   // per axis: the uniform tap count (resample; 0 if it varies) or ksize (crop)
  CropPlan plan;       // crop tables only

  int64_t add(const void* data, int64_t n) {
    const int64_t offset = static_cast<int64_t>(words.size());
    words.resize(words.size() + n);
    std::memcpy(words.data() + offset, data, n * sizeof(int32_t));
    return offset;
  }
  TapView tap(const int32_t* base, int axis) const {
    return {base + at[3 * axis], base + at[3 * axis + 1], reinterpret_cast<const float*>(base + at[3 * axis + 2])};
  }
  PilView pil(const int32_t* base, int axis) const {
    return {base + at[3 * axis], base + at[3 * axis + 1], base + at[3 * axis + 2], k[axis]};
  }
  const float* lut(const int32_t* base) const { return reinterpret_cast<const float*>(base + at[0]); }

  // The device copy (set by the CUDA host code; opaque here).
  std::shared_ptr<void> device;
};

// Tap tables of both axes of a resampling; scale <= 0 means size-based.
inline Tables resample_tables(Mode mode, int64_t sh, int64_t dh, double scale_h, int64_t sw, int64_t dw,
                              double scale_w) {
  Tables t;
  const int64_t in[2] = {sh, sw}, out[2] = {dh, dw};
  const double scale[2] = {scale_h, scale_w};
  for (int a = 0; a < 2; ++a) {
    std::vector<int32_t> offset{0}, index;
    std::vector<float> weight;
    std::vector<int32_t> idx(max_taps(mode, in[a], out[a], scale[a]));
    std::vector<float> w(idx.size());
    for (int64_t o = 0; o < out[a]; ++o) {
      const int n = axis_taps(mode, in[a], out[a], scale[a], o, idx.data(), w.data());
      index.insert(index.end(), idx.begin(), idx.begin() + n);
      weight.insert(weight.end(), w.begin(), w.begin() + n);
      offset.push_back(static_cast<int32_t>(index.size()));
    }
    t.k[a] = uniform_taps(offset.data(), out[a]);
    t.at[3 * a] = t.add(offset.data(), offset.size());
    t.at[3 * a + 1] = t.add(index.data(), index.size());
    t.at[3 * a + 2] = t.add(weight.data(), weight.size());
  }
  return t;
}

// Pillow coefficients of both axes of one image's resize + center crop to side `size` (only the
// kept outputs: each depends on its own taps), and the source window the crop reads.
inline Tables crop_tables(int64_t h, int64_t w, int64_t size) {
  Tables t;
  const CropGeom g = crop_geom(h, w, size);
  const int64_t in[2] = {h, w}, resized[2] = {g.nh, g.nw}, first[2] = {g.top, g.left};
  int64_t lo[2], span[2];
  for (int a = 0; a < 2; ++a) {
    const PilGeom pg = pil_geom(in[a], resized[a]);
    std::vector<int32_t> start(size), count(size), coef(size * pg.ksize);
    std::vector<double> scratch(pg.ksize);
    for (int64_t o = 0; o < size; ++o)
      count[o] = pil_taps(pg, in[a], first[a] + o, scratch.data(), coef.data() + o * pg.ksize, &start[o]);
    t.k[a] = pg.ksize;
    lo[a] = start[0];
    span[a] = start[size - 1] + count[size - 1] - start[0];
    t.at[3 * a] = t.add(start.data(), size);
    t.at[3 * a + 1] = t.add(count.data(), size);
    t.at[3 * a + 2] = t.add(coef.data(), coef.size());
  }
  t.plan = {size, g.vertical_first, lo[0], span[0], lo[1], span[1]};
  return t;
}

// Normalisation lookup of joint_preprocess: means / stds of output 0 (CLIP) then output 1 (DINOv2).
inline Tables lut_tables(const std::array<double, 12>& mean_std) {
  Tables t;
  std::vector<float> lut(kLutSize);
  for (int o = 0; o < 2; ++o)
    for (int c = 0; c < 3; ++c)
      for (int v = 0; v < 256; ++v)
        lut[(o * 3 + c) * 256 + v] = lut_value(v, mean_std[o * 6 + c], mean_std[o * 6 + 3 + c]);
  t.at[0] = t.add(lut.data(), kLutSize);
  return t;
}

}  // namespace comm_fast
