"""Fused Triton kernels registered as ``torch.ops.dsx.*`` with CPU, fake and autograd implementations."""
