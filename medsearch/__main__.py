"""`python -m medsearch` runs the same CLI as the `medsearch` script."""

from medsearch.cli import run

if __name__ == "__main__":
    run()
