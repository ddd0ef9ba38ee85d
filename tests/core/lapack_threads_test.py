"""The solver's factorizations run on one BLAS thread from a process's very first layer on."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the BLAS limit applies on CPU only")
def test_first_factorization_of_a_fresh_process_is_single_threaded():
  """jaxlib loads its LAPACK (an OpenBLAS) lazily; a limit set before that load would miss it and
  the first layer would factorize with every thread (and round differently from later layers)."""
  code = textwrap.dedent("""
      import json
      import jax.numpy as jnp
      import threadpoolctl
      from gptq_jax.core import factor

      with factor._lapack_single_threaded():
        jnp.linalg.cholesky(4.0 * jnp.eye(64)).block_until_ready()  # as factorize() does
        inside = [(i["filepath"], i["num_threads"]) for i in threadpoolctl.threadpool_info()
                  if i["user_api"] == "blas"]
      print(json.dumps(inside))
  """)
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                        timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr
  inside = json.loads(proc.stdout.strip().splitlines()[-1])
  assert inside, "no BLAS library found"
  assert all(n == 1 for _, n in inside), inside
