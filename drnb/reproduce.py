"""The headless reproduction: notebooks 01 -> 02 -> 03 (once per fraction) -> 04 via papermill.

Each notebook is one grid cell. A cell is finished when the file it exists to make is there
(01: ``data/summary.json``; 02: ``pretext/encoder.keras``; 03: every run's ``metrics.json``
at that fraction), so a rerun skips finished cells, reruns failed or interrupted ones, and
never overwrites finished results unless ``overwrite`` is asked for. Notebook 04 only
reads, so it always runs. A failed cell is reported with the path of its executed notebook,
the other fractions still run, and the command exits non-zero.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from drnb.profiles import Profile, resolve_profile
from drnb.runs import RunPaths, checkout_root, default_run_dir, open_run

NOTEBOOKS = {
    "data": "01_data_exploration.ipynb",
    "pretext": "02_rotation_pretext.ipynb",
    "finetune": "03_finetune_fractions.ipynb",
    "analysis": "04_kappa_analysis.ipynb",
}


@dataclass
class Cell:
    """One notebook execution of the grid."""

    stage: str
    parameters: dict
    output: Path
    done_marker: list[Path] = field(default_factory=list)

    @property
    def label(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self.parameters.items() if k != "run_dir")
        return NOTEBOOKS[self.stage].removesuffix(".ipynb") + (f" ({extra})" if extra else "")

    def finished(self) -> bool:
        return bool(self.done_marker) and all(path.exists() for path in self.done_marker)


@dataclass
class ReproduceReport:
    """Outcome of :func:`reproduce`."""

    run: RunPaths
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, Path, str]] = field(default_factory=list)  # (cell, executed notebook, error)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed


def notebook_dir() -> Path:
    """The folder of the numbered notebooks (in the checkout)."""
    root = checkout_root()
    if root is None:
        raise FileNotFoundError("the notebooks ship with the drnb checkout; run from a clone of the repository")
    return root / "notebooks"


def plan(profile: Profile, paths: RunPaths) -> list[Cell]:
    """The grid of notebook executions for ``profile``, in order."""
    from drnb.finetune import METRICS_FILE, run_directory, runnable_methods
    from drnb.pretext import ENCODER_FILE

    run_dir = str(paths.root)
    cells = [
        Cell("data", {"run_dir": run_dir}, paths.notebooks / NOTEBOOKS["data"], [paths.data / "summary.json"]),
        Cell("pretext", {"run_dir": run_dir}, paths.notebooks / NOTEBOOKS["pretext"], [paths.pretext / ENCODER_FILE]),
    ]
    # The same rule notebook 03 applies, so a skipped method never leaves a cell "unfinished".
    methods = runnable_methods(profile)
    for fraction in profile.fractions:
        markers = [
            run_directory(paths.finetune, method, fraction, repetition) / METRICS_FILE
            for method in methods
            for repetition in range(profile.repetitions)
        ]
        name = NOTEBOOKS["finetune"].replace(".ipynb", f"_fraction_{fraction:g}.ipynb")
        cells.append(Cell("finetune", {"run_dir": run_dir, "fraction": fraction}, paths.notebooks / name, markers))
    cells.append(Cell("analysis", {"run_dir": run_dir}, paths.notebooks / NOTEBOOKS["analysis"], []))
    return cells


def kernel_manager_class():
    """The Jupyter kernel manager papermill starts each notebook's kernel with.

    On POSIX systems the kernel talks to papermill over Unix domain sockets (``ipc``
    transport), readable only by the user, instead of plain-text TCP on localhost, which
    ipykernel >= 7 warns about at every start. Windows has no ``ipc`` transport and keeps the
    default.

    The sockets are files. They are made in Jupyter's private runtime folder (where the
    connection files go), under a name unique to each kernel, not in the notebook's working
    folder: a kernel that is killed leaves its sockets behind, and in the checkout they
    would break copying the notebooks folder.
    """
    import uuid

    from jupyter_client.manager import AsyncKernelManager
    from jupyter_core.paths import jupyter_runtime_dir

    if os.name != "posix":
        return AsyncKernelManager

    class IPCKernelManager(AsyncKernelManager):
        def __init__(self, **kwargs):
            kwargs.setdefault("transport", "ipc")
            if kwargs["transport"] == "ipc" and "ip" not in kwargs:
                runtime = Path(jupyter_runtime_dir())
                runtime.mkdir(mode=0o700, parents=True, exist_ok=True)
                kwargs["ip"] = str(runtime / f"drnb-kernel-{uuid.uuid4().hex[:12]}")
            super().__init__(**kwargs)

    return IPCKernelManager


def default_kernel() -> str:
    """``drnb`` when that Jupyter kernel runs this interpreter, else ``python3`` (this interpreter's own).

    A ``drnb`` kernel registered by another checkout (another ``.venv``) is not used: its
    notebooks would run another copy of drnb, or fail when that copy is gone.
    """
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec("drnb")
    except NoSuchKernel:
        return "python3"
    # Compare the paths as written, not resolved: every venv's python links to the same base
    # interpreter, and only the venv's own path says which drnb it imports.
    executable = spec.argv[0] if spec.argv else ""
    ours = os.path.normpath(os.path.abspath(executable)) == os.path.normpath(os.path.abspath(sys.executable))
    return "drnb" if ours else "python3"


def reproduce(
    profile_name: str = "quick",
    *,
    dataset: str | None = None,
    data_dir: str | None = None,
    overrides: dict | None = None,
    out: str | None = None,
    overwrite: bool = False,
    notebooks: str | Path | None = None,
    kernel: str | None = None,
    log=print,
) -> ReproduceReport:
    """Run the whole study headlessly; see the module docstring.

    Parameters
    ----------
    profile_name : {"smoke", "quick", "paper"}
    dataset, data_dir : str, optional
        Override the profile's dataset and its folder.
    overrides : dict, optional
        Other settings, by name (see :class:`drnb.profiles.Profile`).
    out : str, optional
        The run folder; default ``runs/<profile>-<dataset>``.
    overwrite : bool
        Rerun finished cells too (their results are replaced).
    notebooks : path, optional
        Folder holding the numbered notebooks; default the checkout's ``notebooks/``.
    kernel : str, optional
        Jupyter kernel name; default :func:`default_kernel`.

    Raises
    ------
    ValueError, FileNotFoundError
        For bad settings, an unknown dataset or a missing data folder, before anything runs.
    """
    settings = dict(overrides or {})
    if dataset:
        settings["dataset"] = dataset
    if data_dir:
        settings["data_dir"] = str(Path(data_dir).expanduser().resolve())
    profile = resolve_profile(profile_name, settings)  # every settings error surfaces here
    _check_data(profile)
    import papermill  # imported after the checks, so that a bad setting fails at once
    paths, profile = open_run(out or default_run_dir(f"{profile_name}-{profile.dataset}"), profile_name, settings)
    source = Path(notebooks) if notebooks else notebook_dir()
    kernel = kernel or default_kernel()
    manager_class = kernel_manager_class()
    report = ReproduceReport(run=paths)
    cells = plan(profile, paths)
    start = time.perf_counter()
    finetune_seconds: list[float] = []
    failed_stages: set[str] = set()
    log(f"drnb reproduce: profile {profile.name}, dataset {profile.dataset}, run folder {paths.root}, kernel {kernel}")
    for number, cell in enumerate(cells, start=1):
        if cell.stage != "analysis" and cell.finished() and not overwrite:
            report.skipped.append(cell.label)
            log(f"[{number}/{len(cells)}] {cell.label}: finished earlier, skipped")
            continue
        if "data" in failed_stages:
            break  # nothing can run without the data
        if cell.stage == "finetune" and "pretext" in failed_stages and "rotation" in profile.methods:
            report.failed.append((cell.label, cell.output, "not run: the pretext failed"))
            continue
        parameters = {**cell.parameters, "overwrite": overwrite} if cell.stage == "finetune" else cell.parameters
        cell.output.parent.mkdir(parents=True, exist_ok=True)
        cell_start = time.perf_counter()
        try:
            papermill.execute_notebook(
                str(source / NOTEBOOKS[cell.stage]),
                str(cell.output),
                parameters=parameters,
                kernel_name=kernel,
                kernel_manager_class=manager_class,
                cwd=str(source),
                progress_bar=False,
                log_output=False,
            )
        except Exception as error:  # papermill raises PapermillExecutionError and kernel errors of many kinds
            message = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
            report.failed.append((cell.label, cell.output, message))
            failed_stages.add(cell.stage)
            log(f"[{number}/{len(cells)}] {cell.label}: FAILED ({message}); see {cell.output}")
            continue
        seconds = time.perf_counter() - cell_start
        report.ran.append(cell.label)
        if cell.stage == "finetune":
            finetune_seconds.append(seconds)
        remaining = _estimate_remaining(cells[number:], finetune_seconds, overwrite)
        log(
            f"[{number}/{len(cells)}] {cell.label}: done in {_clock(seconds)} "
            f"(elapsed {_clock(time.perf_counter() - start)}{remaining})"
        )
    report.seconds = time.perf_counter() - start
    if not report.failed and paths.features.exists():
        # A cache for the fraction notebooks of this sweep: every run of it has finished.
        try:
            shutil.rmtree(paths.features)
            log(f"removed {paths.features}: the frozen features the fraction notebooks shared")
        except OSError as error:
            log(f"could not remove {paths.features} ({error}); it is a cache and may be deleted")
    if paths.table_md.exists() and not report.failed:
        log(f"table: {paths.table_md}\nplot:  {paths.plot}\nall results: {paths.results}")
    return report


def _estimate_remaining(cells: list[Cell], finetune_seconds: list[float], overwrite: bool) -> str:
    pending = [c for c in cells if c.stage == "finetune" and (overwrite or not c.finished())]
    if not pending or not finetune_seconds:
        return ""
    return f", about {_clock(len(pending) * sum(finetune_seconds) / len(finetune_seconds))} left"


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s"


def _check_data(profile: Profile) -> None:
    """A real dataset's folder must exist before anything runs (synthetic data is made on first use)."""
    from drnb.datasets import dataset_info, default_data_dir

    info = dataset_info(profile.dataset)
    if info.kind == "synthetic":
        return
    folder = Path(profile.data_dir) if profile.data_dir else default_data_dir(profile.dataset)
    if not folder.is_dir():
        problem = (
            f"--data-dir {folder} does not exist for dataset {profile.dataset!r}"
            if profile.data_dir
            else f"no data folder for dataset {profile.dataset!r}: {folder} does not exist (pass --data-dir DIR)"
        )
        raise FileNotFoundError(f"{problem}; expected {info.layout}")
