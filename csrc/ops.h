// Registration hooks of the C++ CPU kernels; each kernels/*.py contract has one here.
#pragma once
#include <pybind11/pybind11.h>

void register_sampling(pybind11::module_& m);
void register_masking(pybind11::module_& m);
