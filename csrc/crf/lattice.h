// Permutohedral lattice (Adams et al. 2010) as used by the dense CRF of
// Kraehenbuehl & Koltun 2011: the per-point arithmetic shared by the CPU and CUDA
// implementations. The operation order follows pydensecrf's SSE build so that the
// two give the same vertices and barycentric weights (see shared/design/crf.md).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define WSSS_HD __host__ __device__ __forceinline__
#else
#define WSSS_HD inline
#endif

namespace wsss_fast {
namespace crf {

// Largest feature dimension d the lattice accepts (2 for the Gaussian kernel, 5 for
// the bilateral one; generic DenseCRF features may use more).
constexpr int kMaxFeatureDim = 16;

// Normalisation modes, numbered as pydensecrf's NormalizationType.
enum Normalization : int64_t {
  kNoNormalization = 0,
  kNormalizeBefore = 1,
  kNormalizeAfter = 2,
  kNormalizeSymmetric = 3,
};

// Compatibility kinds, told apart by the rank of the compat tensor.
enum CompatKind : int { kPotts = 0, kDiagonal = 1, kMatrix = 2 };

// Products and sums without fused multiply-add: pydensecrf rounds after every
// operation, and an FMA here can move a point across a simplex boundary.
WSSS_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

WSSS_HD float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

// Per-axis scale of the elevation matrix: sqrt(2/3) (d+1) / sqrt((i+1)(i+2)).
inline void lattice_scale_factors(int d, float* scale) {
  const float inv_std_dev = static_cast<float>(std::sqrt(2.0 / 3.0) * (d + 1));
  for (int i = 0; i < d; ++i) {
    scale[i] = static_cast<float>(1.0 / std::sqrt(static_cast<double>((i + 2) * (i + 1))) *
                                  inv_std_dev);
  }
}

// Slice scale alpha = 1 / (1 + 2^-d).
inline float lattice_alpha(int d) {
  return 1.0f / (1.0f + std::pow(2.0f, static_cast<float>(-d)));
}

// Embeds one point: `feature` holds its d coordinates at stride `feature_stride`
// (already divided by the kernel's standard deviations). Writes the remainder-0
// point `rem0` (d+1), the `rank` (d+1) of each coordinate, and the barycentric
// weights `weight` (d+1) of the d+1 enclosing simplex vertices. kDim > 0 fixes d at
// compile time (the loops unroll; `dim` is then ignored), 0 takes `dim`.
template <int kDim = 0>
WSSS_HD void embed_point(const float* feature, int64_t feature_stride, int dim,
                         const float* scale, int* rem0, int* rank, float* weight) {
  const int d = kDim > 0 ? kDim : dim;
  float elevated[kMaxFeatureDim + 1];
  float rem0_f[kMaxFeatureDim + 1];
  float bary[kMaxFeatureDim + 2];
  const float down = 1.0f / static_cast<float>(d + 1);
  const float up = static_cast<float>(d + 1);

  // Elevate onto the hyperplane sum(E) = 0.
  float running = 0.0f;
  for (int j = d; j > 0; --j) {
    const float cf = mul_rn(feature[(j - 1) * feature_stride], scale[j - 1]);
    elevated[j] = sub_rn(running, mul_rn(static_cast<float>(j), cf));
    running += cf;
  }
  elevated[0] = running;

  // Nearest remainder-0 point (round half to even, as the SSE build does).
  float sum = 0.0f;
  for (int i = 0; i <= d; ++i) {
    const float v = rintf(mul_rn(down, elevated[i]));
    rem0_f[i] = mul_rn(v, up);
    sum += v;
    rank[i] = 0;
  }
  // Rank of each coordinate's residual in the sorted order (branch-free: the
  // comparisons are data-dependent, unpredictable on a CPU, divergent on a GPU).
  float residual[kMaxFeatureDim + 1];
  for (int i = 0; i <= d; ++i) residual[i] = sub_rn(elevated[i], rem0_f[i]);
  for (int i = 0; i < d; ++i) {
    for (int j = i + 1; j <= d; ++j) {
      const int i_below = residual[i] < residual[j];
      rank[i] += i_below;
      rank[j] += 1 - i_below;
    }
  }
  // Bring the point back onto the plane when the rounded coordinates do not sum to 0.
  const int shift = static_cast<int>(sum);
  for (int i = 0; i <= d; ++i) {
    rank[i] += shift;
    if (rank[i] < 0) {
      rank[i] += d + 1;
      rem0_f[i] += up;
    } else if (rank[i] > d) {
      rank[i] -= d + 1;
      rem0_f[i] -= up;
    }
  }
  // Barycentric coordinates.
  for (int i = 0; i <= d + 1; ++i) bary[i] = 0.0f;
  for (int i = 0; i <= d; ++i) {
    const float v = mul_rn(sub_rn(elevated[i], rem0_f[i]), down);
    bary[d - rank[i]] += v;
    bary[d - rank[i] + 1] -= v;
  }
  bary[0] += 1.0f + bary[d + 1];
  for (int i = 0; i <= d; ++i) {
    rem0[i] = static_cast<int>(rem0_f[i]);
    weight[i] = bary[i];
  }
}

// Coordinate i (< d) of the key of enclosing vertex r (0..d).
WSSS_HD int vertex_key(const int* rem0, const int* rank, int d, int r, int i) {
  return rem0[i] + (rank[i] <= d - r ? r : r - (d + 1));
}

}  // namespace crf
}  // namespace wsss_fast
