// Dense CRF mean-field inference: the per-device implementations behind the op
// wsss_fast::dense_crf_inference (schema and registration in csrc/register.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

namespace wsss_fast {
namespace crf {

// unary (B, M, N) float32 energies; features[k] (B, d_k, N) float32, the batch stride
// may be 0 to share one lattice across the batch; compat[k] float32, 0-d (Potts
// weight), (M,) (diagonal) or (M, M) (matrix, symmetrised); normalization[k] as
// pydensecrf's NormalizationType; init_q (B, M, N) marginals to start from instead of
// softmax(-unary); grid_width > 0 says the N points are the pixels of an image that
// wide in raster order (0: any points), which lets an implementation visit them in a
// cache-friendlier order. Returns Q (B, M, N) float32 after `iterations` mean-field
// steps.
at::Tensor dense_crf_inference_cpu(const at::Tensor& unary, at::TensorList features,
                                   at::TensorList compat, at::IntArrayRef normalization,
                                   int64_t iterations, const c10::optional<at::Tensor>& init_q,
                                   int64_t grid_width);

// A float32 copy of `values` (CPU, float32) in memory from the pool of large blocks
// (crf/cpu/large_buffer.h), checked for NaN and infinities in the same pass: a
// ValueError naming the array (`name`) when there are any. The pydensecrf drop-in
// copies the arrays it is given, as pydensecrf does.
at::Tensor finite_copy_cpu(const at::Tensor& values, c10::string_view name);

#ifdef WSSS_FAST_WITH_CUDA
at::Tensor dense_crf_inference_cuda(const at::Tensor& unary, at::TensorList features,
                                    at::TensorList compat, at::IntArrayRef normalization,
                                    int64_t iterations, const c10::optional<at::Tensor>& init_q,
                                    int64_t grid_width);
#endif

// Shared argument checks (ValueError on the Python side), used by every device.
void check_dense_crf_arguments(const at::Tensor& unary, at::TensorList features,
                               at::TensorList compat, at::IntArrayRef normalization,
                               int64_t iterations, const c10::optional<at::Tensor>& init_q,
                               int64_t grid_width);

}  // namespace crf
}  // namespace wsss_fast
