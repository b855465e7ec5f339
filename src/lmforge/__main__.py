"""`python -m lmforge …` (what `torchrun … -m lmforge train …` runs) is the `lmforge` command."""

from lmforge.cli.main import run

if __name__ == "__main__":
    run()
