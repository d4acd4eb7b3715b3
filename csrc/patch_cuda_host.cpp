// ATen side of the CUDA path: puts the cached tables on the device (once per table set, a
// stream-ordered copy from pinned memory: no pageable copy, no synchronisation), allocates scratch,
// finds the current stream and calls the launchers of csrc/cuda/patch_kernels.cu. Only c10/core
// and ATen headers are used, so this file also compiles (with -DCOMM_FAST_WITH_CUDA) against a CPU
// torch.
#ifdef COMM_FAST_WITH_CUDA

#include <c10/core/DeviceGuard.h>
#include <c10/core/Event.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <cstring>
#include <mutex>

#include "cuda/patch_kernels.h"
#include "patch_ops.h"

namespace comm_fast {
namespace {

cuda::DType dtype_of(at::ScalarType s) {
  switch (s) {
    case at::kFloat: return cuda::DType::kFloat;
    case at::kDouble: return cuda::DType::kDouble;
    case at::kHalf: return cuda::DType::kHalf;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    default: TORCH_CHECK(false, "unsupported dtype ", s);
  }
}

c10::Stream current_stream(const at::Device& d) {
  return c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(d);
}

void check(const char* err, const char* what) { TORCH_CHECK(err == nullptr, what, ": CUDA error: ", err); }

// A table set's words on one device. The copy is queued on the stream of the first call; `done`
// marks its completion for calls on other streams, until it is seen complete.
struct DeviceCopy {
  at::Tensor pinned, words;
  c10::Event done{c10::DeviceType::CUDA};
  c10::Stream stream;
  bool ready = false;
  explicit DeviceCopy(c10::Stream s) : stream(s) {}
};

// The device words of t (which the cache keys by device), uploading them on the first call.
const int32_t* device_words(Tables& t, const at::Device& d, const char* op) {
  static std::mutex mutex;
  std::lock_guard<std::mutex> lock(mutex);
  const c10::Stream stream = current_stream(d);
  const bool capturing = cuda::stream_capturing(stream.native_handle());
  auto* copy = static_cast<DeviceCopy*>(t.device.get());
  if (copy == nullptr) {
    // A copy queued during capture would only run at replay: the tables must exist before.
    TORCH_CHECK(!capturing, op, ": its tables for these sizes are not on ", d,
                " yet; run the op once with the same sizes before capturing a CUDA graph (the warm-up "
                "torch.cuda.graph asks for)");
    auto c = std::make_shared<DeviceCopy>(stream);
    const int64_t n = static_cast<int64_t>(t.words.size());
    c->pinned = at::empty({n}, at::TensorOptions().dtype(at::kInt).pinned_memory(true));
    std::memcpy(c->pinned.mutable_data_ptr<int32_t>(), t.words.data(), n * sizeof(int32_t));
    c->words = at::empty({n}, at::TensorOptions().dtype(at::kInt).device(d));
    c->words.copy_(c->pinned, /*non_blocking=*/true);  // pinned source: cudaMemcpyAsync on `stream`
    c->done.record(stream);
    t.device = c;
    return c->words.const_data_ptr<int32_t>();
  }
  // Under capture the copy is long complete (torch.cuda.graph synchronises before capturing) and
  // an event query is not allowed; elsewhere another stream waits for it (no host sync).
  if (!copy->ready && !capturing) {
    if (copy->done.query())
      copy->ready = true;
    else if (copy->stream != stream)
      copy->done.block(stream);
  }
  return copy->words.const_data_ptr<int32_t>();
}

}  // namespace

void resample_cuda(const at::Tensor& in, const at::Tensor& out, int64_t sw, int64_t dh, int64_t dw, Tables& t) {
  const at::Device d = in.device();
  const c10::DeviceGuard guard(d);
  TORCH_CHECK(dh * dw < (int64_t(1) << 31), "dst_hw: too many output positions for the CUDA kernel");
  const int32_t* words = device_words(t, d, "resample_tokens");
  check(cuda::resample(dtype_of(in.scalar_type()), in.const_data_ptr(), in.stride(0), in.stride(1),
                       out.mutable_data_ptr(), out.stride(0), out.stride(1), in.size(0), in.size(2), sw, dh, dw,
                       t.tap(words, 0), t.k[0], t.tap(words, 1), t.k[1], current_stream(d).native_handle()),
        "resample_tokens");
}

void preprocess_cuda(const std::vector<at::Tensor>& images, const PreprocJob& job) {
  const at::Device d = images[0].device();
  const c10::DeviceGuard guard(d);
  void* stream = current_stream(d).native_handle();
  const float* luts = job.lut->lut(device_words(*job.lut, d, "joint_preprocess"));
  for (const auto& [first, both] : job.groups()) {
    const int64_t S = job.size[first];
    const cuda::DType dt = dtype_of(job.dst[first].scalar_type());
    const int64_t image_bytes = 3 * S * S * job.dst[first].element_size();
    for (size_t b = 0; b < images.size(); ++b) {
      const at::Tensor& img = images[b];
      const std::shared_ptr<Tables> t = crop_tables_for(img.size(0), img.size(1), S, d);
      const int32_t* words = device_words(*t, d, "joint_preprocess");
      const CropPlan& p = t->plan;
      const PilView ty = t->pil(words, 0), tx = t->pil(words, 1);
      void* out0 = static_cast<char*>(job.dst[first].mutable_data_ptr()) + b * image_bytes;
      void* out1 = both ? static_cast<char*>(job.dst[1].mutable_data_ptr()) + b * image_bytes : nullptr;
      const uint8_t* base = img.const_data_ptr<uint8_t>();
      const int64_t sy = img.stride(0), sx = img.stride(1), sc = img.stride(2);
      // Pillow's pass order, as in preprocess_cpu; only the crop's rows / columns are computed.
      if (!p.vertical_first) {
        at::Tensor tmp = at::empty({p.rows, S, 3}, img.options());
        check(cuda::pil_pass(false, base + p.row0 * sy + p.col0 * sx, sy, sx, sc, p.rows, S, tx, p.col0,
                             tmp.mutable_data_ptr<uint8_t>(), dt, nullptr, first, nullptr, nullptr, stream),
              "joint_preprocess");
        check(cuda::pil_pass(true, tmp.const_data_ptr<uint8_t>(), S * 3, 3, 1, S, S, ty, p.row0, nullptr, dt, out0,
                             first, out1, luts, stream),
              "joint_preprocess");
      } else {
        at::Tensor tmp = at::empty({S, p.cols, 3}, img.options());
        check(cuda::pil_pass(true, base + p.col0 * sx, sy, sx, sc, S, p.cols, ty, 0, tmp.mutable_data_ptr<uint8_t>(),
                             dt, nullptr, first, nullptr, nullptr, stream),
              "joint_preprocess");
        check(cuda::pil_pass(false, tmp.const_data_ptr<uint8_t>(), p.cols * 3, 3, 1, S, S, tx, p.col0, nullptr, dt,
                             out0, first, out1, luts, stream),
              "joint_preprocess");
      }
    }
  }
}

}  // namespace comm_fast

#endif  // COMM_FAST_WITH_CUDA
