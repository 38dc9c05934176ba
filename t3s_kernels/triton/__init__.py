"""The Triton kernels: `forward` (streaming lse), `backward` (the loss's gradients),
`config` (block shapes, splits, interpreter detection). Imported only where Triton is."""
