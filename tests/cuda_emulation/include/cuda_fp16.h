// Stands in for the CUDA toolkit header in the emulated CUDA suite: see ../cuda_emulation.h.
#pragma once
#include "../cuda_emulation.h"
