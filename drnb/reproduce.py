"""The headless reproduction: notebooks 01 -> 02 -> 03 (once per fraction) -> 04 via papermill.

Each notebook is one grid cell. A cell is finished when the file it exists to make is there
(01: ``data/summary.json``; 02: ``pretext/encoder.keras``; 03: every run's ``metrics.json``
at that fraction), so a rerun skips finished cells, reruns failed or interrupted ones, and
never overwrites finished results unless ``overwrite`` is asked for. Notebook 04 only
reads, so it always runs. A failed cell is reported with the path of its executed notebook,
the other fractions still run, and the command exits non-zero.

One ``drnb reproduce`` holds a run folder at a time (:func:`drnb.runs.run_lock`). SIGINT and
SIGTERM stop it at once: the running notebook's kernel is killed with its child processes,
its connection and socket files are removed, and no further cell starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from drnb.preprocessing import default_cache_dir
from drnb.profiles import Profile, resolve_profile
from drnb.runs import RunPaths, checkout_root, default_run_dir, open_run, run_lock

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
        extra = ", ".join(f"{k}={v}" for k, v in self.parameters.items() if k not in ("run_dir", "walkthrough"))
        return NOTEBOOKS[self.stage].removesuffix(".ipynb") + (f" ({extra})" if extra else "")

    def finished(self, warn=None) -> bool:
        """Whether every file the cell leaves is there and loads (:func:`damage`); ``warn``
        receives one line naming each file that is there but damaged."""
        if not self.done_marker:
            return False
        finished = True
        for path in self.done_marker:
            problem = damage(path) if path.exists() else "missing"
            if problem != "missing" and problem is not None and warn is not None:
                warn(f"{problem}; running {self.label} again")
            finished = finished and problem is None
        return finished


def damage(path: Path) -> str | None:
    """What is wrong with a file a finished cell leaves, checked by reading it back as its
    readers do: ``"missing"``, the damage (naming the file), or None when it loads.

    ``encoder.keras`` must load in Keras; a run's ``metrics.json`` must load with its
    ``predictions.csv`` (:func:`drnb.finetune.load_finished_run`); a JSON file must be a
    JSON object.
    """
    from drnb.files import read_json
    from drnb.finetune import METRICS_FILE, load_finished_run
    from drnb.pretext import ENCODER_FILE, encoder_damage

    if not path.exists():
        return "missing"
    try:
        if path.name == ENCODER_FILE:
            return encoder_damage(path)
        if path.name == METRICS_FILE:
            load_finished_run(path.parent)
        elif path.suffix == ".json":
            read_json(path)
    except (ValueError, FileNotFoundError) as error:
        return str(error)
    return None


@dataclass
class ReproduceReport:
    """Outcome of :func:`reproduce`."""

    run: RunPaths
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, Path, str]] = field(default_factory=list)  # (cell, executed notebook, error)
    seconds: float = 0.0
    stopped_by: int | None = None  # the signal that stopped the run, if one did
    predicted_seconds: float | None = None  # said before the first cell ran (drnb.workload), if it was

    @property
    def ok(self) -> bool:
        return not self.failed and self.stopped_by is None


def notebook_dir() -> Path:
    """The folder of the numbered notebooks (in the checkout)."""
    root = checkout_root()
    if root is None:
        raise FileNotFoundError("the notebooks ship with the drnb checkout; run from a clone of the repository")
    return root / "notebooks"


def plan(profile: Profile, paths: RunPaths) -> list[Cell]:
    """The grid of notebook executions for ``profile``, in order."""
    from drnb.finetune import METRICS_FILE, pretext_methods, run_directory, runnable_methods

    run_dir = str(paths.root)
    cells = [Cell("data", {"run_dir": run_dir}, paths.notebooks / NOTEBOOKS["data"], [paths.data / "summary.json"])]
    if pretext_methods(profile):  # one notebook trains every pretext the methods name
        encoders = list(paths.encoders(pretext_methods(profile)).values())
        cells.append(Cell("pretext", {"run_dir": run_dir}, paths.notebooks / NOTEBOOKS["pretext"], encoders))
    # The same rule notebook 03 applies, so a skipped method never leaves a cell "unfinished".
    methods = runnable_methods(profile)
    for fraction in profile.fractions:
        markers = [
            run_directory(paths.finetune, protocol, method, fraction, repetition) / METRICS_FILE
            for protocol in profile.protocols
            for method in methods
            for repetition in range(profile.repetitions)
        ]
        name = NOTEBOOKS["finetune"].replace(".ipynb", f"_fraction_{fraction:g}.ipynb")
        # The walkthrough of one run is shown once, in the first fraction's notebook.
        parameters = {"run_dir": run_dir, "fraction": fraction, "walkthrough": fraction == profile.fractions[0]}
        cells.append(Cell("finetune", parameters, paths.notebooks / name, markers))
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
            KERNEL_MANAGERS.add(self)  # so that a signal can stop its kernel (stop_kernels)

        async def _async_interrupt_kernel(self):
            # jupyter_client interrupts every kernel before asking it to shut down, and the
            # kernel logs the interrupt as an error; a notebook papermill has finished runs
            # nothing to interrupt, and a stopped run's kernel is killed instead.
            if not self.shutting_down:
                await super()._async_interrupt_kernel()

    return IPCKernelManager


# The kernel managers drnb started in this process (held weakly: a finished one goes away).
KERNEL_MANAGERS: "weakref.WeakSet" = weakref.WeakSet()


def stop_kernels() -> int:
    """Kill every kernel drnb started in this process that is still running, with its child
    processes, and remove its connection and socket files. Safe from a signal handler: no
    event loop is needed.

    Returns
    -------
    int
        The number of kernels killed.
    """
    killed = 0
    for manager in list(KERNEL_MANAGERS):
        provisioner = getattr(manager, "provisioner", None)
        process = getattr(provisioner, "process", None)
        if process is not None and process.poll() is None:
            # A kernel runs in a session of its own: its process group is it and its children
            # (the preprocessing's worker processes, say).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(getattr(provisioner, "pgid", None) or process.pid, signal.SIGKILL)
            killed += 1
        for cleanup in ("cleanup_connection_file", "cleanup_ipc_files"):
            with contextlib.suppress(OSError, AttributeError):
                getattr(manager, cleanup)()
        KERNEL_MANAGERS.discard(manager)
    return killed


@contextlib.contextmanager
def stopping_on_signals():
    """While inside: SIGINT and SIGTERM kill drnb's kernels at once (:func:`stop_kernels`) and
    are recorded in the list yielded, so the caller starts nothing more; a second signal ends
    the process at once. Outside the main thread (where Python cannot set handlers) nothing
    changes."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(number, frame):
        if received:  # asked twice: stop waiting for anything
            stop_kernels()
            raise SystemExit(128 + number)
        received.append(number)
        stop_kernels()

    previous = {number: signal.signal(number, handler) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for number, action in previous.items():
            signal.signal(number, action)


def in_worker_thread(function, received: list[int]) -> BaseException | None:
    """Run ``function()`` in a thread while this one waits, so that this thread's signal
    handlers run at once (papermill's event loop would otherwise take SIGINT and SIGTERM for
    its own, which only ask the kernel to shut down after its cell); return what it raised.

    Once a signal is in ``received``, a kernel the thread starts after it is killed too.
    """
    raised: list[BaseException] = []

    def target():
        try:
            function()
        except BaseException as error:  # handed back to the caller, whatever it is
            raised.append(error)

    worker = threading.Thread(target=target, name="drnb-notebook", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.2)
        if received:
            stop_kernels()
    return raised[0] if raised else None


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
    profile_name: str = "demo",
    *,
    dataset: str | None = None,
    data_dir: str | None = None,
    overrides: dict | None = None,
    out: str | None = None,
    overwrite: bool = False,
    notebooks: str | Path | None = None,
    kernel: str | None = None,
    predict: bool = True,
    log=print,
) -> ReproduceReport:
    """Run the whole study headlessly; see the module docstring.

    Parameters
    ----------
    profile_name : {"smoke", "demo", "quick", "paper"}
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
    predict : bool
        Before a new sweep starts, say how long it will take on this machine, from about half
        a minute of measurement (:func:`predicted_seconds`); a resumed one is not predicted.

    Raises
    ------
    ValueError, FileNotFoundError
        For bad settings, an unknown dataset or a missing data folder, before anything runs.
    RuntimeError
        When another process holds the run folder.
    """
    settings = dict(overrides or {})
    for option, value in (("--dataset", dataset), ("--data-dir", data_dir), ("--out", out), ("--kernel", kernel)):
        _check_not_empty(option, value)
    if dataset:
        settings["dataset"] = dataset
    if data_dir:
        settings["data_dir"] = str(Path(data_dir).expanduser().resolve())
    profile = resolve_profile(profile_name, settings)  # every settings error surfaces here
    _check_data(profile)
    _check_writable("preprocessing cache", default_cache_dir(), "set DRNB_CACHE to a folder you can write")
    source = Path(notebooks) if notebooks else notebook_dir()
    kernel = _check_kernel(kernel) if kernel else default_kernel()
    folder = RunPaths(Path(out).expanduser().resolve() if out else default_run_dir(f"{profile_name}-{profile.dataset}"))
    _check_writable("--out", folder.root, "pass --out a folder you can write")
    # The lock first: two runs started together into a new folder must not both write its settings.
    with run_lock(folder), stopping_on_signals() as received:
        paths, profile = open_run(folder.root, profile_name, settings, same_profile=True)
        report = ReproduceReport(run=paths)
        log(f"drnb reproduce: profile {profile.name}, dataset {profile.dataset}, run folder {paths.root}, kernel {kernel}")
        cells = plan(profile, paths)
        # A new sweep only: a cell's files there at all (whether or not they load) mean one that resumes.
        if predict and (overwrite or not any(marker.exists() for cell in cells for marker in cell.done_marker)):
            report.predicted_seconds = predicted_seconds(paths, kernel, log)
        _run_cells(cells, profile, source, kernel, overwrite, report, received, log)
        _log_outcome(report, paths, log)
    return report


def _log_outcome(report: ReproduceReport, paths: RunPaths, log) -> None:
    """How the sweep ended, where its results are (removing the features the notebooks
    shared, once every run has finished), and the time it took beside the prediction."""
    if report.stopped_by is not None:
        log(f"stopped by {signal.Signals(report.stopped_by).name}: finished runs are kept; rerun the same command to resume")
    elif not report.failed:
        _remove_shared_features(paths, log)
        if paths.table_md.exists():
            log(f"table: {paths.table_md}\nplots: {paths.plot}, {paths.auc_plot}\nall results: {paths.results}")
    predicted = f" (predicted {_clock(report.predicted_seconds)})" if report.predicted_seconds else ""
    log(f"took {_clock(report.seconds)}{predicted}")


PREDICTION_TIMEOUT = 300  # seconds the measurement may take before the run starts without it


def predicted_seconds(paths: RunPaths, kernel: str, log) -> float | None:
    """The sweep's predicted wall time on this machine, in seconds, logged with its stages, or
    None, logged with the reason, when it cannot be measured.

    It runs :mod:`drnb.workload` in a fresh interpreter, as each notebook's kernel is one: the
    imports, a bare kernel start and a few training steps of the profile's networks are timed,
    and the sweep's work is counted from its real plan.
    """
    from drnb.workload import PREDICT_COMMAND, describe_prediction

    command = [sys.executable, "-c", PREDICT_COMMAND, str(paths.root), kernel]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=PREDICTION_TIMEOUT)
    except subprocess.TimeoutExpired:
        log(f"no prediction of the run's time: measuring took over {PREDICTION_TIMEOUT} s")
        return None
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        reason = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        log(f"no prediction of the run's time: the measurement failed ({reason})")
        return None
    prediction = json.loads(lines[-1])
    log(describe_prediction(prediction))
    return prediction["total"]


def _remove_shared_features(paths: RunPaths, log) -> None:
    """Delete the frozen features the fraction notebooks shared: every run of the sweep has finished."""
    if not paths.features.exists():
        return
    try:
        shutil.rmtree(paths.features)
        log(f"removed {paths.features}: the frozen features the fraction notebooks shared")
    except OSError as error:
        log(f"could not remove {paths.features} ({error}); it is a cache and may be deleted")


def _run_cells(cells: list[Cell], profile: Profile, source: Path, kernel: str, overwrite: bool, report: ReproduceReport,
               received: list[int], log) -> None:
    """Execute the grid's cells in order into ``report``; stop at the first signal in ``received``."""
    import papermill

    manager_class = kernel_manager_class()
    start = time.perf_counter()
    finetune_seconds: list[float] = []
    failed_stages: set[str] = set()
    for number, cell in enumerate(cells, start=1):
        if received:
            break
        if cell.stage != "analysis" and not overwrite and cell.finished(warn=lambda line: log(f"warning: {line}")):
            report.skipped.append(cell.label)
            log(f"[{number}/{len(cells)}] {cell.label}: finished earlier, skipped")
            continue
        if "data" in failed_stages:
            break  # nothing can run without the data
        if cell.stage == "finetune" and "pretext" in failed_stages:
            report.failed.append((cell.label, cell.output, "not run: the pretext failed"))
            continue
        parameters = {**cell.parameters, "overwrite": overwrite} if cell.stage == "finetune" else cell.parameters
        cell.output.parent.mkdir(parents=True, exist_ok=True)
        cell_start = time.perf_counter()
        error = in_worker_thread(lambda: papermill.execute_notebook(
            str(source / NOTEBOOKS[cell.stage]),
            str(cell.output),
            parameters=parameters,
            kernel_name=kernel,
            kernel_manager_class=manager_class,
            cwd=str(source),
            progress_bar=False,
            log_output=False,
        ), received)
        if received:
            report.failed.append((cell.label, cell.output, f"stopped by {signal.Signals(received[0]).name}"))
            break
        if error is not None:  # papermill raises PapermillExecutionError and kernel errors of many kinds
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
    if received:
        report.stopped_by = received[0]
    report.seconds = time.perf_counter() - start


def _estimate_remaining(cells: list[Cell], finetune_seconds: list[float], overwrite: bool) -> str:
    pending = [c for c in cells if c.stage == "finetune" and (overwrite or not c.finished())]
    if not pending or not finetune_seconds:
        return ""
    return f", about {_clock(len(pending) * sum(finetune_seconds) / len(finetune_seconds))} left"


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s"


def _check_not_empty(option: str, value) -> None:
    """An option given as ``''`` (an unset shell variable, say) is refused, not read as its default."""
    if value is not None and not str(value).strip():
        raise ValueError(f"{option} {value!r}: expected a value; leave the option out for its default")


def _check_kernel(kernel: str) -> str:
    """``kernel`` when Jupyter knows it; ValueError listing the kernels it knows otherwise."""
    from jupyter_client.kernelspec import KernelSpecManager

    known = KernelSpecManager().find_kernel_specs()
    if kernel not in known:
        raise ValueError(f"--kernel {kernel}: no such Jupyter kernel; expected one of {sorted(known)}")
    return kernel


def writable_problem(folder: Path) -> str | None:
    """Why files cannot be written in ``folder`` (made if missing), or None when they can.

    Checked without writing anything: the folder, or the nearest of its parents that exists,
    must be a folder this process may create files in.
    """
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} cannot be written (permission denied)"
    return None


def _check_writable(what: str, folder: Path, advice: str) -> None:
    """ValueError naming ``what`` and ``folder`` when nothing can be written there."""
    problem = writable_problem(folder)
    if problem:
        raise ValueError(f"{what} {folder}: {problem}; {advice}")


def _check_data(profile: Profile) -> None:
    """A real dataset's folder must hold its layout before anything runs: its label file, its
    image folder and every listed photograph (read as notebook 01 reads them, without decoding),
    and the archive's folders must exist. Synthetic data is made on first use, where DRNB_DATA points."""
    from drnb.archive import check_sources
    from drnb.datasets import dataset_info, default_data_dir
    from drnb.runs import load_table

    check_sources(profile.pretext_images)
    info = dataset_info(profile.dataset)
    folder = Path(profile.data_dir) if profile.data_dir else default_data_dir(profile.dataset)
    if info.kind == "synthetic":
        if not profile.data_dir:
            _check_writable("synthetic data folder", folder, "set DRNB_DATA to a folder you can write")
        return
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--data-dir {folder} is a file; expected the folder of dataset {profile.dataset!r}: {info.layout}")
    if not folder.is_dir():
        problem = (
            f"--data-dir {folder} does not exist for dataset {profile.dataset!r}"
            if profile.data_dir
            else f"no data folder for dataset {profile.dataset!r}: {folder} does not exist (pass --data-dir DIR)"
        )
        raise FileNotFoundError(f"{problem}; expected {info.layout}")
    if info.kind == "npz":
        return  # notebook 01 downloads the archive when it is missing
    try:
        load_table(profile)
    except (ValueError, FileNotFoundError, OSError) as error:
        raise ValueError(f"--data-dir {folder} does not hold dataset {profile.dataset!r} as expected ({error}); "
                         f"expected {info.layout}") from None
