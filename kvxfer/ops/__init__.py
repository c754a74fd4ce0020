"""Copy operations over plans: a numpy reference (CPU) and the CUDA kernels of ``kvxfer/csrc/``.

Layered one way; each module imports only those below it, and importing any of them imports
neither cupy nor torch and creates no CUDA context:

- CPU, pure numpy: :mod:`~kvxfer.ops.reference` (the oracle), :mod:`~kvxfer.ops.host`
  (vectorized host gather/scatter), :mod:`~kvxfer.ops.jobs` (job records as the kernel reads
  them), :mod:`~kvxfer.ops.workloads` (the standard benchmark workloads).
- Bottom: :mod:`~kvxfer.ops.loader` (the CUDA sources shipped as package data, NVRTC, the
  on-disk cubin cache), :mod:`~kvxfer.ops.runtime` (one :class:`~kvxfer.ops.runtime.DeviceRuntime`
  per device: loaded kernels, launch facts, streams, pinned upload staging),
  :mod:`~kvxfer.ops.operands` (addresses, tensors, devices and streams a copy accepts).
- Kernels: :mod:`~kvxfer.ops.kernels` (a typed launch per kernel of ``kv_copy.cu``, the
  structs they read).
- Copies: :mod:`~kvxfer.ops.jobcopy` (by job records) and :mod:`~kvxfer.ops.pairs` (by block
  pairs), side by side.
- Top: :mod:`~kvxfer.ops.cuda` (gather / scatter / copy_blocks, picking the copy for a plan).
"""
