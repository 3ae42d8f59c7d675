"""`python -m hf_zero ...` is the `hf-zero` command."""

from hf_zero.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
