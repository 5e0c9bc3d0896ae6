"""Denoisers and networks: the ideal denoiser of a finite dataset (more come with the paper's U-Nets)."""
