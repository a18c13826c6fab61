"""`marginface train`: parse, resolve the run (`marginface.train.rundir`), train or dry-run, print."""
from __future__ import annotations

import contextlib
import signal
import sys

from marginface.cli.options import add_threads, apply_threads, note, print_json
from marginface.io.progress import phase

# deferred: startup time. The training stack (torch, the trainer) is imported when the command runs.


def register(sub) -> None:
    t = sub.add_parser("train", help="train a model (no arguments: the built-in synthetic recipe)",
                       epilog="Config keys: configs/synthetic_mbf.yaml lists every key with its default (it is the "
                              "built-in config); recipes and what to change: docs/recipes.md. A mistyped key fails "
                              "with the nearest valid one; --dry-run checks a config without training.")
    t.add_argument("--config", help="YAML or .py config file (default: built-in synthetic_mbf); a .py config is "
                                    "Python and runs with your permissions: use only files you trust")
    t.add_argument("--set", nargs="+", action="extend", metavar="KEY=VALUE", help="override config keys, e.g. optim.lr=0.05")
    t.add_argument("--out", help="run directory (default: runs/<config name>)")
    t.add_argument("--resume", action="store_true",
                   help="continue the run in --out (default: the newest runs/<name>*) from its checkpoints/last.pt")
    t.add_argument("--resume-from", metavar="CHECKPOINT",
                   help="continue the run from this checkpoint (e.g. RUN/checkpoints/best.pt when last.pt is lost); "
                        "the run directory is --out or the checkpoint's own")
    t.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --out that already holds a run: deletes its checkpoints, log and report")
    t.add_argument("--dry-run", action="store_true", help="print the resolved config, data and model summary, then exit")
    add_threads(t)
    t.add_argument("--json", action="store_true", help="print the final report as one JSON object")
    t.set_defaults(func=run)


def run(args) -> int:
    phase("loading torch and the training code...", enabled=not args.json and not args.dry_run)
    from marginface.train import rundir

    apply_threads(args.threads)
    plan = rundir.resolve_run(args.config, args.set, args.out, resume=args.resume, resume_from=args.resume_from,
                              overwrite=args.overwrite, note=note)
    if args.dry_run:
        return _dry_run(plan.cfg, plan.run_dir, args.json)
    from marginface.train.trainer import Trainer

    run_dir = plan.run_dir
    try:
        trainer = Trainer(plan.cfg, run_dir, resume=plan.resume, resume_from=plan.resume_from,
                          overwrite=args.overwrite, console=not args.json)
        report = trainer.fit()
    except KeyboardInterrupt:
        with _ignoring_sigint():  # a further Ctrl-C must not cut the line saying what was saved
            last = run_dir / "checkpoints" / "last.pt"
            info = rundir.peek(last) if last.is_file() else None
            saved = f"state saved in {last} (step {info['step']})" if info else "no checkpoint was written yet"
            print(f"interrupted: {saved}; continue with marginface train --out {run_dir} --resume", file=sys.stderr)
        return 130
    if not trainer.dist.is_main:  # under torchrun only rank 0 reports
        return 0
    if trainer.interrupted:
        # a Ctrl-C the loop did not see (during the final evaluation's metrics, the report, the plots):
        # the run finished and everything is written, but the user asked to stop, so say so and exit 130
        print(f"interrupted after the run finished (step {report['train']['steps']}): checkpoints in "
              f"{run_dir / 'checkpoints'} (last.pt, best.pt) and {run_dir / 'report.json'} are saved",
              file=sys.stderr)
        return 130
    if args.json:
        print_json({"run_dir": str(run_dir), **report})
    else:
        print(f"run directory: {run_dir}")
    return 0


def _dry_run(cfg, run_dir, as_json: bool) -> int:
    """Resolved config, data summary, parameter count, classifier memory, first batch shapes."""
    from marginface.config import dump_yaml
    from marginface.train.dryrun import dry_run

    summary = dry_run(cfg, run_dir)
    if as_json:
        print_json(summary)
    else:
        print(dump_yaml(cfg))
        for k, v in summary.items():
            if k != "config":
                print(f"{k}: {v}")
    return 0


@contextlib.contextmanager
def _ignoring_sigint():
    """SIGINT ignored inside (the main thread only; elsewhere nothing changes)."""
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
