// oscqat._C: the op schemas of oscqat's contract (docs/semantics.md), defined once for every device.
// CPU kernels: csrc/cpu/quant_cpu.cpp (TORCH_LIBRARY_IMPL CPU); CUDA kernels: csrc/cuda/quant_cuda.cu
// (TORCH_LIBRARY_IMPL CUDA, only when built with CUDA). Fake (meta) implementations: oscqat/ops/fakes.py.
// Loading the module (`import oscqat._C`) registers everything; it exposes no Python functions itself.
#include <Python.h>

#include <torch/library.h>

extern "C" {
// An empty module, so that `import oscqat._C` loads the library (and runs the registrations below)
// without linking libtorch_python.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "oscqat C++/CUDA kernels; ops live in torch.ops.oscqat_C",
      -1,    // size of per-interpreter state
      nullptr,
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(oscqat_C, m) {
  m.def("weight_fwd(Tensor w, Tensor scale, Tensor? flags, Tensor? ema, int n, int p, bool damp, "
        "float damp_div) -> (Tensor, Tensor)");
  m.def("weight_fwd_track(Tensor w, Tensor scale, Tensor(a!) prev_int, Tensor(b!) flags, Tensor(c!) freq, "
        "Tensor(d!) ema, Tensor f_th, int n, int p, float momentum, bool damp, float damp_div) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("weight_bwd(Tensor g, Tensor w, Tensor scale, Tensor? flags, Tensor? ema, Tensor grad_d, int n, int p, "
        "float grad_scale, bool damp, float damp_div, bool tracked) -> (Tensor, Tensor)");
  // The three weight ops over many tensors (entry k of every list: one call; bools as ints), all tensors' work in
  // one parallel region (CPU only; oscqat_C::weight_quant_list uses them). A layer is tracked when its prev_int
  // is given.
  m.def("weight_fwd_list(Tensor[] w, Tensor[] scale, Tensor(a!)?[] prev_int, Tensor(b!)?[] flags, "
        "Tensor(c!)?[] freq, Tensor(d!)?[] ema, Tensor[] f_th, int[] n, int[] p, float[] momentum, int[] damp, "
        "float[] damp_div) -> (Tensor[], Tensor[], Tensor[])");
  m.def("weight_bwd_list(Tensor[] g, Tensor[] w, Tensor[] scale, Tensor?[] flags, Tensor?[] ema, Tensor[] grad_d, "
        "int[] n, int[] p, float[] grad_scale, int[] damp, float[] damp_div, int[] tracked) -> (Tensor[], Tensor[])");
  m.def("act_fwd(Tensor x, Tensor scale, Tensor? offset, int n, int p) -> Tensor");
  m.def("act_bwd(Tensor g, Tensor x, Tensor scale, Tensor? offset, int n, int p, float grad_scale) "
        "-> (Tensor, Tensor, Tensor)");
  // The step's first forward's checks on the CPU: 0 fine, 1 NaN/Inf (when `finite`), 2 checksum != ref.
  m.def("check_weight(Tensor w, Tensor scale, Tensor? ref, bool finite) -> int");
  // check_weight of every weight of a list in one pass (finite: 0/1 per weight), an answer per weight.
  m.def("check_weight_list(Tensor[] w, Tensor[] scale, Tensor?[] ref, int[] finite) -> int[]");
  // The weight quantizer, forward and backward, as one differentiable op (csrc/weight_quant_autograd.cpp);
  // `check_finite` / `weight_ref`: check_weight first, raising on a non-zero answer (CPU only).
  m.def("weight_quant(Tensor w, Tensor scale, Tensor(a!)? prev_int, Tensor(b!)? flags, Tensor(c!)? freq, "
        "Tensor(d!)? ema, Tensor f_th, int n, int p, float momentum, bool damp, float damp_div, float grad_scale, "
        "float? s_min, bool check_finite=False, Tensor? weight_ref=None) -> (Tensor, Tensor, Tensor)");
  // weight_quant of many layers in one call and one autograd node (entry k of every list: layer k); bools as
  // ints. All layers' checks run before any state is written; a failure names its layer as "[layer k]".
  m.def("weight_quant_list(Tensor[] w, Tensor[] scale, Tensor(a!)?[] prev_int, Tensor(b!)?[] flags, "
        "Tensor(c!)?[] freq, Tensor(d!)?[] ema, Tensor[] f_th, int[] n, int[] p, float[] momentum, int[] damp, "
        "float[] damp_div, float[] grad_scale, float[] s_min, int[] check_finite, Tensor?[] weight_ref) "
        "-> (Tensor[], Tensor[], Tensor[])");
}
