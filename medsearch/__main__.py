"""`python -m medsearch` runs the same CLI as the `medsearch` script."""

from medsearch.cli import main

if __name__ == "__main__":
    main()
