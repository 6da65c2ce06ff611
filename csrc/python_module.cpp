// The Python extension module fastunet._C: loading it registers the ops (static initializers in ops.cpp
// and ops_cuda.cu) and records what the library was built against, for the import-time checks.
#include <Python.h>
#if __has_include(<torch/headeronly/version.h>)
#include <torch/headeronly/version.h>
#else
#include <torch/version.h>
#endif

#include "fastunet_math.h"

#ifndef FASTUNET_CUDA_VERSION
#define FASTUNET_CUDA_VERSION ""
#endif
#ifndef FASTUNET_CUDA_ARCHS
#define FASTUNET_CUDA_ARCHS ""
#endif

static struct PyModuleDef fastunet_c_module = {PyModuleDef_HEAD_INIT, "_C",
                                               "fastunet's compiled ops (torch.ops.fastunet.*)", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&fastunet_c_module);
  if (m == nullptr) return nullptr;
  if (PyModule_AddStringConstant(m, "built_torch_version", TORCH_VERSION) < 0 ||
      PyModule_AddStringConstant(m, "built_cuda_version", FASTUNET_CUDA_VERSION) < 0 ||
      PyModule_AddStringConstant(m, "built_cuda_archs", FASTUNET_CUDA_ARCHS) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
