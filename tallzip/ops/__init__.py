"""Pure math over tensors (no I/O): task vectors, masks, quantizers and the low-bit representations."""
