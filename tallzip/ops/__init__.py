"""Pure math over tensors and arrays, no I/O: task vectors, the TALL rule, bit packing and the bit-select,
the TIES statistics, the quantizers, the quantized representations of a task and the sub-2-bit ones (lowbit)."""
