// Dense CRF mean-field inference on CUDA, batched over images.
//
// Design
// - One lattice per pairwise kernel for the whole batch. Every vertex key carries its
//   image index, so the images form disjoint parts of one lattice and every kernel
//   below runs over all images at once. Features with a batch stride of 0 (expanded)
//   give one lattice of a single image whose vertex values are replicated per image
//   ("replicas"): same numbers, B times less lattice.
// - Build (once per call, all on the device): one thread per point embeds it
//   (embed_point of lattice.h, shared with the CPU path) and writes its d+1 vertex
//   keys and barycentric weights. Keys are packed into int64 codes: the image index
//   in the top bits, then the vertex's remainder r (all coordinates of enclosing
//   vertex r are congruent to r mod d+1), then each coordinate's quotient
//   (key_i - r) / (d+1) minus its minimum, in as many bits as its range needs. The
//   quotients need about log2(d+1) bits fewer per coordinate than the keys (for
//   d = 16 this is what makes such features fit at all); a code wider than 63 bits is
//   a ValueError naming the kernel. A stable at::sort plus
//   at::unique_consecutive give the vertices in code order, each point's d+1 vertex
//   ids and, from the sorted order, a CSR list per vertex of its (point, weight)
//   contributions in increasing point order. Blur neighbours: one thread per
//   (axis, vertex) forms the two neighbour codes and binary-searches them.
//   pydensecrf embeds points in blocks of 4 and pads the last block with points at
//   the origin, whose vertices join the blur graph: when N % 4 != 0 each image part
//   gets the origin's d+1 vertex keys as extra entries that splat nothing.
// - Sort-based rather than a hash table: the vertex order, the contribution order and
//   hence every float sum are fixed by the input alone, so results are bitwise
//   reproducible run to run (no float atomics anywhere), and the splat sums points in
//   pydensecrf's order.
// - Normalisation is folded into the weights once: splat weights carry n (BEFORE,
//   SYMMETRIC), slice weights carry alpha and n (AFTER, SYMMETRIC), where n comes
//   from the same filter applied to ones.
// - Each mean-field step, per kernel: splat as a gather (one thread per (vertex,
//   label), summing its CSR list), d+1 blur passes (one thread per (vertex, label),
//   reading only the previous buffer; a missing neighbour counts 0). Then one fused
//   kernel per step (up to kMaxTermsPerLaunch pairwise kernels per launch): a group
//   of lanes per pixel, lanes over labels (chunks of up to 32, any M), slices every
//   kernel, applies its compatibility, subtracts from -unary and takes the softmax
//   (max subtracted) with shuffle reductions. It writes the marginals in place: all
//   splats of the step have read them before it runs.
// - Marginals live pixel-major, (B*N, M), so splat and slice read whole label rows;
//   the (B, M, N) inputs and output are transposed once per call.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "crf/dense_crf.h"
#include "crf/lattice.h"

namespace wsss_fast {
namespace crf {
namespace {

constexpr int kThreads = 256;
// Pairwise kernels sliced by one launch of the fused update (more are chained).
constexpr int kMaxTermsPerLaunch = 4;
// Dynamic shared memory of the fused update (matrix compatibilities only).
constexpr int64_t kMaxSharedBytes = 48 * 1024;
// Largest |lattice coordinate| accepted: embed_point's float arithmetic is exact well
// below 2^24, so the keys are exact multiples-plus-remainder (pydensecrf itself stores
// keys as int16).
constexpr int kMaxKeyMagnitude = 1 << 22;

// Blocks for `work` threads of `threads` each (work > 0).
unsigned int block_count(int64_t work, int64_t threads) {
  const int64_t blocks = (work + threads - 1) / threads;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(),
              "dense_crf (CUDA): problem too large for one launch (", work, " threads)");
  return static_cast<unsigned int>(blocks);
}

// ---------------------------------------------------------------------------------
// Lattice construction
// ---------------------------------------------------------------------------------

struct EmbedParams {
  const float* features;
  int64_t stride_image;  // 0 for a shared lattice
  int64_t stride_dim;
  int64_t stride_point;
  int64_t points_per_image;
  int64_t points;  // points in the lattice: N (shared) or B*N
  int d;
  float scale[kMaxFeatureDim];
};

// One thread per point. For its enclosing vertex r (entry point*(d+1) + r): the
// barycentric weight and the quotients (key_i - r) / (d+1), exact since every key
// coordinate of vertex r is congruent to r mod d+1. Quotients (entries, d) int32.
// Sets *too_large when a coordinate exceeds kMaxKeyMagnitude.
__global__ void embed_kernel(EmbedParams params, int32_t* __restrict__ quotients,
                             float* __restrict__ weights, int32_t* __restrict__ too_large) {
  const int64_t point = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (point >= params.points) return;
  const int d = params.d;
  const int64_t image = point / params.points_per_image;
  const int64_t within = point - image * params.points_per_image;
  const float* feature =
      params.features + image * params.stride_image + within * params.stride_point;
  int rem0[kMaxFeatureDim + 1];
  int rank[kMaxFeatureDim + 1];
  float weight[kMaxFeatureDim + 1];
  embed_point(feature, params.stride_dim, d, params.scale, rem0, rank, weight);
  bool out_of_range = false;
  for (int i = 0; i <= d; ++i) {
    out_of_range = out_of_range || rem0[i] > kMaxKeyMagnitude || rem0[i] < -kMaxKeyMagnitude;
  }
  if (out_of_range) *too_large = 1;  // every writer stores the same value
  const int64_t first = point * (d + 1);
  for (int r = 0; r <= d; ++r) {
    weights[first + r] = weight[r];
    int32_t* quotient = quotients + (first + r) * d;
    for (int i = 0; i < d; ++i) quotient[i] = (vertex_key(rem0, rank, d, r, i) - r) / (d + 1);
  }
}

// How vertex keys are packed into int64 codes, from the lowest bits up: quotient i
// as (quotient - quotient_min[i]) at shift[i], the remainder r at remainder_shift, the
// image index at image_shift (top).
struct KeyPacking {
  int d;
  int image_shift;
  int remainder_shift;
  uint64_t remainder_mask;
  int shift[kMaxFeatureDim];
  int64_t quotient_min[kMaxFeatureDim];
  int64_t quotient_range[kMaxFeatureDim];  // max - min
  uint64_t mask[kMaxFeatureDim];
};

int bits_for(int64_t range) {
  int bits = 0;
  while (bits < 64 && (static_cast<uint64_t>(range) >> bits) != 0) ++bits;
  return bits;
}

// The origin's entries (pydensecrf's padding points): quotient rows of entries
// [point_entries, point_entries + images*(d+1)), d+1 per image. The origin has
// rem0 = 0 and rank_i = i.
__global__ void origin_quotients_kernel(int64_t point_entries, int64_t origin_entries, int d,
                                        int32_t* __restrict__ quotients) {
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= origin_entries) return;
  const int r = static_cast<int>(index % (d + 1));
  int rem0[kMaxFeatureDim + 1];
  int rank[kMaxFeatureDim + 1];
  for (int i = 0; i <= d; ++i) {
    rem0[i] = 0;
    rank[i] = i;
  }
  int32_t* quotient = quotients + (point_entries + index) * d;
  for (int i = 0; i < d; ++i) quotient[i] = (vertex_key(rem0, rank, d, r, i) - r) / (d + 1);
}

// Entries below point_entries are point * (d+1) + r (image = entry / entries_per_image);
// above, the origin's, (d+1) per image. Either way the remainder is entry % (d+1).
__global__ void pack_keys_kernel(const int32_t* __restrict__ quotients, int64_t entries,
                                 int64_t point_entries, int64_t entries_per_image,
                                 KeyPacking packing, int64_t* __restrict__ codes) {
  const int64_t entry = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (entry >= entries) return;
  const int64_t corners = packing.d + 1;
  const uint64_t image = static_cast<uint64_t>(
      entry < point_entries ? entry / entries_per_image : (entry - point_entries) / corners);
  const uint64_t remainder = static_cast<uint64_t>(entry % corners);
  uint64_t code = (image << packing.image_shift) | (remainder << packing.remainder_shift);
  const int32_t* quotient = quotients + entry * packing.d;
  for (int i = 0; i < packing.d; ++i) {
    code |= static_cast<uint64_t>(static_cast<int64_t>(quotient[i]) - packing.quotient_min[i])
            << packing.shift[i];
  }
  codes[entry] = static_cast<int64_t>(code);
}

// From the stable sort: entry = order[pos] is the pos-th contribution in vertex
// order, vertex[pos] its vertex id. A point's entry (point * (d+1) + r, below
// point_entries) records the vertex as the point's r-th; an origin entry (sorted after
// every point's entry of its vertex) contributes weight 0 from point 0: it only makes
// the vertex exist, and adding 0 * (finite value) leaves every sum unchanged.
__global__ void build_contributions_kernel(const int64_t* __restrict__ order,
                                           const int64_t* __restrict__ vertex,
                                           const float* __restrict__ barycentric, int64_t entries,
                                           int64_t point_entries, int corners,
                                           int32_t* __restrict__ point_vertex,
                                           int32_t* __restrict__ contribution_point,
                                           float* __restrict__ contribution_weight) {
  const int64_t pos = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (pos >= entries) return;
  const int64_t entry = order[pos];
  if (entry < point_entries) {
    point_vertex[entry] = static_cast<int32_t>(vertex[pos]);
    contribution_point[pos] = static_cast<int32_t>(entry / corners);
    contribution_weight[pos] = barycentric[entry];
  } else {
    contribution_point[pos] = 0;
    contribution_weight[pos] = 0.0f;
  }
}

// Index of `code` in the ascending `codes`, or -1.
__device__ __forceinline__ int32_t find_code(const int64_t* __restrict__ codes, int64_t count,
                                             int64_t code) {
  int64_t low = 0;
  int64_t high = count;
  while (low < high) {
    const int64_t mid = low + (high - low) / 2;
    if (codes[mid] < code) {
      low = mid + 1;
    } else {
      high = mid;
    }
  }
  return (low < count && codes[low] == code) ? static_cast<int32_t>(low) : -1;
}

// One thread per (axis, vertex): neighbours (d+1, V, 2) int32, -1 where missing.
// Along axis j < d: n1 = key - 1 except n1[j] = key[j] + d, n2 = key + 1 except
// n2[j] = key[j] - d; along axis d every stored coordinate moves by -1 / +1.
__global__ void blur_neighbours_kernel(const int64_t* __restrict__ codes, int64_t vertices,
                                       KeyPacking packing, int32_t* __restrict__ neighbours) {
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int d = packing.d;
  if (index >= (d + 1) * vertices) return;
  const int axis = static_cast<int>(index / vertices);
  const int64_t vertex = index - axis * vertices;
  const int64_t corners = d + 1;
  const uint64_t code = static_cast<uint64_t>(codes[vertex]);
  const uint64_t image = code >> packing.image_shift;
  const int64_t remainder =
      static_cast<int64_t>((code >> packing.remainder_shift) & packing.remainder_mask);
  // Every coordinate of n1 moves by -1 mod d+1 (key - 1, or key + d on the axis), of
  // n2 by +1.
  const int64_t minus_remainder = remainder == 0 ? d : remainder - 1;
  const int64_t plus_remainder = remainder == d ? 0 : remainder + 1;
  uint64_t minus = (image << packing.image_shift) |
                   (static_cast<uint64_t>(minus_remainder) << packing.remainder_shift);
  uint64_t plus = (image << packing.image_shift) |
                  (static_cast<uint64_t>(plus_remainder) << packing.remainder_shift);
  bool minus_exists = true;
  bool plus_exists = true;
  for (int i = 0; i < d; ++i) {
    const int64_t quotient =
        packing.quotient_min[i] + static_cast<int64_t>((code >> packing.shift[i]) & packing.mask[i]);
    const int64_t key = quotient * corners + remainder;
    const int64_t down = i == axis ? key + d : key - 1;
    const int64_t up = i == axis ? key - d : key + 1;
    // Exact divisions: down and up are congruent to their remainders.
    const int64_t down_offset = (down - minus_remainder) / corners - packing.quotient_min[i];
    const int64_t up_offset = (up - plus_remainder) / corners - packing.quotient_min[i];
    // A quotient outside the range seen over all vertices cannot belong to a vertex.
    if (down_offset < 0 || down_offset > packing.quotient_range[i]) {
      minus_exists = false;
    } else {
      minus |= static_cast<uint64_t>(down_offset) << packing.shift[i];
    }
    if (up_offset < 0 || up_offset > packing.quotient_range[i]) {
      plus_exists = false;
    } else {
      plus |= static_cast<uint64_t>(up_offset) << packing.shift[i];
    }
  }
  neighbours[2 * index] =
      minus_exists ? find_code(codes, vertices, static_cast<int64_t>(minus)) : -1;
  neighbours[2 * index + 1] =
      plus_exists ? find_code(codes, vertices, static_cast<int64_t>(plus)) : -1;
}

// weights[i] = (alpha * barycentric[i]), pydensecrf's (w * alpha) slice factor.
__global__ void scale_weights_kernel(const float* __restrict__ barycentric, float alpha,
                                     int64_t count, float* __restrict__ weights) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < count) weights[i] = barycentric[i] * alpha;
}

// norm (K applied to ones) -> per-point factor n, in double as pydensecrf does.
__global__ void normaliser_kernel(const float* __restrict__ norm, int64_t points, bool symmetric,
                                  float* __restrict__ factor) {
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= points) return;
  const double shifted = static_cast<double>(norm[p]) + 1e-20;
  factor[p] = static_cast<float>(symmetric ? 1.0 / sqrt(shifted) : 1.0 / shifted);
}

// weights[i] *= factor[point of i]; the point is point_of[i], or i / corners when
// point_of is null (per-point rows of d+1 weights).
__global__ void multiply_by_point_kernel(float* __restrict__ weights,
                                         const int32_t* __restrict__ point_of, int corners,
                                         const float* __restrict__ factor, int64_t count) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= count) return;
  const int64_t point = point_of != nullptr ? static_cast<int64_t>(point_of[i]) : i / corners;
  weights[i] *= factor[point];
}

// ---------------------------------------------------------------------------------
// Filtering
// ---------------------------------------------------------------------------------

// Vertex values of replica r are rows [r*V, (r+1)*V) of a (R*V, M) buffer; point p
// of replica r is row r*P + p of the (R*P, M) pixel-major values.

// One thread per (vertex row, label): out = sum of weight * value over the vertex's
// contributions, in point order.
__global__ void splat_kernel(const float* __restrict__ values, int64_t labels, int64_t points,
                             int64_t vertices, int64_t total, const int64_t* __restrict__ row_start,
                             const int32_t* __restrict__ contribution_point,
                             const float* __restrict__ contribution_weight,
                             float* __restrict__ out) {
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= total) return;
  const int64_t row = index / labels;
  const int64_t label = index - row * labels;
  const int64_t replica = row / vertices;
  const int64_t vertex = row - replica * vertices;
  const float* source = values + replica * points * labels + label;
  float sum = 0.0f;
  const int64_t end = row_start[vertex + 1];
  for (int64_t c = row_start[vertex]; c < end; ++c) {
    sum += contribution_weight[c] * source[static_cast<int64_t>(contribution_point[c]) * labels];
  }
  out[index] = sum;
}

// One blur pass along one axis: out = in + 0.5 * (in[n1] + in[n2]).
__global__ void blur_kernel(const float* __restrict__ in, float* __restrict__ out,
                            const int32_t* __restrict__ axis_neighbours, int64_t labels,
                            int64_t vertices, int64_t total) {
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= total) return;
  const int64_t row = index / labels;
  const int64_t label = index - row * labels;
  const int64_t replica = row / vertices;
  const int64_t vertex = row - replica * vertices;
  const float* base = in + replica * vertices * labels + label;
  const int32_t n1 = axis_neighbours[2 * vertex];
  const int32_t n2 = axis_neighbours[2 * vertex + 1];
  const float first = n1 >= 0 ? base[static_cast<int64_t>(n1) * labels] : 0.0f;
  const float second = n2 >= 0 ? base[static_cast<int64_t>(n2) * labels] : 0.0f;
  out[index] = in[index] + 0.5f * (first + second);
}

// One thread per (point row, label): out = sum over the point's vertices of
// weight * vertex value (the weights already hold alpha and any normaliser).
__global__ void slice_kernel(const float* __restrict__ vertex_values, int64_t labels,
                             int64_t points, int64_t vertices, int corners,
                             const int32_t* __restrict__ point_vertex,
                             const float* __restrict__ slice_weight, int64_t total,
                             float* __restrict__ out) {
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= total) return;
  const int64_t row = index / labels;
  const int64_t label = index - row * labels;
  const int64_t replica = row / points;
  const int64_t point = row - replica * points;
  const int32_t* ids = point_vertex + point * corners;
  const float* weights = slice_weight + point * corners;
  const float* base = vertex_values + replica * vertices * labels + label;
  float sum = 0.0f;
  for (int r = 0; r < corners; ++r) sum += weights[r] * base[static_cast<int64_t>(ids[r]) * labels];
  out[index] = sum;
}

// ---------------------------------------------------------------------------------
// Fused slice + compatibility + unary + softmax
// ---------------------------------------------------------------------------------

struct SliceTerm {
  const float* vertex_values;  // (R*V, M) blurred
  const int32_t* point_vertex;  // (P, d+1)
  const float* slice_weight;    // (P, d+1)
  const float* compat;          // Potts: 1 value; diagonal: M; matrix: M*M symmetrised
  int64_t points;               // P: points of one replica (N shared, B*N otherwise)
  int64_t vertices;             // V
  int corners;                  // d+1
  int kind;                     // CompatKind
  int shared_slot;              // matrix: row of the pixel's shared buffer
};

struct UpdateGroup {
  SliceTerm terms[kMaxTermsPerLaunch];
  int count;
  int matrix_count;
};

__device__ __forceinline__ float slice_value(const SliceTerm& term, int64_t pixel, int64_t labels,
                                             int64_t label) {
  const int64_t replica = pixel / term.points;
  const int64_t point = pixel - replica * term.points;
  const int32_t* ids = term.point_vertex + point * term.corners;
  const float* weights = term.slice_weight + point * term.corners;
  const float* base = term.vertex_values + replica * term.vertices * labels + label;
  float sum = 0.0f;
  for (int r = 0; r < term.corners; ++r) {
    sum += weights[r] * base[static_cast<int64_t>(ids[r]) * labels];
  }
  return sum;
}

// Reductions over aligned groups of `width` lanes (a power of two <= 32). Every lane
// of the warp calls them.
__device__ __forceinline__ float group_max(float value, int width) {
  for (int offset = width / 2; offset > 0; offset /= 2) {
    value = fmaxf(value, __shfl_xor_sync(0xffffffffu, value, offset));
  }
  return value;
}

__device__ __forceinline__ float group_sum(float value, int width) {
  for (int offset = width / 2; offset > 0; offset /= 2) {
    value += __shfl_xor_sync(0xffffffffu, value, offset);
  }
  return value;
}

// A group of `width` lanes per pixel (blockDim.x is a multiple of 32). The energy
// starts at -unary (start_from_unary) or at the partial energy a previous launch left
// in q; each term subtracts its compatibility-weighted filtered marginals. With
// finish_with_softmax, q gets softmax(energy), else the energy itself.
__global__ void mean_field_update_kernel(const float* __restrict__ unary, float* __restrict__ q,
                                         int64_t pixels, int64_t labels, int width,
                                         UpdateGroup group, bool start_from_unary,
                                         bool finish_with_softmax) {
  extern __shared__ float filtered_shared[];
  const int groups_per_block = static_cast<int>(blockDim.x) / width;
  const int local_group = static_cast<int>(threadIdx.x) / width;
  const int lane = static_cast<int>(threadIdx.x) - local_group * width;
  const int64_t pixel = static_cast<int64_t>(blockIdx.x) * groups_per_block + local_group;
  const bool valid = pixel < pixels;
  float* q_row = q + (valid ? pixel : 0) * labels;
  const float* unary_row = unary + (valid ? pixel : 0) * labels;
  float* shared_rows =
      filtered_shared + static_cast<int64_t>(local_group) * group.matrix_count * labels;

  // Matrix compatibilities need the pixel's whole filtered row first.
  if (group.matrix_count > 0) {
    for (int t = 0; t < group.count; ++t) {
      const SliceTerm& term = group.terms[t];
      if (term.kind != kMatrix) continue;
      float* filtered = shared_rows + static_cast<int64_t>(term.shared_slot) * labels;
      if (valid) {
        for (int64_t label = lane; label < labels; label += width) {
          filtered[label] = slice_value(term, pixel, labels, label);
        }
      }
    }
    __syncwarp();
  }

  float local_max = -INFINITY;
  if (valid) {
    for (int64_t label = lane; label < labels; label += width) {
      float energy = start_from_unary ? -unary_row[label] : q_row[label];
      for (int t = 0; t < group.count; ++t) {
        const SliceTerm& term = group.terms[t];
        // pydensecrf: energy -= compat(filtered), compat(x) = -w x (Potts),
        // diag(v) x, or W x with W = (m + m^T) / 2.
        float pairwise;
        if (term.kind == kPotts) {
          pairwise = -term.compat[0] * slice_value(term, pixel, labels, label);
        } else if (term.kind == kDiagonal) {
          pairwise = term.compat[label] * slice_value(term, pixel, labels, label);
        } else {
          const float* filtered = shared_rows + static_cast<int64_t>(term.shared_slot) * labels;
          const float* row = term.compat + label * labels;
          pairwise = 0.0f;
          for (int64_t other = 0; other < labels; ++other) pairwise += row[other] * filtered[other];
        }
        energy -= pairwise;
      }
      q_row[label] = energy;
      local_max = fmaxf(local_max, energy);
    }
  }
  if (!finish_with_softmax) return;  // uniform over the grid

  const float row_max = group_max(local_max, width);
  float local_sum = 0.0f;
  if (valid) {
    for (int64_t label = lane; label < labels; label += width) {
      const float e = expf(q_row[label] - row_max);
      q_row[label] = e;
      local_sum += e;
    }
  }
  const float row_sum = group_sum(local_sum, width);
  if (valid) {
    for (int64_t label = lane; label < labels; label += width) q_row[label] = q_row[label] / row_sum;
  }
}

// ---------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------

struct DeviceLattice {
  int d = 0;
  int64_t points = 0;    // P
  int64_t replicas = 1;  // R
  int64_t vertices = 0;  // V
  at::Tensor point_vertex;         // (P, d+1) int32
  at::Tensor slice_weight;         // (P, d+1) float: alpha * barycentric * n_after
  at::Tensor row_start;            // (V+1) int64: CSR over contributions
  at::Tensor contribution_point;   // (entries) int32
  at::Tensor contribution_weight;  // (entries) float: barycentric * n_before
  at::Tensor neighbours;           // (d+1, V, 2) int32
};

// The current stream of the current device (the guard in dense_crf_inference_cuda sets
// the device). c10's header is used instead of ATen/cuda/CUDAContext.h, which pulls in
// cuSPARSE / cuBLAS headers that a bare toolkit may lack.
cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }

// Splat `values` ((R*P, labels) pixel-major) and blur; the result is in buffers[(d+1) % 2].
void splat_and_blur(const DeviceLattice& lattice, const at::Tensor& values, int64_t labels,
                    at::Tensor* buffers) {
  const int64_t total = lattice.replicas * lattice.vertices * labels;
  if (total == 0) return;
  const unsigned int blocks = block_count(total, kThreads);
  splat_kernel<<<blocks, kThreads, 0, current_stream()>>>(
      values.data_ptr<float>(), labels, lattice.points, lattice.vertices, total,
      lattice.row_start.data_ptr<int64_t>(), lattice.contribution_point.data_ptr<int32_t>(),
      lattice.contribution_weight.data_ptr<float>(), buffers[0].data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int32_t* neighbours = lattice.neighbours.data_ptr<int32_t>();
  for (int axis = 0; axis <= lattice.d; ++axis) {
    blur_kernel<<<blocks, kThreads, 0, current_stream()>>>(
        buffers[axis % 2].data_ptr<float>(), buffers[(axis + 1) % 2].data_ptr<float>(),
        neighbours + static_cast<int64_t>(axis) * lattice.vertices * 2, labels, lattice.vertices,
        total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

int result_buffer(const DeviceLattice& lattice) { return (lattice.d + 1) % 2; }

// Builds the lattice of one pairwise kernel for the whole batch. `kernel_index` only
// names the kernel in errors.
DeviceLattice build_lattice(const at::Tensor& features, int64_t batch, int64_t points_per_image,
                            Normalization normalization, size_t kernel_index) {
  DeviceLattice lattice;
  const int d = static_cast<int>(features.size(1));
  const int corners = d + 1;
  const bool shared = batch == 1 || features.stride(0) == 0;
  lattice.d = d;
  lattice.points = shared ? points_per_image : batch * points_per_image;
  lattice.replicas = shared ? batch : 1;
  const int64_t images = shared ? 1 : batch;
  const int64_t points = lattice.points;
  // Entries: the points' d+1 vertices, then pydensecrf's padding points (the origin)
  // per image when N % 4 != 0.
  const int64_t point_entries = points * corners;
  const int64_t origin_entries = points_per_image % 4 != 0 ? images * corners : 0;
  const int64_t entries = point_entries + origin_entries;
  TORCH_CHECK_VALUE(entries < std::numeric_limits<int32_t>::max(),
                    "dense_crf (CUDA): features[", kernel_index, "] gives ", entries,
                    " lattice entries (about B*N*(d+1)), more than 2^31 - 1; split the batch");

  const auto int_options = features.options().dtype(at::kInt);
  const auto long_options = features.options().dtype(at::kLong);
  const auto float_options = features.options().dtype(at::kFloat);

  // 1. Embed every point.
  at::Tensor quotients = at::empty({entries, d}, int_options);
  at::Tensor barycentric = at::empty({point_entries}, float_options);
  at::Tensor too_large = at::zeros({1}, int_options);
  {
    EmbedParams params{};
    params.features = features.data_ptr<float>();
    params.stride_image = shared ? 0 : features.stride(0);
    params.stride_dim = features.stride(1);
    params.stride_point = features.stride(2);
    params.points_per_image = points_per_image;
    params.points = points;
    params.d = d;
    lattice_scale_factors(d, params.scale);
    embed_kernel<<<block_count(points, kThreads), kThreads, 0, current_stream()>>>(
        params, quotients.data_ptr<int32_t>(), barycentric.data_ptr<float>(),
        too_large.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (origin_entries > 0) {
    origin_quotients_kernel<<<block_count(origin_entries, kThreads), kThreads, 0,
                              current_stream()>>>(point_entries, origin_entries, d,
                                                  quotients.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // 2. Pack keys into int64 codes, bits per quotient from its range.
  KeyPacking packing{};
  packing.d = d;
  {
    // One device-to-host copy: (2, d) quotient bounds, then the too-large flag.
    const at::Tensor bounds =
        at::cat({at::stack({quotients.amin(0), quotients.amax(0)}).flatten(), too_large})
            .to(at::kLong)
            .cpu();
    const int64_t* bound = bounds.data_ptr<int64_t>();
    TORCH_CHECK_VALUE(bound[2 * d] == 0, "dense_crf (CUDA): features[", kernel_index,
                      "] has values too large for the lattice (a lattice coordinate beyond ",
                      kMaxKeyMagnitude, "): the features are far too finely scaled.");
    int shift = 0;
    for (int i = d - 1; i >= 0; --i) {
      packing.quotient_min[i] = bound[i];
      packing.quotient_range[i] = bound[d + i] - bound[i];
      const int bits = bits_for(packing.quotient_range[i]);
      packing.shift[i] = shift;
      packing.mask[i] = bits == 0 ? 0 : (~uint64_t{0} >> (64 - bits));
      shift += bits;
    }
    const int remainder_bits = bits_for(d);
    packing.remainder_shift = shift;
    packing.remainder_mask = ~uint64_t{0} >> (64 - remainder_bits);
    shift += remainder_bits;
    packing.image_shift = shift;
    const int total_bits = shift + bits_for(images - 1);
    TORCH_CHECK_VALUE(total_bits <= 63, "dense_crf (CUDA): the lattice of features[", kernel_index,
                      "] (d = ", d, ") needs ", total_bits,
                      " bits per packed vertex key, more than 63: its features span too wide a "
                      "range for their scale. Use larger kernel standard deviations (sxy, srgb), "
                      "a smaller image or batch, or the CPU path.");
  }
  at::Tensor codes = at::empty({entries}, long_options);
  pack_keys_kernel<<<block_count(entries, kThreads), kThreads, 0, current_stream()>>>(
      quotients.data_ptr<int32_t>(), entries, point_entries, points_per_image * corners, packing,
      codes.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  quotients = at::Tensor();

  // 3. Sort (stable: equal codes keep point order), deduplicate, and invert.
  at::Tensor sorted_codes;
  at::Tensor order;
  std::tie(sorted_codes, order) = at::sort(codes, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  codes = at::Tensor();
  at::Tensor vertex_codes;
  at::Tensor vertex_of_sorted;
  at::Tensor counts;
  std::tie(vertex_codes, vertex_of_sorted, counts) =
      at::unique_consecutive(sorted_codes, /*return_inverse=*/true, /*return_counts=*/true);
  sorted_codes = at::Tensor();
  vertex_codes = vertex_codes.contiguous();
  const int64_t vertices = vertex_codes.size(0);
  lattice.vertices = vertices;

  lattice.row_start = at::zeros({vertices + 1}, long_options);
  lattice.row_start.narrow(0, 1, vertices).copy_(at::cumsum(counts, 0));
  lattice.point_vertex = at::empty({points, corners}, int_options);
  lattice.contribution_point = at::empty({entries}, int_options);
  lattice.contribution_weight = at::empty({entries}, float_options);
  build_contributions_kernel<<<block_count(entries, kThreads), kThreads, 0, current_stream()>>>(
      order.data_ptr<int64_t>(), vertex_of_sorted.contiguous().data_ptr<int64_t>(),
      barycentric.data_ptr<float>(), entries, point_entries, corners,
      lattice.point_vertex.data_ptr<int32_t>(),
      lattice.contribution_point.data_ptr<int32_t>(),
      lattice.contribution_weight.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  order = at::Tensor();
  vertex_of_sorted = at::Tensor();

  // 4. Blur neighbours.
  lattice.neighbours = at::empty({corners, vertices, 2}, int_options);
  blur_neighbours_kernel<<<block_count(corners * vertices, kThreads), kThreads, 0,
                           current_stream()>>>(vertex_codes.data_ptr<int64_t>(), vertices, packing,
                                               lattice.neighbours.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // 5. Slice weights alpha * barycentric, then the normaliser.
  lattice.slice_weight = at::empty({points, corners}, float_options);
  scale_weights_kernel<<<block_count(point_entries, kThreads), kThreads, 0, current_stream()>>>(
      barycentric.data_ptr<float>(), lattice_alpha(d), point_entries,
      lattice.slice_weight.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (normalization != kNoNormalization) {
    // norm = K(ones) with the plain weights (one replica suffices: it is per point).
    DeviceLattice plain = lattice;
    plain.replicas = 1;
    at::Tensor buffers[2] = {at::empty({vertices, 1}, float_options),
                             at::empty({vertices, 1}, float_options)};
    const at::Tensor ones = at::ones({points, 1}, float_options);
    splat_and_blur(plain, ones, 1, buffers);
    at::Tensor norm = at::empty({points}, float_options);
    slice_kernel<<<block_count(points, kThreads), kThreads, 0, current_stream()>>>(
        buffers[result_buffer(plain)].data_ptr<float>(), 1, points, vertices, corners,
        lattice.point_vertex.data_ptr<int32_t>(), lattice.slice_weight.data_ptr<float>(), points,
        norm.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    at::Tensor factor = at::empty({points}, float_options);
    normaliser_kernel<<<block_count(points, kThreads), kThreads, 0, current_stream()>>>(
        norm.data_ptr<float>(), points, normalization == kNormalizeSymmetric,
        factor.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (normalization == kNormalizeSymmetric || normalization == kNormalizeBefore) {
      multiply_by_point_kernel<<<block_count(entries, kThreads), kThreads, 0,
                                 current_stream()>>>(
          lattice.contribution_weight.data_ptr<float>(),
          lattice.contribution_point.data_ptr<int32_t>(), corners, factor.data_ptr<float>(),
          entries);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (normalization == kNormalizeSymmetric || normalization == kNormalizeAfter) {
      multiply_by_point_kernel<<<block_count(entries, kThreads), kThreads, 0,
                                 current_stream()>>>(lattice.slice_weight.data_ptr<float>(),
                                                     nullptr, corners, factor.data_ptr<float>(),
                                                     point_entries);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  return lattice;
}

// Smallest power of two >= min(labels, 32): lanes per pixel in the fused update.
int group_width_for(int64_t labels) {
  int width = 1;
  while (width < 32 && width < labels) width *= 2;
  return width;
}

// Threads per block of the fused update: as many as fit the shared memory, at least
// one warp.
int update_threads(int width, int matrix_count, int64_t labels) {
  const int64_t bytes_per_warp =
      static_cast<int64_t>(32 / width) * matrix_count * labels * static_cast<int64_t>(sizeof(float));
  int warps = kThreads / 32;
  while (warps > 1 && warps * bytes_per_warp > kMaxSharedBytes) warps /= 2;
  return warps * 32;
}

void launch_update(const at::Tensor& unary, at::Tensor& q, int64_t pixels, int64_t labels,
                   const UpdateGroup& group, bool start_from_unary, bool finish_with_softmax) {
  const int width = group_width_for(labels);
  const int threads = update_threads(width, group.matrix_count, labels);
  const int groups_per_block = threads / width;
  const int64_t shared_bytes = static_cast<int64_t>(groups_per_block) * group.matrix_count *
                               labels * static_cast<int64_t>(sizeof(float));
  TORCH_CHECK(shared_bytes <= kMaxSharedBytes, "dense_crf (CUDA): internal error, ", shared_bytes,
              " bytes of shared memory requested");
  mean_field_update_kernel<<<block_count(pixels, groups_per_block), threads,
                             static_cast<size_t>(shared_bytes), current_stream()>>>(
      unary.data_ptr<float>(), q.data_ptr<float>(), pixels, labels, width, group,
      start_from_unary, finish_with_softmax);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor dense_crf_inference_cuda(const at::Tensor& unary, at::TensorList features,
                                    at::TensorList compat, at::IntArrayRef normalization,
                                    int64_t iterations, const c10::optional<at::Tensor>& init_q,
                                    int64_t grid_width) {
  // grid_width only picks the CPU's visiting order; the GPU's needs no hint.
  check_dense_crf_arguments(unary, features, compat, normalization, iterations, init_q,
                            grid_width);
  TORCH_CHECK_VALUE(unary.is_cuda(), "unary must be a CUDA tensor, got ", unary.device());
  const c10::cuda::CUDAGuard device_guard(unary.device());

  const int64_t batch = unary.size(0);
  const int64_t labels = unary.size(1);
  const int64_t points = unary.size(2);
  const int64_t pixels = batch * points;
  const size_t num_kernels = features.size();

  // Pixel-major (B*N, M) copies of the energies and the marginals.
  at::Tensor unary_rows = at::empty({batch, points, labels}, unary.options());
  unary_rows.copy_(unary.transpose(1, 2));
  at::Tensor q = at::empty({batch, points, labels}, unary.options());
  if (init_q.has_value()) q.copy_(init_q->transpose(1, 2));

  // Lattices, compatibilities, blur buffers, and the fused-update launch groups.
  const int width = group_width_for(labels);
  std::vector<DeviceLattice> lattices;
  std::vector<at::Tensor> compat_values;
  std::vector<std::array<at::Tensor, 2>> buffers;
  std::vector<UpdateGroup> groups;
  if (iterations > 0) {
    lattices.reserve(num_kernels);
    for (size_t k = 0; k < num_kernels; ++k) {
      lattices.push_back(build_lattice(features[k], batch, points,
                                       static_cast<Normalization>(normalization[k]), k));
    }
    UpdateGroup current{};
    for (size_t k = 0; k < num_kernels; ++k) {
      const DeviceLattice& lattice = lattices[k];
      at::Tensor weights = compat[k].to(unary.device(), at::kFloat);
      CompatKind kind = kPotts;
      if (weights.dim() == 1) {
        kind = kDiagonal;
      } else if (weights.dim() == 2) {
        kind = kMatrix;
        weights = (weights + weights.t()).mul_(0.5);
      }
      compat_values.push_back(weights.contiguous());
      const auto rows = lattice.replicas * lattice.vertices;
      buffers.push_back({at::empty({rows, labels}, unary.options()),
                         at::empty({rows, labels}, unary.options())});

      if (kind == kMatrix) {
        TORCH_CHECK_VALUE(
            static_cast<int64_t>(32 / width) * labels * static_cast<int64_t>(sizeof(float)) <=
                kMaxSharedBytes,
            "dense_crf (CUDA): a matrix compatibility supports at most ",
            kMaxSharedBytes / static_cast<int64_t>(sizeof(float)), " labels, got ", labels);
      }
      const bool full = current.count == kMaxTermsPerLaunch;
      const bool no_room =
          kind == kMatrix && static_cast<int64_t>(32 / width) * (current.matrix_count + 1) *
                                     labels * static_cast<int64_t>(sizeof(float)) >
                                 kMaxSharedBytes;
      if (current.count > 0 && (full || no_room)) {
        groups.push_back(current);
        current = UpdateGroup{};
      }
      SliceTerm term{};
      term.vertex_values = buffers.back()[result_buffer(lattice)].data_ptr<float>();
      term.point_vertex = lattice.point_vertex.data_ptr<int32_t>();
      term.slice_weight = lattice.slice_weight.data_ptr<float>();
      term.compat = compat_values.back().data_ptr<float>();
      term.points = lattice.points;
      term.vertices = lattice.vertices;
      term.corners = lattice.d + 1;
      term.kind = kind;
      term.shared_slot = kind == kMatrix ? current.matrix_count++ : -1;
      current.terms[current.count++] = term;
    }
    if (current.count > 0) groups.push_back(current);
  }

  if (!init_q.has_value()) {
    launch_update(unary_rows, q, pixels, labels, UpdateGroup{}, /*start_from_unary=*/true,
                  /*finish_with_softmax=*/true);
  }
  for (int64_t iteration = 0; iteration < iterations; ++iteration) {
    for (size_t k = 0; k < num_kernels; ++k) {
      splat_and_blur(lattices[k], q, labels, buffers[k].data());
    }
    if (groups.empty()) {
      launch_update(unary_rows, q, pixels, labels, UpdateGroup{}, true, true);
    }
    for (size_t g = 0; g < groups.size(); ++g) {
      launch_update(unary_rows, q, pixels, labels, groups[g], /*start_from_unary=*/g == 0,
                    /*finish_with_softmax=*/g + 1 == groups.size());
    }
  }
  return q.transpose(1, 2).contiguous();
}

}  // namespace crf
}  // namespace wsss_fast
