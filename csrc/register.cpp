// The one place where wsss_fast's compiled ops are declared (TORCH_LIBRARY) and bound
// to their per-device kernels (TORCH_LIBRARY_IMPL). Fake (meta) kernels for
// torch.compile are registered from Python (wsss_fast/ops/).
#include <Python.h>
#include <torch/library.h>

#include "crf/dense_crf.h"

extern "C" {
// Importing wsss_fast._C runs the static registrations below; the module itself is
// empty.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(wsss_fast, m) {
  m.def(
      "dense_crf_inference(Tensor unary, Tensor[] features, Tensor[] compat, "
      "int[] normalization, int iterations, Tensor? init_q=None, int grid_width=0) -> Tensor");
  m.def("finite_copy(Tensor values, str name) -> Tensor");
}

TORCH_LIBRARY_IMPL(wsss_fast, CPU, m) {
  m.impl("dense_crf_inference", &wsss_fast::crf::dense_crf_inference_cpu);
  m.impl("finite_copy", &wsss_fast::crf::finite_copy_cpu);
}

#ifdef WSSS_FAST_WITH_CUDA
TORCH_LIBRARY_IMPL(wsss_fast, CUDA, m) {
  m.impl("dense_crf_inference", &wsss_fast::crf::dense_crf_inference_cuda);
}
#endif
