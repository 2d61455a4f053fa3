"""``python -m benchmarks [--out DIR] [--repeats K] [--quick]``: see `benchmarks.bench`."""
from benchmarks.bench import main

raise SystemExit(main())
