"""Copy operations over plans: numpy reference (CPU) and CUDA kernels (csrc/)."""
