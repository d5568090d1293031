"""The installed package: medjax.kernels and the gin files come from setup.py's mappings,
and the loss demo runs."""

import pathlib
import shutil
import subprocess
import sys
import zipfile

import gin
import jax.numpy as jnp
import numpy as np
import pytest

import medjax
from medjax import losses

ROOT = pathlib.Path(__file__).resolve().parents[2]
GIN_FILES = sorted((ROOT / "gin").rglob("*.gin"))


def test_kernels_subpackage_maps_to_top_level_folder():
    import medjax.kernels

    assert pathlib.Path(medjax.kernels.__file__).resolve() == ROOT / "kernels" / "__init__.py"


@pytest.mark.slow
def test_wheel_contents(tmp_path):
    # Build from a copy, so the build leaves nothing in the work tree.
    src = tmp_path / "src"
    shutil.copytree(
        ROOT, src, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", ".*cache")
    )
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheels),
            str(src),
        ],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = wheels.glob("medjax-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"medjax", f"medjax-{medjax.__version__}.dist-info"}, tops
    assert "medjax/kernels/__init__.py" in names
    assert "medjax/losses/grpo.py" in names
    for path in GIN_FILES:
        assert f"medjax/gin/{path.relative_to(ROOT / 'gin').as_posix()}" in names
    assert not any(n.startswith("tests/") for n in names)


@pytest.mark.parametrize("path", GIN_FILES, ids=[p.name for p in GIN_FILES])
def test_gin_files_parse(path):
    # Gin resolves every dynamically registered function while parsing, and rejects a
    # parameter the function does not have.
    gin.clear_config()
    try:
        gin.parse_config_file(str(path))
        assert "# Parameters for " in gin.config_str()
    finally:
        gin.clear_config()


def test_readme_commands_are_the_ones_ci_runs():
    readme = (ROOT / "README.md").read_text()
    commands = [b.split("```")[0].strip() for b in readme.split("```bash\n")[1:]]
    assert len(commands) == 2, commands
    assert commands[0].endswith("python run_train.py --gin_file=gin/experiments/quickstart_cpu.gin")
    assert commands[1] in (ROOT / ".ci" / "run").read_text()


def test_gin_dapo_binding_changes_the_loss():
    gin.clear_config()
    try:
        gin.parse_config_file(str(ROOT / "gin" / "losses" / "dapo.gin"))
        loss_fn = gin.get_configurable(losses.grpo_loss)
        logps = jnp.array([[-1.0, -1.0, 0.0], [-1.0, 0.0, 0.0]])
        mask = jnp.array([[1, 1, 0], [1, 0, 0]])
        loss, _ = loss_fn(logps, logps, jnp.array([1.0, -3.0]), mask)
        # dapo: token mean of -A = (-1 - 1 + 3) / 3; grpo's default would give 1.0.
        np.testing.assert_allclose(loss, 1 / 3, rtol=1e-6)
    finally:
        gin.clear_config()


def test_loss_demo_runs():
    out = subprocess.run(
        [sys.executable, "-m", "medjax.losses.demo"],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
    ).stdout
    # Rewards [1, 0, .5, 1 | 0, 0, 1, 0] centred by their group means .625 and .25.
    assert (
        "scale=none : [0.3750, -0.6250, -0.1250, 0.3750, -0.2500, -0.2500, 0.7500, -0.2500]" in out
    )
    for section in ("GRPO family", "GRAO", "M-GRPO", "SFT"):
        assert section in out
    assert "nan" not in out.lower()
