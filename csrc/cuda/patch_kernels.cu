// CUDA kernels of the patch ops: thread mapping and launches only. What each thread computes is
// the shared code of patch_math.h (also what the CPU kernels run), on tables built by the host
// code shared with the CPU path and kept on the device by the table cache.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <type_traits>

#include "patch_kernels.h"

namespace comm_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;

__host__ __device__ __forceinline__ float to_float(float v) { return v; }
__host__ __device__ __forceinline__ float to_float(double v) { return static_cast<float>(v); }
__host__ __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__host__ __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__host__ __device__ __forceinline__ T from_float(float v) {
  if constexpr (std::is_same<T, __half>::value) return __float2half_rn(v);
  else if constexpr (std::is_same<T, __nv_bfloat16>::value) return __float2bfloat16_rn(v);
  else return static_cast<T>(v);
}

// The platform side of the shared per-pixel functions: V channels per thread, V elements of 16
// bytes in all being one vector load / store (the launcher checks the alignment).
template <typename T, int V>
struct DevIO {
  __host__ __device__ static void store(T* p, float v) { *p = from_float<T>(v); }
  __host__ __device__ static void load(const T* p, float* x) {
#ifdef __CUDA_ARCH__
    if constexpr (V * sizeof(T) == 16) {
      const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
      const T* e = reinterpret_cast<const T*>(&raw);
      for (int v = 0; v < V; ++v) x[v] = to_float(e[v]);
    } else
#endif
    {
      for (int v = 0; v < V; ++v) x[v] = to_float(p[v]);
    }
  }
  __host__ __device__ static void store_vec(T* p, const float* a) {
    if constexpr (V * sizeof(T) == 16) {
      uint4 raw;
      T* e = reinterpret_cast<T*>(&raw);
      for (int v = 0; v < V; ++v) e[v] = from_float<T>(a[v]);
      *reinterpret_cast<uint4*>(p) = raw;
    } else {
      for (int v = 0; v < V; ++v) p[v] = from_float<T>(a[v]);
    }
  }
  // acc[v] = (first ? 0 : acc[v]) + sum_{t<k} w[t] p[t][v], in the CPU's order.
  __host__ __device__ static void accumulate(float* acc, const T* const* p, const float* w, int k, int64_t,
                                             bool first) {
    if (first)
      for (int v = 0; v < V; ++v) acc[v] = 0.0f;
    for (int t = 0; t < k; ++t) {
      float x[V];
      load(p[t], x);
      for (int v = 0; v < V; ++v) acc[v] += w[t] * x[v];
    }
  }
};

// One pixel's V channels at c: the shared resample_pixel into registers, then one store.
template <typename T, int V, int KY, int KX>
__device__ __forceinline__ void resample_vec(const T* img, int64_t row_step, int64_t col_step, const TapView& ty,
                                             int64_t oy, const TapView& tx, int64_t ox, T* out) {
  float acc[V];
  resample_pixel<KY, KX, DevIO<T, V>>(img, row_step, col_step, ty, oy, tx, ox, acc, V);
  DevIO<T, V>::store_vec(out, acc);
}

// blockDim = (lanes, pixels): threadIdx.y picks one of several output pixels of the block,
// threadIdx.x strides over its channels in vectors of V (16 bytes when aligned), then the
// remaining C % V channels one at a time. gridDim.y strides over the batch.
template <typename T, int V, int KY, int KX>
__global__ void resample_kernel(const T* __restrict__ in, int64_t in_sb, int64_t in_sn, T* __restrict__ out,
                                int64_t out_sb, int64_t out_sn, int64_t B, int64_t C, int64_t sw, int64_t dh,
                                int64_t dw, TapView ty, TapView tx) {
  const int64_t pix = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (pix >= dh * dw) return;
  const int64_t oy = pix / dw, ox = pix % dw;
  const int64_t vec_end = C / V * V;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const T* img = in + b * in_sb;
    T* o = out + b * out_sb + pix * out_sn;
    for (int64_t c = static_cast<int64_t>(threadIdx.x) * V; c < vec_end; c += static_cast<int64_t>(blockDim.x) * V)
      resample_vec<T, V, KY, KX>(img + c, sw * in_sn, in_sn, ty, oy, tx, ox, o + c);
    for (int64_t c = vec_end + threadIdx.x; c < C; c += blockDim.x)
      resample_vec<T, 1, KY, KX>(img + c, sw * in_sn, in_sn, ty, oy, tx, ox, o + c);
  }
}

// One thread per output sample of a Pillow pass.
template <bool kRows, typename T>
__global__ void pil_pass_kernel(const uint8_t* __restrict__ src, int64_t sy, int64_t sx, int64_t sc, int64_t R,
                                int64_t X, PilView taps, int64_t shift, uint8_t* __restrict__ tmp,
                                T* __restrict__ out0, int out0_id, T* __restrict__ out1,
                                const float* __restrict__ luts) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= R * X) return;
  const int64_t r = i / X, x = i % X;
  uint8_t v[3];
  int32_t acc[3];
  if (kRows)
    pil_output<3>(src + x * sx, taps, r, shift, sy, sc, 3, acc, v, 1);
  else
    pil_output<3>(src + r * sy, taps, x, shift, sx, sc, 3, acc, v, 1);
  if (tmp != nullptr) {
    for (int c = 0; c < 3; ++c) tmp[3 * i + c] = v[c];
    return;
  }
  write_pixel<DevIO<T, 1>>(v, luts, out0_id, out0, out1, R * X, i);
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

template <typename T, int V>
void launch_resample(const T* in, int64_t in_sb, int64_t in_sn, T* out, int64_t out_sb, int64_t out_sn, int64_t B,
                     int64_t C, int64_t sw, int64_t dh, int64_t dw, TapView ty, int ky, TapView tx, int kx,
                     cudaStream_t stream) {
  // Lanes cover the channel vectors (a multiple of the warp, at most the block); the rest of the
  // block's threads take further output pixels.
  const int64_t vectors = (C + V - 1) / V;
  int lanes = static_cast<int>((vectors + 31) / 32 * 32);
  lanes = lanes > kThreads ? kThreads : lanes;
  const int pixels = kThreads / lanes;
  const dim3 block(lanes, pixels);
  const dim3 grid(static_cast<unsigned>((dh * dw + pixels - 1) / pixels), static_cast<unsigned>(B < 65535 ? B : 65535));
  const auto args = [&](auto kernel) {
    kernel<<<grid, block, 0, stream>>>(in, in_sb, in_sn, out, out_sb, out_sn, B, C, sw, dh, dw, ty, tx);
  };
  if (ky == 2 && kx == 2)
    args(resample_kernel<T, V, 2, 2>);
  else if (ky == 4 && kx == 4)
    args(resample_kernel<T, V, 4, 4>);
  else
    args(resample_kernel<T, V, 0, 0>);
}

}  // namespace

const char* resample(DType dtype, const void* in, int64_t in_sb, int64_t in_sn, void* out, int64_t out_sb,
                     int64_t out_sn, int64_t B, int64_t C, int64_t sw, int64_t dh, int64_t dw, TapView ty, int ky,
                     TapView tx, int kx, void* stream) {
  return dispatch(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    constexpr int V = 16 / sizeof(T);
    const auto s = static_cast<cudaStream_t>(stream);
    const T* i = static_cast<const T*>(in);
    T* o = static_cast<T*>(out);
    // 16-byte vectors need 16-byte aligned rows: both base pointers and every stride.
    const bool aligned = reinterpret_cast<uintptr_t>(in) % 16 == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0 &&
                         in_sb % V == 0 && in_sn % V == 0 && out_sb % V == 0 && out_sn % V == 0 && C >= V;
    if (aligned)
      launch_resample<T, V>(i, in_sb, in_sn, o, out_sb, out_sn, B, C, sw, dh, dw, ty, ky, tx, kx, s);
    else
      launch_resample<T, 1>(i, in_sb, in_sn, o, out_sb, out_sn, B, C, sw, dh, dw, ty, ky, tx, kx, s);
  });
}

const char* pil_pass(bool rows, const uint8_t* src, int64_t sy, int64_t sx, int64_t sc, int64_t R, int64_t X,
                     PilView taps, int64_t shift, uint8_t* tmp, DType out_dtype, void* out0, int out0_id, void* out1,
                     const float* luts, void* stream) {
  const unsigned blocks = static_cast<unsigned>((R * X + kThreads - 1) / kThreads);
  return dispatch(out_dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const auto s = static_cast<cudaStream_t>(stream);
    T* o0 = static_cast<T*>(out0);
    T* o1 = static_cast<T*>(out1);
    if (rows)
      pil_pass_kernel<true, T><<<blocks, kThreads, 0, s>>>(src, sy, sx, sc, R, X, taps, shift, tmp, o0, out0_id, o1,
                                                           luts);
    else
      pil_pass_kernel<false, T><<<blocks, kThreads, 0, s>>>(src, sy, sx, sc, R, X, taps, shift, tmp, o0, out0_id, o1,
                                                            luts);
  });
}

bool stream_capturing(void* stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(static_cast<cudaStream_t>(stream), &status) != cudaSuccess) {
    cudaGetLastError();  // clear it; treat as capturing, the cautious answer
    return true;
  }
  return status != cudaStreamCaptureStatusNone;
}

}  // namespace cuda
}  // namespace comm_fast
