// Fused linear + cross-entropy on the CPU: tiles over kept rows x vocabulary.
//
// Every product is an ATen GEMM (at::mm_out / addmm_) on one tile, so the BLAS
// library does the arithmetic; the loops here do the elementwise work of a tile
// (softcap, exp, row statistics, the logit gradient) in one pass over it. Logits are
// float32 products; with bfloat16 inputs the two backward products run in bf16
// (oneDNN's bf16 instructions where the CPU has them), each summed in float32.
//
// Layout. The kept rows are processed in blocks of `block_rows`; inside a block,
// at::parallel_for splits the vocabulary into chunks of `block_vocab` columns,
// one thread per range of chunks, each GEMM single-threaded on its own tile.
// Per (row block, chunk) a thread keeps partial row statistics (max, sum exp,
// target logit, sum of logits, sum exp * z, argmax); the chunks are merged as in
// `reference.merge_partials`, which is the online log-sum-exp.
//
// Entry points (rows [M] int64 into hidden [N, H]; weight / bias already in
// float32; every [M] output float32):
//   lce_forward          lse, target logit, sum logits, entropy, argmax
//   lce_backward         grads from a saved lse and d out / d loss_t (recomputes z)
//   lce_forward_backward the forward and, in the same pass, the grads of
//                        sum_m grad_scale[m] * loss[m]: a row block's logits are
//                        kept chunk by chunk in a [block_rows, V] slab until its lse
//                        is known, then turned into G in place: three GEMMs, none
//                        repeated, and never more than one slab of logits.
// Gradient tiles whose every |d loss / d r| is below filter_eps (>= 0) are
// skipped, GEMMs included; a tile holding a non-finite value never is.
// grad_hidden is summed per thread in float32 [block_rows, H] buffers and
// written once per row block; grad_weight chunks are disjoint between threads.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

using at::Tensor;

// exp(x) in float, vectorisable (Cody-Waite reduction, Cephes polynomial; ~1 ulp). The
// rounding to an integer adds 1.5 * 2^23, as std::floor would not vectorise. NaN stays
// NaN; the argument is clamped to the finite range of the result.
static inline float fast_exp(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float magic = 12582912.0f;
  const float kf = x * 1.44269504088896341f + magic;
  uint32_t kb;
  std::memcpy(&kb, &kf, sizeof(kb));
  const float fx = kf - magic;
  float r = x - fx * 0.693359375f;
  r = r + fx * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const uint32_t bits = (kb - 0x4B400000u + 127u) << 23;  // 2^n, n the low bits of kf
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// c * tanh(x / c) through fast_exp (odd symmetry keeps the exp argument <= 0).
static inline float softcap_fn(float x, float cap, float inv_cap) {
  const float a = x * inv_cap;
  const float t = fast_exp(-2.0f * std::fabs(a));
  const float th = (1.0f - t) / (1.0f + t);
  return cap * (a < 0.0f ? -th : th);
}

struct LossParams {
  bool has_softcap;
  float softcap;
  float label_smoothing;
  float z_loss;
  float filter_eps;  // < 0: exact, no tile is skipped
  int64_t vocab;
};

// Per (chunk, row) partial statistics of one row block, [chunks, rows] each: max m, sum
// exp(z - m) s, target logit tz, sum z sz, sum exp(z - m) (z - m) ez, argmax value / index.
struct Partials {
  Tensor m, s, tz, sz, ez, av, ai;
  Partials(int64_t chunks, int64_t rows, bool entropy, bool argmax) {
    auto f = at::TensorOptions().dtype(at::kFloat);
    m = at::empty({chunks, rows}, f);
    s = at::empty({chunks, rows}, f);
    tz = at::empty({chunks, rows}, f);
    sz = at::empty({chunks, rows}, f);
    ez = entropy ? at::empty({chunks, rows}, f) : Tensor();
    av = argmax ? at::empty({chunks, rows}, f) : Tensor();
    ai = argmax ? at::empty({chunks, rows}, f.dtype(at::kLong)) : Tensor();
  }
};

// z = softcap(h W_c^T + b_c) for one tile, in place in `z` [rows, width].
static void logits_tile(const Tensor& h_blk, const Tensor& weight, const c10::optional<Tensor>& bias,
                        int64_t v0, int64_t width, const LossParams& p, Tensor& z) {
  at::mm_out(z, h_blk, weight.narrow(0, v0, width).t());
  float* zp = z.data_ptr<float>();
  const int64_t rows = z.size(0);
  if (bias.has_value()) {
    const float* bp = bias->data_ptr<float>() + v0;
    for (int64_t i = 0; i < rows; ++i) {
      float* zr = zp + i * width;
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) zr[j] += bp[j];
    }
  }
  if (p.has_softcap) {
    const float cap = p.softcap, inv = 1.0f / p.softcap;
    const int64_t n = rows * width;
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) zp[k] = softcap_fn(zp[k], cap, inv);
  }
}

// Row statistics of one tile z [rows, width] (columns v0 ...) into partials[c].
static void tile_stats(const Tensor& z, int64_t c, int64_t v0, const int64_t* tgt, Partials& P) {
  const int64_t rows = z.size(0), width = z.size(1);
  const float* zp = z.data_ptr<float>();
  float* m = P.m[c].data_ptr<float>();
  float* s = P.s[c].data_ptr<float>();
  float* tz = P.tz[c].data_ptr<float>();
  float* sz = P.sz[c].data_ptr<float>();
  float* ez = P.ez.defined() ? P.ez[c].data_ptr<float>() : nullptr;
  float* av = P.av.defined() ? P.av[c].data_ptr<float>() : nullptr;
  int64_t* ai = P.ai.defined() ? P.ai[c].data_ptr<int64_t>() : nullptr;
  for (int64_t i = 0; i < rows; ++i) {
    const float* zr = zp + i * width;
    float mx = -std::numeric_limits<float>::infinity();
    float sum = 0.0f, poison = 0.0f;
#pragma omp simd reduction(max : mx) reduction(+ : sum, poison)
    for (int64_t j = 0; j < width; ++j) {
      mx = std::max(mx, zr[j]);
      sum += zr[j];
      poison += zr[j] * 0.0f;  // NaN once any logit is inf or NaN
    }
    const bool bad = !(poison == 0.0f);
    float se = 0.0f, sez = 0.0f;
    if (ez != nullptr) {
#pragma omp simd reduction(+ : se, sez)
      for (int64_t j = 0; j < width; ++j) {
        const float d = zr[j] - mx;  // shifted: the largest terms are ~0, not ~max z
        const float e = fast_exp(d);
        se += e;
        sez += e * d;
      }
      ez[i] = bad ? NAN : sez;
    } else {
#pragma omp simd reduction(+ : se)
      for (int64_t j = 0; j < width; ++j) se += fast_exp(zr[j] - mx);
    }
    // A non-finite logit makes the row NaN (as F.cross_entropy does); the NaN max
    // carries that through the merge.
    m[i] = bad ? NAN : mx;
    s[i] = se;
    sz[i] = sum;
    const int64_t y = tgt[i] - v0;
    tz[i] = (y >= 0 && y < width) ? zr[y] : 0.0f;
    if (av != nullptr) {
      int64_t arg = 0;
      for (int64_t j = 0; j < width; ++j) {
        if (zr[j] == mx) { arg = j; break; }  // first maximum: ties go to the lowest index
      }
      av[i] = bad ? NAN : mx;
      ai[i] = v0 + arg;
    }
  }
}

// Merge the chunks' partials: lse, target logit, sum logits, entropy, argmax, each [rows].
static std::vector<Tensor> merge(const Partials& P) {
  Tensor top = std::get<0>(P.m.max(0));  // NaN propagates
  Tensor safe_top = at::where(at::isfinite(top), top, at::zeros_like(top));
  Tensor scale = at::exp(P.m - safe_top);
  Tensor total = (scale * P.s).sum(0);
  Tensor lse = safe_top + at::log(total);
  lse = at::where(at::isnan(top), top, lse);
  // entropy = log(total) - sum_c scale_c (ez_c + (m_c - top) s_c) / total, ez_c holding
  // sum exp(z - m_c) (z - m_c): no cancellation between lse and sum p z.
  Tensor ent = P.ez.defined()
                   ? at::log(total) - (scale * (P.ez + (P.m - safe_top) * P.s)).sum(0) / total
                   : Tensor();
  Tensor arg = P.av.defined() ? P.ai.gather(0, P.av.argmax(0).unsqueeze(0)).squeeze(0) : Tensor();
  return {lse, P.tz.sum(0), P.sz.sum(0), ent, arg};
}

// d loss / d r_j = (p_j (1 + 2 lam lse) - eps / V) * softcap'(z_j), times gcoef, in place over
// zr[j0, j1) (columns without the target); max |d| and a NaN-if-non-finite sum come back.
static inline void grad_range(float* zr, int64_t j0, int64_t j1, float l, float g, float pscale,
                              float smooth, bool has_softcap, float inv_cap, float& mx,
                              float& bad) {
  float m = 0.0f, b = 0.0f;
  if (has_softcap) {
#pragma omp simd reduction(max : m) reduction(+ : b)
    for (int64_t j = j0; j < j1; ++j) {
      const float zc = zr[j] * inv_cap;
      const float d = (fast_exp(zr[j] - l) * pscale - smooth) * (1.0f - zc * zc);
      m = std::max(m, std::fabs(d));
      b += d * 0.0f;
      zr[j] = d * g;
    }
  } else {
#pragma omp simd reduction(max : m) reduction(+ : b)
    for (int64_t j = j0; j < j1; ++j) {
      const float d = fast_exp(zr[j] - l) * pscale - smooth;
      m = std::max(m, std::fabs(d));
      b += d * 0.0f;
      zr[j] = d * g;
    }
  }
  mx = std::max(mx, m);
  bad += b;
}

// G = gcoef_i * d loss_i / d r_ij for one tile, in place over z. Returns whether the
// tile counts (some |d loss / d r| >= filter_eps, or a non-finite value).
static bool grad_tile(Tensor& z, int64_t v0, const int64_t* tgt, const float* lse,
                      const float* gcoef, const LossParams& p) {
  const int64_t rows = z.size(0), width = z.size(1);
  float* zp = z.data_ptr<float>();
  const float smooth = p.label_smoothing / static_cast<float>(p.vocab);
  const float on_target = 1.0f - p.label_smoothing;
  const float inv_cap = p.has_softcap ? 1.0f / p.softcap : 0.0f;
  float tile_max = 0.0f, poison = 0.0f;
  for (int64_t i = 0; i < rows; ++i) {
    float* zr = zp + i * width;
    const float l = lse[i], g = gcoef[i];
    const float pscale = 1.0f + 2.0f * p.z_loss * l;  // z_loss adds 2 lam lse p_j
    const int64_t y = tgt[i] - v0;
    if (y >= 0 && y < width) {
      // The target column apart: p_y - (1 - eps) cancels, and must enter the max as such.
      const float ty = zr[y];
      grad_range(zr, 0, y, l, g, pscale, smooth, p.has_softcap, inv_cap, tile_max, poison);
      grad_range(zr, y + 1, width, l, g, pscale, smooth, p.has_softcap, inv_cap, tile_max,
                 poison);
      const float zc = ty * inv_cap;
      const float cap_grad = p.has_softcap ? 1.0f - zc * zc : 1.0f;
      const float d = (fast_exp(ty - l) * pscale - smooth - on_target) * cap_grad;
      tile_max = std::max(tile_max, std::fabs(d));
      poison += d * 0.0f;
      zr[y] = d * g;
    } else {
      grad_range(zr, 0, width, l, g, pscale, smooth, p.has_softcap, inv_cap, tile_max, poison);
    }
  }
  return !(poison == 0.0f) || !(tile_max < p.filter_eps);
}

struct GradOutputs {
  Tensor grad_hidden;  // [N, H] in hidden's dtype, or undefined
  Tensor grad_weight;  // [V, H] accumulator (float32 or the weight's dtype), or undefined
  Tensor grad_bias;    // [V] float32 accumulator, or undefined
  // The bfloat16 weight when the inputs are bfloat16: the two backward products then run
  // in bf16 (G rounded to it, as the Triton kernels do; the CPU's bf16 instructions),
  // each tile's product summed in float32. Undefined: float32 products.
  Tensor weight_lp;
};

// The backward GEMMs of one gradient tile G [rows, width] (columns v0 ...). h32 / h_in:
// the row block in float32 / in hidden's dtype.
static void grad_gemms(const Tensor& G, int64_t v0, const Tensor& h32, const Tensor& h_in,
                       const Tensor& weight, GradOutputs& out, Tensor* dh_part) {
  const int64_t width = G.size(1);
  Tensor dw = out.grad_weight.defined() ? out.grad_weight.narrow(0, v0, width) : Tensor();
  if (out.weight_lp.defined()) {
    const Tensor g = G.to(out.weight_lp.scalar_type());
    if (dh_part != nullptr) dh_part->add_(at::mm(g, out.weight_lp.narrow(0, v0, width)));
    if (dw.defined()) {
      if (dw.scalar_type() == at::kFloat) {
        dw.add_(at::mm(g.t(), h_in));
      } else {  // accum_dtype = the weight's dtype: sums in that dtype too
        dw.addmm_(g.t(), h_in);
      }
    }
  } else {
    if (dh_part != nullptr) dh_part->addmm_(G, weight.narrow(0, v0, width));
    if (dw.defined()) {
      if (dw.scalar_type() == at::kFloat) {
        dw.addmm_(G.t(), h32);
      } else {  // accum_dtype = the weight's dtype: products and sums in that dtype
        dw.addmm_(G.t().to(dw.scalar_type()), h_in);
      }
    }
  }
  if (out.grad_bias.defined()) out.grad_bias.narrow(0, v0, width).add_(G.sum(0));
}

struct Blocks {
  int64_t rows, vocab, chunks;
};

static Blocks blocks_for(int64_t V, int64_t block_rows, int64_t block_vocab) {
  TORCH_CHECK(block_rows > 0 && block_vocab > 0, "block sizes must be positive");
  const int64_t bv = std::min(block_vocab, V);
  return {block_rows, bv, (V + bv - 1) / bv};
}

// Gather rows r0 .. r0+n of the kept rows: (float32 copy, copy in hidden's dtype).
static std::pair<Tensor, Tensor> gather_rows(const Tensor& hidden, const Tensor& rows, int64_t r0,
                                             int64_t n) {
  Tensor h = hidden.index_select(0, rows.narrow(0, r0, n)).contiguous();
  return {h.to(at::kFloat).contiguous(), h};
}

static void check_common(const Tensor& hidden, const Tensor& weight, const c10::optional<Tensor>& bias,
                         const Tensor& rows, const Tensor& targets) {
  TORCH_CHECK(hidden.device().is_cpu() && weight.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.is_contiguous(),
              "weight must be contiguous float32");
  TORCH_CHECK(!bias.has_value() || (bias->scalar_type() == at::kFloat && bias->is_contiguous()),
              "bias must be contiguous float32");
  TORCH_CHECK(rows.scalar_type() == at::kLong && targets.scalar_type() == at::kLong &&
                  targets.is_contiguous() && rows.numel() == targets.numel(),
              "rows and targets must be int64 [M]");
}

static LossParams params(int64_t V, c10::optional<double> softcap, double label_smoothing,
                         double z_loss, double filter_eps) {
  return {softcap.has_value(), static_cast<float>(softcap.value_or(1.0)),
          static_cast<float>(label_smoothing), static_cast<float>(z_loss),
          static_cast<float>(filter_eps), V};
}

// The forward over all kept rows: [lse, target logit, sum logits, entropy?, argmax?], [M] each.
std::vector<Tensor> lce_forward(const Tensor& hidden, const Tensor& weight,
                                const c10::optional<Tensor>& bias, const Tensor& rows,
                                const Tensor& targets, c10::optional<double> softcap,
                                bool want_entropy, bool want_argmax, int64_t block_rows,
                                int64_t block_vocab) {
  check_common(hidden, weight, bias, rows, targets);
  const int64_t M = rows.numel(), V = weight.size(0);
  const LossParams p = params(V, softcap, 0.0, 0.0, -1.0);
  const Blocks b = blocks_for(V, block_rows, block_vocab);
  auto f = at::TensorOptions().dtype(at::kFloat);
  Tensor lse = at::empty({M}, f), tz = at::empty({M}, f), sz = at::empty({M}, f);
  Tensor ent = want_entropy ? at::empty({M}, f) : at::empty({0}, f);
  Tensor arg = want_argmax ? at::empty({M}, f.dtype(at::kLong)) : at::empty({0}, f.dtype(at::kLong));
  const int64_t* tgt_all = targets.data_ptr<int64_t>();
  for (int64_t r0 = 0; r0 < M; r0 += b.rows) {
    const int64_t n = std::min(b.rows, M - r0);
    Tensor h_blk = gather_rows(hidden, rows, r0, n).first;
    Partials P(b.chunks, n, want_entropy, want_argmax);
    at::parallel_for(0, b.chunks, 1, [&](int64_t c0, int64_t c1) {
      Tensor tile = at::empty({n * b.vocab}, f);
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t v0 = c * b.vocab, width = std::min(b.vocab, V - v0);
        Tensor z = tile.narrow(0, 0, n * width).view({n, width});
        logits_tile(h_blk, weight, bias, v0, width, p, z);
        tile_stats(z, c, v0, tgt_all + r0, P);
      }
    });
    auto st = merge(P);
    lse.narrow(0, r0, n).copy_(st[0]);
    tz.narrow(0, r0, n).copy_(st[1]);
    sz.narrow(0, r0, n).copy_(st[2]);
    if (want_entropy) ent.narrow(0, r0, n).copy_(st[3]);
    if (want_argmax) arg.narrow(0, r0, n).copy_(st[4]);
  }
  return {lse, tz, sz, ent, arg};
}

// Sum of the threads' grad_hidden parts of one row block, written to its rows.
static void write_grad_hidden(GradOutputs& out, const Tensor& parts, const Tensor& rows, int64_t r0,
                              int64_t n) {
  Tensor dh = parts.narrow(1, 0, n).sum(0);
  out.grad_hidden.index_copy_(0, rows.narrow(0, r0, n), dh.to(out.grad_hidden.scalar_type()));
}

// The backward from a saved lse [M] and gcoef [M] (d out / d loss_t): recomputes each
// logit tile once. Writes into the given outputs; returns (tiles skipped, tiles).
std::vector<int64_t> lce_backward(const Tensor& hidden, const Tensor& weight,
                                  const c10::optional<Tensor>& bias, const Tensor& rows,
                                  const Tensor& targets, const Tensor& lse, const Tensor& gcoef,
                                  c10::optional<double> softcap, double label_smoothing,
                                  double z_loss, double filter_eps, c10::optional<Tensor> grad_hidden,
                                  c10::optional<Tensor> grad_weight, c10::optional<Tensor> grad_bias,
                                  c10::optional<Tensor> weight_lp, int64_t block_rows,
                                  int64_t block_vocab) {
  check_common(hidden, weight, bias, rows, targets);
  TORCH_CHECK(lse.scalar_type() == at::kFloat && gcoef.scalar_type() == at::kFloat &&
                  lse.is_contiguous() && gcoef.is_contiguous(),
              "lse and gcoef must be contiguous float32 [M]");
  const int64_t M = rows.numel(), V = weight.size(0), H = weight.size(1);
  const LossParams p = params(V, softcap, label_smoothing, z_loss, filter_eps);
  const Blocks b = blocks_for(V, block_rows, block_vocab);
  GradOutputs out{grad_hidden.value_or(Tensor()), grad_weight.value_or(Tensor()),
                  grad_bias.value_or(Tensor()), weight_lp.value_or(Tensor())};
  auto f = at::TensorOptions().dtype(at::kFloat);
  const int nthreads = at::get_num_threads();
  Tensor parts = out.grad_hidden.defined() ? at::empty({nthreads, std::min(b.rows, M), H}, f) : Tensor();
  std::vector<int64_t> skipped(b.chunks, 0);
  int64_t tiles = 0;
  for (int64_t r0 = 0; r0 < M; r0 += b.rows) {
    const int64_t n = std::min(b.rows, M - r0);
    auto hh = gather_rows(hidden, rows, r0, n);
    if (parts.defined()) parts.zero_();
    at::parallel_for(0, b.chunks, 1, [&](int64_t c0, int64_t c1) {
      Tensor tile = at::empty({n * b.vocab}, f);
      Tensor part = parts.defined() ? parts[at::get_thread_num()].narrow(0, 0, n) : Tensor();
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t v0 = c * b.vocab, width = std::min(b.vocab, V - v0);
        Tensor z = tile.narrow(0, 0, n * width).view({n, width});
        logits_tile(hh.first, weight, bias, v0, width, p, z);
        if (!grad_tile(z, v0, targets.data_ptr<int64_t>() + r0, lse.data_ptr<float>() + r0,
                       gcoef.data_ptr<float>() + r0, p)) {
          ++skipped[c];
          continue;
        }
        grad_gemms(z, v0, hh.first, hh.second, weight, out, part.defined() ? &part : nullptr);
      }
    });
    tiles += b.chunks;
    if (out.grad_hidden.defined()) write_grad_hidden(out, parts, rows, r0, n);
  }
  int64_t total_skipped = 0;
  for (int64_t k : skipped) total_skipped += k;
  return {total_skipped, tiles};
}

// The forward and the gradients of sum_m gcoef[m] * loss[m] in one pass. Returns
// [lse, target logit, sum logits, entropy?, argmax?, (tiles skipped, tiles)].
std::vector<Tensor> lce_forward_backward(
    const Tensor& hidden, const Tensor& weight, const c10::optional<Tensor>& bias,
    const Tensor& rows, const Tensor& targets, const Tensor& gcoef, c10::optional<double> softcap,
    double label_smoothing, double z_loss, double filter_eps, bool want_entropy, bool want_argmax,
    c10::optional<Tensor> grad_hidden, c10::optional<Tensor> grad_weight,
    c10::optional<Tensor> grad_bias, c10::optional<Tensor> weight_lp, int64_t block_rows,
    int64_t block_vocab) {
  check_common(hidden, weight, bias, rows, targets);
  TORCH_CHECK(gcoef.scalar_type() == at::kFloat && gcoef.is_contiguous(),
              "grad_scale must be contiguous float32 [M]");
  const int64_t M = rows.numel(), V = weight.size(0), H = weight.size(1);
  const LossParams p = params(V, softcap, label_smoothing, z_loss, filter_eps);
  const Blocks b = blocks_for(V, block_rows, block_vocab);
  GradOutputs out{grad_hidden.value_or(Tensor()), grad_weight.value_or(Tensor()),
                  grad_bias.value_or(Tensor()), weight_lp.value_or(Tensor())};
  auto f = at::TensorOptions().dtype(at::kFloat);
  const int64_t bm = std::min(b.rows, M);
  const int nthreads = at::get_num_threads();
  Tensor parts = out.grad_hidden.defined() ? at::empty({nthreads, bm, H}, f) : Tensor();
  // One row block's logits, chunk-major so that each tile is contiguous.
  Tensor slab = at::empty({b.chunks, bm * b.vocab}, f);
  Tensor lse = at::empty({M}, f), tz = at::empty({M}, f), sz = at::empty({M}, f);
  Tensor ent = want_entropy ? at::empty({M}, f) : at::empty({0}, f);
  Tensor arg = want_argmax ? at::empty({M}, f.dtype(at::kLong)) : at::empty({0}, f.dtype(at::kLong));
  const int64_t* tgt_all = targets.data_ptr<int64_t>();
  std::vector<int64_t> skipped(b.chunks, 0);
  int64_t tiles = 0;
  auto tile_of = [&](int64_t c, int64_t n) {
    const int64_t width = std::min(b.vocab, V - c * b.vocab);
    return slab[c].narrow(0, 0, n * width).view({n, width});
  };
  for (int64_t r0 = 0; r0 < M; r0 += b.rows) {
    const int64_t n = std::min(b.rows, M - r0);
    auto hh = gather_rows(hidden, rows, r0, n);
    Partials P(b.chunks, n, want_entropy, want_argmax);
    at::parallel_for(0, b.chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        Tensor z = tile_of(c, n);
        logits_tile(hh.first, weight, bias, c * b.vocab, z.size(1), p, z);
        tile_stats(z, c, c * b.vocab, tgt_all + r0, P);
      }
    });
    auto st = merge(P);
    Tensor lse_blk = lse.narrow(0, r0, n);
    lse_blk.copy_(st[0]);
    tz.narrow(0, r0, n).copy_(st[1]);
    sz.narrow(0, r0, n).copy_(st[2]);
    if (want_entropy) ent.narrow(0, r0, n).copy_(st[3]);
    if (want_argmax) arg.narrow(0, r0, n).copy_(st[4]);
    if (parts.defined()) parts.zero_();
    at::parallel_for(0, b.chunks, 1, [&](int64_t c0, int64_t c1) {
      Tensor part = parts.defined() ? parts[at::get_thread_num()].narrow(0, 0, n) : Tensor();
      for (int64_t c = c0; c < c1; ++c) {
        Tensor z = tile_of(c, n);
        if (!grad_tile(z, c * b.vocab, tgt_all + r0, lse.data_ptr<float>() + r0,
                       gcoef.data_ptr<float>() + r0, p)) {
          ++skipped[c];
          continue;
        }
        grad_gemms(z, c * b.vocab, hh.first, hh.second, weight, out,
                   part.defined() ? &part : nullptr);
      }
    });
    tiles += b.chunks;
    if (out.grad_hidden.defined()) write_grad_hidden(out, parts, rows, r0, n);
  }
  int64_t total_skipped = 0;
  for (int64_t k : skipped) total_skipped += k;
  Tensor counts = at::tensor(std::vector<int64_t>{total_skipped, tiles}, at::kLong);
  return {lse, tz, sz, ent, arg, counts};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lce_forward", &lce_forward, "row statistics of the kept rows");
  m.def("lce_backward", &lce_backward, "gradients from a saved lse");
  m.def("lce_forward_backward", &lce_forward_backward, "forward and gradients in one pass");
}
