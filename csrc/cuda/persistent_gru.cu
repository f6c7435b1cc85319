// The persistent kernels of the GRU cell (persistent.cuh): GruUnit in fp32, fp64, fp16 and bf16.
// Legend: as in persistent_kernels.cuh.
#include "persistent_kernels.cuh"

FASTRNN_INSTANTIATE_PERSISTENT(GruUnit)
