"""`python -m transferops`: the same command as `transferops`."""

from transferops.cli import entry

if __name__ == "__main__":
    entry()
