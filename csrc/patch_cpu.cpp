// CPU kernels of the patch ops: token-grid resampling (also used for position embeddings) and
// the Pillow-exact uint8 resize + center crop + normalise of joint_preprocess.
#include "patch_ops.h"

#include "patch_parallel.h"

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

// fp32 -> bf16 with c10's rounding (to nearest even, NaN -> 0x7fc0), branch-free so it vectorises.
COMM_FAST_MULTIVERSION void store_bf16(uint16_t* __restrict dst, const float* __restrict acc, int64_t n) {
  for (int64_t c = 0; c < n; ++c) {
    uint32_t u;
    std::memcpy(&u, &acc[c], sizeof u);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    dst[c] = acc[c] != acc[c] ? uint16_t(0x7fc0) : static_cast<uint16_t>(rounded);
  }
}

template <>
void store<at::BFloat16>(at::BFloat16* __restrict dst, const float* __restrict acc, int64_t n) {
  store_bf16(reinterpret_cast<uint16_t*>(dst), acc, n);
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
  comm_fast::parallel_for(0, B * dh, grain, [&](int64_t begin, int64_t end) {
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

// Horizontal Pillow pass. Each source row is widened once to int32 RGBX pixels (zero-padded at
// the end), so that every output pixel is a dot product of whole vectors: two RGBX pixels per
// 8-lane vector times their two coefficients, summed, then the halves added. Integer arithmetic
// throughout, so the sums are Pillow's exactly (no overflow: |sum| < 255 * 1.5 * 2^22).
typedef int32_t v8si __attribute__((vector_size(32)));

struct HorizontalTaps {
  int pairs = 0;               // vectors per output pixel: ceil(ksize / 2)
  std::vector<v8si> coef;      // [S][pairs]: {k[2j] x4, k[2j+1] x4}, zero past the taps
  std::vector<int32_t> start;  // first source column of each output, relative to the widened row
  int64_t width = 0;           // widened row length in pixels, padding included
};

HorizontalTaps horizontal_taps(const PilTaps& t, int64_t col0, int64_t cols) {
  HorizontalTaps h;
  h.pairs = (t.ksize + 1) / 2;
  const int64_t S = static_cast<int64_t>(t.start.size());
  h.coef.assign(S * h.pairs, v8si{});
  h.start.resize(S);
  for (int64_t x = 0; x < S; ++x) {
    for (int k = 0; k < t.ksize; ++k)
      for (int c = 0; c < 4; ++c) h.coef[x * h.pairs + k / 2][(k % 2) * 4 + c] = t.coef[x * t.ksize + k];
    h.start[x] = static_cast<int32_t>(t.start[x] - col0);
  }
  h.width = cols + 2 * h.pairs;
  return h;
}

// n pixels of a source row (byte strides sx, sc) as int32 RGBX; the padding stays zero.
template <bool kPacked>
void widen_row(const uint8_t* __restrict row, int64_t sx, int64_t sc, int64_t n, int32_t* __restrict dst) {
  if (kPacked) {
    sx = 3;
    sc = 1;
  }
  for (int64_t i = 0; i < n; ++i, row += sx) {
    dst[4 * i] = row[0];
    dst[4 * i + 1] = row[sc];
    dst[4 * i + 2] = row[2 * sc];
  }
}

// kPairs > 0 fixes the vector count per output (fully unrolled); 0 reads it from h.
template <int kPairs>
__attribute__((always_inline)) inline void horizontal_row(const int32_t* __restrict px, const HorizontalTaps& h,
                                                          int64_t S, uint8_t* __restrict out) {
  typedef int32_t v4si __attribute__((vector_size(16)));
  const int pairs = kPairs > 0 ? kPairs : h.pairs;
  const v8si* coef = h.coef.data();
  for (int64_t x = 0; x < S; ++x, coef += pairs) {
    const int32_t* p = px + 4 * static_cast<int64_t>(h.start[x]);
    v8si acc{};
    for (int j = 0; j < pairs; ++j) {
      v8si v;
      std::memcpy(&v, p + 8 * j, sizeof v);
      acc += v * coef[j];
    }
    v4si sum = v4si{acc[0], acc[1], acc[2], acc[3]} + v4si{acc[4], acc[5], acc[6], acc[7]};
    sum = (sum + (1 << (kPilPrecisionBits - 1))) >> kPilPrecisionBits;  // Pillow's clip8, on 4 lanes
    sum = sum < 0 ? 0 : (sum > 255 ? 255 : sum);
    for (int c = 0; c < 3; ++c) out[3 * x + c] = static_cast<uint8_t>(sum[c]);
  }
}

COMM_FAST_MULTIVERSION void pil_horizontal_row(const int32_t* px, const HorizontalTaps& h, int64_t S, uint8_t* out) {
  switch (h.pairs) {  // 4: downscales up to 1.5x (ksize 7), the common case; 5-6: up to 2.5x
    case 4: horizontal_row<4>(px, h, S, out); break;
    case 5: horizontal_row<5>(px, h, S, out); break;
    case 6: horizontal_row<6>(px, h, S, out); break;
    default: horizontal_row<0>(px, h, S, out);
  }
}

// `rows` rows of src into dst [rows, S, 3]; src[0] is column col0 of the image, and the crop
// reads columns [col0, col0 + cols).
void pil_horizontal(const uint8_t* src, int64_t sy, int64_t sx, int64_t sc, int64_t rows, const PilTaps& tx,
                    int64_t col0, int64_t cols, int64_t S, uint8_t* dst) {
  const HorizontalTaps h = horizontal_taps(tx, col0, cols);
  std::vector<int32_t> px(h.width * 4, 0);
  const bool packed = sx == 3 && sc == 1;
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* row = src + r * sy;
    if (packed)
      widen_row<true>(row, sx, sc, cols, px.data());
    else
      widen_row<false>(row, sx, sc, cols, px.data());
    pil_horizontal_row(px.data(), h, S, dst + r * S * 3);
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

// Two float32 outputs of one side (the common case: clip_size == dino_size) share each lookup's index.
COMM_FAST_MULTIVERSION void write_pair(const uint8_t* __restrict row, int64_t S, const float* __restrict l0,
                                       const float* __restrict l1, float* __restrict o0, float* __restrict o1) {
  for (int64_t x = 0; x < S; ++x) {
    const uint8_t v = row[3 * x];
    o0[x] = l0[v];
    o1[x] = l1[v];
  }
}

void write_row(const uint8_t* row, int64_t b, int64_t y, int64_t S, std::vector<PreprocOutput*>& outs) {
  const int64_t offset = b * 3 * S * S + y * S;
  if (outs.size() == 2 && outs[0]->dst.scalar_type() == at::kFloat && outs[1]->dst.scalar_type() == at::kFloat) {
    float* d0 = outs[0]->dst.mutable_data_ptr<float>() + offset;
    float* d1 = outs[1]->dst.mutable_data_ptr<float>() + offset;
    for (int c = 0; c < 3; ++c)
      write_pair(row + c, S, outs[0]->lut[c].data(), outs[1]->lut[c].data(), d0 + c * S * S, d1 + c * S * S);
    return;
  }
  for (PreprocOutput* o : outs) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, o->dst.scalar_type(), "joint_preprocess", [&] {
      write_normalised(row, S, o->lut, o->dst.mutable_data_ptr<scalar_t>() + offset, S * S);
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
    const uint8_t* src = image.const_data_ptr<uint8_t>() + p.row0 * image.stride(0) + p.col0 * image.stride(1);
    pil_horizontal(src, image.stride(0), image.stride(1), image.stride(2), p.rows, p.tx, p.col0, p.cols, S, tmp.data());
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
    pil_horizontal(tmp.data(), p.cols * 3, 3, 1, S, p.tx, p.col0, p.cols, S, out.data());
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
  comm_fast::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      for (auto& g : groups) preprocess_one(images[b], b, g[0]->size, g);
  });
}

}  // namespace comm_fast
