// The Python extension module fastunet._C: loading it registers the ops (static initializers in ops.cpp
// and ops_cuda.cu) and records what the library was built against, for the import-time checks.
#include <Python.h>
#if __has_include(<torch/headeronly/version.h>)
#include <torch/headeronly/version.h>
#else
#include <torch/version.h>
#endif

#include <cstring>

#include "cpu_lines.h"

#ifndef FASTUNET_CUDA_VERSION
#define FASTUNET_CUDA_VERSION ""
#endif
#ifndef FASTUNET_CUDA_ARCHS
#define FASTUNET_CUDA_ARCHS ""
#endif

// The instruction set of the CPU's line loops by name (cpu_lines.h), so that tests can run each one.
static const char* const line_isa_names[] = {"portable", "avx2", "avx512"};

static PyObject* set_line_isa(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) return nullptr;
  for (int i = 0; i < 3; ++i) {
    if (std::strcmp(name, line_isa_names[i]) != 0) continue;
    const int previous = static_cast<int>(fastunet::cpu::line_isa().load());
    if (!fastunet::cpu::set_line_isa(static_cast<fastunet::cpu::LineIsa>(i))) {
      PyErr_Format(PyExc_RuntimeError, "fastunet: this CPU cannot run the '%s' line loops", name);
      return nullptr;
    }
    return PyUnicode_FromString(line_isa_names[previous]);
  }
  PyErr_Format(PyExc_ValueError, "fastunet: unknown line loops '%s' (portable, avx2 or avx512)", name);
  return nullptr;
}

static PyObject* supported_line_isas(PyObject*, PyObject*) {
  PyObject* names = PyList_New(0);
  for (int i = 0; names != nullptr && i < 3; ++i) {
    if (!fastunet::cpu::cpu_has(static_cast<fastunet::cpu::LineIsa>(i))) continue;
    PyObject* name = PyUnicode_FromString(line_isa_names[i]);
    if (name == nullptr || PyList_Append(names, name) < 0) Py_CLEAR(names);
    Py_XDECREF(name);
  }
  return names;
}

static PyMethodDef fastunet_c_methods[] = {
    {"set_line_isa", set_line_isa, METH_O,
     "Sets the CPU line loops' instruction set by name (portable, avx2, avx512); returns the previous one."},
    {"supported_line_isas", supported_line_isas, METH_NOARGS,
     "The line loops' instruction sets this CPU can run, by name."},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef fastunet_c_module = {
    PyModuleDef_HEAD_INIT, "_C", "fastunet's compiled ops (torch.ops.fastunet.*)", -1, fastunet_c_methods};

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
