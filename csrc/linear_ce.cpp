// Fused linear + cross-entropy on the CPU: tiles over kept rows x vocabulary.
//
// Products. Every GEMM is oneDNN's batch-reduce GEMM micro-kernel, reached through ATen
// (at::native::cpublas::brgemm) and called on one tile by one thread: float32 operands, or
// bfloat16 operands (VNNI-packed B, the CPU's bf16 dot-product instructions) with float32
// accumulation and float32 output. On the CPUs measured it runs the float32 products at
// about twice the speed of the BLAS behind at::mm (MKL takes its AVX2 path on AMD), and it
// gives bf16 x bf16 -> fp32, which ATen's at::mm does not.
//
// Layout. A tile's logits are computed transposed, Z^T [width, rows] = W_c @ Hb^T: the
// weight chunk W_c [width, H] is the A operand as stored, and the row block's hidden states,
// packed once per row block, are the B operand. The per-token statistics (one token per
// column) then vectorise across tokens. The logit gradient G^T [width, rows] feeds the
// backward products:
//   grad_weight_c [width, H] += G^T @ Hb          (A = G^T, B = Hb packed per row block)
//   grad_hidden [rows, H]    += G @ W_c           (A = G, the tile transposed;
//                                                   B = W_c as stored, or VNNI-packed
//                                                   per tile for bf16: no copy of W)
//
// Blocking. Kept rows go in blocks of `block_rows`; inside a block, at::parallel_for splits
// the vocabulary chunks of `block_vocab` columns between threads. Per (row block, chunk) a
// thread keeps partial statistics (max, sum exp, target logit, sum of logits, sum exp * z,
// argmax); the chunks are merged as in `reference.merge_partials` (online log-sum-exp).
//
// Entry points (rows [M] int64 into hidden [N, H]; weight [V, H] contiguous in the operand
// dtype, float32 or bfloat16, hidden rows converted to it; bias float32; outputs float32):
//   lce_forward          lse, target logit, sum logits, entropy, argmax
//   lce_backward         grads from a saved lse and d out / d loss_t (recomputes Z)
//   lce_forward_backward the forward and, in the same pass, the grads of
//                        sum_m grad_scale[m] * loss[m]: a row block's logits are kept chunk
//                        by chunk in a [V, block_rows] slab until its lse is known, then
//                        turned into G^T in place: three GEMMs, none repeated. With
//                        token_scaling (DFT) the coefficient of row m is grad_scale[m] *
//                        p[m], p = exp(target logit - lse) taken once the block is merged.
// Gradient tiles whose every |d loss / d z| is below filter_eps (>= 0) are skipped, GEMMs
// included; a tile holding a non-finite value never is. grad_hidden is summed per thread
// in float32 [block_rows, H] buffers and written once per row block; grad_weight chunks
// are disjoint between threads, and each chunk's first contribution is written, not
// added (the accumulators come uninitialised).

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

using at::BFloat16;
using at::Tensor;
namespace cpublas = at::native::cpublas;

// ---------------------------------------------------------------------------------------
// Elementwise helpers
// ---------------------------------------------------------------------------------------

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

// float -> bfloat16 bits, round to nearest even, NaN kept (vectorisable, unlike the
// c10 conversion with its branch).
static inline uint16_t bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return (u & 0x7fffffffu) > 0x7f800000u ? uint16_t(0x7fc0) : uint16_t(rounded);
}

// ---------------------------------------------------------------------------------------
// GEMMs and operand packing
// ---------------------------------------------------------------------------------------

// bf16 operands use oneDNN's VNNI layout for B: pairs of consecutive K rows interleaved,
// [ceil(K / 2)][N][2], the odd row's partner zero.
template <typename T>
constexpr bool kVnni = std::is_same_v<T, BFloat16>;

template <typename T>
using Bits = std::conditional_t<kVnni<T>, uint16_t, float>;

// Elements of a packed B operand of K rows and N columns.
template <typename T>
static int64_t packed_size(int64_t K, int64_t N) {
  return (kVnni<T> ? (K + 1) / 2 * 2 : K) * N;
}

// C [M, N] (+)= A [M, K] @ B [K, N]; A row-major (lda), B packed (ldb = its N), C float32.
template <typename T>
static void gemm(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc,
                 bool accumulate, const T* A, const T* B, float* C) {
  cpublas::brgemm(M, N, K, lda, ldb, ldc, accumulate, A, B, C, kVnni<T>);
}

// The hidden size is cut into blocks of kHiddenBlock in every product where it is a
// dimension, so that a product's C block (backward) or B block (logits) stays in L2 while
// the other operand is reused. Measured on a 2-core Zen 5 (bf16 / fp32, 256-row blocks,
// 256-column chunks): at H=2048 the backward products went from 540 to 660 GF/s (bf16)
// and 250 to 370 GF/s (fp32); at H=512 it changes nothing.
constexpr int64_t kHiddenBlock = 256;

// C [M, N] (+)= A [M, K] @ B [K, N] with N (= ldb = ldc, the hidden size) cut into
// column blocks.
template <typename T>
static void gemm_by_columns(int64_t M, int64_t N, int64_t K, int64_t lda, bool accumulate,
                            const T* A, const T* B, float* C) {
  const int64_t nb = std::min(kHiddenBlock, N);
  for (int64_t c0 = 0; c0 < N; c0 += nb) {
    const int64_t width = std::min(nb, N - c0);
    gemm<T>(M, width, K, lda, N, N, accumulate, A, B + (kVnni<T> ? 2 * c0 : c0), C + c0);
  }
}

// C [M, N] = A [M, K] @ B [K, N] with K (the hidden size) cut into blocks of an even
// number of rows (a VNNI pair never straddles two), summed in C.
template <typename T>
static void gemm_by_depth(int64_t M, int64_t N, int64_t K, int64_t lda, const T* A,
                          const T* B, float* C) {
  const int64_t kb = std::min(2 * kHiddenBlock, K);
  for (int64_t k0 = 0; k0 < K; k0 += kb) {
    gemm<T>(M, N, std::min(kb, K - k0), lda, N, N, k0 > 0, A + k0, B + k0 * N, C);
  }
}

// B [K, N] from a row-major source (row k at src + k * lds) into dst (packed_size(K, N)).
template <typename T>
static void pack_b(const T* src_t, int64_t lds, int64_t K, int64_t N, T* dst_t) {
  auto src = reinterpret_cast<const Bits<T>*>(src_t);
  auto dst = reinterpret_cast<Bits<T>*>(dst_t);
  if constexpr (!kVnni<T>) {
    for (int64_t k = 0; k < K; ++k) std::memcpy(dst + k * N, src + k * lds, N * sizeof(float));
  } else {
    for (int64_t p = 0; p < (K + 1) / 2; ++p) {
      const uint16_t* r0 = src + 2 * p * lds;
      const uint16_t* r1 = r0 + lds;
      uint16_t* d = dst + 2 * p * N;
      if (2 * p + 1 < K) {
#pragma omp simd
        for (int64_t n = 0; n < N; ++n) {
          d[2 * n] = r0[n];
          d[2 * n + 1] = r1[n];
        }
      } else {
        for (int64_t n = 0; n < N; ++n) {
          d[2 * n] = r0[n];
          d[2 * n + 1] = 0;
        }
      }
    }
  }
}

// B [K, N] = src^T, src [N, K] row-major (row n at src + n * lds), into dst.
template <typename T>
static void pack_bt(const T* src_t, int64_t lds, int64_t N, int64_t K, T* dst_t) {
  auto src = reinterpret_cast<const Bits<T>*>(src_t);
  auto dst = reinterpret_cast<Bits<T>*>(dst_t);
  constexpr int64_t kBlock = 32;
  if constexpr (!kVnni<T>) {
    for (int64_t n0 = 0; n0 < N; n0 += kBlock) {
      for (int64_t k0 = 0; k0 < K; k0 += kBlock) {
        const int64_t n1 = std::min(N, n0 + kBlock), k1 = std::min(K, k0 + kBlock);
        for (int64_t n = n0; n < n1; ++n)
          for (int64_t k = k0; k < k1; ++k) dst[k * N + n] = src[n * lds + k];
      }
    }
  } else {
    const int64_t pairs = (K + 1) / 2;
    for (int64_t n0 = 0; n0 < N; n0 += kBlock) {
      for (int64_t p0 = 0; p0 < pairs; p0 += kBlock) {
        const int64_t n1 = std::min(N, n0 + kBlock), p1 = std::min(pairs, p0 + kBlock);
        for (int64_t n = n0; n < n1; ++n) {
          const uint16_t* s = src + n * lds;
          for (int64_t p = p0; p < p1; ++p) {
            uint16_t* d = dst + (p * N + n) * 2;
            d[0] = s[2 * p];
            d[1] = 2 * p + 1 < K ? s[2 * p + 1] : uint16_t(0);
          }
        }
      }
    }
  }
}

// W [V, H] as the B operand of grad_hidden = G @ W_c, chunk by chunk: float32 W is used as
// stored (undefined here); bf16 W is VNNI-packed once per call, chunk c (rows v0 .. v0 + w)
// at c * packed_size(bv, H), when the caller's memory budget holds that copy (else each
// tile packs its chunk: M / block_rows passes over W). In parallel over chunks.
template <typename T>
static Tensor pack_weight(const Tensor& weight, int64_t bv) {
  if constexpr (!kVnni<T>) {
    return Tensor();
  } else {
    const int64_t V = weight.size(0), H = weight.size(1), chunks = (V + bv - 1) / bv;
    const int64_t stride = packed_size<T>(bv, H);
    Tensor out = at::empty({chunks * stride}, weight.options());
    const T* src = weight.data_ptr<T>();
    T* dst = out.data_ptr<T>();
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t v0 = c * bv, w = std::min(bv, V - v0);
        pack_b<T>(src + v0 * H, H, w, H, dst + c * stride);
      }
    });
    return out;
  }
}

// G [n, w] = (G^T [w, n])^T in the operand dtype (bf16: rounded), blocked for the caches.
template <typename T>
static void transpose_tile(const float* gt, int64_t w, int64_t n, T* g_t) {
  auto g = reinterpret_cast<Bits<T>*>(g_t);
  constexpr int64_t kBlock = 32;
  for (int64_t i0 = 0; i0 < w; i0 += kBlock) {
    const int64_t i1 = std::min(w, i0 + kBlock);
    for (int64_t j0 = 0; j0 < n; j0 += kBlock) {
      const int64_t j1 = std::min(n, j0 + kBlock);
      for (int64_t j = j0; j < j1; ++j) {
        Bits<T>* dst = g + j * w;
#pragma omp simd
        for (int64_t i = i0; i < i1; ++i) {
          if constexpr (kVnni<T>) {
            dst[i] = bf16_bits(gt[i * n + j]);
          } else {
            dst[i] = gt[i * n + j];
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// Loss options and per-token statistics
// ---------------------------------------------------------------------------------------

struct LossParams {
  bool has_softcap;
  float softcap;
  float label_smoothing;
  float z_loss;
  float filter_eps;  // < 0: exact, no tile is skipped
  int64_t vocab;
  // z = logit_mul * softcap(r): logit scale and temperature folded in (Python's
  // kernel_logit_map); 1 skips the multiply. Its factor in dz/dr rides on gcoef.
  float logit_mul = 1.0f;
  // Class weights a [V] (nullptr: none): sum z becomes sum a z, and per kept row k the
  // gradient's p coefficient base pbase[k] = (1 - eps) a_y + eps / V sum a (else 1) and
  // its on-target term ontgt[k] = (1 - eps) a_y (else 1 - eps); smoothing eps / V a_j.
  const float* class_weight = nullptr;
  const float* pbase = nullptr;
  const float* ontgt = nullptr;
};

// Per (chunk, token) partial statistics of one row block, [chunks, rows] each: max m, sum
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

// Z^T = softcap(W_c Hb^T + b_c) for one tile, into z [width, n] (row i: vocab v0 + i).
template <typename T>
static void logits_tile(const T* w, int64_t H, const T* hbt, int64_t n, const float* bias,
                        int64_t v0, int64_t width, const LossParams& p, float* z) {
  gemm_by_depth<T>(width, n, H, H, w + v0 * H, hbt, z);
  if (bias != nullptr) {
    for (int64_t i = 0; i < width; ++i) {
      const float b = bias[v0 + i];
      float* zr = z + i * n;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) zr[j] += b;
    }
  }
  if (p.has_softcap) {
    const float cap = p.softcap, inv = 1.0f / p.softcap;
    const int64_t count = width * n;
#pragma omp simd
    for (int64_t k = 0; k < count; ++k) z[k] = softcap_fn(z[k], cap, inv);
  }
  if (p.logit_mul != 1.0f) {  // scale / temperature (never on the default path)
    const float mul = p.logit_mul;
    const int64_t count = width * n;
#pragma omp simd
    for (int64_t k = 0; k < count; ++k) z[k] *= mul;
  }
}

// Per-token statistics of one tile z [width, n] (vocab v0 ...) into partials[c].
static void tile_stats(const float* z, int64_t width, int64_t n, int64_t c, int64_t v0,
                       const int64_t* tgt, Partials& P, const float* class_weight) {
  float* m = P.m[c].data_ptr<float>();
  float* s = P.s[c].data_ptr<float>();
  float* tz = P.tz[c].data_ptr<float>();
  float* sz = P.sz[c].data_ptr<float>();
  float* ez = P.ez.defined() ? P.ez[c].data_ptr<float>() : nullptr;
  float* av = P.av.defined() ? P.av[c].data_ptr<float>() : nullptr;
  int64_t* ai = P.ai.defined() ? P.ai[c].data_ptr<int64_t>() : nullptr;
  std::vector<float> poison(n, 0.0f);
  std::vector<int32_t> arg(n, 0);
  float* bad = poison.data();
  int32_t* a = arg.data();
  for (int64_t j = 0; j < n; ++j) {
    m[j] = -std::numeric_limits<float>::infinity();
    sz[j] = 0.0f;
    s[j] = 0.0f;
    if (ez != nullptr) ez[j] = 0.0f;
  }
  // Pass 1: max (first maximum for the argmax: strict >), sum, and a NaN once any logit
  // is inf or NaN.
  for (int64_t i = 0; i < width; ++i) {
    const float* zr = z + i * n;
    // sum z, or sum a z under class weights (times 1: exact on the default path)
    const float wi = class_weight != nullptr ? class_weight[v0 + i] : 1.0f;
    if (ai != nullptr) {
      const int32_t row = static_cast<int32_t>(i);
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        const float v = zr[j];
        const bool gt = v > m[j];
        a[j] = gt ? row : a[j];
        m[j] = gt ? v : m[j];
        sz[j] += v * wi;
        bad[j] += v * 0.0f;
      }
    } else {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        const float v = zr[j];
        m[j] = v > m[j] ? v : m[j];
        sz[j] += v * wi;
        bad[j] += v * 0.0f;
      }
    }
  }
  // Pass 2: sum exp(z - m), and sum exp(z - m) (z - m) for the entropy (shifted: the
  // largest terms are ~0, not ~max z).
  for (int64_t i = 0; i < width; ++i) {
    const float* zr = z + i * n;
    if (ez != nullptr) {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        const float d = zr[j] - m[j];
        const float e = fast_exp(d);
        s[j] += e;
        ez[j] += e * d;
      }
    } else {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) s[j] += fast_exp(zr[j] - m[j]);
    }
  }
  for (int64_t j = 0; j < n; ++j) {
    // A non-finite logit makes the token NaN (as F.cross_entropy does); the NaN max
    // carries that through the merge.
    const bool is_bad = !(bad[j] == 0.0f);
    const int64_t y = tgt[j] - v0;
    tz[j] = (y >= 0 && y < width) ? z[y * n + j] : 0.0f;
    if (ez != nullptr && is_bad) ez[j] = NAN;
    if (ai != nullptr) {
      av[j] = is_bad ? NAN : m[j];
      ai[j] = v0 + a[j];
    }
    if (is_bad) m[j] = NAN;
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

// G^T = gcoef_j * d loss_j / d r_ij for one tile z [width, n], in place:
// d loss / d r = (p (1 + 2 lam lse) - eps / V - [target] (1 - eps)) * softcap'(z). Returns
// whether the tile counts (some |d loss / d r| >= filter_eps, or a non-finite value).
// r0: the row block's first kept row (for the per-row class-weight coefficients).
static bool grad_tile(float* z, int64_t width, int64_t n, int64_t v0, const int64_t* tgt,
                      const float* lse, const float* gcoef, const LossParams& p, int64_t r0) {
  const float smooth = p.label_smoothing / static_cast<float>(p.vocab);
  const float* cw = p.class_weight;
  const float* pbase = p.pbase != nullptr ? p.pbase + r0 : nullptr;
  const float* ontgt = p.ontgt != nullptr ? p.ontgt + r0 : nullptr;
  // softcap' in terms of z = mul * cap * tanh(r / cap): 1 - (z / (cap * mul))^2
  const float inv_cap = p.has_softcap ? 1.0f / (p.softcap * p.logit_mul) : 0.0f;
  std::vector<float> pscale(n), target_z(n), on_target(n, 1.0f - p.label_smoothing);
  std::vector<int32_t> target_row(n);
  for (int64_t j = 0; j < n; ++j) {
    // z_loss adds 2 lam lse p_j
    pscale[j] = (pbase != nullptr ? pbase[j] : 1.0f) + 2.0f * p.z_loss * lse[j];
    if (ontgt != nullptr) on_target[j] = ontgt[j];
    const int64_t y = tgt[j] - v0;
    target_row[j] = (y >= 0 && y < width) ? static_cast<int32_t>(y) : -1;
    target_z[j] = (y >= 0 && y < width) ? z[y * n + j] : 0.0f;
  }
  const float* ps = pscale.data();
  const int32_t* yr = target_row.data();
  float tile_max = 0.0f, poison = 0.0f;
  for (int64_t i = 0; i < width; ++i) {
    float* zr = z + i * n;
    const int32_t row = static_cast<int32_t>(i);
    const float sm = cw != nullptr ? smooth * cw[v0 + i] : smooth;
    float mx = 0.0f, b = 0.0f;
    // The target entries are rewritten below; p_y - (1 - eps) cancels and must enter the
    // max as such, so they count 0 here.
    if (p.has_softcap) {
#pragma omp simd reduction(max : mx) reduction(+ : b)
      for (int64_t j = 0; j < n; ++j) {
        const float zc = zr[j] * inv_cap;
        const float d = (fast_exp(zr[j] - lse[j]) * ps[j] - sm) * (1.0f - zc * zc);
        mx = std::max(mx, yr[j] == row ? 0.0f : std::fabs(d));
        b += d * 0.0f;
        zr[j] = d * gcoef[j];
      }
    } else {
#pragma omp simd reduction(max : mx) reduction(+ : b)
      for (int64_t j = 0; j < n; ++j) {
        const float d = fast_exp(zr[j] - lse[j]) * ps[j] - sm;
        mx = std::max(mx, yr[j] == row ? 0.0f : std::fabs(d));
        b += d * 0.0f;
        zr[j] = d * gcoef[j];
      }
    }
    tile_max = std::max(tile_max, mx);
    poison += b;
  }
  for (int64_t j = 0; j < n; ++j) {
    if (yr[j] < 0) continue;
    const float ty = target_z[j];
    const float zc = ty * inv_cap;
    const float cap_grad = p.has_softcap ? 1.0f - zc * zc : 1.0f;
    const float sy = cw != nullptr ? smooth * cw[tgt[j]] : smooth;
    const float d = (fast_exp(ty - lse[j]) * ps[j] - sy - on_target[j]) * cap_grad;
    tile_max = std::max(tile_max, std::fabs(d));
    poison += d * 0.0f;
    z[yr[j] * n + j] = d * gcoef[j];
  }
  return !(poison == 0.0f) || !(tile_max < p.filter_eps);
}

// ---------------------------------------------------------------------------------------
// Row blocks and gradient products
// ---------------------------------------------------------------------------------------

struct Blocks {
  int64_t rows, vocab, chunks;
};

static Blocks blocks_for(int64_t V, int64_t block_rows, int64_t block_vocab) {
  TORCH_CHECK(block_rows > 0 && block_vocab > 0, "block sizes must be positive");
  const int64_t bv = std::min(block_vocab, V);
  return {block_rows, bv, (V + bv - 1) / bv};
}

// One row block's hidden states in the operand dtype: rows [n, H], and the packed B
// operands of the two products that take them: Hb^T (logits) and Hb (grad_weight).
template <typename T>
struct RowBlock {
  Tensor rows;  // [n, H] contiguous, operand dtype
  Tensor hbt;   // packed Hb^T [H, n]
  Tensor hb;    // packed Hb [n, H] (float: rows itself); undefined unless asked for
  int64_t n;

  RowBlock(const Tensor& hidden, const Tensor& row_index, int64_t r0, int64_t n_rows,
           at::ScalarType dtype, bool want_hb)
      : n(n_rows) {
    const int64_t H = hidden.size(1);
    rows = hidden.index_select(0, row_index.narrow(0, r0, n)).to(dtype).contiguous();
    hbt = at::empty({packed_size<T>(H, n)}, rows.options());
    pack_bt<T>(rows.data_ptr<T>(), H, n, H, hbt.data_ptr<T>());
    if (want_hb) {
      if constexpr (kVnni<T>) {
        hb = at::empty({packed_size<T>(n, H)}, rows.options());
        pack_b<T>(rows.data_ptr<T>(), H, n, H, hb.data_ptr<T>());
      } else {
        hb = rows;
      }
    }
  }
};

struct GradOutputs {
  Tensor grad_hidden;  // [N, H] in hidden's dtype, or undefined
  Tensor grad_weight;  // [V, H] accumulator (float32 or the accum dtype), or undefined
  Tensor grad_bias;    // [V] float32 accumulator, or undefined
  const void* weight;  // W [V, H] in the operand dtype
  Tensor weight_b;     // bf16 with `pack_weight`: W VNNI-packed by chunks; else per tile
  int64_t block_vocab;
};

// Per-thread scratch of the gradient products.
template <typename T>
struct GradScratch {
  Tensor gt_lp;  // bf16: G^T rounded, the A operand of grad_weight [w, n]
  Tensor g;      // G [n, w] in the operand dtype, the A operand of grad_hidden
  Tensor wb;     // bf16: W_c VNNI-packed, the B operand of grad_hidden
  Tensor dw;     // float32 [w, H] product when the accumulator is not float32
  GradScratch(int64_t bv, int64_t bm, int64_t H, bool lp_accum, bool need_hidden,
              bool packed_weight) {
    auto o = at::TensorOptions().dtype(kVnni<T> ? at::kBFloat16 : at::kFloat);
    if constexpr (kVnni<T>) gt_lp = at::empty({bv * bm}, o);
    if (need_hidden) g = at::empty({bv * bm}, o);
    if (kVnni<T> && need_hidden && !packed_weight) wb = at::empty({packed_size<T>(bv, H)}, o);
    if (lp_accum) dw = at::empty({bv, H}, at::TensorOptions().dtype(at::kFloat));
  }
};

// The backward products of one gradient tile G^T [w, n] float32 (vocab v0 ...).
// `first`: the first contribution to this chunk's grad_weight / grad_bias rows, which
// are then written, not added to (the accumulators start uninitialised: no [V, H] memset).
template <typename T>
static void grad_gemms(const float* gt, int64_t w, int64_t n, int64_t v0, int64_t H,
                       int64_t V, const RowBlock<T>& blk, GradOutputs& out,
                       GradScratch<T>& scratch, float* dh_part, bool first) {
  const T* a_op;  // G^T [w, n], the A operand of grad_weight
  if constexpr (kVnni<T>) {
    // G rounded to bf16 (as the Triton kernels do), each product summed in float32.
    uint16_t* ga = reinterpret_cast<uint16_t*>(scratch.gt_lp.data_ptr());
    const int64_t count = w * n;
#pragma omp simd
    for (int64_t k = 0; k < count; ++k) ga[k] = bf16_bits(gt[k]);
    a_op = scratch.gt_lp.template data_ptr<T>();
  } else {
    a_op = gt;
  }
  if (out.grad_weight.defined()) {
    if (out.grad_weight.scalar_type() == at::kFloat) {
      gemm_by_columns<T>(w, H, n, n, !first, a_op, blk.hb.template data_ptr<T>(),
                         out.grad_weight.data_ptr<float>() + v0 * H);
    } else {  // accum_dtype = the weight's dtype: sums in that dtype
      Tensor prod = scratch.dw.narrow(0, 0, w);
      gemm_by_columns<T>(w, H, n, n, false, a_op, blk.hb.template data_ptr<T>(),
                         prod.data_ptr<float>());
      if (first) {
        out.grad_weight.narrow(0, v0, w).copy_(prod);
      } else {
        out.grad_weight.narrow(0, v0, w).add_(prod);
      }
    }
  }
  if (dh_part != nullptr) {  // grad_hidden [n, H] += G [n, w] @ W_c [w, H]
    T* g = scratch.g.template data_ptr<T>();
    transpose_tile<T>(gt, w, n, g);
    // W_c as stored (float32), or VNNI-packed here: per tile, which costs
    // (M / block_rows) passes over W but no [V, H] copy of it
    const T* wb = static_cast<const T*>(out.weight) + v0 * H;
    if constexpr (kVnni<T>) {
      if (out.weight_b.defined()) {
        wb = out.weight_b.template data_ptr<T>() +
             (v0 / out.block_vocab) * packed_size<T>(out.block_vocab, H);
      } else {
        pack_b<T>(wb, H, w, H, scratch.wb.template data_ptr<T>());
        wb = scratch.wb.template data_ptr<T>();
      }
    }
    gemm_by_columns<T>(n, H, w, w, true, g, wb, dh_part);
  }
  if (out.grad_bias.defined()) {
    float* gb = out.grad_bias.data_ptr<float>() + v0;
    for (int64_t i = 0; i < w; ++i) {
      const float* r = gt + i * n;
      float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
      for (int64_t j = 0; j < n; ++j) acc += r[j];
      gb[i] = first ? acc : gb[i] + acc;
    }
  }
}

// Zero the grad_weight / grad_bias rows of a chunk that no tile has written.
static void zero_chunk(GradOutputs& out, int64_t v0, int64_t w) {
  if (out.grad_weight.defined()) out.grad_weight.narrow(0, v0, w).zero_();
  if (out.grad_bias.defined()) out.grad_bias.narrow(0, v0, w).zero_();
}

// Sum of the threads' grad_hidden parts [threads][n * H] of one row block, written to its rows.
static void write_grad_hidden(GradOutputs& out, const Tensor& parts, const Tensor& rows,
                              int64_t r0, int64_t n, int64_t H) {
  Tensor dh = parts.narrow(1, 0, n * H).sum(0).view({n, H});
  out.grad_hidden.index_copy_(0, rows.narrow(0, r0, n), dh.to(out.grad_hidden.scalar_type()));
}

static void check_common(const Tensor& hidden, const Tensor& weight, const c10::optional<Tensor>& bias,
                         const Tensor& rows, const Tensor& targets) {
  TORCH_CHECK(hidden.device().is_cpu() && weight.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK((weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16) &&
                  weight.is_contiguous() && weight.dim() == 2,
              "weight must be a contiguous float32 or bfloat16 [V, H]");
  TORCH_CHECK(hidden.dim() == 2 && hidden.size(1) == weight.size(1), "hidden must be [N, H]");
  TORCH_CHECK(!bias.has_value() || (bias->scalar_type() == at::kFloat && bias->is_contiguous()),
              "bias must be contiguous float32");
  TORCH_CHECK(rows.scalar_type() == at::kLong && targets.scalar_type() == at::kLong &&
                  targets.is_contiguous() && rows.numel() == targets.numel(),
              "rows and targets must be int64 [M]");
}

static const float* f32_ptr(const c10::optional<Tensor>& t, int64_t numel, const char* name) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == numel,
              name, " must be contiguous float32 of ", numel, " elements");
  return t->data_ptr<float>();
}

// class_weight [V], pbase / ontgt [M] (all or none; see LossParams).
static LossParams params(int64_t V, c10::optional<double> softcap, double label_smoothing,
                         double z_loss, double filter_eps, double logit_mul = 1.0,
                         const c10::optional<Tensor>& class_weight = c10::nullopt,
                         const c10::optional<Tensor>& pbase = c10::nullopt,
                         const c10::optional<Tensor>& ontgt = c10::nullopt, int64_t M = 0) {
  LossParams p{softcap.has_value(), static_cast<float>(softcap.value_or(1.0)),
               static_cast<float>(label_smoothing), static_cast<float>(z_loss),
               static_cast<float>(filter_eps), V};
  p.logit_mul = static_cast<float>(logit_mul);
  p.class_weight = f32_ptr(class_weight, V, "class_weight");
  p.pbase = f32_ptr(pbase, M, "pbase");
  p.ontgt = f32_ptr(ontgt, M, "ontgt");
  return p;
}

static const float* bias_ptr(const c10::optional<Tensor>& bias) {
  return bias.has_value() ? bias->data_ptr<float>() : nullptr;
}

// The row statistics outputs [M] and their writing from a merged row block.
struct Stats {
  Tensor lse, tz, sz, ent, arg;
  Stats(int64_t M, bool want_entropy, bool want_argmax) {
    auto f = at::TensorOptions().dtype(at::kFloat);
    lse = at::empty({M}, f);
    tz = at::empty({M}, f);
    sz = at::empty({M}, f);
    ent = want_entropy ? at::empty({M}, f) : at::empty({0}, f);
    arg = want_argmax ? at::empty({M}, f.dtype(at::kLong)) : at::empty({0}, f.dtype(at::kLong));
  }
  void write(const Partials& P, int64_t r0, int64_t n) {
    auto st = merge(P);
    lse.narrow(0, r0, n).copy_(st[0]);
    tz.narrow(0, r0, n).copy_(st[1]);
    sz.narrow(0, r0, n).copy_(st[2]);
    if (st[3].defined()) ent.narrow(0, r0, n).copy_(st[3]);
    if (st[4].defined()) arg.narrow(0, r0, n).copy_(st[4]);
  }
};

// ---------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------

// The logits and statistics of one row block, chunks split between threads: chunk c's
// tile [width, n] goes to tile_of(c) (a per-thread buffer, or the slab).
template <typename T, typename TileOf>
static void block_forward(const T* w, int64_t V, int64_t H, const RowBlock<T>& blk,
                          const float* bias, const LossParams& p, const Blocks& b,
                          const int64_t* tgt, Partials& P, TileOf tile_of) {
  at::parallel_for(0, b.chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t v0 = c * b.vocab, width = std::min(b.vocab, V - v0);
      float* z = tile_of(c);
      logits_tile<T>(w, H, blk.hbt.template data_ptr<T>(), blk.n, bias, v0, width, p, z);
      tile_stats(z, width, blk.n, c, v0, tgt, P, p.class_weight);
    }
    cpublas::brgemm_release(kVnni<T>);
  });
}

template <typename T>
static std::vector<Tensor> forward_impl(const Tensor& hidden, const Tensor& weight,
                                        const c10::optional<Tensor>& bias, const Tensor& rows,
                                        const Tensor& targets, const LossParams& p,
                                        bool want_entropy, bool want_argmax, const Blocks& b) {
  const int64_t M = rows.numel(), V = weight.size(0), H = weight.size(1);
  Stats out(M, want_entropy, want_argmax);
  const int64_t* tgt_all = targets.data_ptr<int64_t>();
  const T* w = weight.data_ptr<T>();
  for (int64_t r0 = 0; r0 < M; r0 += b.rows) {
    const int64_t n = std::min(b.rows, M - r0);
    RowBlock<T> blk(hidden, rows, r0, n, weight.scalar_type(), false);
    Partials P(b.chunks, n, want_entropy, want_argmax);
    // each thread's chunks in turn through its own tile buffer
    std::vector<std::vector<float>> tiles(at::get_num_threads());
    block_forward<T>(w, V, H, blk, bias_ptr(bias), p, b, tgt_all + r0, P, [&](int64_t) {
      std::vector<float>& tile = tiles[at::get_thread_num()];
      tile.resize(b.vocab * n);
      return tile.data();
    });
    out.write(P, r0, n);
  }
  return {out.lse, out.tz, out.sz, out.ent, out.arg};
}

// The forward over all kept rows: [lse, target logit, sum logits, entropy?, argmax?], [M] each.
std::vector<Tensor> lce_forward(const Tensor& hidden, const Tensor& weight,
                                const c10::optional<Tensor>& bias, const Tensor& rows,
                                const Tensor& targets, c10::optional<double> softcap,
                                double logit_mul, c10::optional<Tensor> class_weight,
                                bool want_entropy, bool want_argmax, int64_t block_rows,
                                int64_t block_vocab) {
  check_common(hidden, weight, bias, rows, targets);
  const LossParams p = params(weight.size(0), softcap, 0.0, 0.0, -1.0, logit_mul, class_weight);
  const Blocks b = blocks_for(weight.size(0), block_rows, block_vocab);
  if (weight.scalar_type() == at::kBFloat16)
    return forward_impl<BFloat16>(hidden, weight, bias, rows, targets, p, want_entropy,
                                  want_argmax, b);
  return forward_impl<float>(hidden, weight, bias, rows, targets, p, want_entropy, want_argmax, b);
}

// What the two backward entry points share: outputs, blocks, per-thread grad_hidden parts.
struct Backward {
  GradOutputs out;
  Blocks b;
  LossParams p;
  Tensor parts;  // float32 [threads, block_rows * H] grad_hidden parts, or undefined
  bool pack_w = false;  // bf16: VNNI-pack W once (`pack_weight`) instead of per tile
  std::vector<int64_t> skipped;
  std::vector<uint8_t> written;  // per chunk: its grad_weight / grad_bias rows hold a value
  int64_t tiles = 0;

  Backward(const Tensor& weight, int64_t M, const LossParams& lp, int64_t block_rows,
           int64_t block_vocab, c10::optional<Tensor> grad_hidden,
           c10::optional<Tensor> grad_weight, c10::optional<Tensor> grad_bias)
      : out{grad_hidden.value_or(Tensor()), grad_weight.value_or(Tensor()),
            grad_bias.value_or(Tensor()), weight.data_ptr(), Tensor(),
            std::min(block_vocab, weight.size(0))},
        b(blocks_for(weight.size(0), block_rows, block_vocab)),
        p(lp),
        skipped(b.chunks, 0),
        written(b.chunks, 0) {
    const int64_t H = weight.size(1);
    if (out.grad_hidden.defined()) {
      parts = at::empty({at::get_num_threads(), H * std::min(b.rows, M)},
                        at::TensorOptions().dtype(at::kFloat));
    }
  }

  bool lp_accum() const {
    return out.grad_weight.defined() && out.grad_weight.scalar_type() != at::kFloat;
  }

  // The gradient of tile c of a row block (logits in z), skipped or multiplied out.
  template <typename T>
  void tile(float* z, int64_t c, int64_t width, const RowBlock<T>& blk, const int64_t* tgt,
            const float* lse, const float* gcoef, int64_t V, int64_t H,
            GradScratch<T>& scratch, float* part, int64_t r0) {
    const int64_t v0 = c * b.vocab;
    const bool first = !written[c];
    written[c] = 1;
    if (!grad_tile(z, width, blk.n, v0, tgt, lse, gcoef, p, r0)) {
      ++skipped[c];
      if (first) zero_chunk(out, v0, width);
      return;
    }
    grad_gemms<T>(z, width, blk.n, v0, H, V, blk, out, scratch, part, first);
  }

  float* part_of_thread() {
    if (!parts.defined()) return nullptr;
    Tensor part = parts[at::get_thread_num()];
    return part.data_ptr<float>();
  }

  void begin_block() {
    if (parts.defined()) parts.zero_();
  }

  void end_block(const Tensor& rows, int64_t r0, int64_t n, int64_t H) {
    tiles += b.chunks;
    if (out.grad_hidden.defined()) write_grad_hidden(out, parts, rows, r0, n, H);
  }

  // Chunks that no row block reached (no kept rows at all) get zeros.
  void finish(int64_t V) {
    for (int64_t c = 0; c < b.chunks; ++c) {
      if (!written[c]) zero_chunk(out, c * b.vocab, std::min(b.vocab, V - c * b.vocab));
    }
  }

  int64_t total_skipped() const {
    int64_t total = 0;
    for (int64_t k : skipped) total += k;
    return total;
  }
};

template <typename T>
static void backward_impl(const Tensor& hidden, const Tensor& weight,
                          const c10::optional<Tensor>& bias, const Tensor& rows,
                          const Tensor& targets, const Tensor& lse, const Tensor& gcoef,
                          Backward& bw) {
  const int64_t M = rows.numel(), V = weight.size(0), H = weight.size(1);
  const Blocks& b = bw.b;
  const T* w = weight.data_ptr<T>();
  const bool need_hb = bw.out.grad_weight.defined();
  if (bw.pack_w && bw.out.grad_hidden.defined()) bw.out.weight_b = pack_weight<T>(weight, b.vocab);
  for (int64_t r0 = 0; r0 < M; r0 += b.rows) {
    const int64_t n = std::min(b.rows, M - r0);
    RowBlock<T> blk(hidden, rows, r0, n, weight.scalar_type(), need_hb);
    bw.begin_block();
    at::parallel_for(0, b.chunks, 1, [&](int64_t c0, int64_t c1) {
      std::vector<float> tile(b.vocab * n);
      GradScratch<T> scratch(b.vocab, n, H, bw.lp_accum(), bw.out.grad_hidden.defined(),
                             bw.out.weight_b.defined());
      float* part = bw.part_of_thread();
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t v0 = c * b.vocab, width = std::min(b.vocab, V - v0);
        logits_tile<T>(w, H, blk.hbt.template data_ptr<T>(), n, bias_ptr(bias), v0, width,
                       bw.p, tile.data());
        bw.tile<T>(tile.data(), c, width, blk, targets.data_ptr<int64_t>() + r0,
                   lse.data_ptr<float>() + r0, gcoef.data_ptr<float>() + r0, V, H, scratch,
                   part, r0);
      }
      cpublas::brgemm_release(kVnni<T>);
    });
    bw.end_block(rows, r0, n, H);
  }
  bw.finish(V);
}

// The backward from a saved lse [M] and gcoef [M] (d out / d loss_t): recomputes each
// logit tile once. Writes into the given outputs; returns (tiles skipped, tiles).
std::vector<int64_t> lce_backward(const Tensor& hidden, const Tensor& weight,
                                  const c10::optional<Tensor>& bias, const Tensor& rows,
                                  const Tensor& targets, const Tensor& lse, const Tensor& gcoef,
                                  c10::optional<double> softcap, double logit_mul,
                                  c10::optional<Tensor> class_weight, c10::optional<Tensor> pbase,
                                  c10::optional<Tensor> ontgt, double label_smoothing,
                                  double z_loss, double filter_eps, c10::optional<Tensor> grad_hidden,
                                  c10::optional<Tensor> grad_weight, c10::optional<Tensor> grad_bias,
                                  bool pack_w, int64_t block_rows, int64_t block_vocab) {
  check_common(hidden, weight, bias, rows, targets);
  TORCH_CHECK(lse.scalar_type() == at::kFloat && gcoef.scalar_type() == at::kFloat &&
                  lse.is_contiguous() && gcoef.is_contiguous(),
              "lse and gcoef must be contiguous float32 [M]");
  const int64_t V = weight.size(0);
  Backward bw(weight, rows.numel(),
              params(V, softcap, label_smoothing, z_loss, filter_eps, logit_mul, class_weight,
                     pbase, ontgt, rows.numel()),
              block_rows, block_vocab, grad_hidden, grad_weight, grad_bias);
  bw.pack_w = pack_w;
  if (weight.scalar_type() == at::kBFloat16) {
    backward_impl<BFloat16>(hidden, weight, bias, rows, targets, lse, gcoef, bw);
  } else {
    backward_impl<float>(hidden, weight, bias, rows, targets, lse, gcoef, bw);
  }
  return {bw.total_skipped(), bw.tiles};
}

template <typename T>
static std::vector<Tensor> forward_backward_impl(const Tensor& hidden, const Tensor& weight,
                                                 const c10::optional<Tensor>& bias,
                                                 const Tensor& rows, const Tensor& targets,
                                                 const Tensor& gcoef, bool want_entropy,
                                                 bool want_argmax, bool token_scaling,
                                                 Backward& bw) {
  const int64_t M = rows.numel(), V = weight.size(0), H = weight.size(1);
  const Blocks& b = bw.b;
  const T* w = weight.data_ptr<T>();
  const bool need_hb = bw.out.grad_weight.defined();
  if (bw.pack_w && bw.out.grad_hidden.defined()) bw.out.weight_b = pack_weight<T>(weight, b.vocab);
  const int64_t bm = std::min(b.rows, M);
  // One row block's logits, chunk-major so that each tile is contiguous.
  Tensor slab = at::empty({b.chunks, b.vocab * std::max<int64_t>(bm, 1)},
                          at::TensorOptions().dtype(at::kFloat));
  Stats out(M, want_entropy, want_argmax);
  const int64_t* tgt_all = targets.data_ptr<int64_t>();
  std::vector<float> scaled(token_scaling ? bm : 0);  // one row block's scaled coefficients
  for (int64_t r0 = 0; r0 < M; r0 += b.rows) {
    const int64_t n = std::min(b.rows, M - r0);
    RowBlock<T> blk(hidden, rows, r0, n, weight.scalar_type(), need_hb);
    Partials P(b.chunks, n, want_entropy, want_argmax);
    block_forward<T>(w, V, H, blk, bias_ptr(bias), bw.p, b, tgt_all + r0, P,
                     [&](int64_t c) { return slab[c].data_ptr<float>(); });
    out.write(P, r0, n);
    // Token scaling: the block's lse and target logits are known now, so its
    // coefficients become gcoef_j * p_j, p_j = exp(tz_j - lse_j) (no gradient through p).
    const float* coef = gcoef.data_ptr<float>() + r0;
    if (token_scaling) {
      const float* lse_b = out.lse.data_ptr<float>() + r0;
      const float* tz_b = out.tz.data_ptr<float>() + r0;
      for (int64_t j = 0; j < n; ++j) scaled[j] = coef[j] * std::exp(tz_b[j] - lse_b[j]);
      coef = scaled.data();
    }
    bw.begin_block();
    at::parallel_for(0, b.chunks, 1, [&](int64_t c0, int64_t c1) {
      GradScratch<T> scratch(b.vocab, n, H, bw.lp_accum(), bw.out.grad_hidden.defined(),
                             bw.out.weight_b.defined());
      float* part = bw.part_of_thread();
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t width = std::min(b.vocab, V - c * b.vocab);
        bw.tile<T>(slab[c].data_ptr<float>(), c, width, blk, tgt_all + r0,
                   out.lse.data_ptr<float>() + r0, coef, V, H, scratch, part, r0);
      }
      cpublas::brgemm_release(kVnni<T>);
    });
    bw.end_block(rows, r0, n, H);
  }
  bw.finish(V);
  Tensor counts = at::tensor(std::vector<int64_t>{bw.total_skipped(), bw.tiles}, at::kLong);
  return {out.lse, out.tz, out.sz, out.ent, out.arg, counts};
}

// The forward and the gradients of sum_m gcoef[m] * loss[m] (token_scaling: of
// sum_m gcoef[m] * p[m] * loss[m], p = exp(target logit - lse) a constant) in one pass.
// Returns [lse, target logit, sum logits, entropy?, argmax?, (tiles skipped, tiles)].
std::vector<Tensor> lce_forward_backward(
    const Tensor& hidden, const Tensor& weight, const c10::optional<Tensor>& bias,
    const Tensor& rows, const Tensor& targets, const Tensor& gcoef, c10::optional<double> softcap,
    double logit_mul, c10::optional<Tensor> class_weight, c10::optional<Tensor> pbase,
    c10::optional<Tensor> ontgt, double label_smoothing, double z_loss, double filter_eps, bool want_entropy, bool want_argmax,
    bool token_scaling, c10::optional<Tensor> grad_hidden, c10::optional<Tensor> grad_weight,
    c10::optional<Tensor> grad_bias, bool pack_w, int64_t block_rows, int64_t block_vocab) {
  check_common(hidden, weight, bias, rows, targets);
  TORCH_CHECK(gcoef.scalar_type() == at::kFloat && gcoef.is_contiguous(),
              "grad_scale must be contiguous float32 [M]");
  const int64_t V = weight.size(0);
  Backward bw(weight, rows.numel(),
              params(V, softcap, label_smoothing, z_loss, filter_eps, logit_mul, class_weight,
                     pbase, ontgt, rows.numel()),
              block_rows, block_vocab, grad_hidden, grad_weight, grad_bias);
  bw.pack_w = pack_w;
  if (weight.scalar_type() == at::kBFloat16)
    return forward_backward_impl<BFloat16>(hidden, weight, bias, rows, targets, gcoef,
                                           want_entropy, want_argmax, token_scaling, bw);
  return forward_backward_impl<float>(hidden, weight, bias, rows, targets, gcoef, want_entropy,
                                      want_argmax, token_scaling, bw);
}

// The products alone, with the kernels' blocking and packing and no elementwise work: the
// logits GEMM (and, with `backward`, the two gradient GEMMs on the raw logits). For the
// benchmark's breakdown of where the time goes; returns one checksum.
template <typename T>
static double gemms_impl(const Tensor& hidden, const Tensor& weight, const Tensor& rows,
                         bool backward, bool pack_w, const Blocks& b) {
  const int64_t M = rows.numel(), V = weight.size(0), H = weight.size(1);
  GradOutputs out{};
  Tensor parts;
  if (backward) {
    out.grad_weight = at::zeros({V, H}, at::TensorOptions().dtype(at::kFloat));
    out.weight = weight.data_ptr();
    out.block_vocab = b.vocab;
    if (pack_w) out.weight_b = pack_weight<T>(weight, b.vocab);
    parts = at::zeros({at::get_num_threads(), H * std::min(b.rows, M)},
                      at::TensorOptions().dtype(at::kFloat));
  }
  const T* w = weight.data_ptr<T>();
  const LossParams p{false, 1.0f, 0.0f, 0.0f, -1.0f, V};
  for (int64_t r0 = 0; r0 < M; r0 += b.rows) {
    const int64_t n = std::min(b.rows, M - r0);
    RowBlock<T> blk(hidden, rows, r0, n, weight.scalar_type(), backward);
    at::parallel_for(0, b.chunks, 1, [&](int64_t c0, int64_t c1) {
      std::vector<float> tile(b.vocab * n);
      GradScratch<T> scratch(b.vocab, n, H, false, backward, out.weight_b.defined());
      float* part = backward ? parts[at::get_thread_num()].data_ptr<float>() : nullptr;
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t v0 = c * b.vocab, width = std::min(b.vocab, V - v0);
        logits_tile<T>(w, H, blk.hbt.template data_ptr<T>(), n, nullptr, v0, width, p,
                       tile.data());
        if (backward)
          grad_gemms<T>(tile.data(), width, n, v0, H, V, blk, out, scratch, part, false);
      }
      cpublas::brgemm_release(kVnni<T>);
    });
  }
  return backward ? out.grad_weight.sum().item<double>() + parts.sum().item<double>() : 0.0;
}

double lce_gemms(const Tensor& hidden, const Tensor& weight, const Tensor& rows, bool backward,
                 bool pack_w, int64_t block_rows, int64_t block_vocab) {
  check_common(hidden, weight, c10::nullopt, rows, rows);
  const Blocks b = blocks_for(weight.size(0), block_rows, block_vocab);
  if (weight.scalar_type() == at::kBFloat16)
    return gemms_impl<BFloat16>(hidden, weight, rows, backward, pack_w, b);
  return gemms_impl<float>(hidden, weight, rows, backward, pack_w, b);
}

// Whether this CPU (and this process's oneDNN settings) runs the bf16 micro-kernel; where
// it does not, the caller computes in float32.
bool bf16_supported() {
  try {
    float a[4] = {1.0f, 2.0f, 3.0f, 4.0f};
    BFloat16 A[4], B[4];
    for (int k = 0; k < 4; ++k) A[k] = B[k] = BFloat16(a[k]);
    float C[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    // A [2, 2] @ B [2, 2], B in VNNI layout: [1][2][2]
    BFloat16 Bv[4] = {B[0], B[2], B[1], B[3]};
    cpublas::brgemm(2, 2, 2, 2, 2, 2, false, A, Bv, C, true);
    cpublas::brgemm_release(true);
    return C[0] == 7.0f && C[1] == 10.0f && C[2] == 15.0f && C[3] == 22.0f;
  } catch (const std::exception&) {
    return false;
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lce_forward", &lce_forward, "row statistics of the kept rows");
  m.def("lce_backward", &lce_backward, "gradients from a saved lse");
  m.def("lce_forward_backward", &lce_forward_backward, "forward and gradients in one pass");
  m.def("lce_gemms", &lce_gemms, "the products alone (benchmark breakdown)");
  m.def("bf16_supported", &bf16_supported, "whether the bf16 GEMM micro-kernel runs here");
}
