// magnet_engine._C: C++ CPU implementations of the kernels in kernels/ (same contracts).
// Tensors cross the boundary as numpy buffers (zero-copy views of CPU torch tensors), so
// the extension builds against pybind11 alone, never against torch headers.
#include "ops.h"

PYBIND11_MODULE(_C, m) {
    m.doc() = "magnet-engine C++ CPU kernels";
    register_sampling(m);
    register_masking(m);
    register_attention(m);
    register_int8(m);
}
