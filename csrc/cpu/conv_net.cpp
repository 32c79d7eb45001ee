// CPU depth-first network executor (see hf_conv_net.h): per sample, every step in order, the
// activations in the thread's scratch. Convolutions are the packed direct sparse convolution of
// conv.cpp with one sample per group (register epilogue straight into the next step's input),
// pools are plain loops over one sample's planes.
#include "hf_conv_net.h"

#include <algorithm>
#include <cstdint>
#include <string>

#include "hf_sparse_cpu.h"

namespace hf {
HF_ISA_BEGIN
namespace {

constexpr int kActivationSlot = 4;  // cpu::scratch slot of the activations (0-3: the convolution's own)

// One sample's map: element (c, i, j) at p[c*sc + i*sh + j*sw].
template <typename T>
struct MapView {
  T* p;
  std::int64_t sc, sh, sw;
};

// Where a slot's map of h x w planes lives: planes of (h + 2 b) x (w + 2 b), interior at (b, b).
struct SlotGeometry {
  std::int64_t border, pitch, plane;
  SlotGeometry(std::int64_t b, std::int64_t h, std::int64_t w) : border(b), pitch(w + 2 * b), plane((h + 2 * b) * (w + 2 * b)) {}
  std::int64_t interior() const { return border * pitch + border; }
};

// a unless b is larger or a NaN: a NaN anywhere in a window wins (as torch.max_pool2d).
template <typename T>
inline T max_nan(T a, T b) { return (b > a || b != b) ? b : a; }

template <typename T>
void max_pool(const ConvNetStep& s, MapView<const T> in, MapView<T> out) {
  if (s.kh == 2 && s.kw == 2 && s.sh == 2 && s.sw == 2 && in.sw == 1) {  // the common case, vectorised
    for (std::int64_t c = 0; c < s.oc; ++c)
      for (std::int64_t i = 0; i < s.oh; ++i) {
        const T* __restrict r0 = in.p + c * in.sc + 2 * i * in.sh;
        const T* __restrict r1 = r0 + in.sh;
        T* __restrict o = out.p + c * out.sc + i * out.sh;
#pragma omp simd
        for (std::int64_t j = 0; j < s.ow; ++j)
          o[j] = max_nan(max_nan(r0[2 * j], r0[2 * j + 1]), max_nan(r1[2 * j], r1[2 * j + 1]));
      }
    return;
  }
  for (std::int64_t c = 0; c < s.oc; ++c)
    for (std::int64_t i = 0; i < s.oh; ++i)
      for (std::int64_t j = 0; j < s.ow; ++j) {
        const T* win = in.p + c * in.sc + i * s.sh * in.sh + j * s.sw * in.sw;
        T m = win[0];
        for (std::int64_t y = 0; y < s.kh; ++y)
          for (std::int64_t x = 0; x < s.kw; ++x) m = max_nan(m, win[y * in.sh + x * in.sw]);
        out.p[c * out.sc + i * out.sh + j] = m;
      }
}

template <typename T>
void avg_pool(const ConvNetStep& s, MapView<const T> in, MapView<T> out) {
  const double scale = 1.0 / static_cast<double>(s.h * s.w);
  for (std::int64_t c = 0; c < s.c; ++c) {
    double acc = 0.0;
    for (std::int64_t i = 0; i < s.h; ++i)
      for (std::int64_t j = 0; j < s.w; ++j) acc += in.p[c * in.sc + i * in.sh + j * in.sw];
    out.p[c * out.sc] = static_cast<T>(acc * scale);
  }
}

// out[o] = bias[o] + sum_c W[o, c] in[c] (a classifier head on a globally pooled map).
template <typename T>
void linear(const ConvNetStep& s, MapView<const T> in, MapView<T> out) {
  const T* __restrict w = ptr<const T>(static_cast<std::uintptr_t>(s.val));
  const T* bias = s.bias ? ptr<const T>(static_cast<std::uintptr_t>(s.bias)) : nullptr;
  for (std::int64_t o = 0; o < s.oc; ++o) {
    const T* __restrict wo = w + o * s.c;
    T acc = T(0);
#pragma omp simd reduction(+ : acc)
    for (std::int64_t c = 0; c < s.c; ++c) acc += wo[c] * in.p[c * in.sc];
    out.p[o * out.sc] = bias ? acc + bias[o] : acc;
  }
}

// The zero border around each of c planes of h x w (interior untouched).
template <typename T>
void zero_border(T* base, std::int64_t c, std::int64_t h, std::int64_t w, const SlotGeometry& g) {
  const std::int64_t b = g.border;
  for (std::int64_t ch = 0; ch < c; ++ch) {
    T* pl = base + ch * g.plane;
    std::fill(pl, pl + b * g.pitch, T(0));
    std::fill(pl + (b + h) * g.pitch, pl + g.plane, T(0));
    if (b == 1) {  // the usual 3x3 padding: two stores a row (a loop here compiles to two memset calls)
      for (std::int64_t r = 1; r <= h; ++r) pl[r * g.pitch] = pl[r * g.pitch + 1 + w] = T(0);
    } else {
      for (std::int64_t r = b; r < b + h; ++r) {
        std::fill(pl + r * g.pitch, pl + r * g.pitch + b, T(0));
        std::fill(pl + r * g.pitch + b + w, pl + (r + 1) * g.pitch, T(0));
      }
    }
  }
}

SparseConvParams conv_params(const ConvNetStep& s, int dtype, int itype) {
  SparseConvParams q{};
  q.rowptr = static_cast<std::uintptr_t>(s.rowptr);
  q.col = static_cast<std::uintptr_t>(s.col);
  q.val = static_cast<std::uintptr_t>(s.val);
  q.bias = static_cast<std::uintptr_t>(s.bias);
  q.off = static_cast<std::uintptr_t>(s.off);
  q.n = 1;
  q.in_c = s.c; q.h = s.h; q.w = s.w;
  q.out_c = s.oc; q.ho = s.oh; q.wo = s.ow;
  q.kh = s.kh; q.kw = s.kw; q.sh = s.sh; q.sw = s.sw; q.ph = s.ph; q.pw = s.pw; q.dh = s.dh; q.dw = s.dw;
  q.nnz = s.nnz;
  q.lane_pitch = s.lane_pitch;
  q.batch_block = 1;
  q.algo = 0;
  q.relu = s.relu != 0;
  q.dtype = dtype;
  q.itype = itype;
  return q;
}

void check_program(const ConvNetParams& p) {
  require(p.nsteps > 0 && p.steps && p.nslots > 0 && p.slot_size, "sparse_conv_net: empty program");
  require(p.n >= 0 && (p.n == 0 || (p.x && p.y)), "sparse_conv_net: null input or output");
  const ConvNetStep* steps = ptr<const ConvNetStep>(p.steps);
  const std::int64_t* size = ptr<const std::int64_t>(p.slot_size);
  const std::int64_t* border = size + p.nslots;
  for (std::int64_t s = 1; s < p.nslots; ++s) require(size[s] >= 0 && border[s] >= 0, "sparse_conv_net: bad slot");
  auto fits = [&](std::int64_t slot, std::int64_t c, std::int64_t h, std::int64_t w) {
    return size[slot] >= c * (h + 2 * border[slot]) * (w + 2 * border[slot]);
  };
  for (std::int64_t t = 0; t < p.nsteps; ++t) {
    const ConvNetStep& s = steps[t];
    // the message is built only on failure: this runs on every call
    auto need = [t](bool ok, const char* what) {
      if (!ok) require(false, "sparse_conv_net: step " + std::to_string(t) + ": " + what);
    };
    need(s.in >= 0 && s.in < p.nslots && s.res >= -1 && s.res < p.nslots && s.out > 0 && s.out < p.nslots,
         "slot out of range");
    need(s.c > 0 && s.h > 0 && s.w > 0 && s.oc > 0 && s.oh > 0 && s.ow > 0, "bad size");
    need(s.in == 0 || fits(s.in, s.c, s.h, s.w), "input slot size does not match");
    need(t == p.nsteps - 1 || fits(s.out, s.oc, s.oh, s.ow), "output slot size does not match");
    need(s.res < 0 || (s.kind == kNetConv && s.res > 0 && fits(s.res, s.oc, s.oh, s.ow)),
         "residual slot does not match");
    need(s.prepacked != 1 || (s.kind == kNetConv && s.in > 0 && s.sh == 1 && s.sw == 1 && s.ph == border[s.in] &&
                              s.pw == border[s.in]),
         "a prepacked input needs stride 1 and padding equal to its slot's border");
    if (s.prepacked == 2) {  // the previous convolution's packed input, same geometry
      const ConvNetStep* a = t > 0 ? &steps[t - 1] : nullptr;
      need(a && s.kind == kNetConv && a->kind == kNetConv && !a->prepacked && a->in == s.in && a->c == s.c &&
               a->h == s.h && a->w == s.w && a->kh == s.kh && a->kw == s.kw && a->sh == s.sh && a->sw == s.sw &&
               a->ph == s.ph && a->pw == s.pw && a->dh == s.dh && a->dw == s.dw && a->lane_pitch == s.lane_pitch,
           "a reused packed input needs the previous step to be a convolution of the same geometry");
    }
    need(s.prepacked >= 0 && s.prepacked <= 2, "bad prepacked mode");
    switch (s.kind) {
      case kNetConv: {
        need(s.off != 0, "convolutions need precomputed tap offsets");
        SparseConvParams q = conv_params(s, p.dtype, p.itype);
        q.x = q.y = 1;  // stand-ins: check() looks at sizes and presence only
        check(q);
        break;
      }
      case kNetMaxPool:
        need(s.kh > 0 && s.kw > 0 && s.sh > 0 && s.sw > 0 && s.oc == s.c && s.oh == (s.h - s.kh) / s.sh + 1 &&
                 s.ow == (s.w - s.kw) / s.sw + 1 && s.h >= s.kh && s.w >= s.kw,
             "max pool geometry does not match");
        break;
      case kNetAvgPool:
        need(s.oc == s.c && s.oh == 1 && s.ow == 1, "average pool must output c x 1 x 1");
        break;
      case kNetLinear:
        need(s.h == 1 && s.w == 1 && s.oh == 1 && s.ow == 1 && s.val != 0,
             "linear needs c x 1 x 1 maps and a weight");
        break;
      default:
        need(false, ("unknown step kind " + std::to_string(s.kind)).c_str());
    }
  }
}

// Sample b through the program; acts is the activation scratch (slot offsets in base). team: every
// thread of a parallel region of `threads` runs this call; convolutions with the work for it are shared
// (one barrier each), every other step runs on the master thread, with a barrier only before the next
// shared step (master_ran: the master wrote since the last barrier; the same on every thread, as
// every thread takes the same branches). Otherwise the calling thread runs it all.
template <typename T, typename I>
void run_sample(const ConvNetParams& p, std::int64_t b, T* acts, const std::int64_t* base, int threads, bool team,
                bool& master_ran) {
  const ConvNetStep* steps = ptr<const ConvNetStep>(p.steps);
  const std::int64_t* border = ptr<const std::int64_t>(p.slot_size) + p.nslots;
  const T* x = ptr<const T>(p.x) + b * p.xs_n;
  // The interior of slot `slot` holding an h x w map.
  auto view = [&](std::int64_t slot, std::int64_t h, std::int64_t w) {
    const SlotGeometry g(border[slot], h, w);
    return MapView<T>{acts + base[slot] + g.interior(), g.plane, g.pitch, 1};
  };
  for (std::int64_t t = 0; t < p.nsteps; ++t) {
    const ConvNetStep& s = steps[t];
    const MapView<const T> in = [&] {
      if (s.in == 0) return MapView<const T>{x, p.xs_c, p.xs_h, p.xs_w};
      const MapView<T> v = view(s.in, s.h, s.w);
      return MapView<const T>{v.p, v.sc, v.sh, v.sw};
    }();
    const bool last = t == p.nsteps - 1;
    const MapView<T> out = last ? MapView<T>{ptr<T>(p.y) + b * s.oc * s.oh * s.ow, s.oh * s.ow, s.ow, 1}
                                : view(s.out, s.oh, s.ow);
    auto clear_border = [&] {  // the writes below touch only the interior
      if (!last && border[s.out] > 0)
        zero_border(acts + base[s.out], s.oc, s.oh, s.ow, SlotGeometry(border[s.out], s.oh, s.ow));
    };
    SparseConvParams q = conv_params(s, p.dtype, p.itype);
    if (s.kind == kNetConv) {
      if (s.prepacked == 1) {  // the slot, border included, is the packed input
        const SlotGeometry g(border[s.in], s.h, s.w);
        q.x = reinterpret_cast<std::uintptr_t>(acts + base[s.in]);
        q.xs_c = g.plane; q.xs_h = g.pitch; q.xs_w = 1;
        q.prepacked = true;
      } else if (s.prepacked == 2 && !team) {  // what the previous step packed on this thread
        q.x = reinterpret_cast<std::uintptr_t>(sparse_conv2d_packed_scratch<T>(q));
        q.prepacked = true;
      } else {  // (in a team the previous step may have packed on another thread: pack again)
        q.x = reinterpret_cast<std::uintptr_t>(in.p);
        q.xs_c = in.sc; q.xs_h = in.sh; q.xs_w = in.sw;
        q.x_border = s.in > 0 ? border[s.in] : 0;
      }
      q.y = reinterpret_cast<std::uintptr_t>(out.p);
      q.ys_c = out.sc; q.ys_h = out.sh; q.ys_w = 1;
      // the border between rows is zero (clear_border, done before the convolution starts) and may be
      // rewritten with zeros
      q.y_gaps_zero = !last && border[s.out] > 0;
      if (s.res > 0) {
        const MapView<T> r = view(s.res, s.oh, s.ow);
        q.res = reinterpret_cast<std::uintptr_t>(r.p);
        q.rs_c = r.sc; q.rs_h = r.sh; q.rs_w = 1;
      }
    }
    auto alone = [&] {
      clear_border();
      if (s.kind == kNetConv) {
        sparse_conv2d_on<T, I>(q, 1);
      } else if (s.kind == kNetMaxPool) {
        max_pool<T>(s, in, out);
      } else if (s.kind == kNetAvgPool) {
        avg_pool<T>(s, in, out);
      } else {
        linear<T>(s, in, out);
      }
    };
    if (!team) {
      alone();
    } else if (s.kind == kNetConv && sparse_conv2d_team_pays(q)) {
      if (master_ran) {  // the team reads what the master wrote since the last barrier
#pragma omp barrier
        master_ran = false;
      }
#pragma omp single  // (its barrier: the convolution may write zeros over the border too)
      clear_border();
      sparse_conv2d_on<T, I>(q, threads, true);
#pragma omp barrier
    } else {  // the master thread alone, no barrier: the next step on it sees its writes
      if (cpu::thread_num() == 0) alone();
      master_ran = true;
    }
  }
}

template <typename T, typename I>
void run(const ConvNetParams& p) {
  const std::int64_t* size = ptr<const std::int64_t>(p.slot_size);
  std::int64_t base[64];
  std::int64_t total = 0;
  for (std::int64_t s = 0; s < p.nslots; ++s) {
    base[s] = total;
    total += s == 0 ? 0 : cpu::round_up(size[s], 16) + 16;  // 64-byte aligned maps, a register of slack
  }
  const int threads = p.threads > 0 ? std::min(p.threads, cpu::max_threads()) : cpu::max_threads();
  if (p.n >= 2 && threads > 1) {  // samples in parallel, each depth-first on one thread
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (std::int64_t b = 0; b < p.n; ++b) {
      bool unused = false;
      run_sample<T, I>(p, b, cpu::scratch<T>(kActivationSlot, total), base, 1, false, unused);
    }
    return;
  }
  T* acts = cpu::scratch<T>(kActivationSlot, total);  // the calling thread's: the team shares it
  if (threads > 1) {  // one region for the whole program: a barrier per shared layer, no fork per layer
#pragma omp parallel num_threads(threads)
    {
      bool master_ran = false;  // (the region's end is a barrier)
      for (std::int64_t b = 0; b < p.n; ++b) run_sample<T, I>(p, b, acts, base, threads, true, master_ran);
    }
    return;
  }
  bool unused = false;
  for (std::int64_t b = 0; b < p.n; ++b) run_sample<T, I>(p, b, acts, base, 1, false, unused);
}

}  // namespace

void sparse_conv_net(CpuTag, const ConvNetParams& p) {
  check_program(p);
  require(p.nslots <= 64, "sparse_conv_net: at most 64 activation slots");
  require(p.threads >= 0, "sparse_conv_net: threads must be >= 0");
  if (p.n == 0) return;
  dispatch_float_index(p.dtype, p.itype, "sparse_conv_net",
                       [&](auto zero, auto izero) { run<decltype(zero), decltype(izero)>(p); });
}

HF_ISA_END
}  // namespace hf
