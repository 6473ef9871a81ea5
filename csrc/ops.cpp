// Op schemas (namespace `backpropamine`) and their CPU implementations. Fake (meta)
// implementations and the autograd glue live in backpropamine_cuda/fused.py.
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "cpu/cpu_backend.h"
#include "ops/register.h"
#include "sequence_pass.h"
#include "trace_pass.h"

// Importing backpropamine_cuda._C registers the ops; the module itself is empty.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(backpropamine, m) {
  bp::define_ops(m);
  // The instruction set of the CPU kernels in use: "default", "avx2" or "avx512".
  m.def("cpu_isa() -> str", [] { return std::string(bp::cpu_isa_name(bp::cpu_isa())); });
  // The path the CPU RNN (or LSTM) sequence op takes at these sizes: "whole" or "steps".
  m.def(
      "cpu_sequence_path(int batch, int hidden, bool retroactive, int itemsize, "
      "bool lstm=False) -> str",
      [](int64_t batch, int64_t hidden, bool retroactive, int64_t itemsize, bool lstm) {
        const bp::Cell cell = lstm ? bp::Cell::Lstm : bp::Cell::Tanh;
        return std::string(
            bp::use_whole_sequence(cell, batch, hidden, retroactive, itemsize) ? "whole" : "steps");
      });
}

TORCH_LIBRARY_IMPL(backpropamine, CPU, m) { bp::impl_ops<bp::CpuBackend>(m); }
