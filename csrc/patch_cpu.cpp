// CPU kernels of the patch ops: token-grid resampling (also used for position embeddings) and
// the Pillow-exact uint8 resize + center crop + normalise of joint_preprocess.
#include "patch_ops.h"

#include <ATen/Parallel.h>

#include <cstring>
#include <type_traits>

// The hot loops are compiled twice, for AVX2 and for the baseline ISA, and picked at load time:
// the extension is built without -march flags so that it runs on any x86-64.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define COMM_FAST_MULTIVERSION __attribute__((target_clones("avx2", "default")))
#else
#define COMM_FAST_MULTIVERSION
#endif

namespace comm_fast {
namespace {

inline float to_float(float v) { return v; }
inline float to_float(double v) { return static_cast<float>(v); }
inline float to_float(at::Half v) { return static_cast<float>(v); }
inline float to_float(at::BFloat16 v) {
  uint32_t u = static_cast<uint32_t>(v.x) << 16;  // bf16 -> fp32 is a shift
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// acc[c] = (first ? 0 : acc[c]) + sum_k w[k] * x[k][c] for up to 4 taps in one pass over the
// channels: the loop every resampling mode spends its time in (branches are loop-invariant).
template <typename T>
__attribute__((always_inline)) inline void axpy_taps(float* __restrict acc, const T* const* x, const float* w, int k,
                                                     int64_t n, bool first) {
  const T* __restrict x0 = x[0];
  const T* __restrict x1 = x[k > 1 ? 1 : 0];
  const T* __restrict x2 = x[k > 2 ? 2 : 0];
  const T* __restrict x3 = x[k > 3 ? 3 : 0];
  const float w0 = w[0], w1 = k > 1 ? w[1] : 0.0f, w2 = k > 2 ? w[2] : 0.0f, w3 = k > 3 ? w[3] : 0.0f;
  if (k == 4) {
    for (int64_t c = 0; c < n; ++c)
      acc[c] = (first ? 0.0f : acc[c]) + w0 * to_float(x0[c]) + w1 * to_float(x1[c]) + w2 * to_float(x2[c]) +
               w3 * to_float(x3[c]);
  } else if (k == 2) {
    for (int64_t c = 0; c < n; ++c) acc[c] = (first ? 0.0f : acc[c]) + w0 * to_float(x0[c]) + w1 * to_float(x1[c]);
  } else {
    for (int j = 0; j < k; ++j, first = false)
      for (int64_t c = 0; c < n; ++c) acc[c] = (first ? 0.0f : acc[c]) + w[j] * to_float(x[j][c]);
  }
}

#define COMM_FAST_AXPY(T)                                                                                   \
  COMM_FAST_MULTIVERSION void axpy(float* acc, const T* const* x, const float* w, int k, int64_t n, bool first) { \
    axpy_taps<T>(acc, x, w, k, n, first);                                                                   \
  }
COMM_FAST_AXPY(float)
COMM_FAST_AXPY(double)
COMM_FAST_AXPY(at::Half)
COMM_FAST_AXPY(at::BFloat16)
#undef COMM_FAST_AXPY

template <typename T>
void store(T* __restrict dst, const float* __restrict acc, int64_t n) {
  for (int64_t c = 0; c < n; ++c) dst[c] = static_cast<T>(acc[c]);
}

template <typename T>
void resample_impl(const at::Tensor& in, const at::Tensor& out, int64_t sw, int64_t dh, int64_t dw,
                   const AxisTaps& ty, const AxisTaps& tx) {
  const int64_t B = in.size(0), C = in.size(2);
  const int64_t in_sb = in.stride(0), in_sn = in.stride(1);
  const int64_t out_sb = out.stride(0), out_sn = out.stride(1);
  const T* src = in.const_data_ptr<T>();
  T* dst = out.mutable_data_ptr<T>();
  // One task per output row of one image; the channel loop is the vectorised one.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, dw * C));
  at::parallel_for(0, B * dh, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(C);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / dh, oy = r % dh;
      const T* img = src + b * in_sb;
      for (int64_t ox = 0; ox < dw; ++ox) {
        T* o = dst + b * out_sb + (oy * dw + ox) * out_sn;
        // fp32 outputs accumulate in place; other dtypes in an fp32 row, converted once.
        float* acc = std::is_same<T, float>::value ? reinterpret_cast<float*>(o) : scratch.data();
        // Taps in groups of 4, so the channel row is read and written once per group.
        const T* ptr[4];
        float w[4];
        int k = 0;
        bool first = true;
        for (int32_t j = ty.offset[oy]; j < ty.offset[oy + 1]; ++j) {
          const T* row = img + static_cast<int64_t>(ty.index[j]) * sw * in_sn;
          for (int32_t i = tx.offset[ox]; i < tx.offset[ox + 1]; ++i) {
            ptr[k] = row + static_cast<int64_t>(tx.index[i]) * in_sn;
            w[k++] = ty.weight[j] * tx.weight[i];
            if (k == 4) {
              axpy(acc, ptr, w, k, C, first);
              k = 0;
              first = false;
            }
          }
        }
        if (k > 0) {
          axpy(acc, ptr, w, k, C, first);
          first = false;
        }
        if (first) std::fill(acc, acc + C, 0.0f);  // no taps (cannot happen for valid sizes)
        if (!std::is_same<T, float>::value) store(o, acc, C);
      }
    }
  });
}

// ---- joint_preprocess ----

// Horizontal Pillow pass: `rows` rows of src into dst [rows, S, 3]; tap t of output x reads
// column tx.start[x] + t - col0 of src. Strides are in bytes; kHWC fixes them to the packed
// HxWx3 layout so that the tap loop is tight.
template <bool kHWC>
void pil_horizontal(const uint8_t* src, int64_t sy, int64_t sx, int64_t sc, int64_t rows, const PilTaps& tx,
                    int64_t col0, int64_t S, uint8_t* dst) {
  if (kHWC) {
    sx = 3;
    sc = 1;
  }
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* row = src + r * sy;
    uint8_t* o = dst + r * S * 3;
    for (int64_t x = 0; x < S; ++x) {
      const int32_t* k = tx.coef.data() + x * tx.ksize;
      const uint8_t* px = row + (tx.start[x] - col0) * sx;
      int32_t s0 = 1 << (kPilPrecisionBits - 1), s1 = s0, s2 = s0;
      for (int32_t t = 0; t < tx.size[x]; ++t, px += sx) {
        s0 += px[0] * k[t];
        s1 += px[sc] * k[t];
        s2 += px[2 * sc] * k[t];
      }
      o[3 * x] = pil_clip8(s0);
      o[3 * x + 1] = pil_clip8(s1);
      o[3 * x + 2] = pil_clip8(s2);
    }
  }
}

// Vertical Pillow pass of one output row: taps over rows of src, vectorised along the row.
COMM_FAST_MULTIVERSION void pil_vertical_row(const uint8_t* __restrict src, int64_t row_stride,
                                             const int32_t* __restrict k, int32_t taps, int64_t n,
                                             int32_t* __restrict acc, uint8_t* __restrict out) {
  for (int64_t j = 0; j < n; ++j) acc[j] = 1 << (kPilPrecisionBits - 1);
  for (int32_t t = 0; t < taps; ++t) {
    const uint8_t* s = src + t * row_stride;
    const int32_t w = k[t];
    for (int64_t j = 0; j < n; ++j) acc[j] += static_cast<int32_t>(s[j]) * w;
  }
  for (int64_t j = 0; j < n; ++j) {
    const int32_t v = acc[j] >> kPilPrecisionBits;
    out[j] = static_cast<uint8_t>(v < 0 ? 0 : (v > 255 ? 255 : v));
  }
}

template <typename T>
void write_normalised(const uint8_t* row, int64_t S, const NormLut& lut, T* plane0, int64_t plane) {
  for (int c = 0; c < 3; ++c) {
    const float* l = lut[c].data();
    T* o = plane0 + c * plane;
    for (int64_t x = 0; x < S; ++x) o[x] = static_cast<T>(l[row[3 * x + c]]);
  }
}

void write_row(const uint8_t* row, int64_t b, int64_t y, int64_t S, std::vector<PreprocOutput*>& outs) {
  for (PreprocOutput* o : outs) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, o->dst.scalar_type(), "joint_preprocess", [&] {
      write_normalised(row, S, o->lut, o->dst.mutable_data_ptr<scalar_t>() + b * 3 * S * S + y * S, S * S);
    });
  }
}

// Resize + crop one image (in Pillow's pass order) for side S and write every output of that side.
void preprocess_one(const at::Tensor& image, int64_t b, int64_t S, std::vector<PreprocOutput*>& outs) {
  const CropPlan p = make_crop_plan(image.size(0), image.size(1), S);
  const bool packed = image.stride(1) == 3 && image.stride(2) == 1;
  std::vector<int32_t> acc(std::max(S, p.cols) * 3);
  std::vector<uint8_t> row(S * 3);
  if (!p.vertical_first) {
    // Horizontal pass over the rows the crop needs, then one vertical pass per output row.
    std::vector<uint8_t> tmp(p.rows * S * 3);
    const uint8_t* src = image.const_data_ptr<uint8_t>() + p.row0 * image.stride(0);
    if (packed)
      pil_horizontal<true>(src, image.stride(0), 3, 1, p.rows, p.tx, 0, S, tmp.data());
    else
      pil_horizontal<false>(src, image.stride(0), image.stride(1), image.stride(2), p.rows, p.tx, 0, S, tmp.data());
    for (int64_t y = 0; y < S; ++y) {
      pil_vertical_row(tmp.data() + (p.ty.start[y] - p.row0) * S * 3, S * 3, p.ty.coef.data() + y * p.ty.ksize,
                       p.ty.size[y], S * 3, acc.data(), row.data());
      write_row(row.data(), b, y, S, outs);
    }
  } else {
    // Vertical pass over the columns the crop needs (rows must be packed for it), then horizontal.
    const at::Tensor img = packed ? image : image.contiguous();
    const uint8_t* base = img.const_data_ptr<uint8_t>() + p.col0 * 3;
    std::vector<uint8_t> tmp(S * p.cols * 3), out(S * S * 3);
    for (int64_t y = 0; y < S; ++y)
      pil_vertical_row(base + p.ty.start[y] * img.stride(0), img.stride(0), p.ty.coef.data() + y * p.ty.ksize,
                       p.ty.size[y], p.cols * 3, acc.data(), tmp.data() + y * p.cols * 3);
    pil_horizontal<true>(tmp.data(), p.cols * 3, 3, 1, S, p.tx, p.col0, S, out.data());
    for (int64_t y = 0; y < S; ++y) write_row(out.data() + y * S * 3, b, y, S, outs);
  }
}

}  // namespace

void resample_cpu(const at::Tensor& in, const at::Tensor& out, int64_t sw, int64_t dh, int64_t dw,
                  const AxisTaps& ty, const AxisTaps& tx) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scalar_type(), "resample_tokens", [&] {
    resample_impl<scalar_t>(in, out, sw, dh, dw, ty, tx);
  });
}

void preprocess_cpu(const std::vector<at::Tensor>& images, std::vector<PreprocOutput>& outputs) {
  // Outputs of equal side share one resize.
  std::vector<std::vector<PreprocOutput*>> groups;
  for (auto& o : outputs) {
    auto g = std::find_if(groups.begin(), groups.end(), [&](auto& v) { return v[0]->size == o.size; });
    if (g == groups.end()) groups.push_back({&o});
    else g->push_back(&o);
  }
  const int64_t B = static_cast<int64_t>(images.size());
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      for (auto& g : groups) preprocess_one(images[b], b, g[0]->size, g);
  });
}

}  // namespace comm_fast
