// Argument checks of wsss_fast::dense_crf_inference, shared by every device. They
// raise c10::ValueError (ValueError in Python) naming the argument.
#include <ATen/ATen.h>

#include "crf/dense_crf.h"
#include "crf/lattice.h"

namespace wsss_fast {
namespace crf {

void check_dense_crf_arguments(const at::Tensor& unary, at::TensorList features,
                               at::TensorList compat, at::IntArrayRef normalization,
                               int64_t iterations, const c10::optional<at::Tensor>& init_q,
                               int64_t grid_width) {
  TORCH_CHECK_VALUE(unary.dim() == 3, "unary must have shape (B, M, N), got ", unary.sizes());
  TORCH_CHECK_VALUE(unary.scalar_type() == at::kFloat, "unary must be float32, got ",
                    unary.scalar_type());
  const int64_t batch = unary.size(0);
  const int64_t labels = unary.size(1);
  const int64_t points = unary.size(2);
  TORCH_CHECK_VALUE(batch > 0 && labels > 0 && points > 0,
                    "unary must have B, M, N > 0, got shape ", unary.sizes());
  TORCH_CHECK_VALUE(points < (int64_t{1} << 31) / (kMaxFeatureDim + 1),
                    "unary has too many points per image: ", points);
  // The CPU implementation checks finiteness while it reads the values (one pass
  // less over them); other devices check here.
  const bool check_values = unary.device().type() != at::kCPU;
  TORCH_CHECK_VALUE(!check_values || at::isfinite(unary).all().item<bool>(),
                    "unary contains NaN or infinite energies");
  TORCH_CHECK_VALUE(iterations >= 0, "iterations must be >= 0, got ", iterations);
  TORCH_CHECK_VALUE(grid_width >= 0 && (grid_width == 0 || points % grid_width == 0),
                    "grid_width must be 0 (points in any order) or an image width dividing N = ",
                    points, ", got ", grid_width);
  TORCH_CHECK_VALUE(features.size() == compat.size() && compat.size() == normalization.size(),
                    "features, compat and normalization must have one entry per kernel, got ",
                    features.size(), ", ", compat.size(), " and ", normalization.size());
  for (size_t k = 0; k < features.size(); ++k) {
    const at::Tensor& feature = features[k];
    TORCH_CHECK_VALUE(feature.dim() == 3 && feature.size(0) == batch && feature.size(2) == points,
                      "features[", k, "] must have shape (B, d, N) = (", batch, ", d, ", points,
                      "), got ", feature.sizes());
    TORCH_CHECK_VALUE(feature.size(1) >= 1 && feature.size(1) <= kMaxFeatureDim,
                      "features[", k, "] must have 1 to ", kMaxFeatureDim,
                      " dimensions d, got ", feature.size(1));
    TORCH_CHECK_VALUE(feature.scalar_type() == at::kFloat, "features[", k,
                      "] must be float32, got ", feature.scalar_type());
    TORCH_CHECK_VALUE(feature.device() == unary.device(), "features[", k, "] is on ",
                      feature.device(), " but unary on ", unary.device());
    TORCH_CHECK_VALUE(!check_values || at::isfinite(feature).all().item<bool>(), "features[", k,
                      "] contains NaN or infinite values");

    const at::Tensor& weights = compat[k];
    const bool potts = weights.dim() == 0;
    const bool diagonal = weights.dim() == 1 && weights.size(0) == labels;
    const bool matrix = weights.dim() == 2 && weights.size(0) == labels && weights.size(1) == labels;
    TORCH_CHECK_VALUE(potts || diagonal || matrix, "compat[", k,
                      "] must be a 0-d Potts weight, an (M,) vector or an (M, M) matrix with M = ",
                      labels, ", got shape ", weights.sizes());
    TORCH_CHECK_VALUE(weights.scalar_type() == at::kFloat, "compat[", k, "] must be float32, got ",
                      weights.scalar_type());
    TORCH_CHECK_VALUE(weights.device() == unary.device(), "compat[", k, "] is on ",
                      weights.device(), " but unary on ", unary.device());
    TORCH_CHECK_VALUE(normalization[k] >= kNoNormalization && normalization[k] <= kNormalizeSymmetric,
                      "normalization[", k, "] must be 0 (none), 1 (before), 2 (after) or 3 "
                      "(symmetric), got ", normalization[k]);
  }
  if (init_q.has_value()) {
    const at::Tensor& q = *init_q;
    TORCH_CHECK_VALUE(q.sizes() == unary.sizes(), "init_q must have the shape of unary ",
                      unary.sizes(), ", got ", q.sizes());
    TORCH_CHECK_VALUE(q.scalar_type() == at::kFloat, "init_q must be float32, got ",
                      q.scalar_type());
    TORCH_CHECK_VALUE(q.device() == unary.device(), "init_q is on ", q.device(),
                      " but unary on ", unary.device());
  }
}

}  // namespace crf
}  // namespace wsss_fast
