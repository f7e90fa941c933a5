// CUDA emulator (tests/cuda_emu): device built-ins for compiling csrc/cuda kernels as host C++.
#pragma once
#include "../device.h"
