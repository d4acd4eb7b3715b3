// CUDA kernels of the patch ops. The tap tables come from the host code shared with the CPU path
// (patch_common.h), so both devices use the same taps; accumulation is fp32 for resampling and
// Pillow's fixed point for the uint8 resize, as on the CPU.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <type_traits>

#include "patch_kernels.h"

namespace comm_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kPilPrecisionBits = 32 - 8 - 2;  // Resample.c's PRECISION_BITS

__device__ __forceinline__ float load(const float* p) { return *p; }
__device__ __forceinline__ float load(const double* p) { return static_cast<float>(*p); }
__device__ __forceinline__ float load(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(double* p, float v) { *p = v; }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// One block per output pixel (and batch slice); threads stride over channels, so loads and stores
// are coalesced.
template <typename T>
__global__ void resample_kernel(const T* __restrict__ in, int64_t in_sb, int64_t in_sn, T* __restrict__ out,
                                int64_t out_sb, int64_t out_sn, int64_t B, int64_t C, int64_t sw, int64_t dw,
                                Taps ty, Taps tx) {
  const int64_t pix = blockIdx.x;
  const int64_t oy = pix / dw, ox = pix % dw;
  const int j0 = ty.offset[oy], j1 = ty.offset[oy + 1], i0 = tx.offset[ox], i1 = tx.offset[ox + 1];
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const T* img = in + b * in_sb;
    T* o = out + b * out_sb + pix * out_sn;
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      float acc = 0.0f;
      for (int j = j0; j < j1; ++j) {
        const T* row = img + static_cast<int64_t>(ty.index[j]) * sw * in_sn + c;
        for (int i = i0; i < i1; ++i)
          acc += ty.weight[j] * tx.weight[i] * load(row + static_cast<int64_t>(tx.index[i]) * in_sn);
      }
      store(o + c, acc);
    }
  }
}

__device__ __forceinline__ uint8_t clip8(int32_t acc) {
  const int32_t v = acc >> kPilPrecisionBits;
  return static_cast<uint8_t>(v < 0 ? 0 : (v > 255 ? 255 : v));
}

template <bool kRows, typename T>
__global__ void pil_pass_kernel(const uint8_t* __restrict__ src, int64_t sy, int64_t sx, int64_t sc, int64_t R,
                                int64_t X, PilAxis taps, int64_t shift, uint8_t* __restrict__ tmp,
                                T* __restrict__ out0, T* __restrict__ out1, const float* __restrict__ lut) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= R * X) return;
  const int64_t r = i / X, x = i % X, o = kRows ? r : x;
  const int32_t* k = taps.coef + o * taps.ksize;
  const int64_t first = taps.start[o] - shift;
  const uint8_t* p = kRows ? src + first * sy + x * sx : src + r * sy + first * sx;
  const int64_t step = kRows ? sy : sx;
  int32_t s0 = 1 << (kPilPrecisionBits - 1), s1 = s0, s2 = s0;
  for (int t = 0; t < taps.size[o]; ++t, p += step) {
    s0 += p[0] * k[t];
    s1 += p[sc] * k[t];
    s2 += p[2 * sc] * k[t];
  }
  const uint8_t v[3] = {clip8(s0), clip8(s1), clip8(s2)};
  if (tmp != nullptr) {
    for (int c = 0; c < 3; ++c) tmp[3 * i + c] = v[c];
    return;
  }
  const int64_t plane = R * X;
  for (int c = 0; c < 3; ++c) {
    store(out0 + c * plane + i, lut[c * 256 + v[c]]);
    if (out1 != nullptr) store(out1 + c * plane + i, lut[768 + c * 256 + v[c]]);
  }
}

const char* last_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

template <typename F>
const char* dispatch(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat: f(static_cast<float*>(nullptr)); break;
    case DType::kDouble: f(static_cast<double*>(nullptr)); break;
    case DType::kHalf: f(static_cast<__half*>(nullptr)); break;
    case DType::kBFloat16: f(static_cast<__nv_bfloat16*>(nullptr)); break;
  }
  return last_error();
}

}  // namespace

const char* resample(DType dtype, const void* in, int64_t in_sb, int64_t in_sn, void* out, int64_t out_sb,
                     int64_t out_sn, int64_t B, int64_t C, int64_t sw, int64_t dh, int64_t dw, Taps ty, Taps tx,
                     void* stream) {
  int threads = static_cast<int>((C + 31) / 32 * 32);
  threads = threads < 32 ? 32 : (threads > kThreads ? kThreads : threads);
  const dim3 grid(static_cast<unsigned>(dh * dw), static_cast<unsigned>(B < 65535 ? B : 65535));
  return dispatch(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    resample_kernel<T><<<grid, threads, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(in), in_sb, in_sn, static_cast<T*>(out), out_sb, out_sn, B, C, sw, dw, ty, tx);
  });
}

const char* pil_pass(bool rows, const uint8_t* src, int64_t sy, int64_t sx, int64_t sc, int64_t R, int64_t X,
                     PilAxis taps, int64_t shift, uint8_t* tmp, DType out_dtype, void* out0, void* out1,
                     const float* lut, void* stream) {
  const unsigned blocks = static_cast<unsigned>((R * X + kThreads - 1) / kThreads);
  return dispatch(out_dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    auto s = static_cast<cudaStream_t>(stream);
    if (rows)
      pil_pass_kernel<true, T><<<blocks, kThreads, 0, s>>>(src, sy, sx, sc, R, X, taps, shift, tmp,
                                                           static_cast<T*>(out0), static_cast<T*>(out1), lut);
    else
      pil_pass_kernel<false, T><<<blocks, kThreads, 0, s>>>(src, sy, sx, sc, R, X, taps, shift, tmp,
                                                            static_cast<T*>(out0), static_cast<T*>(out1), lut);
  });
}

}  // namespace cuda
}  // namespace comm_fast
