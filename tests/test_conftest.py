"""The XLA flags conftest.py sets are ones the running jaxlib knows: XLA aborts a process on an
unknown flag, so a flag removed by a jaxlib upgrade would kill every test worker."""

import os
import subprocess
import sys

PROBE = "import jax; print(jax.devices()[0].platform)"


def xla_starts_with(flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True,
                          text=True, timeout=120)


def test_every_conftest_flag_is_known_to_this_xla():
    flags = os.environ["XLA_FLAGS"].split()
    assert "--xla_backend_optimization_level=0" in flags
    done = xla_starts_with(" ".join(flags))
    assert done.returncode == 0 and done.stdout.strip() == "cpu", done.stderr[-2000:]


def test_an_unknown_flag_is_what_the_probe_catches():
    """The check above can fail: XLA refuses a flag it does not know."""
    done = xla_starts_with("--xla_cae_jax_no_such_flag=1")
    assert done.returncode != 0
    assert "Unknown flag" in done.stderr or "unknown flag" in done.stderr.lower()
