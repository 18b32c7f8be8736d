"""The ``drnb`` command (also ``python -m drnb``).

::

    drnb datasets                                  registered datasets, sources, licences, layouts
    drnb inspect --dataset NAME [--data-dir DIR]   counts per grade, given splits, every problem found
    drnb inspect --pretext-images DIR[,NAME:DIR]   an unlabelled archive: photographs per source, every problem found
    drnb profiles [NAME]                           the settings of each profile
    drnb reproduce --profile {smoke,demo,quick,paper} [--dataset NAME] [--data-dir DIR]
                   [--set key=value ...] [--out runs/NAME] [--overwrite]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="drnb", description="Self-supervised rotation pretraining for DR grading.")
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("datasets", help="list the registered datasets with source, licence and expected layout")

    inspect = commands.add_parser("inspect", help="load a dataset and report counts, splits and problems")
    inspect.add_argument("--dataset", help="registered dataset name (see `drnb datasets`)")
    inspect.add_argument(
        "--pretext-images",
        help="inspect an unlabelled archive instead: folders, or NAME / NAME:DIR of registered datasets, comma-separated",
    )
    inspect.add_argument("--data-dir", help="the dataset's folder as it comes from its source")
    inspect.add_argument("--label-file", help="csv layout: label file inside the data folder")
    inspect.add_argument("--image-dir", help="csv layout: image folder inside the data folder")
    inspect.add_argument("--id-column", help="csv layout: column holding the image id")
    inspect.add_argument("--grade-column", help="csv layout: column holding the grade 0-4")
    inspect.add_argument("--patient-column", help="column holding the patient id (eyes of one patient kept together)")
    inspect.add_argument("--suffix", help="csv layout: image file suffix, e.g. .png")
    inspect.add_argument("--no-decode", action="store_true", help="skip checking every photograph as preprocessing does (decoding it, finding its fundus): faster")

    profiles = commands.add_parser("profiles", help="show the settings of the profiles")
    profiles.add_argument("name", nargs="?", help="one profile (default: all)")

    reproduce = commands.add_parser("reproduce", help="run notebooks 01-04 headlessly with papermill")
    reproduce.add_argument("--profile", default="demo", help="smoke (tests), demo (synthetic, minutes), quick (CPU, < 1 h), paper (GPU)")
    reproduce.add_argument("--dataset", help="registered dataset name; default the profile's (synthetic)")
    reproduce.add_argument("--data-dir", help="the dataset's folder as it comes from its source")
    reproduce.add_argument(
        "--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
        help="override one profile setting, e.g. --set pretext_epochs=5 --set fractions=0.1,1.0",
    )
    reproduce.add_argument("--out", help="run folder (default runs/<profile>-<dataset>)")
    reproduce.add_argument("--overwrite", action="store_true", help="rerun finished cells and replace their results")
    reproduce.add_argument("--kernel", help="Jupyter kernel (default: drnb if registered, else python3)")
    reproduce.add_argument(
        "--no-prediction", dest="predict", action="store_false",
        help="start at once, without first measuring this machine to predict how long the run takes",
    )
    return parser


def _datasets() -> int:
    from drnb.datasets import DATASETS, default_data_dir

    for info in DATASETS.values():
        print(f"{info.name}\n  {info.title}\n  layout:  {info.layout}\n  source:  {info.source}")
        print(f"  licence: {info.licence}")
        if info.citation:
            print(f"  cite:    {info.citation}")
        print(f"  default folder: {default_data_dir(info.name)}\n")
    return 0


@contextlib.contextmanager
def _warnings_collected(problems: list[str]):
    """Collect drnb's logged warnings (a dropped missing photograph, ...) into ``problems``."""

    class Collect(logging.Handler):
        def emit(self, record):
            problems.append(record.getMessage())

    handler = Collect(logging.WARNING)
    logging.getLogger("drnb").addHandler(handler)
    try:
        yield
    finally:
        logging.getLogger("drnb").removeHandler(handler)


def _print_problems(problems: list[str]) -> int:
    """Print the problems found; the exit code: 1 if there are any."""
    print(f"problems: {len(problems)}")
    for problem in problems:
        print(f"  - {problem}")
    return 1 if problems else 0


def _inspect(args) -> int:
    from drnb.datasets import GRADE_NAMES, grade_counts, load_dataset
    from drnb.preprocessing import find_problems

    if args.pretext_images:
        return _inspect_archive(args)
    if not args.dataset:
        raise ValueError("inspect: expected --dataset NAME (a labelled dataset) or --pretext-images (an unlabelled archive)")
    problems: list[str] = []
    with _warnings_collected(problems):
        table = load_dataset(
            args.dataset, args.data_dir, drop_missing=True, label_file=args.label_file, image_dir=args.image_dir,
            id_column=args.id_column, grade_column=args.grade_column,
            patient_column=args.patient_column, suffix=args.suffix,
        )
    if not args.no_decode:
        problems.extend(find_problems(table))
    print(f"{args.dataset}: {len(table)} images")
    for grade, count in grade_counts(table).items():
        print(f"  grade {grade} ({GRADE_NAMES[grade]}): {count}")
    if table["split"].notna().any():
        print("given splits: " + ", ".join(f"{k} {v}" for k, v in table["split"].value_counts().sort_index().items()))
    else:
        print("given splits: none")
    patients = table["patient_id"].dropna()
    if len(patients):
        print(f"patients: {patients.nunique()} ({len(patients)} images with a patient id)")
    return _print_problems(problems)


def _inspect_archive(args) -> int:
    """``drnb inspect --pretext-images``: the archive's photographs per source and every problem
    preprocessing would meet in them."""
    from drnb.archive import archive_table, check_sources, normalise_entries
    from drnb.preprocessing import find_problems

    entries = normalise_entries(args.pretext_images)
    check_sources(entries)
    problems: list[str] = []
    with _warnings_collected(problems):
        table = archive_table(entries, drop_missing=True)
    if not args.no_decode:
        problems.extend(find_problems(table))
    print(f"pretext archive: {len(table)} photographs (grades never read)")
    for source, count in table["source"].value_counts(sort=False).items():
        print(f"  {source}: {count}")
    return _print_problems(problems)


def _profiles(args) -> int:
    from drnb.profiles import PROFILES, resolve_profile

    for name in [args.name] if args.name else PROFILES:
        print(f"# {name}\n{resolve_profile(name).to_json()}\n")
    return 0


def _reproduce(args) -> int:
    from drnb.profiles import parse_assignments
    from drnb.reproduce import reproduce

    report = reproduce(
        args.profile, dataset=args.dataset, data_dir=args.data_dir, overrides=parse_assignments(args.settings),
        out=args.out, overwrite=args.overwrite, kernel=args.kernel, predict=args.predict,
    )
    if report.stopped_by is not None:
        return 128 + report.stopped_by  # the shell's code for a command a signal ended
    if report.failed:
        print(f"{len(report.failed)} cell(s) failed:", file=sys.stderr)
        for label, notebook, message in report.failed:
            print(f"  {label}: {message}\n    executed notebook: {notebook}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``drnb`` console script; returns the exit code."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    handlers = {"datasets": lambda: _datasets(), "inspect": lambda: _inspect(args), "profiles": lambda: _profiles(args), "reproduce": lambda: _reproduce(args)}
    try:
        return handlers[args.command]()
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"drnb {args.command}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a path the checks could not foresee (a folder that became unreadable, say)
        print(f"drnb {args.command}: error: {error.strerror or error}: {error.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
