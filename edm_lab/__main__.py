"""`python -m edm_lab ...`: the `edm-lab` command."""
from edm_lab.cli import main

if __name__ == "__main__":
    main()
