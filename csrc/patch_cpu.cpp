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

// The platform side of the shared resample_pixel (patch_math.h): its channel loop is axpy.
template <typename T>
struct CpuIO {
  static void store(T* p, float v) { *p = static_cast<T>(v); }
  static void accumulate(float* acc, const T* const* p, const float* w, int k, int64_t n, bool first) {
    if (k == 0) std::fill(acc, acc + n, 0.0f);  // no taps (cannot happen for valid sizes)
    else axpy(acc, p, w, k, n, first);
  }
};

template <int KY, int KX, typename T>
void resample_rows(const T* src, int64_t in_sb, int64_t in_sn, T* dst, int64_t out_sb, int64_t out_sn, int64_t sw,
                   int64_t dh, int64_t dw, int64_t C, const TapView& ty, const TapView& tx, int64_t begin,
                   int64_t end) {
  std::vector<float> scratch(C);
  for (int64_t r = begin; r < end; ++r) {
    const int64_t b = r / dh, oy = r % dh;
    for (int64_t ox = 0; ox < dw; ++ox) {
      T* o = dst + b * out_sb + (oy * dw + ox) * out_sn;
      // fp32 outputs accumulate in place; other dtypes in an fp32 row, converted once.
      float* acc = std::is_same<T, float>::value ? reinterpret_cast<float*>(o) : scratch.data();
      resample_pixel<KY, KX, CpuIO<T>>(src + b * in_sb, sw * in_sn, in_sn, ty, oy, tx, ox, acc, C);
      if (!std::is_same<T, float>::value) store(o, acc, C);
    }
  }
}

template <typename T>
void resample_impl(const at::Tensor& in, const at::Tensor& out, int64_t sw, int64_t dh, int64_t dw, const Tables& t) {
  const int64_t B = in.size(0), C = in.size(2);
  const T* src = in.const_data_ptr<T>();
  T* dst = out.mutable_data_ptr<T>();
  const TapView ty = t.tap(t.words.data(), 0), tx = t.tap(t.words.data(), 1);
  // One task per output row of one image; the channel loop is the vectorised one. Bilinear and
  // bicubic tables (2 or 4 taps everywhere) get compile-time tap counts.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, dw * C));
  comm_fast::parallel_for(0, B * dh, grain, [&](int64_t begin, int64_t end) {
    const auto run = [&](auto rows) {
      rows(src, in.stride(0), in.stride(1), dst, out.stride(0), out.stride(1), sw, dh, dw, C, ty, tx, begin, end);
    };
    if (t.k[0] == 2 && t.k[1] == 2) run(resample_rows<2, 2, T>);
    else if (t.k[0] == 4 && t.k[1] == 4) run(resample_rows<4, 4, T>);
    else run(resample_rows<0, 0, T>);
  });
}

// ---- joint_preprocess ----

// Horizontal Pillow pass of one row, through the shared pil_output: the source row is first
// widened to int32 RGBX pixels (zero-padded by ksize at the end), so that each tap is one 4-lane
// vector multiply-add, over a compile-time count of taps.
struct RgbxLanes {
  typedef int32_t v4si __attribute__((vector_size(16)));
  static void mac(int32_t* acc, const int32_t* p, int64_t, int32_t k, int64_t) {
    v4si a, x;
    std::memcpy(&a, acc, sizeof a);
    std::memcpy(&x, p, sizeof x);
    a += x * k;
    std::memcpy(acc, &a, sizeof a);
  }
};

template <int K>
__attribute__((always_inline)) inline void horizontal_row(const int32_t* __restrict px, const PilView& tx,
                                                          int64_t shift, int64_t S, uint8_t* __restrict out) {
  for (int64_t x = 0; x < S; ++x) {
    uint8_t v[4];
    int32_t acc[4];
    pil_output<4, K, RgbxLanes>(px, tx, x, shift, 4, 1, 4, acc, v, 1);
    out[3 * x] = v[0];
    out[3 * x + 1] = v[1];
    out[3 * x + 2] = v[2];
  }
}

COMM_FAST_MULTIVERSION void pil_horizontal_row(const int32_t* px, const PilView& tx, int64_t shift, int64_t S,
                                               uint8_t* out) {
  switch (tx.ksize) {  // 5: upscales; 7: downscales up to 1.5x, the common case; 9-11: up to 2.5x
    case 5: horizontal_row<5>(px, tx, shift, S, out); break;
    case 7: horizontal_row<7>(px, tx, shift, S, out); break;
    case 9: horizontal_row<9>(px, tx, shift, S, out); break;
    case 11: horizontal_row<11>(px, tx, shift, S, out); break;
    default: horizontal_row<0>(px, tx, shift, S, out);
  }
}

// n pixels of a source row (byte strides sx, sc) as int32 RGBX.
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

// `rows` rows of src into dst [rows, S, 3]; src[0] is column `shift` of the image.
void pil_horizontal(const uint8_t* src, int64_t sy, int64_t sx, int64_t sc, int64_t rows, const PilView& tx,
                    int64_t shift, int64_t cols, int64_t S, uint8_t* dst) {
  std::vector<int32_t> px((cols + tx.ksize) * 4, 0);  // the padding stays zero
  const bool packed = sx == 3 && sc == 1;
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* row = src + r * sy;
    if (packed)
      widen_row<true>(row, sx, sc, cols, px.data());
    else
      widen_row<false>(row, sx, sc, cols, px.data());
    pil_horizontal_row(px.data(), tx, shift, S, dst + r * S * 3);
  }
}

// Vertical Pillow pass of output row y over n bytes of each source row (src[0] is row `shift`),
// through the shared pil_output, vectorised along the row. acc: n int32 of scratch.
COMM_FAST_MULTIVERSION void pil_vertical_row(const uint8_t* __restrict src, int64_t row_stride, const PilView& ty,
                                             int64_t y, int64_t shift, int64_t n, int32_t* __restrict acc,
                                             uint8_t* __restrict out) {
  pil_output<0>(src, ty, y, shift, row_stride, 1, n, acc, out, 1);
}

// Output row y of image b from a resized row [S, 3], through the shared write_pixel.
template <typename T>
void write_row(const uint8_t* row, int64_t b, int64_t y, int64_t S, const PreprocJob& job, int first, bool both,
               const float* luts) {
  const int64_t plane = S * S, offset = b * 3 * plane + y * S;
  T* o0 = job.dst[first].mutable_data_ptr<T>() + offset;
  T* o1 = both ? job.dst[1].mutable_data_ptr<T>() + offset : nullptr;
  for (int64_t x = 0; x < S; ++x) write_pixel<CpuIO<T>>(row + 3 * x, luts, first, o0, o1, plane, x);
}

// Resize + crop one image (in Pillow's pass order) for one group of outputs and write them.
void preprocess_one(const at::Tensor& image, int64_t b, const PreprocJob& job, int first, bool both) {
  const int64_t S = job.size[first];
  const std::shared_ptr<Tables> t = crop_tables_for(image.size(0), image.size(1), S, image.device());
  const CropPlan& p = t->plan;
  const PilView ty = t->pil(t->words.data(), 0), tx = t->pil(t->words.data(), 1);
  const float* luts = job.lut->lut(job.lut->words.data());
  auto write = [&](const uint8_t* row, int64_t y) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, job.dst[first].scalar_type(), "joint_preprocess",
                                    [&] { write_row<scalar_t>(row, b, y, S, job, first, both, luts); });
  };
  std::vector<uint8_t> row(S * 3);
  std::vector<int32_t> acc(std::max(S, p.cols) * 3);
  if (!p.vertical_first) {
    // Horizontal pass over the rows the crop needs, then one vertical pass per output row.
    std::vector<uint8_t> tmp(p.rows * S * 3);
    const uint8_t* src = image.const_data_ptr<uint8_t>() + p.row0 * image.stride(0) + p.col0 * image.stride(1);
    pil_horizontal(src, image.stride(0), image.stride(1), image.stride(2), p.rows, tx, p.col0, p.cols, S, tmp.data());
    for (int64_t y = 0; y < S; ++y) {
      pil_vertical_row(tmp.data(), S * 3, ty, y, p.row0, S * 3, acc.data(), row.data());
      write(row.data(), y);
    }
  } else {
    // Vertical pass over the columns the crop needs (rows must be packed for it), then horizontal.
    const at::Tensor img = image.stride(1) == 3 && image.stride(2) == 1 ? image : image.contiguous();
    const uint8_t* base = img.const_data_ptr<uint8_t>() + p.col0 * 3;
    std::vector<uint8_t> tmp(S * p.cols * 3), out(S * S * 3);
    for (int64_t y = 0; y < S; ++y)
      pil_vertical_row(base, img.stride(0), ty, y, 0, p.cols * 3, acc.data(), tmp.data() + y * p.cols * 3);
    pil_horizontal(tmp.data(), p.cols * 3, 3, 1, S, tx, p.col0, p.cols, S, out.data());
    for (int64_t y = 0; y < S; ++y) write(out.data() + y * S * 3, y);
  }
}

}  // namespace

void resample_cpu(const at::Tensor& in, const at::Tensor& out, int64_t sw, int64_t dh, int64_t dw, const Tables& t) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scalar_type(), "resample_tokens", [&] {
    resample_impl<scalar_t>(in, out, sw, dh, dw, t);
  });
}

void preprocess_cpu(const std::vector<at::Tensor>& images, const PreprocJob& job) {
  const int64_t B = static_cast<int64_t>(images.size());
  const auto groups = job.groups();
  comm_fast::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      for (const auto& g : groups) preprocess_one(images[b], b, job, g.first, g.second);
  });
}

}  // namespace comm_fast
