// y = x @ W_r[:out, :in].T straight from 2-bit planes: the CPU kernel behind matryoshka::planes_linear.
//
// Layout (core/planes.py builds it): u = q + 128 in 0..255 for the int8 code q; plane p holds bits 7-2p, 6-2p of
// u. Rows come in tiles of 16 and columns in blocks of 32 (one fp16 scale per row and block):
//   planes (T, G, 4, 128) uint8: tile t, block g, plane p; byte 16e + r holds, at bits 2f..2f+1, the plane's two
//                                bits of row 16t + r, column 32g + 8f + e  (e 0..7, f 0..3, r 0..15)
//   scales (T, G, 16) fp16
// so one (tile, block) is 4 x 128 contiguous bytes, a cell's row prefix is a prefix of tiles, its column prefix a
// prefix of blocks in every tile, and r bits read planes 0..ceil(r/2)-1 only.
// Value: W_r = s * (c - 128 + (2^(8-r) - 1) / 2) with c = u & (0xff << (8-r)) (nested.py's top-bits rule), so
//   y_row = sum_g s_g * (sum_i c_i x_i) + b_r * sum_g s_g * sum_i x_i,   b_r = -128 + (2^(8-r) - 1) / 2.
// Bytes decode to one lane per row (16 rows = 16 fp32 lanes), so each column costs a convert and an FMA with a
// broadcast x and no horizontal sum. AVX-512 and AVX2 paths are chosen at run time (one binary serves both
// machines we run on); a portable loop serves the rest.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <immintrin.h>
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int TILE = 16, BLOCK = 32, PLANES = 4, PLANE_BYTES = 128, MAX_M = 8;
constexpr int AHEAD = 6;  // blocks prefetched ahead: one core's hardware prefetch alone reaches ~1/3 of DRAM speed

struct Cell {
  const uint8_t* planes;    // (T, G, 4, 128)
  const at::Half* scales;   // (T, G, 16)
  int64_t G;                // blocks per row in storage
  int64_t ng;               // blocks the cell reads
  int np;                   // planes the cell reads
  int bits;
  float b;                  // b_r
  const float* x;           // (mb, ng * 32), zero padded
  const float* xs;          // (mb, ng): per-block sums of x
  int64_t ldx;
};

// The bytes AHEAD blocks on in this thread's walk (the next tile's blocks past the cell's last one), to prefetch.
inline void prefetch_ahead(const Cell& c, int64_t t, int64_t g, int np) {
  int64_t gg = g + AHEAD, tt = t;
  if (gg >= c.ng) gg -= c.ng, ++tt;
  const char* p = (const char*)(c.planes + (tt * c.G + gg) * PLANES * PLANE_BYTES);
  for (int i = 0; i < np * PLANE_BYTES; i += 64) _mm_prefetch(p + i, _MM_HINT_T0);
}

inline uint8_t plane_mask(int p, int bits) { return uint8_t((3u << (6 - 2 * p)) & (0xffu << (8 - bits))); }

// ------------------------------------------------------------------ portable
void tile_ref(const Cell& c, int64_t t, int mb, float* out, int64_t ldo, int rows) {
  float acc[MAX_M][TILE] = {}, bacc[MAX_M][TILE] = {};
  for (int64_t g = 0; g < c.ng; ++g) {
    const uint8_t* gp = c.planes + (t * c.G + g) * PLANES * PLANE_BYTES;
    const at::Half* sp = c.scales + (t * c.G + g) * TILE;
    float part[MAX_M][TILE] = {};
    for (int f = 0; f < 4; ++f)
      for (int e = 0; e < 8; ++e) {
        int i = 8 * f + e;
        for (int r = 0; r < TILE; ++r) {
          unsigned code = 0;
          for (int p = 0; p < c.np; ++p)
            code |= (((gp[p * PLANE_BYTES + 16 * e + r] >> (2 * f)) & 3u) << (6 - 2 * p)) & plane_mask(p, c.bits);
          for (int m = 0; m < mb; ++m) part[m][r] += float(code) * c.x[m * c.ldx + 32 * g + i];
        }
      }
    for (int r = 0; r < TILE; ++r) {
      float s = float(sp[r]);
      for (int m = 0; m < mb; ++m) {
        acc[m][r] += part[m][r] * s;
        bacc[m][r] += s * c.xs[m * c.ng + g];
      }
    }
  }
  for (int m = 0; m < mb; ++m)
    for (int r = 0; r < rows; ++r) out[m * ldo + r] = acc[m][r] + c.b * bacc[m][r];
}

// ------------------------------------------------------------------ AVX-512
template <int NP, int MB>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void tile_512(const Cell& c, int64_t t, float* out,
                                                                   int64_t ldo, int rows) {
  __m512 acc[MB], bacc[MB];
  for (int m = 0; m < MB; ++m) acc[m] = bacc[m] = _mm512_setzero_ps();
  __m512i mask[NP];
  for (int p = 0; p < NP; ++p) mask[p] = _mm512_set1_epi8(char(plane_mask(p, c.bits)));
  for (int64_t g = 0; g < c.ng; ++g) {
    const uint8_t* gp = c.planes + (t * c.G + g) * PLANES * PLANE_BYTES;
    prefetch_ahead(c, t, g, NP);
    __m512i P[NP][2];
    for (int p = 0; p < NP; ++p) {
      P[p][0] = _mm512_loadu_si512(gp + p * PLANE_BYTES);
      P[p][1] = _mm512_loadu_si512(gp + p * PLANE_BYTES + 64);
    }
    const __m512 S = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(c.scales + (t * c.G + g) * TILE)));
    const float* xg = c.x + 32 * g;
    constexpr int NA = MB >= 4 ? 1 : 4 / MB;  // independent FMA chains: one chain waits 4 cycles per FMA
    __m512 part[MB][NA];
    for (int m = 0; m < MB; ++m)
      for (int a = 0; a < NA; ++a) part[m][a] = _mm512_setzero_ps();
#pragma GCC unroll 4
    for (int f = 0; f < 4; ++f) {
      __m512i C[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()};
#pragma GCC unroll 4
      for (int p = 0; p < NP; ++p) {
        const int s = 6 - 2 * p - 2 * f;  // field f to bits 6-2p..7-2p (16-bit shifts: the mask drops spill-over)
        for (int h = 0; h < 2; ++h) {
          __m512i v = s > 0 ? _mm512_slli_epi16(P[p][h], s) : s < 0 ? _mm512_srli_epi16(P[p][h], -s) : P[p][h];
          C[h] = _mm512_ternarylogic_epi32(v, mask[p], C[h], 0xEA);  // (v & mask) | C
        }
      }
#pragma GCC unroll 8
      for (int e = 0; e < 8; ++e) {
        const __m128i bytes = _mm512_extracti32x4_epi32(C[e >> 2], e & 3);
        const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes));
        for (int m = 0; m < MB; ++m)
          part[m][e % NA] = _mm512_fmadd_ps(w, _mm512_set1_ps(xg[m * c.ldx + 8 * f + e]), part[m][e % NA]);
      }
    }
    for (int m = 0; m < MB; ++m) {
      for (int a = 1; a < NA; ++a) part[m][0] = _mm512_add_ps(part[m][0], part[m][a]);
      acc[m] = _mm512_fmadd_ps(part[m][0], S, acc[m]);
      bacc[m] = _mm512_fmadd_ps(S, _mm512_set1_ps(c.xs[m * c.ng + g]), bacc[m]);
    }
  }
  const __mmask16 keep = rows >= TILE ? __mmask16(0xffff) : __mmask16((1u << rows) - 1);
  for (int m = 0; m < MB; ++m)
    _mm512_mask_storeu_ps(out + m * ldo, keep, _mm512_fmadd_ps(_mm512_set1_ps(c.b), bacc[m], acc[m]));
}

// ------------------------------------------------------------------ AVX2
template <int NP, int MB>
__attribute__((target("avx2,fma,f16c"))) void tile_256(const Cell& c, int64_t t, float* out, int64_t ldo, int rows) {
  __m256 acc[MB][2], bacc[MB][2];
  for (int m = 0; m < MB; ++m)
    for (int k = 0; k < 2; ++k) acc[m][k] = bacc[m][k] = _mm256_setzero_ps();
  __m256i mask[NP];
  for (int p = 0; p < NP; ++p) mask[p] = _mm256_set1_epi8(char(plane_mask(p, c.bits)));
  for (int64_t g = 0; g < c.ng; ++g) {
    const uint8_t* gp = c.planes + (t * c.G + g) * PLANES * PLANE_BYTES;
    prefetch_ahead(c, t, g, NP);
    const at::Half* sp = c.scales + (t * c.G + g) * TILE;
    const __m256 S0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)sp));
    const __m256 S1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(sp + 8)));
    const float* xg = c.x + 32 * g;
    constexpr int NA = MB >= 4 ? 1 : 4 / MB;  // independent FMA chains (see tile_512)
    __m256 part[MB][NA][2];
    for (int m = 0; m < MB; ++m)
      for (int a = 0; a < NA; ++a) part[m][a][0] = part[m][a][1] = _mm256_setzero_ps();
#pragma GCC unroll 4
    for (int f = 0; f < 4; ++f) {
      for (int q = 0; q < 4; ++q) {  // 32 bytes = columns e = 2q, 2q + 1 of 16 rows
        __m256i C = _mm256_setzero_si256();
#pragma GCC unroll 4
        for (int p = 0; p < NP; ++p) {
          const int s = 6 - 2 * p - 2 * f;
          __m256i v = _mm256_loadu_si256((const __m256i*)(gp + p * PLANE_BYTES + 32 * q));
          v = s > 0 ? _mm256_slli_epi16(v, s) : s < 0 ? _mm256_srli_epi16(v, -s) : v;
          C = _mm256_or_si256(C, _mm256_and_si256(v, mask[p]));
        }
        for (int half = 0; half < 2; ++half) {
          const int e = 2 * q + half;
          const __m128i b16 = half ? _mm256_extracti128_si256(C, 1) : _mm256_castsi256_si128(C);
          const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b16));
          const __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(b16, b16)));
          for (int m = 0; m < MB; ++m) {
            const __m256 xv = _mm256_set1_ps(xg[m * c.ldx + 8 * f + e]);
            part[m][e % NA][0] = _mm256_fmadd_ps(w0, xv, part[m][e % NA][0]);
            part[m][e % NA][1] = _mm256_fmadd_ps(w1, xv, part[m][e % NA][1]);
          }
        }
      }
    }
    for (int m = 0; m < MB; ++m) {
      for (int a = 1; a < NA; ++a)
        for (int k = 0; k < 2; ++k) part[m][0][k] = _mm256_add_ps(part[m][0][k], part[m][a][k]);
      const __m256 xs = _mm256_set1_ps(c.xs[m * c.ng + g]);
      acc[m][0] = _mm256_fmadd_ps(part[m][0][0], S0, acc[m][0]);
      acc[m][1] = _mm256_fmadd_ps(part[m][0][1], S1, acc[m][1]);
      bacc[m][0] = _mm256_fmadd_ps(S0, xs, bacc[m][0]);
      bacc[m][1] = _mm256_fmadd_ps(S1, xs, bacc[m][1]);
    }
  }
  const __m256 b = _mm256_set1_ps(c.b);
  for (int m = 0; m < MB; ++m) {
    alignas(32) float tmp[TILE];
    _mm256_store_ps(tmp, _mm256_fmadd_ps(b, bacc[m][0], acc[m][0]));
    _mm256_store_ps(tmp + 8, _mm256_fmadd_ps(b, bacc[m][1], acc[m][1]));
    std::memcpy(out + m * ldo, tmp, sizeof(float) * rows);
  }
}

// ------------------------------------------------------------------ dispatch
enum Isa { REF = 0, AVX2 = 1, AVX512 = 2 };

int best_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
    return AVX512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return AVX2;
  return REF;
}

using TileFn = void (*)(const Cell&, int64_t, float*, int64_t, int);

template <int NP>
TileFn pick_mb(int isa, int mb) {
  if (isa == AVX512) {
    switch (mb) {
      case 1: return tile_512<NP, 1>;
      case 2: return tile_512<NP, 2>;
      case 4: return tile_512<NP, 4>;
      default: return tile_512<NP, 8>;
    }
  }
  switch (mb) {
    case 1: return tile_256<NP, 1>;
    case 2: return tile_256<NP, 2>;
    case 4: return tile_256<NP, 4>;
    default: return tile_256<NP, 8>;
  }
}

TileFn pick(int isa, int np, int mb) {
  switch (np) {
    case 1: return pick_mb<1>(isa, mb);
    case 2: return pick_mb<2>(isa, mb);
    case 3: return pick_mb<3>(isa, mb);
    default: return pick_mb<4>(isa, mb);
  }
}

int round_mb(int64_t m) { return m <= 1 ? 1 : m <= 2 ? 2 : m <= 4 ? 4 : 8; }

void check_args(const at::Tensor& x, const at::Tensor& planes, const at::Tensor& scales, int64_t out, int64_t bits) {
  TORCH_CHECK(planes.dtype() == at::kByte && planes.dim() == 4 && planes.size(2) == PLANES &&
                  planes.size(3) == PLANE_BYTES && planes.is_contiguous(),
              "planes must be contiguous uint8 (T, G, 4, 128)");
  TORCH_CHECK((scales.dtype() == at::kHalf || scales.dtype() == at::kShort) && scales.dim() == 3 && scales.size(0) == planes.size(0) &&
                  scales.size(1) == planes.size(1) && scales.size(2) == TILE && scales.is_contiguous(),
              "scales must be contiguous fp16 or its int16 bits (T, G, 16)");
  TORCH_CHECK(bits >= 2 && bits <= 8, "bits must be 2..8, got ", bits);
  TORCH_CHECK(out >= 1 && out <= planes.size(0) * TILE, "out_features ", out, " exceeds the stored rows");
  TORCH_CHECK(x.size(-1) <= planes.size(1) * BLOCK, "x has ", x.size(-1), " features, more than stored");
}

// Dequantize rows [r0, r0 + n) of the cell into w (n, ng * 32) fp32 (prefill: then one GEMM).
void dequant_rows(const Cell& c, int64_t r0, int64_t n, float* w) {
  const int64_t K = c.ng * BLOCK;
  for (int64_t rr = 0; rr < n; ++rr) {
    const int64_t row = r0 + rr, t = row / TILE, r = row % TILE;
    for (int64_t g = 0; g < c.ng; ++g) {
      const uint8_t* gp = c.planes + (t * c.G + g) * PLANES * PLANE_BYTES;
      const float s = float(c.scales[(t * c.G + g) * TILE + r]);
      for (int f = 0; f < 4; ++f)
        for (int e = 0; e < 8; ++e) {
          unsigned code = 0;
          for (int p = 0; p < c.np; ++p)
            code |= (((gp[p * PLANE_BYTES + 16 * e + r] >> (2 * f)) & 3u) << (6 - 2 * p)) & plane_mask(p, c.bits);
          w[rr * K + 32 * g + 8 * f + e] = s * (float(code) + c.b);
        }
    }
  }
}

}  // namespace

at::Tensor planes_linear(const at::Tensor& x_in, const at::Tensor& planes, const at::Tensor& scales, int64_t out,
                         int64_t bits, int64_t isa) {
  check_args(x_in, planes, scales, out, bits);
  const int64_t k = x_in.size(-1), ng = (k + BLOCK - 1) / BLOCK, kp = ng * BLOCK;
  auto lead = x_in.sizes().vec();
  lead.pop_back();
  at::Tensor x = x_in.reshape({-1, k}).to(at::kFloat);
  const int64_t M = x.size(0);
  if (isa < 0) isa = best_isa();
  Cell c{planes.data_ptr<uint8_t>(), reinterpret_cast<const at::Half*>(scales.data_ptr()), planes.size(1), ng, int((bits + 1) / 2), int(bits),
         float(-128.0 + (double((1 << (8 - bits)) - 1)) / 2.0), nullptr, nullptr, kp};
  at::Tensor y = at::empty({M, out}, x.options());
  // x as the kernels read it: rows of whole blocks, and spare zero rows when a batch rounds up (round_mb)
  at::Tensor xp = x;
  if (kp != k || !x.is_contiguous() || (M <= 2 * MAX_M && round_mb(M % MAX_M ? M % MAX_M : MAX_M) != (M % MAX_M ? M % MAX_M : MAX_M))) {
    xp = at::zeros({M + MAX_M, kp}, x.options());
    xp.narrow(0, 0, M).narrow(1, 0, k).copy_(x);
  }
  std::vector<float> xs(size_t(xp.size(0) * ng));
  const float* xd = xp.data_ptr<float>();
  for (int64_t i = 0; i < xp.size(0) * ng; ++i) {
    float acc = 0.f;
    for (int j = 0; j < BLOCK; ++j) acc += xd[i * BLOCK + j];
    xs[i] = acc;
  }
  c.x = xd;
  c.xs = xs.data();
  const int64_t tiles = (out + TILE - 1) / TILE;
  if (M > 2 * MAX_M) {  // prefill: dequantize a chunk of rows at a time into one GEMM
    const int64_t chunk = 1024;
    at::Tensor w = at::empty({std::min(chunk, out), kp}, x.options());
    for (int64_t r0 = 0; r0 < out; r0 += chunk) {
      const int64_t n = std::min(chunk, out - r0);
      float* wp = w.data_ptr<float>();
      at::parallel_for(0, n, 16, [&](int64_t a, int64_t b) { dequant_rows(c, r0 + a, b - a, wp + a * kp); });
      y.narrow(1, r0, n).copy_(at::mm(xp.narrow(0, 0, M), w.narrow(0, 0, n).t()));
    }
  } else {
    for (int64_t m0 = 0; m0 < M; m0 += MAX_M) {
      const int mb = round_mb(std::min<int64_t>(MAX_M, M - m0));
      const int real = int(std::min<int64_t>(mb, M - m0));
      Cell cm = c;
      cm.x = c.x + m0 * kp;
      cm.xs = c.xs + m0 * ng;
      // whole tiles and whole batches land in y directly when they fit it, else in a buffer cut to shape
      const bool direct = out % TILE == 0 && mb == real;
      at::Tensor buf = direct ? y.narrow(0, m0, mb) : at::empty({mb, tiles * TILE}, x.options());
      float* bp = buf.data_ptr<float>();
      const int64_t ldo = direct ? out : tiles * TILE;
      const TileFn fn = isa == REF ? nullptr : pick(int(isa), cm.np, mb);
      at::parallel_for(0, tiles, 1, [&](int64_t a, int64_t b) {
        for (int64_t t = a; t < b; ++t) {
          if (fn) fn(cm, t, bp + t * TILE, ldo, TILE);
          else tile_ref(cm, t, mb, bp + t * TILE, ldo, TILE);
        }
      });
      if (!direct) y.narrow(0, m0, real).copy_(buf.narrow(0, 0, real).narrow(1, 0, out));
    }
  }
  lead.push_back(out);
  return y.view(lead).to(x_in.scalar_type());
}

int64_t cpu_isa() { return best_isa(); }

TORCH_LIBRARY(matryoshka, m) {
  m.def("planes_linear(Tensor x, Tensor planes, Tensor scales, int out_features, int bits, int isa=-1) -> Tensor");
}

TORCH_LIBRARY_IMPL(matryoshka, CPU, m) { m.impl("planes_linear", &planes_linear); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("cpu_isa", &cpu_isa, "0 portable, 1 AVX2, 2 AVX-512"); }
