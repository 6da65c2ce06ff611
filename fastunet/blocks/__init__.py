"""The fused U-Net blocks, a module per concern; fastunet.functional is their public face (see its docstring)."""
