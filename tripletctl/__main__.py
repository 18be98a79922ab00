"""`python -m tripletctl` (what `torchrun -m tripletctl train ...` runs)."""

from tripletctl.cli import main

if __name__ == "__main__":
    main()
