"""`python -m fseft ...` (also what `torchrun -m fseft pretrain ...` runs)."""

from fseft.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
