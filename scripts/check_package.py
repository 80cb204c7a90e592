"""Build the sdist and wheel, check what they hold, and run the quickstart from the installed wheel.

    python scripts/check_package.py [--dist DIR] [--keep]

Run by .ci/run (needs `build`, in the test extra, and network access for the build's isolated environment
and the wheel's dependencies). Steps:

1. `python -m build` writes the sdist and, from it, the wheel (so the sdist is proven complete).
2. The wheel holds the `lora_onnx` package, its metadata and the license, nothing else (no `tests`
   package, no `models/`); the sdist holds the README, LICENSE, pyproject, tests and the bundled models.
3. A fresh virtual environment (no source tree on `sys.path`) installs the wheel; from an empty folder the
   quickstart's first command runs on the bundled tiny Llama (absolute path) and must prove its output,
   and the `lora-onnx` console script answers `--version`.

Exits 0 when everything holds, 1 with the failed check otherwise.
"""

from __future__ import annotations

import argparse
import email.parser
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import venv
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = ["inject", "{model}", "-o", "out/tiny_llama_lora.onnx", "--rank", "8", "--init", "random"]
# The wheel must stay small: the bundled models (1.9 MB) are test data, not package data.
MAX_WHEEL_BYTES = 1_000_000
REQUIRED_METADATA = ("Name", "Version", "Summary", "License-Expression", "Requires-Python", "Author")


class CheckFailed(Exception):
    """One packaging check that did not hold."""


def _run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]
    if result.returncode != 0:
        raise CheckFailed(f"{cmd[0]} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def build(dist: Path) -> tuple[Path, Path]:
    """Build the sdist and the wheel (from the sdist) into ``dist``; return their paths."""
    shutil.rmtree(dist, ignore_errors=True)
    _run([sys.executable, "-m", "build", "--outdir", str(dist), str(REPO)])
    (sdist,) = dist.glob("lora_onnx-*.tar.gz")
    (wheel,) = dist.glob("lora_onnx-*.whl")
    return sdist, wheel


def check_wheel(wheel: Path) -> str:
    """Only the package, its metadata and the license; no test data; returns the version."""
    if wheel.stat().st_size > MAX_WHEEL_BYTES:
        raise CheckFailed(f"{wheel.name} is {wheel.stat().st_size:,} bytes (limit {MAX_WHEEL_BYTES:,})")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        (meta_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = email.parser.Parser().parsestr(zf.read(meta_name).decode())
    tops = {n.split("/", 1)[0] for n in names}
    stray = {t for t in tops if t != "lora_onnx" and not t.endswith(".dist-info")}
    if stray:
        raise CheckFailed(f"{wheel.name} installs more than lora_onnx: {sorted(stray)}")
    if not any(n.endswith(".dist-info/licenses/LICENSE") for n in names):
        raise CheckFailed(f"{wheel.name} has no LICENSE in its dist-info")
    if "lora_onnx/cli/main.py" not in names:
        raise CheckFailed(f"{wheel.name} lacks lora_onnx/cli/main.py")
    missing = [key for key in REQUIRED_METADATA if not meta.get(key)]
    if missing:
        raise CheckFailed(f"{wheel.name} metadata lacks {missing}")
    if meta["License-Expression"] != "Apache-2.0":
        raise CheckFailed(f"license is {meta['License-Expression']!r}, expected 'Apache-2.0'")
    for key, what in (("Classifier", "classifiers"), ("Project-URL", "project URLs")):
        if not meta.get_all(key):
            raise CheckFailed(f"{wheel.name} metadata has no {what}")
    if not meta.get_payload().lstrip().startswith("# lora-onnx"):
        raise CheckFailed(f"{wheel.name} long description is not the README")
    return meta["Version"]


def check_sdist(sdist: Path) -> None:
    """The source: README, LICENSE, pyproject, the package, the tests and the bundled models."""
    with tarfile.open(sdist) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    wanted = [
        "README.md",
        "LICENSE",
        "pyproject.toml",
        "lora_onnx/__init__.py",
        "tests/conftest.py",
        "models/tiny_llama/model.onnx",
        "models/tiny_llama/model.onnx.data",
    ]
    missing = [n for n in wanted if n not in names]
    if missing:
        raise CheckFailed(f"{sdist.name} lacks {missing}")
    junk = sorted(n for n in names if "__pycache__" in n or n.endswith(".pyc"))
    if junk:
        raise CheckFailed(f"{sdist.name} holds compiled files: {junk[:5]}")


def check_installed(wheel: Path, version: str, workdir: Path) -> None:
    """A fresh venv with only the wheel (and its dependencies) runs the quickstart outside the source tree."""
    env_dir = workdir / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    _run([str(python), "-m", "pip", "install", "--quiet", str(wheel)])
    run_dir = workdir / "run"
    run_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    model = REPO / "models" / "tiny_llama" / "model.onnx"
    args = [a.format(model=model) for a in QUICKSTART] + ["--validate"]
    where = _run(
        [str(python), "-c", "import lora_onnx; print(lora_onnx.__file__)"], cwd=run_dir, env=env
    ).stdout.strip()
    if Path(where).resolve().is_relative_to(REPO):
        raise CheckFailed(f"lora_onnx was imported from the source tree ({where}), not the wheel")
    result = _run([str(python), "-m", "lora_onnx", *args], cwd=run_dir, env=env)
    if "all outputs agree" not in result.stdout or not (run_dir / "out" / "tiny_llama_lora.onnx").exists():
        raise CheckFailed(f"the quickstart did not prove and write its output:\n{result.stdout}")
    printed = _run([str(env_dir / "bin" / "lora-onnx"), "--version"], cwd=run_dir, env=env).stdout
    if version not in printed:
        raise CheckFailed(f"lora-onnx --version printed {printed!r}, expected {version}")


def main(argv: list[str] | None = None) -> int:
    """Run every check; print the first failure and return 1, else 0."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dist", type=Path, default=REPO / "dist", help="where the archives go")
    parser.add_argument("--keep", action="store_true", help="keep the temporary venv and run folder")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="lora-onnx-package-"))
    try:
        sdist, wheel = build(args.dist)
        check_sdist(sdist)
        version = check_wheel(wheel)
        check_installed(wheel, version, workdir)
    except CheckFailed as e:
        print(f"package check failed: {e}", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    size = wheel.stat().st_size
    print(f"package ok: {sdist.name}, {wheel.name} ({size:,} bytes); the quickstart ran from the wheel")
    return 0


if __name__ == "__main__":
    sys.exit(main())
