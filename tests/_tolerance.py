"""Float32 tolerances for the tests, derived from the rounding they have to absorb.

Two programs computing the same maths in a different order (chunked vs whole, cached vs teacher-
forced, sharded vs one device, jaxalign vs torch, accumulated vs full batch, or the same XLA
program on a CPU with another vector width: AVX2 vs AVX-512 changes how XLA:CPU splits float32
reductions, and FMA changes the rounding of a·b + c) agree only up to rounding. One float32
rounding moves a value by at most half an ulp, F32_EPS/2 relative; a sum of n terms of size ~s
computed in another order differs by up to ~n·F32_EPS·s (typically ~sqrt(n)·F32_EPS·s), and a
network stacks such sums layer after layer. So a tolerance here is a number of float32 ulps of the
magnitude compared, `ulps(k, scale)` = k·F32_EPS·max|scale|, with k counted from the reduction
lengths at the call site and a margin for the reduction order being different on another CPU.

Comparisons of the same program on the same inputs (determinism, resume, identical shapes) stay
exact (`assert_array_equal`); those do not depend on the CPU.
"""

from __future__ import annotations

import jax
import numpy as np

F32_EPS = float(np.finfo(np.float32).eps)  # 2**-23 ~ 1.19e-7: one float32 ulp at 1.0


def ulps(k: float, scale=1.0) -> float:
    """`k` float32 ulps of `scale`: k·F32_EPS·max|scale|.

    `scale` is a number, an array or a pytree of arrays (its largest |element| is used: the
    magnitude that sets the rounding of the sums producing what is compared). With the default
    scale of 1 this is a relative tolerance, for `rtol=`.
    """
    leaves = jax.tree.leaves(scale)
    biggest = max(float(np.max(np.abs(np.asarray(x, np.float64)))) for x in leaves)
    return k * F32_EPS * biggest
