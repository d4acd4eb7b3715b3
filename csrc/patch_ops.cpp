// Entry points of comm_fast._C: argument checks (every one raises a Python error with a clear
// message), device dispatch and the Python bindings.
#include <torch/extension.h>

#include <ATen/MemoryOverlap.h>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "patch_ops.h"

namespace comm_fast {
namespace {

bool built_with_cuda() {
#ifdef COMM_FAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

void check_device(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() || t.device().is_cuda(), name, ": expected a CPU or CUDA tensor, got ",
              t.device());
  TORCH_CHECK(t.device().is_cpu() || built_with_cuda(), name,
              ": is a CUDA tensor but comm_fast._C was built without CUDA");
}

void check_float(const at::Tensor& t, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kHalf || s == at::kBFloat16 || s == at::kDouble, name,
              ": expected a float32, float16, bfloat16 or float64 tensor, got ", s);
}

void check_grid(int64_t h, int64_t w, const char* name) {
  TORCH_CHECK(h > 0 && w > 0, name, ": expected positive sizes, got (", h, ", ", w, ")");
  TORCH_CHECK(h < (int64_t(1) << 31) && w < (int64_t(1) << 31), name, ": sizes too large");
}

// A large fresh CPU output is first touched by our kernel: ask for transparent huge pages on it
// (the 2 MiB-aligned interior; contents unaffected). Where THP is in "madvise" mode this cuts
// first-touch page faults ~500x, e.g. joint_preprocess's two 43 MB outputs at B = 32.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (!t.device().is_cpu() || t.nbytes() < 2 * kHuge) return;
  const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t begin = (p + kHuge - 1) & ~(kHuge - 1), end = (p + t.nbytes()) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);  // advisory only
#endif
}

int64_t device_key(const at::Device& d) { return static_cast<int64_t>(d.type()); }

}  // namespace

std::shared_ptr<Tables> crop_tables_for(int64_t h, int64_t w, int64_t S, const at::Device& device) {
  return cached_tables({Tables::kCrop, device_key(device), device.index(), h, w, S},
                       [&] { return crop_tables(h, w, S); });
}

namespace {

void run_resample(const at::Tensor& in, const at::Tensor& out, int64_t sw, int64_t dh, int64_t dw, Tables& t) {
  if (in.numel() == 0 || out.numel() == 0) return;
  if (in.is_cuda()) {
#ifdef COMM_FAST_WITH_CUDA
    resample_cuda(in, out, sw, dh, dw, t);
#endif
  } else {
    resample_cpu(in, out, sw, dh, dw, t);
  }
}

}  // namespace

// tokens [B, sh*sw, C] -> [B, dh*dw, C], written into `out` (any [B, dh*dw, C] view with a unit
// channel stride, e.g. a channel slice of a wider buffer) when given. scale_h/scale_w > 0 make
// the scale factor, not the sizes, drive the coordinate mapping (F.interpolate(scale_factor=)).
at::Tensor resample_tokens(const at::Tensor& tokens, int64_t sh, int64_t sw, int64_t dh, int64_t dw,
                           const std::string& mode_name, c10::optional<at::Tensor> out_opt,
                           double scale_h, double scale_w) {
  const Mode mode = parse_mode(mode_name);
  check_grid(sh, sw, "src_hw");
  check_grid(dh, dw, "dst_hw");
  TORCH_CHECK(tokens.dim() == 3, "tokens: expected [B, H*W, C], got shape ", tokens.sizes());
  check_float(tokens, "tokens");
  check_device(tokens, "tokens");
  TORCH_CHECK(tokens.size(1) == sh * sw, "tokens: ", tokens.size(1), " tokens do not form the stated ", sh, "x",
              sw, " grid");
  TORCH_CHECK(tokens.stride(2) == 1 || tokens.size(2) <= 1, "tokens: the channel dimension must be contiguous (stride 1), got strides ",
              tokens.strides());
  TORCH_CHECK((scale_h > 0) == (scale_w > 0), "scale factors: give both or neither");
  TORCH_CHECK(scale_h <= 0 || mode == Mode::Bilinear || mode == Mode::Bicubic,
              "scale factors: only bilinear and bicubic modes take them");
  const int64_t B = tokens.size(0), C = tokens.size(2);
  at::Tensor out;
  if (out_opt.has_value()) {
    out = *out_opt;
    TORCH_CHECK(out.dim() == 3 && out.size(0) == B && out.size(1) == dh * dw && out.size(2) == C,
                "out: expected shape [", B, ", ", dh * dw, ", ", C, "], got ", out.sizes());
    TORCH_CHECK(out.scalar_type() == tokens.scalar_type(), "out: expected dtype ", tokens.scalar_type(), ", got ",
                out.scalar_type());
    TORCH_CHECK(out.device() == tokens.device(), "out: expected device ", tokens.device(), ", got ", out.device());
    TORCH_CHECK(out.stride(2) == 1 || C <= 1, "out: the channel dimension must be contiguous (stride 1), got strides ",
                out.strides());
    TORCH_CHECK(at::has_internal_overlap(out) != at::MemOverlap::Yes,
                "out: its elements overlap in memory (expanded or broadcast view)");
    at::assert_no_overlap(out, tokens);
  } else {
    out = at::empty({B, dh * dw, C}, tokens.options());
  }
  const at::Device d = tokens.device();
  const std::shared_ptr<Tables> t = cached_tables(
      {Tables::kResample, device_key(d), d.index(), static_cast<int64_t>(mode), sh, dh, bits_of(scale_h), sw, dw,
       bits_of(scale_w)},
      [&] { return resample_tables(mode, sh, dh, scale_h, sw, dw, scale_w); });
  run_resample(tokens, out, sw, dh, dw, *t);
  return out;
}

// pos [P + sh*sw, D] or [1, P + sh*sw, D] -> same layout on the dst grid, prefix tokens copied,
// fp32 math, result in pos.dtype. Modes: hf, dinov2_offset, antialias.
at::Tensor interpolate_pos_embed(const at::Tensor& pos, int64_t sh, int64_t sw, int64_t dh, int64_t dw,
                                 const std::string& mode, int64_t num_prefix) {
  check_grid(sh, sw, "src_hw");
  check_grid(dh, dw, "dst_hw");
  TORCH_CHECK(pos.dim() == 2 || (pos.dim() == 3 && pos.size(0) == 1),
              "pos: expected [P + H*W, D] or [1, P + H*W, D], got shape ", pos.sizes());
  check_float(pos, "pos");
  check_device(pos, "pos");
  TORCH_CHECK(num_prefix >= 0, "num_prefix_tokens: expected >= 0, got ", num_prefix);
  const at::Tensor p = (pos.dim() == 2 ? pos.unsqueeze(0) : pos).contiguous();
  TORCH_CHECK(p.size(1) == num_prefix + sh * sw, "pos: expected ", num_prefix, " prefix tokens + ", sh, "x", sw,
              " grid = ", num_prefix + sh * sw, " positions, got ", p.size(1));
  std::string rmode = "bicubic";
  double fh = 0.0, fw = 0.0;
  if (mode == "dinov2_offset") {
    fh = (static_cast<double>(dh) + 0.1) / static_cast<double>(sh);
    fw = (static_cast<double>(dw) + 0.1) / static_cast<double>(sw);
    TORCH_CHECK(static_cast<int64_t>(std::floor(sh * fh)) == dh && static_cast<int64_t>(std::floor(sw * fw)) == dw,
                "dst_hw: the dinov2_offset scale factor does not give ", dh, "x", dw);
  } else if (mode == "antialias") {
    rmode = "bicubic_aa";
  } else {
    TORCH_CHECK(mode == "hf", "mode: expected hf, dinov2_offset or antialias, got '", mode, "'");
  }
  const int64_t D = p.size(2);
  at::Tensor out = at::empty({1, num_prefix + dh * dw, D}, p.options());
  out.narrow(1, 0, num_prefix).copy_(p.narrow(1, 0, num_prefix));
  resample_tokens(p.narrow(1, num_prefix, sh * sw), sh, sw, dh, dw, rmode, out.narrow(1, num_prefix, dh * dw), fh,
                  fw);
  return pos.dim() == 2 ? out.squeeze(0) : out;
}

// LLaVA-1.5's expand2square: the image centred on a square of its longer side filled with `fill`.
at::Tensor pad_to_square(const at::Tensor& img, const std::vector<int64_t>& fill) {
  const int64_t h = img.size(0), w = img.size(1), m = std::max(h, w);
  if (h == w) return img;
  at::Tensor out = at::empty({m, m, 3}, img.options());
  for (int c = 0; c < 3; ++c) out.select(2, c).fill_(fill[c]);
  out.narrow(0, (m - h) / 2, h).narrow(1, (m - w) / 2, w).copy_(img);
  return out;
}

// images: uint8 [H, W, 3] views (any strides, one device). Returns (clip, dino) [B, 3, S, S].
// clip_fill / dino_fill: empty (resize + center crop) or each encoder's pad colour (3 values in
// 0..255): pad to a square first, per encoder.
std::tuple<at::Tensor, at::Tensor> joint_preprocess(const std::vector<at::Tensor>& images, int64_t clip_size,
                                                    int64_t dino_size, at::ScalarType dtype,
                                                    const std::vector<double>& clip_mean,
                                                    const std::vector<double>& clip_std,
                                                    const std::vector<double>& dino_mean,
                                                    const std::vector<double>& dino_std,
                                                    const std::vector<int64_t>& clip_fill,
                                                    const std::vector<int64_t>& dino_fill) {
  TORCH_CHECK(!images.empty(), "images: expected at least one image");
  TORCH_CHECK(clip_size > 0 && dino_size > 0, "clip_size, dino_size: expected positive sizes, got ", clip_size, ", ",
              dino_size);
  TORCH_CHECK(clip_size <= 16384 && dino_size <= 16384, "clip_size, dino_size: at most 16384");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble,
              "dtype: expected a floating dtype, got ", dtype);
  for (const auto* v : {&clip_mean, &clip_std, &dino_mean, &dino_std})
    TORCH_CHECK(v->size() == 3, "mean/std: expected 3 values per encoder");
  for (double s : clip_std) TORCH_CHECK(s != 0.0, "clip std: must be non-zero");
  for (double s : dino_std) TORCH_CHECK(s != 0.0, "dino std: must be non-zero");
  TORCH_CHECK(clip_fill.empty() == dino_fill.empty(), "clip_fill, dino_fill: give both pad colours or neither");
  for (const auto* f : {&clip_fill, &dino_fill}) {
    TORCH_CHECK(f->empty() || f->size() == 3, "fill: expected 3 values (a pad colour) or none, got ", f->size());
    for (int64_t v : *f) TORCH_CHECK(v >= 0 && v <= 255, "fill: expected values in 0..255, got ", v);
  }
  const auto device = images[0].device();
  for (size_t i = 0; i < images.size(); ++i) {
    const auto& im = images[i];
    TORCH_CHECK(im.dim() == 3 && im.size(2) == 3, "images[", i, "]: expected an [H, W, 3] view, got shape ",
                im.sizes());
    TORCH_CHECK(im.scalar_type() == at::kByte, "images[", i, "]: expected uint8, got ", im.scalar_type());
    TORCH_CHECK(im.size(0) > 0 && im.size(1) > 0, "images[", i, "]: empty image of shape ", im.sizes());
    TORCH_CHECK(im.size(0) < (int64_t(1) << 20) && im.size(1) < (int64_t(1) << 20), "images[", i, "]: too large");
    TORCH_CHECK(im.device() == device, "images[", i, "]: on ", im.device(), ", images[0] on ", device);
    TORCH_CHECK(im.stride(0) >= 0 && im.stride(1) >= 0 && im.stride(2) >= 0, "images[", i,
                "]: negative strides are not supported");
    check_device(im, "images");
  }
  const int64_t B = static_cast<int64_t>(images.size());
  PreprocJob job;
  job.size[0] = clip_size;
  job.size[1] = dino_size;
  for (int o = 0; o < 2; ++o) {
    job.dst[o] = at::empty({B, 3, job.size[o], job.size[o]}, at::TensorOptions().dtype(dtype).device(device));
    advise_huge_pages(job.dst[o]);
  }
  std::array<double, 12> mean_std;
  for (int c = 0; c < 3; ++c) {
    mean_std[c] = clip_mean[c];
    mean_std[3 + c] = clip_std[c];
    mean_std[6 + c] = dino_mean[c];
    mean_std[9 + c] = dino_std[c];
  }
  TableKey key{Tables::kLut, device_key(device), device.index()};
  for (int i = 0; i < 12; ++i) key[3 + i] = bits_of(mean_std[i]);
  job.lut = cached_tables(key, [&] { return lut_tables(mean_std); });
  const auto run = [&](const std::vector<at::Tensor>& imgs) {
    if (device.is_cuda()) {
#ifdef COMM_FAST_WITH_CUDA
      preprocess_cuda(imgs, job);
#endif
    } else {
      preprocess_cpu(imgs, job);
    }
  };
  if (clip_fill.empty()) {
    run(images);
  } else {
    // The two encoders' pad colours differ, so each output gets its own padded images and resize.
    const std::vector<int64_t>* fills[2] = {&clip_fill, &dino_fill};
    for (int o = 0; o < 2; ++o) {
      std::vector<at::Tensor> padded;
      padded.reserve(images.size());
      for (const auto& im : images) padded.push_back(pad_to_square(im, *fills[o]));
      job.only = o;
      run(padded);
    }
  }
  return {job.dst[0], job.dst[1]};
}

}  // namespace comm_fast

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "comm_fast csrc extension: joint CLIP/DINOv2 patch interpolation and preprocessing";
  m.def("with_cuda", &comm_fast::built_with_cuda, "whether the CUDA kernels were compiled in");
  m.def("resample_tokens", &comm_fast::resample_tokens, "resample a [B, H*W, C] token grid", py::arg("tokens"),
        py::arg("src_h"), py::arg("src_w"), py::arg("dst_h"), py::arg("dst_w"), py::arg("mode"),
        py::arg("out") = py::none(), py::arg("scale_h") = 0.0, py::arg("scale_w") = 0.0);
  m.def("interpolate_pos_embed", &comm_fast::interpolate_pos_embed, "bicubic position-embedding interpolation",
        py::arg("pos"), py::arg("src_h"), py::arg("src_w"), py::arg("dst_h"), py::arg("dst_w"), py::arg("mode"),
        py::arg("num_prefix_tokens"));
  m.def("joint_preprocess", &comm_fast::joint_preprocess, "uint8 images -> (clip, dino) normalised pixels",
        py::arg("images"), py::arg("clip_size"), py::arg("dino_size"), py::arg("dtype"), py::arg("clip_mean"),
        py::arg("clip_std"), py::arg("dino_mean"), py::arg("dino_std"), py::arg("clip_fill") = std::vector<int64_t>{},
        py::arg("dino_fill") = std::vector<int64_t>{});
  m.def(
      "table_cache_stats",
      [] {
        const auto s = comm_fast::table_cache_stats();
        py::dict d;
        d["builds"] = s.builds;
        d["hits"] = s.hits;
        d["entries"] = s.entries;
        return d;
      },
      "the table cache's counters: builds (misses), hits, entries held");
  m.def("table_cache_clear", &comm_fast::table_cache_clear, "drop every cached table and reset the counters");
}
