"""Reading and writing files safely, and storing paths so that a committed artifact names no machine.

Writing:
- `writable_dir`: create an output folder and prove it can be written before any work starts.
- `atomic_write`: write a file under a temporary name, flush it to disk and rename it into place, so a
  reader (or a run killed half-way) sees the old file or the new one, never a partial one;
  `atomic_write_text`, `atomic_write_json` and `atomic_savefig` (a matplotlib figure) build on it;
  `remove_partial_writes` clears the temporary files of writers that were killed.
- `atomic_folder`: the same for a whole folder (world data, a model folder): built under a temporary
  name beside it, renamed into place at the end.
- `OutputLock`: one run at a time per output folder (an advisory lock the kernel drops when the process
  dies, so a killed run never leaves a stale lock).
- `stored_path`: the string a result file records for a path — relative to the repository when the path is
  inside it (the shipped defaults, `runs/`, `figures/`), as given otherwise.

Reading (each raises the toolkit's error type with one line naming the file, and record and field where
there are some; `attrib.errors`):
- `read_json`: a JSON file no larger than `max_json_bytes`, in UTF-8.
- `read_safetensors`: the tensors and metadata of a safetensors file, truncation and corruption caught.
- `inside_root`: a path taken from data, refused when it leaves its root (``..``, absolute, a symlink out).
- `open_image`: an RGB image, refused before decoding when larger than `max_image_pixels`;
  `image_size` the same check from the header alone.
- `require`: a field of a JSON object with the type it must have.

Limits come from the environment (``VISEDIT_MAX_JSON_BYTES``, ``VISEDIT_MAX_IMAGE_PIXELS``) or the
defaults below: 256 MiB of JSON (MMEdit's E-VQA train file is ~4 MiB) and 50 megapixels (COCO images are
~0.3).
"""
from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

from attrib.errors import ArtifactError, DataError, OutputBusy, VisEditError

MAX_JSON_BYTES = 256 * 2**20
MAX_IMAGE_PIXELS = 50_000_000
LOCK_FILE = ".visedit.lock"
DEAD_HOLDER_S = 5.0  # how long a lock whose holder has died may take to be released before it is reported

REPOSITORY = Path(__file__).resolve().parent.parent  # the checkout the packages are imported from


def writable_dir(out_dir: str | Path) -> Path:
    """``out_dir`` created if needed and checked writable; an OSError names the folder otherwise."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise OSError(f"{out_dir}: output folder cannot be written ({error.strerror})") from None
    return out_dir


def atomic_write(path: str | Path, write: Callable[[str], object]) -> Path:
    """Call ``write(tmp)`` on a temporary name beside ``path``, flush it to disk, then rename it to
    ``path``; when ``write`` fails the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # per process: two writers never share one
    try:
        write(str(tmp))
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """`atomic_write` of a text file (UTF-8)."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def stored_path(path: str | Path | None) -> str | None:
    """``path`` as a result file should record it: relative to the repository when inside it."""
    if path is None:
        return None
    resolved = Path(path).resolve()
    try:
        return resolved.relative_to(REPOSITORY).as_posix()
    except ValueError:
        return str(path)


def atomic_write_json(path: str | Path, data: Any, indent: int | None = 2) -> Path:
    """`atomic_write_text` of ``data`` as JSON with a final newline."""
    return atomic_write_text(path, json.dumps(data, indent=indent, ensure_ascii=False) + "\n")


def remove_partial_writes(folder: str | Path) -> list[Path]:
    """Remove what `atomic_write` leaves in ``folder`` when its process is killed mid-write: the hidden
    temporary files (``.<name>.<pid>.tmp``) of processes no longer running. Returns the removed paths."""
    removed = []
    for tmp in Path(folder).glob(".*.tmp"):
        pid = tmp.name.rsplit(".", 2)[-2]
        if pid.isdigit() and not _running(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists and has not exited (a zombie waiting for its parent has)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][:1] not in ("Z", "X")
    except (OSError, IndexError):  # no /proc: trust the signal test
        return True


def atomic_savefig(figure, path: str | Path, dpi: int = 110) -> Path:
    """`atomic_write` of a matplotlib figure, in the format of ``path``'s suffix (the temporary name's
    ``.tmp`` would otherwise choose it)."""
    path = Path(path)
    kind = path.suffix.lstrip(".").lower() or "png"
    return atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=dpi, format=kind))


class OutputLock:
    """Hold a lock file while a run writes into ``out``; a second run on the same folder gets `OutputBusy`
    naming the holder's pid. The lock is ``flock``-based: the kernel releases it when the holding process
    exits or is killed, so a killed run never blocks the next one. The file is ``out/.visedit.lock``, or
    with ``beside`` ``.<name>.visedit.lock`` next to ``out`` (for a folder built elsewhere and renamed into
    place, or a single output file); it is removed when the lock is let go, and so is ``out`` when the
    lock created it and it is still empty (a run that failed early). Re-entering a lock this
    process already holds is allowed (a command and the pipeline it calls may both take it).

        with OutputLock(out):
            ...  # write into out
    """

    _held: dict[str, int] = {}  # lock files this process holds → nesting depth

    def __init__(self, out: str | Path, beside: bool = False):
        self.out = Path(out)
        self.path = self.out.parent / f".{self.out.name}{LOCK_FILE}" if beside else self.out / LOCK_FILE
        self._handle = None
        self._key = ""
        self._created = False

    def __enter__(self) -> "OutputLock":
        self._key = f"{os.getpid()}:{self.path.resolve()}"
        if self._key in OutputLock._held:
            OutputLock._held[self._key] += 1
            return self
        self._created = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + DEAD_HOLDER_S
        while True:
            handle = open(self.path, "a+")
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "unknown"
                handle.close()
                if holder.isdigit() and not _running(int(holder)) and time.monotonic() < deadline:
                    time.sleep(0.05)  # the holder is dead: the kernel lets its lock go a moment after
                    continue
                raise OutputBusy(f"{self.out}: another run (pid {holder}) is writing here; wait for it to end "
                                 f"or choose another output folder") from None
            if _same_file(self.path, handle):
                break
            handle.close()  # the previous holder removed the file after we opened it: lock the new one
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._handle = handle
        OutputLock._held[self._key] = 1
        return self

    def __exit__(self, *exc) -> None:
        depth = OutputLock._held.get(self._key, 0)
        if depth > 1:
            OutputLock._held[self._key] = depth - 1
            return
        OutputLock._held.pop(self._key, None)
        if self._handle is not None:
            self.path.unlink(missing_ok=True)  # before letting go, so no one can lock a file about to vanish
            fcntl.flock(self._handle.fileno(), fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None
            if self._created:
                with contextlib.suppress(OSError):  # not empty: the run wrote its outputs
                    self.path.parent.rmdir()


def _same_file(path: Path, handle) -> bool:
    try:
        found = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(handle.fileno())
    return (found.st_dev, found.st_ino) == (opened.st_dev, opened.st_ino)


@contextlib.contextmanager
def atomic_folder(out: str | Path, replace: bool = False) -> Iterator[Path]:
    """Build a folder under a hidden temporary name beside ``out`` and rename it to ``out`` when the block
    ends without an error, so a reader (or a run killed half-way) never sees a half-written folder at
    ``out``. On an error the temporary folder is removed; what a killed build left behind
    (``.<name>.partial-*``, ``.<name>.old-*``) is removed by the next build of ``out``. An existing ``out``
    is replaced when it is empty or ``replace`` is true, else FileExistsError; two builds of one ``out``
    at once are refused (`OutputLock` beside it).

        with atomic_folder(out) as tmp:
            ...  # write the folder's files into tmp
    """
    out = Path(out)
    with OutputLock(out, beside=True):
        for pattern in (".partial-*", ".old-*"):  # a killed build's leftovers: the lock proves their writer gone
            for stale in out.parent.glob(f".{glob.escape(out.name)}{pattern}"):
                if stale.is_dir() and not stale.is_symlink():
                    shutil.rmtree(stale, ignore_errors=True)
                else:
                    stale.unlink(missing_ok=True)
        if not replace and _non_empty(out):
            raise FileExistsError(f"{out} already exists and is not empty")
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
        try:
            os.chmod(tmp, 0o755)  # mkdtemp's 0700 would survive the rename
            yield tmp
            if not replace and _non_empty(out):
                raise FileExistsError(f"{out} appeared while writing; not replacing it")
            _move_into_place(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _non_empty(path: Path) -> bool:
    return path.exists() and not (path.is_dir() and not any(path.iterdir()))


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` is renamed aside first and removed after."""
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        out.rmdir()
    if not (out.exists() or out.is_symlink()):
        os.rename(tmp, out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    os.rename(out, old)
    os.rename(tmp, out)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    else:
        old.unlink()


def _limit(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise VisEditError(f"environment variable {name}={text!r}: expected a whole number") from None
    if value <= 0:
        raise VisEditError(f"environment variable {name}={text!r}: must be positive")
    return value


def max_json_bytes() -> int:
    """The largest JSON file the readers accept (``VISEDIT_MAX_JSON_BYTES``, default 256 MiB)."""
    return _limit("VISEDIT_MAX_JSON_BYTES", MAX_JSON_BYTES)


def max_image_pixels() -> int:
    """The largest image (width × height) the readers decode (``VISEDIT_MAX_IMAGE_PIXELS``, default 50 M)."""
    return _limit("VISEDIT_MAX_IMAGE_PIXELS", MAX_IMAGE_PIXELS)


def read_json(path: str | Path, what: str = "JSON file", error: type[VisEditError] = ArtifactError,
              max_bytes: int | None = None) -> Any:
    """The parsed content of the JSON file ``path``; a missing, oversized, non-UTF-8 or malformed file
    raises ``error`` with one line that names it and says which of these it is (``what``: what it should
    be, e.g. "attribution artifact")."""
    path = Path(path)
    limit = max_json_bytes() if max_bytes is None else max_bytes
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise error(f"{path}: not a file; expected a {what}")
        if size > limit:
            raise error(f"{path}: {size:,} bytes is over the {limit:,}-byte limit for a {what} "
                        f"(VISEDIT_MAX_JSON_BYTES raises it)")
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise error(f"{path}: file not found; expected a {what}") from None
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text at byte {exc.start}; expected a {what}") from None
    except OSError as exc:
        raise error(f"{path}: cannot read the {what} ({exc.strerror or type(exc).__name__})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); "
                    f"expected a {what}") from None
    except RecursionError:
        raise error(f"{path}: JSON nested too deeply; expected a {what}") from None
    except ValueError:  # e.g. an integer of more digits than Python converts
        raise error(f"{path}: not valid JSON (a number too long to read); expected a {what}") from None


_KINDS = {int: "a whole number", float: "a number", str: "a string", list: "a list", dict: "an object",
          bool: "true or false", type(None): "null"}


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a whole number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def require(data: Any, key: str, kind: type | tuple[type, ...], where: str,
            error: type[VisEditError] = ArtifactError, default: Any = ...) -> Any:
    """``data[key]`` checked to be of ``kind`` (int excludes bool; float accepts int); ``where`` names
    the file and record for the message. A missing key returns ``default`` when one is given."""
    if not isinstance(data, dict):
        raise error(f"{where}: expected an object, found {_type_name(data)}")
    if key not in data:
        if default is not ...:
            return default
        raise error(f"{where}: missing field {key!r}")
    value = data[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    ok = any((isinstance(value, int) and not isinstance(value, bool)) if k is int
             else (isinstance(value, (int, float)) and not isinstance(value, bool)) if k is float
             else isinstance(value, k) for k in kinds)
    if not ok:
        wanted = " or ".join(_KINDS.get(k, k.__name__) for k in kinds)
        raise error(f"{where}, field {key!r}: expected {wanted}, found {_type_name(value)}")
    return value


def read_safetensors(path: str | Path, what: str = "safetensors file", error: type[VisEditError] = ArtifactError,
                     device: str = "cpu") -> tuple[dict, dict[str, str]]:
    """(tensors, metadata) of a safetensors file; a missing, truncated or corrupt file raises ``error``."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: file not found; expected a {what}")
    try:
        with safe_open(str(path), framework="pt", device=device) as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        detail = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise error(f"{path}: not a readable {what} ({detail})") from None
    return tensors, metadata


def inside_root(root: str | Path, relative: str, where: str, error: type[VisEditError] = DataError) -> Path:
    """``root / relative``, refused when ``relative`` is absolute, empty, or leads outside ``root`` once
    ``..`` and symbolic links are resolved; ``where`` names the file, record and field."""
    if not relative or "\x00" in relative:
        raise error(f"{where}: empty path or NUL byte in {relative!r}")
    if Path(relative).is_absolute():
        raise error(f"{where}: absolute path {relative!r}; paths must be relative to the image root {root}")
    root = Path(root)
    base = root.resolve()
    target = (root / relative).resolve()
    if target != base and base not in target.parents:
        raise error(f"{where}: path {relative!r} leads outside the image root {root} (to {target})")
    return root / relative


def open_image(path: str | Path, where: str, max_pixels: int | None = None,
               error: type[VisEditError] = DataError):
    """The RGB image at ``path``; an image over ``max_pixels`` (width × height, default
    `max_image_pixels`) is refused from its header, before any pixel is decoded. Missing, unreadable,
    truncated or bomb-like files raise ``error``; ``where`` names the file, record and field."""
    return _read_image(path, where, max_pixels, error, lambda image: image.convert("RGB"))


def image_size(path: str | Path, where: str, max_pixels: int | None = None,
               error: type[VisEditError] = DataError) -> tuple[int, int]:
    """(width, height) of the image at ``path`` from its header alone (no pixel decoded), refused as
    `open_image` refuses it: for checking a dataset's images up front without loading them."""
    return _read_image(path, where, max_pixels, error, lambda image: image.size)


def _read_image(path: str | Path, where: str, max_pixels: int | None, error: type[VisEditError],
                read: Callable[[Any], Any]) -> Any:
    from PIL import Image, UnidentifiedImageError

    limit = max_image_pixels() if max_pixels is None else max_pixels
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width * height > limit:
                    raise error(f"{where}: image {path} is {width} × {height} = {width * height:,} pixels, "
                                f"over the {limit:,}-pixel limit (VISEDIT_MAX_IMAGE_PIXELS raises it)")
                return read(image)
    except VisEditError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise error(f"{where}: image {path} is a decompression bomb (over PIL's pixel limit)") from None
    except FileNotFoundError:
        raise error(f"{where}: image not found: {path}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
        raise error(f"{where}: cannot read image {path} ({type(exc).__name__})") from None
