"""``python -m encoder`` moved to ``python -m pipeline``: fit writes the pipeline's Parquet format, which
the encoder does not know (it stays free of pyarrow). Say so in one line rather than a ModuleNotFoundError."""
import sys

if __name__ == "__main__":
    args = " ".join(sys.argv[1:]) or "fit|render|bench ..."
    print(f"error: the command moved: python -m pipeline {args}", file=sys.stderr)
    sys.exit(2)
