"""The paper's design space as pure-torch math: no Hydra, Lightning or W&B in here."""
