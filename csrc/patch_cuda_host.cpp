// ATen side of the CUDA path: uploads the tap tables, allocates scratch on the device, finds the
// current stream and calls the launchers of csrc/cuda/patch_kernels.cu. Only c10/core and ATen
// headers are used, so this file also compiles (with -DCOMM_FAST_WITH_CUDA) against a CPU torch.
#ifdef COMM_FAST_WITH_CUDA

#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <map>

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

void* current_stream(const at::Device& d) {
  return c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(d).native_handle();
}

void check(const char* err, const char* what) { TORCH_CHECK(err == nullptr, what, ": CUDA error: ", err); }

at::Tensor upload(const std::vector<int32_t>& v, const at::Device& d) {
  return at::tensor(v, at::TensorOptions().dtype(at::kInt)).to(d);
}
at::Tensor upload(const std::vector<float>& v, const at::Device& d) {
  return at::tensor(v, at::TensorOptions().dtype(at::kFloat)).to(d);
}

// A PilTaps table on the device (tensors keep it alive while kernels queue on the stream).
struct DeviceAxis {
  at::Tensor start, size, coef;
  int ksize;
  cuda::PilAxis view() const {
    return {start.const_data_ptr<int32_t>(), size.const_data_ptr<int32_t>(), coef.const_data_ptr<int32_t>(), ksize};
  }
};

DeviceAxis upload(const PilTaps& t, const at::Device& d) {
  return {upload(t.start, d), upload(t.size, d), upload(t.coef, d), t.ksize};
}

}  // namespace

void resample_cuda(const at::Tensor& in, const at::Tensor& out, int64_t sw, int64_t dh, int64_t dw,
                   const AxisTaps& ty, const AxisTaps& tx) {
  const at::Device d = in.device();
  const c10::DeviceGuard guard(d);
  TORCH_CHECK(dh * dw < (int64_t(1) << 31), "dst_hw: too many output positions for the CUDA kernel");
  const at::Tensor y_off = upload(ty.offset, d), y_idx = upload(ty.index, d), y_w = upload(ty.weight, d);
  const at::Tensor x_off = upload(tx.offset, d), x_idx = upload(tx.index, d), x_w = upload(tx.weight, d);
  const cuda::Taps cy{y_off.const_data_ptr<int32_t>(), y_idx.const_data_ptr<int32_t>(), y_w.const_data_ptr<float>()};
  const cuda::Taps cx{x_off.const_data_ptr<int32_t>(), x_idx.const_data_ptr<int32_t>(), x_w.const_data_ptr<float>()};
  check(cuda::resample(dtype_of(in.scalar_type()), in.const_data_ptr(), in.stride(0), in.stride(1),
                       out.mutable_data_ptr(), out.stride(0), out.stride(1), in.size(0), in.size(2), sw, dh, dw, cy,
                       cx, current_stream(d)),
        "resample_tokens");
}

void preprocess_cuda(const std::vector<at::Tensor>& images, std::vector<PreprocOutput>& outputs) {
  const at::Device d = images[0].device();
  const c10::DeviceGuard guard(d);
  void* stream = current_stream(d);
  // Outputs of equal side share one resize; otherwise each runs on its own.
  std::vector<std::pair<PreprocOutput*, PreprocOutput*>> groups;
  if (outputs.size() == 2 && outputs[0].size == outputs[1].size)
    groups.push_back({&outputs[0], &outputs[1]});
  else
    for (auto& o : outputs) groups.push_back({&o, nullptr});
  for (auto& g : groups) {
    const int64_t S = g.first->size;
    const cuda::DType dt = dtype_of(g.first->dst.scalar_type());
    std::vector<float> lut(2 * 3 * 256);
    for (int k = 0; k < 2; ++k) {
      const PreprocOutput* o = (k == 1 && g.second != nullptr) ? g.second : g.first;
      for (int c = 0; c < 3; ++c) std::copy(o->lut[c].begin(), o->lut[c].end(), lut.begin() + (k * 3 + c) * 256);
    }
    const at::Tensor lut_d = upload(lut, d);
    std::map<std::pair<int64_t, int64_t>, std::tuple<CropPlan, DeviceAxis, DeviceAxis>> plans;  // per image size
    for (size_t b = 0; b < images.size(); ++b) {
      const at::Tensor& img = images[b];
      const auto key = std::make_pair(img.size(0), img.size(1));
      auto it = plans.find(key);
      if (it == plans.end()) {
        CropPlan p = make_crop_plan(key.first, key.second, S);
        DeviceAxis ax = upload(p.tx, d), ay = upload(p.ty, d);
        it = plans.emplace(key, std::make_tuple(std::move(p), std::move(ax), std::move(ay))).first;
      }
      const CropPlan& p = std::get<0>(it->second);
      const cuda::PilAxis tx = std::get<1>(it->second).view(), ty = std::get<2>(it->second).view();
      const int64_t offset = static_cast<int64_t>(b) * 3 * S * S * g.first->dst.element_size();
      void* out0 = static_cast<char*>(g.first->dst.mutable_data_ptr()) + offset;
      void* out1 = g.second ? static_cast<char*>(g.second->dst.mutable_data_ptr()) + offset : nullptr;
      const uint8_t* base = img.const_data_ptr<uint8_t>();
      const int64_t sy = img.stride(0), sx = img.stride(1), sc = img.stride(2);
      // Pillow's pass order, as in preprocess_cpu; only the crop's rows / columns are computed.
      if (!p.vertical_first) {
        at::Tensor tmp = at::empty({p.rows, S, 3}, img.options());
        check(cuda::pil_pass(false, base + p.row0 * sy, sy, sx, sc, p.rows, S, tx, 0, tmp.mutable_data_ptr<uint8_t>(),
                             dt, nullptr, nullptr, nullptr, stream),
              "joint_preprocess");
        check(cuda::pil_pass(true, tmp.const_data_ptr<uint8_t>(), S * 3, 3, 1, S, S, ty, p.row0, nullptr, dt, out0,
                             out1, lut_d.const_data_ptr<float>(), stream),
              "joint_preprocess");
      } else {
        at::Tensor tmp = at::empty({S, p.cols, 3}, img.options());
        check(cuda::pil_pass(true, base + p.col0 * sx, sy, sx, sc, S, p.cols, ty, 0, tmp.mutable_data_ptr<uint8_t>(),
                             dt, nullptr, nullptr, nullptr, stream),
              "joint_preprocess");
        check(cuda::pil_pass(false, tmp.const_data_ptr<uint8_t>(), p.cols * 3, 3, 1, S, S, tx, p.col0, nullptr, dt,
                             out0, out1, lut_d.const_data_ptr<float>(), stream),
              "joint_preprocess");
      }
    }
  }
}

}  // namespace comm_fast

#endif  // COMM_FAST_WITH_CUDA
