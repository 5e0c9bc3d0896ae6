"""edm-lab: a harness for ablations over the EDM design space (Karras et al., NeurIPS 2022)."""

__version__ = "0.1.0"
