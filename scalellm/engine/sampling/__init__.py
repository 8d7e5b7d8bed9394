"""Tensor helpers of the sampler: penalties, top-k/top-p/min-p filters, random draws and logprobs."""
