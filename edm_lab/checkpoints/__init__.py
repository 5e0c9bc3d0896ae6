"""Checkpoints: this project's own format and a safe import of the reference's published snapshots.

`edm_lab.checkpoints.official.load_official(source, cache_dir)` opens the pre-trained EDM pickles
(`edm-*.pkl`, `baseline-*.pkl`, `network-snapshot-*.pkl` of the reference training loop) WITHOUT
executing the Python source they carry: a restricted unpickler admits only an explicit
allow-list of globals, the reference's persistent objects become inert records, and the network
is rebuilt from this project's own classes (`edm_lab.nets`, `edm_lab.design.precond`) with its
tensors copied in by parameter name.
"""
