// d2v_engine._C: the CPU kernels of the three fused ops, called by d2v_engine/ops/cpp.py (which
// validates arguments with the reference's checks and adds autograd). The GIL is released while
// a kernel runs.
#include <torch/extension.h>

#include "ops.h"

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "C++ (OpenMP, multiversioned SIMD) CPU kernels of d2v_engine's fused ops";
  m.def("ema_update_cached", &d2v::ema_update_cached, py::arg("ema"), py::arg("student"),
        py::arg("shadow"), py::arg("decay"), py::call_guard<py::gil_scoped_release>(),
        "Runs the cached plan of these exact tensors and returns True, or returns False (miss).");
  m.def("ema_update_", &d2v::ema_update_, py::arg("ema"), py::arg("student"), py::arg("shadow"),
        py::arg("decay"), py::call_guard<py::gil_scoped_release>(),
        "Builds (and caches) the plan of these tensors and runs it.");
  m.def("ema_clear_cache", &d2v::ema_clear_cache, "Forgets every cached EMA plan.");
  m.def("ema_cache_size", &d2v::ema_cache_size, "Number of cached EMA plans.");
  m.def("make_targets", &d2v::make_targets, py::arg("layers"), py::arg("layer_norm"),
        py::arg("final_norm"), py::arg("mask"), py::arg("padding_mask"), py::arg("eps"),
        py::arg("repeat") = 1, py::call_guard<py::gil_scoped_release>(),
        "Averaged normalised targets [M, C] or [B, T, C] fp32 (norms: 0 none, 1 instance, "
        "2 layer); with repeat R, mask [B*R, T] selects rows of sample r / R for each copy r.");
  m.def("regression_loss_fwd", &d2v::regression_loss_fwd, py::arg("pred"), py::arg("target"),
        py::arg("beta"), py::arg("scale"), py::arg("mean"), py::arg("need_grad"),
        py::call_guard<py::gil_scoped_release>(),
        "Per-row losses [M] fp32 and the fp32 gradient (or an empty tensor).");
  m.def("regression_loss_bwd", &d2v::regression_loss_bwd, py::arg("grad"), py::arg("upstream"),
        py::arg("dtype"), py::call_guard<py::gil_scoped_release>(),
        "grad [M, C] fp32 times upstream (0-dim, or [M] per row), cast to dtype (0 fp32, "
        "1 bf16, 2 fp16).");
}
