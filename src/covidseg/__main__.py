"""`python -m covidseg ...` (also what `torchrun -m covidseg train ...` runs)."""

from covidseg.cli.main import run

if __name__ == "__main__":
    run()
