"""Model files that components download: a registry of assets, a cache, checksums, one-line errors.

Weights of Hugging Face models are loaded by their libraries through ``huggingface_hub`` (``HF_HOME``,
``HF_ENDPOINT``, ``HF_HUB_OFFLINE`` and local directories behave as everywhere else). Files that live
elsewhere (the latent-MAE on ModelScope, the LAION aesthetic MLP on GitHub) are *assets*: plugins register
them (hook ``drpo_register_assets``) and components ask for them by name::

    @hookimpl
    def drpo_register_assets(register):
        register("my-weights", url="https://example.org/w.pth", sha256="ab12...", licence="MIT",
                 summary="what needs it")

    weights = drpo_core.assets.path("my-weights")      # a local Path, fetched first when allowed

* **URL schemes**: ``https://`` / ``http://``, ``file://`` (a local copy; also what the tests use) and
  ``hf://org/repo[@revision]/path/in/repo``, which goes through ``huggingface_hub`` (its cache, endpoint
  and offline mode).
* **Cache**: ``$DRPO_CACHE`` (default ``$XDG_CACHE_HOME/drpo``, i.e. ``~/.cache/drpo``); an asset's file is
  ``<cache>/assets/<name>/<filename>``. A download goes to a temporary file beside it, is checked against
  the registered SHA-256 while it streams, and is renamed into place only when it matches.
* **Checksums**: ``sha256`` is 64 hex digits, or ``"unverified"`` where none could be computed. A file put in
  place by hand is hashed on first use; ``.verified`` beside it remembers the result (by size and mtime).
* **Offline**: with ``HF_HUB_OFFLINE`` or ``DRPO_OFFLINE`` set nothing is downloaded over the network
  (``file://`` still is); a missing file is one line naming the file to put where, or the command to run.

``drpo assets list`` shows every registered asset, where it is cached and whether it is verified;
``drpo assets fetch NAME`` downloads one. :func:`load_checkpoint` reads a PyTorch checkpoint with
``torch.load(weights_only=True)`` and explains in one line what to do when that refuses it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from drpo_core.errors import AssetError

UNVERIFIED = "unverified"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_SCHEMES = ("https", "http", "file", "hf")
_TRUE = {"1", "ON", "YES", "TRUE"}
_CHUNK = 1 << 20

#: ``progress(bytes_done, bytes_total or None)``, called while a download streams
Progress = Callable[[int, int | None], None]


@dataclass(frozen=True)
class Asset:
    """A downloadable file a component needs."""

    name: str
    #: ``https://...``, ``file://...`` or ``hf://org/repo[@revision]/path``
    url: str
    #: lower-case hex SHA-256 of the file, or ``"unverified"``
    sha256: str
    #: the file's licence as its publisher states it ("not stated" when it does not)
    licence: str
    #: the cached file's name (default: the URL's last path segment)
    filename: str = ""
    #: what the file is and what uses it
    summary: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        scheme = urllib.parse.urlsplit(self.url).scheme
        if scheme not in _SCHEMES:
            raise ValueError(f"asset {self.name!r}: URL {self.url!r} is not one of {', '.join(_SCHEMES)}")
        digest = self.sha256.lower()
        if digest != UNVERIFIED and not _SHA256.fullmatch(digest):
            raise ValueError(f"asset {self.name!r}: sha256 must be 64 hex digits or {UNVERIFIED!r}")
        object.__setattr__(self, "sha256", digest)
        if not self.filename:
            tail = urllib.parse.unquote(urllib.parse.urlsplit(self.url).path.rstrip("/").rsplit("/", 1)[-1])
            object.__setattr__(self, "filename", tail or self.name)
        if "/" in self.filename or self.filename in ("", ".", ".."):
            raise ValueError(f"asset {self.name!r}: filename {self.filename!r} must be a plain file name")

    @property
    def on_hub(self) -> bool:
        return self.url.startswith("hf://")

    @property
    def verifiable(self) -> bool:
        return self.sha256 != UNVERIFIED


@dataclass(frozen=True)
class AssetState:
    """Where an asset is and whether its file is known to match its checksum."""

    asset: Asset
    #: the cached file (or where it will be put)
    path: Path
    present: bool
    #: True: checked against the registered SHA-256; False: not checked yet, or no checksum registered
    verified: bool

    @property
    def status(self) -> str:
        if not self.present:
            return "missing"
        if not self.asset.verifiable:
            return "unverified (no checksum registered)"
        return "verified" if self.verified else "not checked yet"


# -- where things live ------------------------------------------------------------------------------


def cache_dir() -> Path:
    """drpo's cache: ``$DRPO_CACHE``, else ``$XDG_CACHE_HOME/drpo``, else ``~/.cache/drpo``."""
    explicit = os.environ.get("DRPO_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "drpo"


def offline() -> str | None:
    """The variable that turns downloads off (``DRPO_OFFLINE`` or ``HF_HUB_OFFLINE``), or None when online."""
    for variable in ("DRPO_OFFLINE", "HF_HUB_OFFLINE"):
        if os.environ.get(variable, "").strip().upper() in _TRUE:
            return variable
    return None


def _folder(asset: Asset) -> Path:
    return cache_dir() / "assets" / asset.name


def _hub_parts(asset: Asset) -> tuple[str, str | None, str]:
    """``hf://org/repo@rev/dir/file`` -> ``("org/repo", "rev", "dir/file")``."""
    rest = asset.url.removeprefix("hf://")
    parts = rest.split("/")
    if len(parts) < 3:
        raise AssetError(f"asset {asset.name!r}: {asset.url!r} is not hf://org/repo[@revision]/path")
    repo, _, revision = "/".join(parts[:2]).partition("@")
    return repo, revision or None, "/".join(parts[2:])


def _hub_cached(asset: Asset) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    repo, revision, inner = _hub_parts(asset)
    found = try_to_load_from_cache(repo, inner, revision=revision)
    return Path(found) if isinstance(found, str) else None


def location(asset: Asset) -> Path:
    """The asset's file: in drpo's cache, or (``hf://``) in the Hugging Face cache once downloaded."""
    if asset.on_hub:
        cached = _hub_cached(asset)
        if cached is not None:
            return cached
    return _folder(asset) / asset.filename


# -- checksums -------------------------------------------------------------------------------------


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _marker(asset: Asset) -> Path:
    return _folder(asset) / ".verified"


def _fingerprint(path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _is_verified(asset: Asset, path: Path) -> bool:
    try:
        record = json.loads(_marker(asset).read_text())
        return bool(record == {**_fingerprint(path), "sha256": asset.sha256})
    except (OSError, ValueError):
        return False


def _remember_verified(asset: Asset, path: Path) -> None:
    marker = _marker(asset)
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({**_fingerprint(path), "sha256": asset.sha256}))
    except OSError:  # a read-only cache: verify again next time
        pass


def _verify(asset: Asset, path: Path) -> None:
    """Hash a file not verified yet; a mismatch is one line saying what to do."""
    if not asset.verifiable or _is_verified(asset, path):
        return
    actual = sha256_of(path)
    if actual != asset.sha256:
        raise AssetError(f"{path} has SHA-256 {actual}, not the {asset.sha256} registered for asset {asset.name!r}: "
                         f"delete it and run `drpo assets fetch {asset.name}` (or put the right file there)")
    _remember_verified(asset, path)


def state(asset: Asset) -> AssetState:
    """Where the asset is and whether it is verified (never hashes, never downloads)."""
    path = location(asset)
    present = path.is_file()
    return AssetState(asset, path, present, present and asset.verifiable and _is_verified(asset, path))


# -- lookup, fetch, path ---------------------------------------------------------------------------


def _network(asset: Asset) -> bool:
    return not asset.url.startswith("file://")


def _offline_message(asset: Asset, why: str, alternative: str) -> str:
    target = location(asset)
    how = (f"run `drpo assets fetch {asset.name}` where you are online, or download {asset.url} to {target}")
    if asset.on_hub:
        repo, _, inner = _hub_parts(asset)
        how = (f"run `drpo assets fetch {asset.name}` (or `hf download {repo} {inner}`) where you are online, "
               "with the same HF_HOME")
    extra = f", or {alternative}" if alternative else ""
    return f"asset {asset.name!r} ({asset.filename}) is not cached and {why}: {how}{extra}"


def fetch(asset: Asset, *, force: bool = False, progress: Progress | None = None) -> Path:
    """Download an asset into the cache (unless present and verified) and return its path."""
    if asset.on_hub:
        return _fetch_hub(asset, force)
    target = _folder(asset) / asset.filename
    if target.is_file() and not force:
        _verify(asset, target)
        return target
    variable = offline()
    if variable and _network(asset):
        raise AssetError(_offline_message(asset, f"{variable} is set", ""))
    _download(asset, target, progress)
    if asset.verifiable:
        _remember_verified(asset, target)
    return target


def path(asset: Asset, *, download: bool = True, alternative: str = "") -> Path:
    """The local file of an asset: cached and verified, else fetched when ``download`` and downloads are on.

    ``alternative``: what else the user can do, appended to the one-line error (``"set features.weights"``).
    """
    found = location(asset)
    if found.is_file():
        _verify(asset, found)
        return found
    variable = offline() if _network(asset) else None
    if variable or not download:
        why = f"{variable} is set" if variable else "this caller does not download"
        raise AssetError(_offline_message(asset, why, alternative))
    print(f"downloading asset {asset.name} from {asset.url} to {found}", file=sys.stderr)
    return fetch(asset)


def _download(asset: Asset, target: Path, progress: Progress | None) -> None:
    """Stream ``asset.url`` to ``target`` through a temporary file, hashing as it goes."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    digest = hashlib.sha256()
    try:
        with os.fdopen(handle, "wb") as out:
            try:
                response = urllib.request.urlopen(asset.url, timeout=60)  # noqa: S310 (schemes checked)
            except (urllib.error.URLError, OSError, ValueError) as error:
                reason = getattr(error, "reason", None) or error
                raise AssetError(f"could not download asset {asset.name!r} from {asset.url}: {reason}; "
                                 f"download it by hand to {target}") from None
            with response:
                total = int(response.headers.get("Content-Length") or 0) or None
                done = 0
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    done += len(chunk)
                    if progress is not None:
                        progress(done, total)
            out.flush()
            os.fsync(out.fileno())
        actual = digest.hexdigest()
        if asset.verifiable and actual != asset.sha256:
            raise AssetError(f"the download of asset {asset.name!r} from {asset.url} has SHA-256 {actual}, not the "
                             f"registered {asset.sha256}: not kept (a changed or corrupted source; report it to the "
                             "plugin that registers the asset)")
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _fetch_hub(asset: Asset, force: bool) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo, revision, inner = _hub_parts(asset)
    variable = offline()
    try:
        found = Path(hf_hub_download(repo, inner, revision=revision, force_download=force and not variable,
                                     local_files_only=variable is not None))
    except LocalEntryNotFoundError:
        why = f"{variable} is set" if variable else "the hub cannot be reached"
        raise AssetError(_offline_message(asset, why, "")) from None
    except Exception as error:  # huggingface_hub raises many kinds; one line is what the user needs
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise AssetError(f"could not download asset {asset.name!r} ({asset.url}): {first}") from None
    _verify(asset, found)
    return found


# -- loading ---------------------------------------------------------------------------------------

_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def load_checkpoint(path: str | Path) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``; a refusal or an unreadable file is one
    line saying what the user can do. A checkpoint never runs code in drpo."""
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise AssetError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Weights only load failed" not in str(error) or "Unsupported operand" in str(error):
            raise AssetError(f"{path} is not a readable PyTorch checkpoint (not a pickle of tensors); download it "
                             "again") from None
        found = _GLOBAL.search(str(error))
        what = found.group(1) if found else "Python objects besides tensors"
        raise AssetError(f"{path}: torch.load(weights_only=True) refuses it, as it holds {what}, which drpo does not "
                         "unpickle (unpickling can run code); if you trust its source, load it once with "
                         "weights_only=False, save only its tensors (torch.save of a dict of tensors, or "
                         "safetensors) and use that file") from None
    except Exception as error:  # torch raises RuntimeError, KeyError, EOFError... for files that are not checkpoints
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise AssetError(f"{path} is not a readable PyTorch checkpoint ({type(error).__name__}: {first}); "
                         "download it again") from None


def option_or_asset(value: str | None, asset: Asset, config_dir: Path, where: str, alternative: str) -> Path:
    """A component's weights: the local file its option ``where`` names (relative to the recipe's folder), or,
    when the option is unset, the registered ``asset`` (fetched when it may be; ``alternative`` ends the
    one-line error of a missing asset). One line when the named file is missing."""
    if value is None:
        return path(asset, alternative=alternative)
    local = Path(value).expanduser()  # as config.resolve_path: the working directory first, then the recipe's
    if not local.is_absolute() and not local.exists():
        local = Path(config_dir) / local
    if not local.is_file():
        raise AssetError(f"{where}: {local} does not exist (default: the asset {asset.name}, "
                         f"`drpo assets fetch {asset.name}`)")
    return local
