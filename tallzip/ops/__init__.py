"""Pure math over tensors and arrays, no I/O: task vectors, the TALL rule, bit packing and the bit-select,
the TIES statistics, the quantizers and the quantized representations of a task."""
