// CUDA emulator (tests/cuda_emu): the host runtime API subset that csrc/cuda uses.
#pragma once
#include "../runtime.h"
