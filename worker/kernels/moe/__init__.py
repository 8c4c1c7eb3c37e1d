"""Sparse MoE ops: `reference` (torch, the source of truth), `triton` (the GPU kernels, same signatures),
`align` (the device-side grouping of pairs by expert) and `configs/` (tile configs tuned per device)."""
