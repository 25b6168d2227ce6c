// int4 weights x int8 activations on AVX512-VNNI: the arithmetic llama.cpp uses for Q4_1 x Q8_1.
//
// Weights: asymmetric 4-bit per group of 32 inputs (w = d * q + m, q in 0..15; GGUF Q4_1), packed per
// block of 16 outputs so that one 64-byte vector holds 4 consecutive inputs of each of the 16 outputs
// (byte 4n + j, n = output in the block, j = input): vpdpbusd then sums 4 products into each output's
// lane. Activations: each row quantized to int8 per group of 32 (x = dx * x8), exactly as llama.cpp's
// Q8_1. Every row is computed alone in a fixed order, so a row's result does not depend on the other
// rows of the call (verifying k tokens gives bitwise what decoding them one by one gives).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>
#include <cmath>
#include <vector>

namespace {

constexpr int64_t GROUP = 32;  // inputs per scale
constexpr int64_t NBLK = 16;   // outputs per packed block (one AVX-512 vector of fp32)

inline __m512 load16(const float* x) { return _mm512_loadu_ps(x); }
inline __m512 load16(const at::BFloat16* x) {  // bf16 -> fp32 is exact: the bits move up by 16
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// x (M, K) -> x8 (M, K) int8, dx (M, G) scale, sdx (M, G) = dx * sum(x8)
template <typename in_t>
void quantize_rows(const in_t* x, int64_t M, int64_t K, int8_t* x8, float* dx, float* sdx) {
  const int64_t G = K / GROUP;
  for (int64_t r = 0; r < M; ++r) {
    for (int64_t g = 0; g < G; ++g) {
      const in_t* xs = x + r * K + g * GROUP;
      __m512 v0 = load16(xs), v1 = load16(xs + 16);
      float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
      float d = amax / 127.0f;
      __m512 vinv = _mm512_set1_ps(d > 0.0f ? 1.0f / d : 0.0f);
      constexpr int rnd = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
      __m512i q0 = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_mul_ps(v0, vinv), rnd));
      __m512i q1 = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_mul_ps(v1, vinv), rnd));
      int8_t* out = x8 + r * K + g * GROUP;
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm512_cvtsepi32_epi8(q0));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 16), _mm512_cvtsepi32_epi8(q1));
      int s = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
      dx[r * G + g] = d;
      sdx[r * G + g] = d * static_cast<float>(s);
    }
  }
}

template <typename out_t>
inline void store16(out_t* y, __m512 v);
template <>
inline void store16<float>(float* y, __m512 v) { _mm512_storeu_ps(y, v); }
template <>
inline void store16<at::BFloat16>(at::BFloat16* y, __m512 v) {
  alignas(64) float tmp[16];
  _mm512_store_ps(tmp, v);
  for (int i = 0; i < 16; ++i) y[i] = at::BFloat16(tmp[i]);  // round to nearest even, as a cast does
}

template <typename out_t>
void gemm(const int8_t* x8, const float* dx, const float* sdx, const uint8_t* qw, const at::Half* dm,
          out_t* y, int64_t M, int64_t N, int64_t K) {
  const int64_t G = K / GROUP, NB = N / NBLK;
  const __m512i low = _mm512_set1_epi8(0x0F);
  at::parallel_for(0, NB, 1, [&](int64_t b0, int64_t b1) {
    std::vector<__m512> acc(M);
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t r = 0; r < M; ++r) acc[r] = _mm512_setzero_ps();
      for (int64_t g = 0; g < G; ++g) {
        const uint8_t* p = qw + (b * G + g) * 256;
        __m512i w[8];
        for (int v = 0; v < 4; ++v) {
          __m512i pv = _mm512_loadu_si512(p + 64 * v);
          w[2 * v] = _mm512_and_si512(pv, low);
          w[2 * v + 1] = _mm512_and_si512(_mm512_srli_epi16(pv, 4), low);
        }
        const at::Half* s = dm + (b * G + g) * 32;
        __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s)));
        __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + 16)));
        for (int64_t r = 0; r < M; ++r) {
          const int32_t* xr = reinterpret_cast<const int32_t*>(x8 + r * K + g * GROUP);
          __m512i ai = _mm512_setzero_si512();
          for (int a = 0; a < 8; ++a) ai = _mm512_dpbusd_epi32(ai, w[a], _mm512_set1_epi32(xr[a]));
          __m512 sc = _mm512_mul_ps(d, _mm512_set1_ps(dx[r * G + g]));
          acc[r] = _mm512_fmadd_ps(sc, _mm512_cvtepi32_ps(ai), acc[r]);
          acc[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(sdx[r * G + g]), acc[r]);
        }
      }
      for (int64_t r = 0; r < M; ++r) store16<out_t>(y + r * N + b * NBLK, acc[r]);
    }
  });
}

at::Tensor q4a8_linear(const at::Tensor& x, const at::Tensor& qw, const at::Tensor& dm, int64_t n) {
  TORCH_CHECK(x.device().is_cpu() && qw.device().is_cpu() && dm.device().is_cpu(), "q4a8_linear: CPU tensors only");
  TORCH_CHECK(qw.scalar_type() == at::kByte && dm.scalar_type() == at::kHalf, "q4a8_linear: packed uint8 weights and fp16 scales");
  const int64_t K = x.size(-1);
  TORCH_CHECK(K % GROUP == 0 && n % NBLK == 0, "q4a8_linear: in_features % 32 and out_features % 16 must be 0");
  TORCH_CHECK(qw.numel() == n * K / 2 && dm.numel() == n * K / GROUP * 2, "q4a8_linear: packed weight shape mismatch");
  TORCH_CHECK(qw.is_contiguous() && dm.is_contiguous(), "q4a8_linear: packed weights must be contiguous");
  const int64_t M = x.numel() / K, G = K / GROUP;
  auto xc = x.contiguous();
  // per-thread scratch for the quantized rows: no allocation per call once warm
  thread_local std::vector<int8_t> x8;
  thread_local std::vector<float> dx, sdx;
  if (static_cast<int64_t>(x8.size()) < M * K) x8.resize(M * K);
  if (static_cast<int64_t>(dx.size()) < M * G) { dx.resize(M * G); sdx.resize(M * G); }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  auto y = at::empty({M, n}, x.options());
  const uint8_t* q = qw.data_ptr<uint8_t>();
  const at::Half* s = dm.data_ptr<at::Half>();
  if (x.scalar_type() == at::kBFloat16) {
    quantize_rows(xc.data_ptr<at::BFloat16>(), M, K, x8.data(), dx.data(), sdx.data());
    gemm<at::BFloat16>(x8.data(), dx.data(), sdx.data(), q, s, y.data_ptr<at::BFloat16>(), M, n, K);
  } else {
    TORCH_CHECK(x.scalar_type() == at::kFloat, "q4a8_linear: float32 or bfloat16 activations");
    quantize_rows(xc.data_ptr<float>(), M, K, x8.data(), dx.data(), sdx.data());
    gemm<float>(x8.data(), dx.data(), sdx.data(), q, s, y.data_ptr<float>(), M, n, K);
  }
  return y.reshape(shape);
}

}  // namespace

TORCH_LIBRARY(dovetail, m) { m.def("q4a8_linear(Tensor x, Tensor qw, Tensor dm, int n) -> Tensor"); }
TORCH_LIBRARY_IMPL(dovetail, CPU, m) { m.impl("q4a8_linear", &q4a8_linear); }
