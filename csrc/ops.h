// Registration hooks of the C++ CPU kernels; each kernels/*.py contract has one here.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>

void register_sampling(pybind11::module_& m);
void register_masking(pybind11::module_& m);
void register_attention(pybind11::module_& m);
void register_int8(pybind11::module_& m);

// Typed view of a numpy buffer (a zero-copy view of a CPU torch tensor): checks the dtype,
// the rank and that the last dimension is contiguous, so a wrong tensor raises instead of
// being silently copied (a copy would drop in-place writes).
template <typename T>
struct Buffer {
    T* data;
    pybind11::ssize_t rows, cols, row_stride;  // in elements; rank-1 arrays have rows == 1
};

template <typename T>
Buffer<T> buffer_of(pybind11::array& a, const char* name, int ndim) {
    if (!a.dtype().is(pybind11::dtype::of<T>()))
        throw pybind11::type_error(std::string(name) + ": expected dtype " +
                                   std::string(pybind11::str(pybind11::dtype::of<T>())) + ", found " +
                                   std::string(pybind11::str(a.dtype())));
    if (a.ndim() != ndim)
        throw pybind11::value_error(std::string(name) + ": expected " + std::to_string(ndim) +
                                    " dimensions, found " + std::to_string(a.ndim()));
    const auto item = static_cast<pybind11::ssize_t>(sizeof(T));
    if (a.shape(ndim - 1) > 1 && a.strides(ndim - 1) != item)
        throw pybind11::value_error(std::string(name) + ": last dimension must be contiguous");
    Buffer<T> b;
    b.data = static_cast<T*>(a.mutable_data());
    b.rows = ndim == 2 ? a.shape(0) : 1;
    b.cols = a.shape(ndim - 1);
    b.row_stride = ndim == 2 ? a.strides(0) / item : b.cols;
    return b;
}
