// CPU kernels XLA:CPU has no fast form of, as XLA FFI custom calls (see cpu_kernels.py).
//
// CaeDepthwiseKernelGrad: out[n, 3 * i + j, c] = sum over (h, w) of
// x[n, h + i - 1, w + j - 1, c] * grad[n, h, w, c], taps outside x counting zero: the
// per-example kernel gradient of a 3x3 'SAME' depthwise conv. XLA:CPU has no fused form of
// this: it takes one windowed copy and one reduction per tap, reading both arrays nine times.
// Here each example's image is walked once, row by row, with the nine partial sums of its
// channels in cache.
//
// CaeIm2col: out[n, i, j, (a * kw + b) * C + c] = x[n, sh * i + a - ph, sw * j + b - pw, c],
// zero outside x: the matrix whose product with a [kh * kw * C, F] kernel is a convolution.
// XLA:CPU builds it as one strided copy per tap and then a concatenation: 2-10x slower.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kPixels = 4;  // Pixels of a row summed per load and store of a partial sum.
constexpr int64_t kLanes = 16;  // Channels at a time, one or two vector registers.

struct Image {
  const float* x;     // [height, width, channels]
  const float* grad;  // same shape
  int64_t height, width, channels;
};

// Adds the products of the kCount pixels (h, w .. w + kCount - 1), channels [c, c + lanes),
// to their taps' partial sums out[(3 * i + j) * channels + c + k], for taps i in [i0, i1) and
// j in [j0, j1) (all nine where kAllTaps: unrolled).
template <int64_t kCount, bool kAllTaps>
inline void AddPixels(const Image& im, int64_t h, int64_t w, int64_t c, int64_t lanes, int i0,
                      int i1, int j0, int j1, float* __restrict out) {
  if constexpr (kAllTaps) i0 = 0, i1 = 3, j0 = 0, j1 = 3;
  const int64_t step = im.channels;
  const float* g = im.grad + (h * im.width + w) * step + c;
  for (int i = i0; i < i1; ++i) {
    for (int j = j0; j < j1; ++j) {
      const float* xt = im.x + ((h + i - 1) * im.width + w + j - 1) * step + c;
      float* __restrict a = out + (3 * i + j) * step + c;
      for (int64_t k = 0; k < lanes; ++k) {
        float sum = a[k];
        for (int64_t p = 0; p < kCount; ++p) sum += xt[p * step + k] * g[p * step + k];
        a[k] = sum;
      }
    }
  }
}

// The nine tap sums of one example into out [9, channels]; taps on the zero padding skipped.
void TapSums(const Image& im, float* __restrict out) {
  std::fill(out, out + 9 * im.channels, 0.0f);
  for (int64_t h = 0; h < im.height; ++h) {
    const int i0 = h == 0 ? 1 : 0, i1 = h == im.height - 1 ? 2 : 3;
    for (int64_t w = 0; w < im.width;) {
      const bool inside = w >= 1 && w + kPixels < im.width;  // All column taps of kPixels.
      const int j0 = w == 0 ? 1 : 0, j1 = w == im.width - 1 ? 2 : 3;
      for (int64_t c = 0; c < im.channels; c += kLanes) {
        const int64_t lanes = std::min(kLanes, im.channels - c);
        if (inside && i1 - i0 == 3 && lanes == kLanes) {
          AddPixels<kPixels, true>(im, h, w, c, kLanes, 0, 3, 0, 3, out);
        } else if (inside) {
          AddPixels<kPixels, false>(im, h, w, c, lanes, i0, i1, 0, 3, out);
        } else {
          AddPixels<1, false>(im, h, w, c, lanes, i0, i1, j0, j1, out);
        }
      }
      w += inside ? kPixels : 1;
    }
  }
}

// Runs fn(0..items-1) on the caller and XLA's intra-op threads. The caller takes items too
// and waits only for items already running elsewhere, so a busy pool cannot stall it.
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t items, const F& fn) {
  struct Counters {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto counters = std::make_shared<Counters>();
  auto work = [counters, items, &fn] {
    for (int64_t i; (i = counters->next.fetch_add(1)) < items;) {
      fn(i);
      counters->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), items) - 1;
  for (int64_t k = 0; k < helpers; ++k) {
    // A helper that starts after the caller is done finds no items left: it never calls fn.
    pool.Schedule([work] { work(); });
  }
  work();
  while (counters->done.load(std::memory_order_acquire) < items) std::this_thread::yield();
}

ffi::Error DepthwiseKernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> input,
                               ffi::Buffer<ffi::F32> grad, ffi::ResultBuffer<ffi::F32> out) {
  const auto g = grad.dimensions();
  const auto x = input.dimensions();
  const auto o = out->dimensions();
  if (g.size() != 4 || x.size() != 4 || o.size() != 3 ||
      !std::equal(g.begin(), g.end(), x.begin()) || o[0] != g[0] || o[1] != 9 || o[2] != g[3]) {
    return ffi::Error::InvalidArgument(
        "depthwise_kernel_grad takes input and grad [N, H, W, C] and returns [N, 9, C]");
  }
  const int64_t size = g[1] * g[2] * g[3];
  ParallelFor(pool, g[0], [&](int64_t n) {
    const Image im{input.typed_data() + n * size, grad.typed_data() + n * size, g[1], g[2], g[3]};
    TapSums(im, out->typed_data() + n * 9 * g[3]);
  });
  return ffi::Error::Success();
}

ffi::Error Im2col(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> input,
                  ffi::ResultBuffer<ffi::F32> out, int64_t kh, int64_t kw, int64_t sh,
                  int64_t sw, int64_t ph, int64_t pw) {
  const auto x = input.dimensions();
  const auto o = out->dimensions();
  if (x.size() != 4 || o.size() != 4 || o[0] != x[0] || o[3] != kh * kw * x[3]) {
    return ffi::Error::InvalidArgument(
        "im2col takes x [N, H, W, C] and returns [N, OH, OW, kh * kw * C]");
  }
  const int64_t height = x[1], width = x[2], channels = x[3], oh = o[1], ow = o[2];
  const int64_t row = kw * channels;  // One tap row of one output pixel.
  ParallelFor(pool, x[0] * oh, [&](int64_t item) {
    const int64_t n = item / oh, i = item % oh;
    const float* image = input.typed_data() + n * height * width * channels;
    float* __restrict dst = out->typed_data() + item * ow * kh * row;
    for (int64_t j = 0; j < ow; ++j) {
      const int64_t w0 = sw * j - pw;
      for (int64_t a = 0; a < kh; ++a, dst += row) {
        const int64_t h = sh * i + a - ph;
        if (h < 0 || h >= height) {
          std::fill(dst, dst + row, 0.0f);
        } else if (w0 >= 0 && w0 + kw <= width) {  // The kw taps of a row are contiguous.
          std::copy_n(image + (h * width + w0) * channels, row, dst);
        } else {
          for (int64_t b = 0; b < kw; ++b) {
            float* tap = dst + b * channels;
            if (w0 + b < 0 || w0 + b >= width) {
              std::fill(tap, tap + channels, 0.0f);
            } else {
              std::copy_n(image + (h * width + w0 + b) * channels, channels, tap);
            }
          }
        }
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CaeDepthwiseKernelGrad, DepthwiseKernelGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(CaeIm2col, Im2col,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("kh")
                                  .Attr<int64_t>("kw")
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw")
                                  .Attr<int64_t>("ph")
                                  .Attr<int64_t>("pw"));
