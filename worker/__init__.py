"""tokenq worker: the job path from a Redis stream to a result and a usage event."""

import os

# One BLAS thread: the semantic cache's only matrix work is one matrix-vector product per
# lookup, which is bound by memory, and extra BLAS threads fight the event loop for the
# cores (measured: 15 ms with two threads on a busy 2-core machine, 2 ms with one). Set
# here, before anything imports numpy; an operator's own setting wins.
for _name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")
