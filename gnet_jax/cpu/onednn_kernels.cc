// XLA FFI handlers for GoogLeNet's float32 convolutions, max pools and BatchNorms on CPU:
// - the forward, the input gradient and the kernel gradient of an NHWC x HWIO -> NHWC
//   convolution without dilation or groups, and an inference forward that adds a bias
//   and applies ReLU as it writes its output;
// - the forward (with or without the workspace its gradient needs) and the gradient of
//   an NHWC max pool;
// - BatchNorm + ReLU in training, forward and gradient, written out in C++;
// - Winograd F(2x2, 3x3) for the 3x3 convolutions it is faster on (namespace winograd).
// gnet_jax/cpu/build.py builds this file and registers the handlers.
//
// Why: XLA CPU's own (Eigen) kernel gradients are slower than oneDNN's on the same
// shapes, its max pools and their gradients are slow, in inference the BatchNorm and ReLU
// after each convolution are one more pass over memory, and in training XLA compiles each
// BatchNorm into many kernels (BENCHMARKS.md, "CPU choices").
//
// Threads: each call cuts its batch into one chunk per thread of XLA's intra-op pool and
// runs oneDNN single-threaded on each chunk, on the calling thread and on the pool.
// oneDNN's own OpenMP team would instead compete for the cores with the XLA ops that run
// beside the call.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

extern "C" void omp_set_num_threads(int);  // libgomp, which libdnnl links

namespace ffi = xla::ffi;
using dnnl::memory;
using Tag = dnnl::memory::format_tag;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// One chunk's convolution: batch n, input h x w x c, kernel kh x kw x c x o, output
// oh x ow x o, strides (sh, sw), padding (top, bottom, left, right).
struct Geometry {
  int64_t n, h, w, c, kh, kw, o, oh, ow, sh, sw, pt, pb, pl, pr;

  auto Key() const { return std::make_tuple(n, h, w, c, kh, kw, o, sh, sw, pt, pb, pl, pr); }
  memory::desc Src() const { return {{n, c, h, w}, memory::data_type::f32, Tag::nhwc}; }
  memory::desc Dst() const { return {{n, o, oh, ow}, memory::data_type::f32, Tag::nhwc}; }
  memory::desc Weights(Tag tag = Tag::hwio) const {
    return {{o, c, kh, kw}, memory::data_type::f32, tag};
  }
  memory::desc Bias() const { return {{o}, memory::data_type::f32, Tag::a}; }
};

// The primitives of one geometry g, built by build(g) on first use and kept: building
// them costs more than running them on small inputs.
template <typename T, typename G>
std::shared_ptr<T> Cached(const G& g, std::shared_ptr<T> (*build)(const G&)) {
  static std::mutex mutex;
  static std::map<decltype(g.Key()), std::shared_ptr<T>> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto& cached = cache[g.Key()];
  if (!cached) cached = build(g);
  return cached;
}

// Every execution brings its own scratchpad: with the library's, two chunks of the same
// primitive running at once would share one.
dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

// A convolution's primitives, each with the reorder of HWIO weights it needs.
struct Conv {
  // Inference: the convolution, then + bias and ReLU as post-ops (a BatchNorm with fixed
  // statistics folded into the kernel and bias).
  dnnl::convolution_forward::primitive_desc bias_relu_pd;
  dnnl::convolution_forward bias_relu;
  dnnl::reorder weights_to_bias_relu;
  dnnl::convolution_forward::primitive_desc fwd_pd;
  dnnl::convolution_forward fwd;
  dnnl::reorder weights_to_fwd;
  dnnl::convolution_backward_data::primitive_desc bwd_data_pd;
  dnnl::convolution_backward_data bwd_data;
  dnnl::reorder weights_to_bwd_data;
  dnnl::convolution_backward_weights::primitive_desc bwd_weights_pd;
  dnnl::convolution_backward_weights bwd_weights;
  dnnl::reorder diff_weights_to_hwio;
};

std::shared_ptr<Conv> BuildConv(const Geometry& g) {
  auto& eng = Engine();
  memory::dims strides{g.sh, g.sw}, pad_l{g.pt, g.pl}, pad_r{g.pb, g.pr};
  auto algo = dnnl::algorithm::convolution_direct;
  dnnl::primitive_attr attr = UserScratchpad();
  auto p = std::make_shared<Conv>();
  // Weights in whatever layout oneDNN prefers (Tag::any); activations stay NHWC.
  dnnl::post_ops relu;
  relu.append_eltwise(dnnl::algorithm::eltwise_relu, 0.f, 0.f);
  dnnl::primitive_attr relu_attr = UserScratchpad();  // not attr: copies share one object
  relu_attr.set_post_ops(relu);
  p->bias_relu_pd = dnnl::convolution_forward::primitive_desc(
      eng, dnnl::prop_kind::forward_inference, algo, g.Src(), g.Weights(Tag::any), g.Bias(),
      g.Dst(), strides, pad_l, pad_r, relu_attr);
  p->bias_relu = dnnl::convolution_forward(p->bias_relu_pd);
  p->weights_to_bias_relu = dnnl::reorder(dnnl::reorder::primitive_desc(
      eng, g.Weights(), eng, p->bias_relu_pd.weights_desc(), attr));
  p->fwd_pd = dnnl::convolution_forward::primitive_desc(
      eng, dnnl::prop_kind::forward_training, algo, g.Src(), g.Weights(Tag::any), g.Dst(),
      strides, pad_l, pad_r, attr);
  p->fwd = dnnl::convolution_forward(p->fwd_pd);
  p->weights_to_fwd = dnnl::reorder(dnnl::reorder::primitive_desc(
      eng, g.Weights(), eng, p->fwd_pd.weights_desc(), attr));
  p->bwd_data_pd = dnnl::convolution_backward_data::primitive_desc(
      eng, algo, g.Src(), g.Weights(Tag::any), g.Dst(), strides, pad_l, pad_r, p->fwd_pd,
      attr);
  p->bwd_data = dnnl::convolution_backward_data(p->bwd_data_pd);
  p->weights_to_bwd_data = dnnl::reorder(dnnl::reorder::primitive_desc(
      eng, g.Weights(), eng, p->bwd_data_pd.weights_desc(), attr));
  p->bwd_weights_pd = dnnl::convolution_backward_weights::primitive_desc(
      eng, algo, g.Src(), g.Weights(Tag::any), g.Dst(), strides, pad_l, pad_r, p->fwd_pd,
      attr);
  p->bwd_weights = dnnl::convolution_backward_weights(p->bwd_weights_pd);
  p->diff_weights_to_hwio = dnnl::reorder(dnnl::reorder::primitive_desc(
      eng, p->bwd_weights_pd.diff_weights_desc(), eng, g.Weights(), attr));
  return p;
}

void Execute(const dnnl::primitive& prim, std::unordered_map<int, memory> args,
             int omp_threads) {
  omp_set_num_threads(omp_threads);
  dnnl_memory_desc_t scratchpad;
  dnnl_memory_desc_clone(&scratchpad, dnnl_primitive_desc_query_md(
      prim.get_primitive_desc(), dnnl_query_scratchpad_md, 0));
  args.emplace(DNNL_ARG_SCRATCHPAD, memory(memory::desc(scratchpad), Engine()));
  dnnl::stream stream(Engine());
  prim.execute(stream, args);
  stream.wait();
}

// Runs chunk(i) for every i < n, on the calling thread and on XLA's pool. The caller
// claims chunks too and waits only for chunks already started, so a pool whose threads
// are all busy (or waiting in another such call) cannot deadlock it: a helper that
// starts late finds nothing left to do.
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int n, F chunk) {
  struct State {
    std::atomic<int> next{0};
    int done = 0;
    std::exception_ptr error;
    std::mutex mutex;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  auto work = [state, n, chunk]() {
    for (int i; (i = state->next.fetch_add(1)) < n;) {
      std::exception_ptr error;
      try {
        chunk(i);
      } catch (...) {
        error = std::current_exception();
      }
      std::lock_guard<std::mutex> lock(state->mutex);
      if (error && !state->error) state->error = error;
      if (++state->done == n) state->cv.notify_all();
    }
  };
  for (int i = 1; i < n; ++i) pool.Schedule(decltype(work)(work));
  work();
  std::unique_lock<std::mutex> lock(state->mutex);
  state->cv.wait(lock, [&] { return state->done == n; });
  if (state->error) std::rethrow_exception(state->error);
}

using F32 = ffi::Buffer<ffi::F32>;
using Ints = ffi::Span<const int64_t>;

// A call's batch is cut into `chunks` equal parts, one per thread of XLA's pool (as many
// as divide the batch), each run with `omp_threads` oneDNN threads.
struct Cut {
  int chunks, omp_threads;

  static Cut Make(ffi::ThreadPool& pool, int64_t batch) {
    int threads = static_cast<int>(std::max<int64_t>(1, pool.num_threads()));
    int chunks = threads;
    while (chunks > 1 && batch % chunks != 0) --chunks;
    // A batch that cannot be cut (one image) gets oneDNN's threads instead.
    return {chunks, chunks > 1 ? 1 : threads};
  }
};

// Chunk i of an array whose chunks are all laid out as `chunk`.
memory At(const memory::desc& chunk, void* data, int i) {
  return memory(chunk, Engine(), static_cast<char*>(data) + i * chunk.get_size());
}

// Winograd F(2x2, 3x3): a 3x3 convolution at stride 1, padding 1, computed on 4x4 input
// tiles that each give a 2x2 output tile, as 16 matrix products of (tiles x in) by
// (in x out) channels: 16 multiplications per tile and channel pair where the direct
// convolution does 36. oneDNN 3.2 has no float32 Winograd on x86-64; this one beats its
// direct convolution on GoogLeNet's 3x3 layers, with errors no larger than the direct
// convolution's (BENCHMARKS.md, "CPU choices"). Transforms from Lavin & Gray (2015).
namespace winograd {

// Tiles per block: a block's transformed input and products (~1-2 MB) stay in L2.
constexpr int64_t kTileBlock = 64;

// Where it beats the direct convolution on GoogLeNet's layers: from 64 input channels up;
// not with fewer input channels, nor on odd sizes (7x7), where 15 of the 64 outputs
// computed per channel are thrown away. GNET_JAX_WINOGRAD=0 (read on every call) keeps
// the covered ones on the direct convolution too.
bool Covers(const Geometry& g, int64_t in_channels, int64_t out_channels) {
  const char* setting = std::getenv("GNET_JAX_WINOGRAD");
  if (setting && std::string(setting) == "0") return false;
  return g.kh == 3 && g.kw == 3 && g.sh == 1 && g.sw == 1 && g.pt == 1 && g.pb == 1 &&
         g.pl == 1 && g.pr == 1 && g.oh == g.h && g.ow == g.w && g.h % 2 == 0 &&
         g.w % 2 == 0 && in_channels >= 64 && out_channels >= 64;
}

// The transforms' loops, compiled for each of these and picked for the CPU at load time.
#define GNET_VECTORISED __attribute__((target_clones("avx512f", "avx2", "default")))

// u[16][c][o] = G k G^T for each channel pair of the HWIO kernel k (3 x 3 x c x o).
GNET_VECTORISED std::vector<float> TransformKernel(const float* k, int64_t c, int64_t o) {
  std::vector<float> u(16 * c * o);
  const int64_t e = c * o;  // stride between the 16 transformed elements
  for (int64_t ci = 0; ci < c; ++ci) {
    const float* r[3][3];
    for (int i = 0; i < 3; ++i)
      for (int j = 0; j < 3; ++j) r[i][j] = k + ((i * 3 + j) * c + ci) * o;
    float* __restrict out = u.data() + ci * o;
#pragma omp simd
    for (int64_t oi = 0; oi < o; ++oi) {
      float t[4][3];
      for (int j = 0; j < 3; ++j) {
        float k0 = r[0][j][oi], k1 = r[1][j][oi], k2 = r[2][j][oi];
        t[0][j] = k0;
        t[1][j] = 0.5f * (k0 + k1 + k2);
        t[2][j] = 0.5f * (k0 - k1 + k2);
        t[3][j] = k2;
      }
      for (int i = 0; i < 4; ++i) {
        out[(4 * i + 0) * e + oi] = t[i][0];
        out[(4 * i + 1) * e + oi] = 0.5f * (t[i][0] + t[i][1] + t[i][2]);
        out[(4 * i + 2) * e + oi] = 0.5f * (t[i][0] - t[i][1] + t[i][2]);
        out[(4 * i + 3) * e + oi] = t[i][2];
      }
    }
  }
  return u;
}

// The kernel whose convolution with dy gives dx: rotated 180 degrees, in and out swapped.
std::vector<float> InputGradientKernel(const float* k, int64_t c, int64_t o) {
  std::vector<float> flipped(9 * o * c);
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j)
      for (int64_t ci = 0; ci < c; ++ci)
        for (int64_t oi = 0; oi < o; ++oi)
          flipped[((i * 3 + j) * o + oi) * c + ci] =
              k[(((2 - i) * 3 + (2 - j)) * c + ci) * o + oi];
  return flipped;
}

// This thread's transformed input, products, padding and the outputs past an odd edge.
thread_local std::vector<float> v, m, zeros, discard;

// y = conv(x, kernel) (+ bias, ReLU) for NHWC x (n x h x w x c) and y (n x h x w x o),
// u the kernel's transform; single-threaded, in this thread's scratch.
GNET_VECTORISED void Convolve(const float* x, int64_t n, int64_t h, int64_t w, int64_t c,
                              const float* u, int64_t o, const float* bias, bool relu,
                              float* y) {
  v.resize(16 * kTileBlock * c);
  m.resize(16 * kTileBlock * o);
  zeros.assign(c, 0.f);
  discard.resize(o);
  const int64_t th = (h + 1) / 2, tw = (w + 1) / 2, tiles = n * th * tw;
  const int64_t ve = kTileBlock * c, me = kTileBlock * o;
  for (int64_t t0 = 0; t0 < tiles; t0 += kTileBlock) {
    const int64_t block = std::min(kTileBlock, tiles - t0);
    for (int64_t t = 0; t < block; ++t) {  // v = B^T d B
      int64_t img = (t0 + t) / (th * tw), r = (t0 + t) % (th * tw);
      int64_t top = 2 * (r / tw) - 1, left = 2 * (r % tw) - 1;
      const float* d[4][4];
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) {
          int64_t row = top + i, col = left + j;
          d[i][j] = row >= 0 && row < h && col >= 0 && col < w
                        ? x + ((img * h + row) * w + col) * c : zeros.data();
        }
      float* __restrict out = v.data() + t * c;
#pragma omp simd
      for (int64_t ci = 0; ci < c; ++ci) {
        float s[4][4];
        for (int j = 0; j < 4; ++j) {
          float d0 = d[0][j][ci], d1 = d[1][j][ci], d2 = d[2][j][ci], d3 = d[3][j][ci];
          s[0][j] = d0 - d2;
          s[1][j] = d1 + d2;
          s[2][j] = d2 - d1;
          s[3][j] = d1 - d3;
        }
        for (int i = 0; i < 4; ++i) {
          out[(4 * i + 0) * ve + ci] = s[i][0] - s[i][2];
          out[(4 * i + 1) * ve + ci] = s[i][1] + s[i][2];
          out[(4 * i + 2) * ve + ci] = s[i][2] - s[i][1];
          out[(4 * i + 3) * ve + ci] = s[i][1] - s[i][3];
        }
      }
    }
    for (int e = 0; e < 16; ++e)  // m[e] = v[e] u[e]: (block x c) by (c x o), row-major
      dnnl::sgemm('N', 'N', block, o, c, 1.f, v.data() + e * ve, c, u + e * c * o, o, 0.f,
                  m.data() + e * me, o);
    for (int64_t t = 0; t < block; ++t) {  // y = A^T m A (+ bias, ReLU)
      int64_t img = (t0 + t) / (th * tw), r = (t0 + t) % (th * tw);
      int64_t row = 2 * (r / tw), col = 2 * (r % tw);
      float* y00 = y + ((img * h + row) * w + col) * o;
      float* y01 = col + 1 < w ? y00 + o : discard.data();
      float* y10 = row + 1 < h ? y00 + w * o : discard.data();
      float* y11 = row + 1 < h && col + 1 < w ? y00 + (w + 1) * o : discard.data();
      const float* __restrict q = m.data() + t * o;
#pragma omp simd
      for (int64_t oi = 0; oi < o; ++oi) {
        float s[2][4];
        for (int j = 0; j < 4; ++j) {
          float m0 = q[j * me + oi], m1 = q[(4 + j) * me + oi], m2 = q[(8 + j) * me + oi],
                m3 = q[(12 + j) * me + oi];
          s[0][j] = m0 + m1 + m2;
          s[1][j] = m1 - m2 - m3;
        }
        float b = bias ? bias[oi] : 0.f;
        float a00 = s[0][0] + s[0][1] + s[0][2] + b, a01 = s[0][1] - s[0][2] - s[0][3] + b;
        float a10 = s[1][0] + s[1][1] + s[1][2] + b, a11 = s[1][1] - s[1][2] - s[1][3] + b;
        if (relu) {
          a00 = std::max(a00, 0.f);
          a01 = std::max(a01, 0.f);
          a10 = std::max(a10, 0.f);
          a11 = std::max(a11, 0.f);
        }
        y00[oi] = a00;
        y01[oi] = a01;
        y10[oi] = a10;
        y11[oi] = a11;
      }
    }
  }
}

}  // namespace winograd

struct Plan {
  Geometry g;  // of one chunk
  Cut cut;
  std::shared_ptr<Conv> conv;

  static Plan Make(ffi::ThreadPool& pool, Ints x, Ints w, Ints y, Ints strides,
                   Ints padding) {
    Cut cut = Cut::Make(pool, x[0]);
    Geometry g{x[0] / cut.chunks, x[1], x[2], x[3], w[0], w[1], w[3], y[1], y[2],
               strides[0], strides[1], padding[0], padding[1], padding[2], padding[3]};
    return {g, cut, Cached(g, BuildConv)};
  }

  // Winograd (single-threaded) runs a chunk per thread, so only where the batch is cut.
  bool Winograd(int64_t in_channels, int64_t out_channels) const {
    return cut.omp_threads == 1 && winograd::Covers(g, in_channels, out_channels);
  }

  memory Src(float* data, int i) const { return At(g.Src(), data, i); }
  memory Dst(float* data, int i) const { return At(g.Dst(), data, i); }
  memory Reordered(const dnnl::reorder& reorder, const memory::desc& to, float* hwio) const {
    memory from(g.Weights(), Engine(), hwio);
    if (to == from.get_desc()) return from;
    memory out(to, Engine());
    Execute(reorder, {{DNNL_ARG_FROM, from}, {DNNL_ARG_TO, out}}, cut.omp_threads);
    return out;
  }
};

template <typename F>
ffi::Error Guarded(F body) {
  try {
    body();
    return ffi::Error::Success();
  } catch (const std::exception& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN: ") + e.what());
  }
}

// conv(in, kernel) (+ bias, ReLU) chunk by chunk with winograd::Convolve, `u` the
// kernel's transform; `in` has ci channels and `out` co, both plan.g's height and width.
void WinogradChunks(ffi::ThreadPool& pool, const Plan& plan, const float* in, int64_t ci,
                    const std::vector<float>& u, int64_t co, const float* bias, bool relu,
                    float* out) {
  const Geometry& g = plan.g;
  const int64_t pixels = g.n * g.h * g.w;
  ParallelFor(pool, plan.cut.chunks, [&](int i) {
    omp_set_num_threads(1);  // dnnl::sgemm's
    winograd::Convolve(in + i * pixels * ci, g.n, g.h, g.w, ci, u.data(), co, bias, relu,
                       out + i * pixels * co);
  });
}

ffi::Error Forward(ffi::ThreadPool pool, F32 x, F32 w, ffi::ResultBuffer<ffi::F32> y,
                   Ints strides, Ints padding) {
  return Guarded([&] {
    Plan plan = Plan::Make(pool, x.dimensions(), w.dimensions(), y->dimensions(), strides,
                           padding);
    const Geometry& g = plan.g;
    float *xs = x.typed_data(), *ys = y->typed_data();
    if (plan.Winograd(g.c, g.o)) {
      WinogradChunks(pool, plan, xs, g.c, winograd::TransformKernel(w.typed_data(), g.c, g.o),
                     g.o, nullptr, false, ys);
      return;
    }
    const Conv& c = *plan.conv;
    memory weights = plan.Reordered(c.weights_to_fwd, c.fwd_pd.weights_desc(), w.typed_data());
    ParallelFor(pool, plan.cut.chunks, [&, xs, ys](int i) {
      Execute(c.fwd, {{DNNL_ARG_SRC, plan.Src(xs, i)}, {DNNL_ARG_WEIGHTS, weights},
                      {DNNL_ARG_DST, plan.Dst(ys, i)}}, plan.cut.omp_threads);
    });
  });
}

ffi::Error ForwardBiasRelu(ffi::ThreadPool pool, F32 x, F32 w, F32 b,
                           ffi::ResultBuffer<ffi::F32> y, Ints strides, Ints padding) {
  return Guarded([&] {
    Plan plan = Plan::Make(pool, x.dimensions(), w.dimensions(), y->dimensions(), strides,
                           padding);
    const Geometry& g = plan.g;
    float *xs = x.typed_data(), *ys = y->typed_data();
    if (plan.Winograd(g.c, g.o)) {
      WinogradChunks(pool, plan, xs, g.c, winograd::TransformKernel(w.typed_data(), g.c, g.o),
                     g.o, b.typed_data(), true, ys);
      return;
    }
    const Conv& c = *plan.conv;
    memory weights = plan.Reordered(c.weights_to_bias_relu, c.bias_relu_pd.weights_desc(),
                                    w.typed_data());
    memory bias(g.Bias(), Engine(), b.typed_data());
    ParallelFor(pool, plan.cut.chunks, [&, xs, ys](int i) {
      Execute(c.bias_relu, {{DNNL_ARG_SRC, plan.Src(xs, i)}, {DNNL_ARG_WEIGHTS, weights},
                            {DNNL_ARG_BIAS, bias}, {DNNL_ARG_DST, plan.Dst(ys, i)}},
              plan.cut.omp_threads);
    });
  });
}

ffi::Error BackwardData(ffi::ThreadPool pool, F32 dy, F32 w, ffi::ResultBuffer<ffi::F32> dx,
                        Ints strides, Ints padding) {
  return Guarded([&] {
    Plan plan = Plan::Make(pool, dx->dimensions(), w.dimensions(), dy.dimensions(), strides,
                           padding);
    const Geometry& g = plan.g;
    float *dys = dy.typed_data(), *dxs = dx->typed_data();
    if (plan.Winograd(g.o, g.c)) {  // dx = conv(dy, the kernel rotated, in and out swapped)
      std::vector<float> k = winograd::InputGradientKernel(w.typed_data(), g.c, g.o);
      WinogradChunks(pool, plan, dys, g.o, winograd::TransformKernel(k.data(), g.o, g.c), g.c,
                     nullptr, false, dxs);
      return;
    }
    const Conv& c = *plan.conv;
    memory weights = plan.Reordered(c.weights_to_bwd_data, c.bwd_data_pd.weights_desc(),
                                    w.typed_data());
    ParallelFor(pool, plan.cut.chunks, [&, dys, dxs](int i) {
      Execute(c.bwd_data, {{DNNL_ARG_DIFF_DST, plan.Dst(dys, i)}, {DNNL_ARG_WEIGHTS, weights},
                           {DNNL_ARG_DIFF_SRC, plan.Src(dxs, i)}}, plan.cut.omp_threads);
    });
  });
}

ffi::Error BackwardWeights(ffi::ThreadPool pool, F32 x, F32 dy, ffi::ResultBuffer<ffi::F32> dw,
                           Ints strides, Ints padding) {
  return Guarded([&] {
    Plan plan = Plan::Make(pool, x.dimensions(), dw->dimensions(), dy.dimensions(), strides,
                           padding);
    const Conv& c = *plan.conv;
    // Each chunk's kernel gradient in oneDNN's layout, summed, then reordered to HWIO.
    auto desc = c.bwd_weights_pd.diff_weights_desc();
    std::vector<memory> partial;
    for (int i = 0; i < plan.cut.chunks; ++i) partial.emplace_back(desc, Engine());
    float *xs = x.typed_data(), *dys = dy.typed_data();
    ParallelFor(pool, plan.cut.chunks, [&, xs, dys](int i) {
      Execute(c.bwd_weights, {{DNNL_ARG_SRC, plan.Src(xs, i)},
                              {DNNL_ARG_DIFF_DST, plan.Dst(dys, i)},
                              {DNNL_ARG_DIFF_WEIGHTS, partial[i]}}, plan.cut.omp_threads);
    });
    auto* sum = static_cast<float*>(partial[0].get_data_handle());
    size_t size = desc.get_size() / sizeof(float);
    for (int i = 1; i < plan.cut.chunks; ++i) {
      const auto* part = static_cast<const float*>(partial[i].get_data_handle());
      for (size_t j = 0; j < size; ++j) sum[j] += part[j];
    }
    Execute(c.diff_weights_to_hwio,
            {{DNNL_ARG_FROM, partial[0]},
             {DNNL_ARG_TO, memory(plan.g.Weights(), Engine(), dw->typed_data())}},
            plan.cut.omp_threads);
  });
}

// One chunk's max pool: batch n, input h x w x c, window kh x kw, output oh x ow x c,
// strides (sh, sw), padding (top, bottom, left, right), which never wins a window.
struct PoolGeometry {
  int64_t n, h, w, c, kh, kw, oh, ow, sh, sw, pt, pb, pl, pr;

  auto Key() const { return std::make_tuple(n, h, w, c, kh, kw, sh, sw, pt, pb, pl, pr); }
  memory::desc Src() const { return {{n, c, h, w}, memory::data_type::f32, Tag::nhwc}; }
  memory::desc Dst() const { return {{n, c, oh, ow}, memory::data_type::f32, Tag::nhwc}; }
};

// The forward without a workspace (inference), with one (training: the position of each
// window's maximum, one byte per output) and the gradient, which reads the workspace.
struct Pool {
  dnnl::pooling_forward inference;
  dnnl::pooling_forward::primitive_desc training_pd;
  dnnl::pooling_forward training;
  dnnl::pooling_backward backward;
};

std::shared_ptr<Pool> BuildPool(const PoolGeometry& g) {
  auto& eng = Engine();
  memory::dims strides{g.sh, g.sw}, kernel{g.kh, g.kw}, dilation{0, 0}, pad_l{g.pt, g.pl},
      pad_r{g.pb, g.pr};
  auto algo = dnnl::algorithm::pooling_max;
  dnnl::primitive_attr attr = UserScratchpad();
  auto p = std::make_shared<Pool>();
  p->inference = dnnl::pooling_forward(dnnl::pooling_forward::primitive_desc(
      eng, dnnl::prop_kind::forward_inference, algo, g.Src(), g.Dst(), strides, kernel,
      dilation, pad_l, pad_r, attr));
  p->training_pd = dnnl::pooling_forward::primitive_desc(
      eng, dnnl::prop_kind::forward_training, algo, g.Src(), g.Dst(), strides, kernel,
      dilation, pad_l, pad_r, attr);
  p->training = dnnl::pooling_forward(p->training_pd);
  // gnet_jax/cpu/ops.py gives the workspace one byte per output, laid out like the output.
  auto ws = p->training_pd.workspace_desc();
  if (ws.get_data_type() != memory::data_type::u8 ||
      ws.get_size() != static_cast<size_t>(g.n * g.oh * g.ow * g.c)) {
    throw std::runtime_error("unexpected max-pool workspace of " +
                             std::to_string(ws.get_size()) + " bytes");
  }
  p->backward = dnnl::pooling_backward(dnnl::pooling_backward::primitive_desc(
      eng, algo, g.Src(), g.Dst(), strides, kernel, dilation, pad_l, pad_r, p->training_pd,
      attr));
  return p;
}

struct PoolPlan {
  PoolGeometry g;  // of one chunk
  Cut cut;
  std::shared_ptr<Pool> pool;

  static PoolPlan Make(ffi::ThreadPool& threads, Ints x, Ints y, Ints window, Ints strides,
                       Ints padding) {
    Cut cut = Cut::Make(threads, x[0]);
    PoolGeometry g{x[0] / cut.chunks, x[1], x[2], x[3], window[0], window[1], y[1], y[2],
                   strides[0], strides[1], padding[0], padding[1], padding[2], padding[3]};
    return {g, cut, Cached(g, BuildPool)};
  }

  memory Src(float* data, int i) const { return At(g.Src(), data, i); }
  memory Dst(float* data, int i) const { return At(g.Dst(), data, i); }
  memory Workspace(uint8_t* data, int i) const {
    return At(pool->training_pd.workspace_desc(), data, i);
  }
};

using U8 = ffi::Buffer<ffi::U8>;

ffi::Error MaxPool(ffi::ThreadPool threads, F32 x, ffi::ResultBuffer<ffi::F32> y,
                   Ints window, Ints strides, Ints padding) {
  return Guarded([&] {
    auto plan = PoolPlan::Make(threads, x.dimensions(), y->dimensions(), window, strides,
                               padding);
    float *xs = x.typed_data(), *ys = y->typed_data();
    ParallelFor(threads, plan.cut.chunks, [&, xs, ys](int i) {
      Execute(plan.pool->inference, {{DNNL_ARG_SRC, plan.Src(xs, i)},
                                     {DNNL_ARG_DST, plan.Dst(ys, i)}}, plan.cut.omp_threads);
    });
  });
}

ffi::Error MaxPoolTraining(ffi::ThreadPool threads, F32 x, ffi::ResultBuffer<ffi::F32> y,
                           ffi::ResultBuffer<ffi::U8> ws, Ints window, Ints strides,
                           Ints padding) {
  return Guarded([&] {
    auto plan = PoolPlan::Make(threads, x.dimensions(), y->dimensions(), window, strides,
                               padding);
    float *xs = x.typed_data(), *ys = y->typed_data();
    uint8_t* wss = ws->typed_data();
    ParallelFor(threads, plan.cut.chunks, [&, xs, ys, wss](int i) {
      Execute(plan.pool->training, {{DNNL_ARG_SRC, plan.Src(xs, i)},
                                    {DNNL_ARG_DST, plan.Dst(ys, i)},
                                    {DNNL_ARG_WORKSPACE, plan.Workspace(wss, i)}},
              plan.cut.omp_threads);
    });
  });
}

ffi::Error MaxPoolBackward(ffi::ThreadPool threads, F32 dy, U8 ws,
                           ffi::ResultBuffer<ffi::F32> dx, Ints window, Ints strides,
                           Ints padding) {
  return Guarded([&] {
    auto plan = PoolPlan::Make(threads, dx->dimensions(), dy.dimensions(), window, strides,
                               padding);
    float *dys = dy.typed_data(), *dxs = dx->typed_data();
    uint8_t* wss = ws.typed_data();
    ParallelFor(threads, plan.cut.chunks, [&, dys, dxs, wss](int i) {
      Execute(plan.pool->backward, {{DNNL_ARG_DIFF_DST, plan.Dst(dys, i)},
                                    {DNNL_ARG_WORKSPACE, plan.Workspace(wss, i)},
                                    {DNNL_ARG_DIFF_SRC, plan.Src(dxs, i)}},
              plan.cut.omp_threads);
    });
  });
}

// BatchNorm + ReLU in training, written out rather than oneDNN's primitive: its statistics
// are over the whole batch, so the primitive runs on oneDNN's own threads, which compete
// with the XLA ops running beside it. Here the (rows, channels)
// array is cut into one slice of rows per thread of XLA's pool, as the convolutions are.
// The ReLU's mask is recomputed from x in the gradient: no workspace.

// The normalisation as x * a + b per channel, computed alike in forward and backward so
// that both see the same ReLU mask.
struct Affine {
  std::vector<float> a, b, inv;

  Affine(const float* scale, const float* shift, const float* mean, const float* var,
         int64_t c, float eps) : a(c), b(c), inv(c) {
    for (int64_t j = 0; j < c; ++j) {
      inv[j] = 1.0f / std::sqrt(var[j] + eps);
      a[j] = scale[j] * inv[j];
      b[j] = shift[j] - mean[j] * a[j];
    }
  }
};

// The loops over rows below are compiled for AVX-512, AVX2 and plain x86-64, the best
// picked when the library loads, which the widest vectors make fastest. Each vectorises
// over channels, so every clone adds in the same order.
#define GNET_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))

// Per-channel sums of u and u * x over rows [begin, end) of (rows, c) arrays, added into
// su and sux: float within blocks of rows, double across them. u is x in the forward, the
// gradient through the ReLU (mask from x * a + b) in the backward.
constexpr int64_t kBlock = 128;

GNET_CLONES void AddSums(const float* __restrict x, const float* __restrict dy,
                         const float* __restrict a, const float* __restrict b, int64_t begin,
                         int64_t end, int64_t c, double* su, double* sux) {
  std::vector<float> bu(c), bux(c);
  for (int64_t r0 = begin; r0 < end; r0 += kBlock) {
    std::fill(bu.begin(), bu.end(), 0.f);
    std::fill(bux.begin(), bux.end(), 0.f);
    float* __restrict u_sum = bu.data();
    float* __restrict ux_sum = bux.data();
    for (int64_t r = r0; r < std::min(end, r0 + kBlock); ++r) {
      const float* __restrict xr = x + r * c;
      if (dy == nullptr) {
        for (int64_t j = 0; j < c; ++j) {
          u_sum[j] += xr[j];
          ux_sum[j] += xr[j] * xr[j];
        }
      } else {
        const float* __restrict dyr = dy + r * c;
        for (int64_t j = 0; j < c; ++j) {
          float d = dyr[j];  // loaded unconditionally: a select, not a branch
          float u = xr[j] * a[j] + b[j] > 0.f ? d : 0.f;
          u_sum[j] += u;
          ux_sum[j] += u * xr[j];
        }
      }
    }
    for (int64_t j = 0; j < c; ++j) {
      su[j] += u_sum[j];
      sux[j] += ux_sum[j];
    }
  }
}

// y = relu(x * a + b) over rows [begin, end).
GNET_CLONES void NormalizeRelu(const float* __restrict x, const float* __restrict a,
                               const float* __restrict b, int64_t begin, int64_t end,
                               int64_t c, float* __restrict y) {
  for (int64_t r = begin; r < end; ++r) {
    const float* __restrict xr = x + r * c;
    float* __restrict yr = y + r * c;
    for (int64_t j = 0; j < c; ++j) yr[j] = std::max(0.f, xr[j] * a[j] + b[j]);
  }
}

// dx = a * u + k1 * x + k0 over rows [begin, end), u the gradient through the ReLU.
GNET_CLONES void InputGradient(const float* __restrict x, const float* __restrict dy,
                               const float* __restrict a, const float* __restrict b,
                               const float* __restrict k1, const float* __restrict k0,
                               int64_t begin, int64_t end, int64_t c,
                               float* __restrict dx) {
  for (int64_t r = begin; r < end; ++r) {
    const float* __restrict xr = x + r * c;
    const float* __restrict dyr = dy + r * c;
    float* __restrict dxr = dx + r * c;
    for (int64_t j = 0; j < c; ++j) {
      float d = dyr[j];
      float u = xr[j] * a[j] + b[j] > 0.f ? d : 0.f;
      dxr[j] = a[j] * u + k1[j] * xr[j] + k0[j];
    }
  }
}

// One slice of `rows` rows per thread of XLA's pool (at least one row each).
int SliceCount(ffi::ThreadPool& pool, int64_t rows) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), rows)));
}

// f(i, begin, end) for each slice i.
template <typename F>
void Slices(ffi::ThreadPool& pool, int64_t rows, F f) {
  int slices = SliceCount(pool, rows);
  ParallelFor(pool, slices, [&](int i) { f(i, rows * i / slices, rows * (i + 1) / slices); });
}

// The per-channel sums of AddSums over all rows.
void Sums(ffi::ThreadPool& pool, const float* x, const float* dy, const float* a,
          const float* b, int64_t rows, int64_t c, std::vector<double>& su,
          std::vector<double>& sux) {
  int slices = SliceCount(pool, rows);
  std::vector<double> partial(2 * slices * c, 0.0);
  Slices(pool, rows, [&](int i, int64_t begin, int64_t end) {
    AddSums(x, dy, a, b, begin, end, c, &partial[2 * i * c], &partial[(2 * i + 1) * c]);
  });
  su.assign(c, 0.0);
  sux.assign(c, 0.0);
  for (int i = 0; i < slices; ++i) {
    for (int64_t j = 0; j < c; ++j) {
      su[j] += partial[2 * i * c + j];
      sux[j] += partial[(2 * i + 1) * c + j];
    }
  }
}

ffi::Error BatchNormReluTraining(ffi::ThreadPool pool, F32 x, F32 scale, F32 shift,
                                 F32 running_mean, F32 running_var,
                                 ffi::ResultBuffer<ffi::F32> y,
                                 ffi::ResultBuffer<ffi::F32> mean,
                                 ffi::ResultBuffer<ffi::F32> var,
                                 ffi::ResultBuffer<ffi::F32> new_running_mean,
                                 ffi::ResultBuffer<ffi::F32> new_running_var, float eps,
                                 float momentum) {
  return Guarded([&] {
    int64_t c = scale.element_count(), rows = x.element_count() / c;
    std::vector<double> sum, sum2;
    Sums(pool, x.typed_data(), nullptr, nullptr, nullptr, rows, c, sum, sum2);
    float *m = mean->typed_data(), *v = var->typed_data();
    for (int64_t j = 0; j < c; ++j) {
      // flax's: the mean of squares less the squared mean, biased; and its running
      // averages, momentum * running + (1 - momentum) * batch.
      double mu = sum[j] / rows;
      m[j] = static_cast<float>(mu);
      v[j] = static_cast<float>(std::max(0.0, sum2[j] / rows - mu * mu));
      new_running_mean->typed_data()[j] =
          momentum * running_mean.typed_data()[j] + (1 - momentum) * m[j];
      new_running_var->typed_data()[j] =
          momentum * running_var.typed_data()[j] + (1 - momentum) * v[j];
    }
    Affine f(scale.typed_data(), shift.typed_data(), m, v, c, eps);
    Slices(pool, rows, [&](int, int64_t begin, int64_t end) {
      NormalizeRelu(x.typed_data(), f.a.data(), f.b.data(), begin, end, c, y->typed_data());
    });
  });
}

ffi::Error BatchNormReluBackward(ffi::ThreadPool pool, F32 dy, F32 x, F32 scale, F32 shift,
                                 F32 mean, F32 var, ffi::ResultBuffer<ffi::F32> dx,
                                 ffi::ResultBuffer<ffi::F32> dscale,
                                 ffi::ResultBuffer<ffi::F32> dshift, float eps) {
  return Guarded([&] {
    int64_t c = scale.element_count(), rows = x.element_count() / c;
    Affine f(scale.typed_data(), shift.typed_data(), mean.typed_data(), var.typed_data(), c,
             eps);
    // With u the gradient through the ReLU and x^ = (x - mean) * inv:
    // dshift = sum(u), dscale = sum(u * x^), and
    // dx = a * (u - dshift / rows - x^ * dscale / rows) = a * u + k1 * x + k0.
    std::vector<double> su, sux;
    Sums(pool, x.typed_data(), dy.typed_data(), f.a.data(), f.b.data(), rows, c, su, sux);
    std::vector<float> k1(c), k0(c);
    for (int64_t j = 0; j < c; ++j) {
      double mu = mean.typed_data()[j], inv = f.inv[j], a = f.a[j];
      double ds = inv * (sux[j] - mu * su[j]);
      dshift->typed_data()[j] = static_cast<float>(su[j]);
      dscale->typed_data()[j] = static_cast<float>(ds);
      k1[j] = static_cast<float>(-a * inv * ds / rows);
      k0[j] = static_cast<float>(-a * su[j] / rows + a * inv * mu * ds / rows);
    }
    Slices(pool, rows, [&](int, int64_t begin, int64_t end) {
      InputGradient(x.typed_data(), dy.typed_data(), f.a.data(), f.b.data(), k1.data(),
                    k0.data(), begin, end, c, dx->typed_data());
    });
  });
}

}  // namespace

// Every convolution handler takes two float32 operands and gives one result; `strides`
// is (rows, columns) and `padding` (top, bottom, left, right).
#define GNET_CONV_BINDING                 \
  ffi::Ffi::Bind()                        \
      .Ctx<ffi::ThreadPool>()             \
      .Arg<F32>()                         \
      .Arg<F32>()                         \
      .Ret<F32>()                         \
      .Attr<Ints>("strides")              \
      .Attr<Ints>("padding")

XLA_FFI_DEFINE_HANDLER_SYMBOL(GnetConvForward, Forward, GNET_CONV_BINDING);
// relu(conv(x, w) + b): the same, with the bias b (one per output channel) third.
XLA_FFI_DEFINE_HANDLER_SYMBOL(GnetConvBiasReluForward, ForwardBiasRelu,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Ret<F32>()
                                  .Attr<Ints>("strides")
                                  .Attr<Ints>("padding"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(GnetConvBackwardData, BackwardData, GNET_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(GnetConvBackwardWeights, BackwardWeights, GNET_CONV_BINDING);

// The max pools: `window` and `strides` are (rows, columns), `padding` (top, bottom,
// left, right); the workspace is uint8, shaped like the output.
XLA_FFI_DEFINE_HANDLER_SYMBOL(GnetMaxPool, MaxPool,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32>()
                                  .Ret<F32>()
                                  .Attr<Ints>("window")
                                  .Attr<Ints>("strides")
                                  .Attr<Ints>("padding"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(GnetMaxPoolTraining, MaxPoolTraining,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32>()
                                  .Ret<F32>()
                                  .Ret<ffi::Buffer<ffi::U8>>()
                                  .Attr<Ints>("window")
                                  .Attr<Ints>("strides")
                                  .Attr<Ints>("padding"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(GnetMaxPoolBackward, MaxPoolBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<F32>()
                                  .Attr<Ints>("window")
                                  .Attr<Ints>("strides")
                                  .Attr<Ints>("padding"));

// BatchNorm + ReLU in training. Forward: x (NHWC), scale, shift, running mean and variance
// -> y, the batch's mean and variance, the new running mean and variance.
// Backward: dy, x, scale, shift, mean, variance -> dx, dscale, dshift.
XLA_FFI_DEFINE_HANDLER_SYMBOL(GnetBatchNormReluTraining, BatchNormReluTraining,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Attr<float>("epsilon")
                                  .Attr<float>("momentum"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(GnetBatchNormReluBackward, BatchNormReluBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Attr<float>("epsilon"));
