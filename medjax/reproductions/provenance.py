"""What a measurement records beside its numbers: the machine and the package versions
(benchmarks/ and the reproductions both write them into their JSON)."""

import importlib.metadata
import os
import platform


def machine() -> dict:
    """CPU model, core count, platform, Python, and JAX's backend and devices."""
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(
                line.split(":", 1)[1].strip() for line in f if line.startswith("model name")
            )
    except (OSError, StopIteration):
        pass
    import jax

    return {
        "cpu": model,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
    }


def versions(*packages: str) -> dict:
    """{package: installed version or None}."""
    out = {}
    for name in packages:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out
