"""Every check before anything starts: settings, flags, the output folder (its settings too), the shards, the Ray
address.

``prepare`` turns the parsed options into a ``Setup`` or raises ValueError on
the first problem, before Ray, the lock or any worker exists, so a bad value
is one ``error:`` line and exit status 2 instead of a traceback (or a hang)
after Ray started.
"""
from __future__ import annotations

import dataclasses
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import encoder

from . import storage
from .config import PipelineConfig, load_pipeline_config
from .output_folder import OutputFolder, access_denied, is_access_denied
from .limits import check_limits
from .redact import redact
from .shards import TAR_SUFFIXES, Shard, make_shards, missing_local
from .sources import check_url, local_path
from .writer import FORMAT_VERSION, file_settings

if TYPE_CHECKING:
    from .driver import RunOptions


DEVICES = "auto, cpu, cuda or cuda:N"


def resolve_device(requested: str | None, gpus: int | None, local: bool = True) -> tuple[str, int | None]:
    """(worker device 'cpu' | 'cuda', number of GPU workers or None for all); ValueError when impossible.

    ``--gpus 0`` means CPU workers; ``--device cuda`` with ``--gpus 0`` is a
    contradiction. ``local``: the GPUs are this machine's, so they are counted
    here; a cluster's are counted once attached.
    """
    requested = (requested or "auto").lower()
    if requested not in ("auto", "cpu", "cuda") and not (requested.startswith("cuda:") and requested[5:].isdigit()):
        raise ValueError(f"--device must be {DEVICES}, got {requested!r}")
    if gpus is not None and gpus < 0:
        raise ValueError(f"--gpus must be >= 0, got {gpus}")
    if requested == "cpu":
        if gpus:
            raise ValueError("--device cpu contradicts --gpus > 0")
        return "cpu", 0
    if gpus == 0:
        if requested.startswith("cuda"):
            raise ValueError("--device cuda needs --gpus >= 1")
        return "cpu", 0
    if requested.startswith("cuda") and not local:
        return "cuda", gpus
    import torch

    if not local:
        # A cluster's GPUs are counted once attached (prepare asks the cluster when this machine has none).
        return ("cpu", 0) if gpus is None and not torch.cuda.is_available() else ("cuda", gpus)
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if requested == "auto" and gpus is None and not available:
        return "cpu", 0
    if not available:
        raise ValueError("no GPU is visible on this machine: use --gpus 0 (CPU workers), or --address to join a cluster")
    if gpus is not None and gpus > available:
        raise ValueError(f"--gpus {gpus} asked, this machine has {available} GPU(s)")
    return "cuda", gpus


def _ray_address(options: RunOptions) -> str | None:
    """The cluster to join on purpose (--address, else RAY_ADDRESS), or None: start our own."""
    return options.address or os.environ.get("RAY_ADDRESS") or None


def check_ray_address(address: str, timeout: float) -> None:
    """Fail in bounded time when nothing listens at the cluster's address (ray.init would wait ~15 minutes)."""
    target = address[len("ray://"):] if address.startswith("ray://") else address
    if target == "auto":
        from ray._private.services import canonicalize_bootstrap_address

        try:
            target = canonicalize_bootstrap_address("auto") or ""
        except (ConnectionError, ValueError) as exc:
            raise ValueError(f"--address auto: {exc}") from None
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--address must be 'auto', HOST:PORT or ray://HOST:PORT, got {address!r}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ValueError(f"cannot reach the Ray cluster at {target} within {timeout:g} s: {exc}") from None


def _check_output(output: str) -> str:
    if "@" in urlsplit(output).netloc and "://" in output:
        # The output's name is written into the summary and the log: a key in it would be published
        # with the dataset. Stores take their credentials from the environment.
        raise ValueError(f"--output {redact(output)}: credentials in the output URI are refused (they would be "
                         "written into the summary and the log); give them in the environment instead "
                         "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE, GOOGLE_APPLICATION_CREDENTIALS)")
    folder = OutputFolder(output)
    if folder.is_remote:
        # An object store (s3://bucket/prefix) or another filesystem: a prefix needs no creating,
        # but its bucket must exist (mkdir checks it, one request).
        try:
            folder.root.mkdir(parents=True, exist_ok=True)
        except (OSError, ValueError) as exc:
            if is_access_denied(exc):  # wrong or missing credentials: not the bucket's fault
                raise ValueError(redact(access_denied(folder, exc))) from None
            raise ValueError(f"cannot use the output {redact(output)}: {redact(exc)}") from None
        return str(folder)
    out = folder.root.resolve()
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"cannot create the output folder {out}: {exc.strerror or exc}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"the output folder {out} is not writable")
    return str(out)


def _check_shards(specs: list[str], out: str) -> list[Shard]:
    shards = make_shards(specs)
    if not shards:
        raise ValueError(f"no shards matched {specs}")
    for shard in shards:
        check_url(shard.url)
        named = local_path(shard.url) or (shard.url if storage.is_fs_uri(shard.url) else None)
        if named is not None and not named.endswith(TAR_SUFFIXES):
            # A zip or a folder of images is not a webdataset shard: say so now, not as a reader's error later.
            raise ValueError(f"{redact(shard.url)} is not a tar shard: webdataset shards end in "
                             f"{', '.join(TAR_SUFFIXES)} (img2dataset --output_format webdataset writes them)")
        if shard.url.endswith(".tar.zst") and not shard.url.startswith("pipe:"):
            # No zstd decoder in the standard library; a pipe: command may decompress it (zstd -dc).
            raise ValueError(f"zstd-compressed shards are not supported: {shard.url} "
                             "(decompress them, or pass pipe:zstd -dc FILE)")  # fmt: skip
    missing = missing_local(shards)
    if missing:
        raise ValueError(f"{len(missing)} of {len(shards)} local shards do not exist, e.g. {missing[0]}")
    # Local and filesystem-URI sources (streams have no folder); a remote source's existence is left to
    # the run (a listing already found the ones a folder or pattern named).
    inputs = {str(Path(p).resolve().parent) for p in map(local_path, (s.url for s in shards)) if p is not None}
    inputs |= {storage.folder_of(s.url) for s in shards if storage.is_fs_uri(s.url)}
    if out in inputs:
        # img2dataset keeps its own {id}.parquet (url metadata) beside each {id}.tar.
        raise ValueError(f"--output {out} holds input shards: its {{id}}.parquet files would be overwritten")
    return shards


# Footers read to learn the settings of a remote folder that has no settings file: a request or two each.
REMOTE_FOOTERS = 16


def _check_folder(setup: Setup) -> None:
    """The output folder's settings (its settings file, or its files' footers when it has none) against the run's,
    and ``--overwrite`` only over a PainterBot output folder."""
    folder = OutputFolder(setup.out)
    overwrite = setup.options.overwrite
    try:
        if overwrite:
            foreign = folder.foreign_names()
            if foreign:
                shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
                raise ValueError(f"--overwrite: {redact(folder)} holds files that are not a PainterBot output "
                                 f"folder's ({shown}); --overwrite replaces an output folder's shards, so it is "
                                 "refused here: pick a new or empty --output folder, or move those files out")
        folder.check_settings(setup.row_settings(), overwrite, file_settings=file_settings,
                              limit=REMOTE_FOOTERS if folder.is_remote else None)  # fmt: skip
    except OSError as exc:  # a listing or a footer the store refused
        if is_access_denied(exc):
            raise ValueError(redact(access_denied(folder, exc))) from None
        raise ValueError(f"cannot read the output folder {redact(folder)}: {redact(exc)}") from None


@dataclass
class Setup:
    """A run whose every setting, flag, path and shard has been checked."""

    options: RunOptions
    fit_config: encoder.FitConfig
    cfg: PipelineConfig
    out: str
    shards: list[Shard]
    device: str
    gpus: int | None
    address: str | None

    def row_settings(self) -> dict:
        """What shapes the rows of the output folder (kept in its settings file)."""
        settings = {"format_version": FORMAT_VERSION, "strokes": self.fit_config.strokes, "size": self.fit_config.size}
        if self.cfg.extra_columns:  # typed .json columns change the schema: one set per folder
            settings["extra_columns"] = dict(self.cfg.extra_columns)
        return settings


def prepare(options: RunOptions) -> Setup:
    """Check everything before anything starts; ValueError (one line) on the first problem."""
    fit_config = encoder.load_config(options.config, **options.encoder_overrides)
    if options.device is not None:
        resolve_device(options.device, None, local=False)  # the flag's spelling, before FitConfig's message
    cfg = load_pipeline_config(options.config, **options.pipeline_overrides)
    address = _ray_address(options) if options.use_ray else None
    requested = options.device or fit_config.device
    device, gpus = resolve_device(requested, options.gpus, local=address is None)
    if not options.use_ray and requested.startswith("cuda:"):
        device = requested  # in-process, a specific GPU may be named
    cpu_workers = (cfg.workers if options.use_ray else 1) if device == "cpu" else None
    check_limits(fit_config, cfg, device, local=address is None, workers=cpu_workers)
    out = _check_output(options.output)
    shards = _check_shards(options.shards, out)
    setup = Setup(options, fit_config, cfg, out, shards, device, gpus, address)
    _check_folder(setup)  # its row settings do not depend on the device settled below
    if address is not None:
        check_ray_address(address, cfg.connect_timeout)
        if requested == "auto" and options.gpus is None and device == "cpu":
            from .cluster import cluster_gpus  # attaches to the cluster (checked reachable just above)

            if cluster_gpus(address):
                device = "cuda"  # a head node without a GPU still drives GPU workers on the others
    setup.device, setup.fit_config = device, dataclasses.replace(fit_config, device=device)
    return setup
