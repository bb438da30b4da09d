#!/usr/bin/env python
"""Encode webdataset image shards into Parquet stroke datasets.

    python run_encode.py --shards 'laion-art/{00000..00999}.tar' --gpus 8 --output OUT
    python run_encode.py --shards 'shards/*.tar' --gpus 0 --workers 2 --config cpu_small
    python run_encode.py --demo

Rerunning the same command resumes: shards whose stats file and Parquet file
check out are skipped. Flags override values of the config file (``encoder:``
and ``pipeline:`` sections). Every setting, flag, path and shard is checked
before anything starts: a problem is one ``error:`` line and exit status 2.
Exit status: 0 all shards done, 1 some failed (or the disk failed), 2 usage
error or the output folder in use by another run, 130 Ctrl-C, 143 SIGTERM, 129 SIGHUP.
"""
from __future__ import annotations

import argparse
import signal
import sys

# Light imports only up here: the stop signals are taken over (main) before torch and Ray load,
# so a Ctrl-C, SIGTERM or SIGHUP during the imports is an orderly stop too.
from pipeline.redact import redact
from pipeline.stopping import StopSignals

DEFAULT_OUTPUT = "out"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    import encoder  # the presets' names for --help (loads torch)
    from pipeline.config import DEFAULT_PRESET

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    io = p.add_argument_group("input and output")
    io.add_argument("--shards", nargs="+", metavar="SPEC",
                    help="shard specs: paths, globs, folders, brace ranges ('{00000..00999}.tar'), "
                         "http(s):// urls, pipe:COMMAND (run without a shell), s3:// gs:// or other fsspec URIs")  # fmt: skip
    io.add_argument("--output", "-o", help=f"output folder or s3:// gs:// URI (default: {DEFAULT_OUTPUT}, "
                                           "or demo_out/strokes with --demo)")  # fmt: skip
    io.add_argument("--overwrite", action="store_true", help="redo shards that are already done")
    io.add_argument("--demo", action="store_true",
                    help="build a small demo set from images bundled with scikit-image and encode it")  # fmt: skip

    enc = p.add_argument_group("encoder (override the config's encoder: section)")
    enc.add_argument("--config", help=f"preset name ({', '.join(encoder.preset_names())}) or YAML path "
                                      f"(default: {DEFAULT_PRESET}; the demo picks cpu_small without a GPU)")
    enc.add_argument("--strokes", type=int, help="strokes per image")
    enc.add_argument("--size", type=int, help="side of the square the image is fitted at")
    enc.add_argument("--seed", type=int)
    enc.add_argument("--device", help="cpu | cuda | auto (default: the config's, auto = cuda when present)")

    pipe = p.add_argument_group("pipeline (override the config's pipeline: section)")
    pipe.add_argument("--batch-size", type=int, help="images per fit_batch call")
    pipe.add_argument("--gpus", type=int, help="GPU workers, one per GPU (default: all); 0 = CPU workers")
    pipe.add_argument("--workers", type=int, help="CPU workers when --gpus 0")
    pipe.add_argument("--max-retries", type=int, help="extra attempts per failed shard")
    pipe.add_argument("--reader-threads", type=int, help="image decoding threads per worker")
    pipe.add_argument("--max-image-pixels", type=int, help="refuse larger images (decompression bombs)")

    ray = p.add_argument_group("Ray")
    ray.add_argument("--address", help="join an existing Ray cluster ('auto' or HOST:PORT); default: start a local one")
    ray.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all)")
    ray.add_argument("--no-dashboard", action="store_true", help="do not start the Ray dashboard")
    ray.add_argument("--no-ray", action="store_true", help="run one worker in this process, without Ray")
    ray.add_argument("--no-progress", action="store_true", help="no progress bar (per-shard lines are still printed)")
    args = p.parse_args(argv)
    if not args.demo and not args.shards:
        p.error("--shards is required (or use --demo)")
    # Flags that cannot both hold are refused, never one of them silently dropped.
    conflicts = [
        (args.demo and args.shards, "--demo builds and encodes its own shards: drop --shards, or --demo"),
        (args.no_ray and args.address, "--no-ray runs without Ray: it cannot join --address"),
        (args.no_ray and args.num_cpus is not None, "--num-cpus sizes the local Ray: it means nothing with --no-ray"),
        (args.address and args.num_cpus is not None, "--num-cpus sizes a local Ray: a cluster joined with --address "
                                                     "has its own CPUs"),
        (args.output is not None and not args.output.strip(), "--output is empty: name a folder or a URI"),
    ]
    for hit, message in conflicts:
        if hit:
            p.error(message)
    return args


def options_from_args(args: argparse.Namespace):
    from pipeline.driver import RunOptions

    return RunOptions(
        shards=args.shards or [],
        output=args.output or ("" if args.demo else DEFAULT_OUTPUT),  # the demo picks its own
        config=args.config,
        encoder_overrides={"strokes": args.strokes, "size": args.size, "seed": args.seed},
        pipeline_overrides={
            "batch_size": args.batch_size,
            "workers": args.workers,
            "max_retries": args.max_retries,
            "reader_threads": args.reader_threads,
            "max_image_pixels": args.max_image_pixels,
            "num_cpus": args.num_cpus,
            "include_dashboard": False if args.no_dashboard else None,
        },
        device=args.device,
        gpus=args.gpus,
        address=args.address,
        overwrite=args.overwrite,
        use_ray=not args.no_ray,
        progress=not args.no_progress,
    )


def main(argv: list[str] | None = None, exiting: bool = False) -> int:
    """The command. ``exiting``: the process ends when this returns (``python run_encode.py``): a
    signal after the run's last write is then ignored rather than killing the process, so the exit
    status is the run's."""
    # Deferred until the imports are done: an interrupt raised inside torch's or Ray's native import
    # code can abort the interpreter (seen: SIGABRT). A signal now is recorded and acted on after them.
    stop = StopSignals()
    stop.defer()
    stop.install()
    try:
        return _main(argv, stop)
    except KeyboardInterrupt:
        stop.record(signal.SIGINT)  # Ctrl-C, unless the handler recorded another signal first
        print(f"stopped by {stop.name} before the run started: nothing was written", file=sys.stderr)
        return stop.exit_status
    finally:
        if exiting:
            stop.defer()
        else:
            stop.uninstall()


def _main(argv: list[str] | None, stop: StopSignals) -> int:
    args = parse_args(argv)
    from pipeline.lock import LockHeld

    try:
        from pipeline import demo
        from pipeline.driver import run

        options = options_from_args(args)
        if args.demo:
            options = demo.prepare_demo(options)
        # Still deferred: a signal during the imports, the demo's shards or the run's checks stops the
        # run once its output folder is locked, before its first shard, with a summary (driver.run).
        code = run(options, stop)
        if args.demo and not stop.stopped:
            demo.show_demo(options)
        return code
    except (ValueError, FileNotFoundError, LockHeld) as exc:
        # Settings, flags, paths, shards, a folder held by another run: found before anything started.
        print(f"error: {redact(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:
        # The disk or the system failed while running (a full disk writing the summary, ...).
        print(f"error: {redact(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(exiting=True))
