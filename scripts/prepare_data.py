"""Tokenize JSONL files once into a memory-mapped token store (see docs/data.md).

    python scripts/prepare_data.py --input data.jsonl [more.jsonl ...] --tokenizer DIR --out DIR [--workers N]
"""

import sys

from chunkflow.prepare import main

if __name__ == "__main__":
    sys.exit(main())
