"""`python -m tileflow`: the `tileflow` command line, for environments without its script on PATH."""

from tileflow.cli import main

if __name__ == "__main__":
    main(prog_name="tileflow")
