"""Run the numbered notebooks in order with papermill: ``python -m helpers.run``.

Parameters come from a profile file (``profiles/<name>.yaml``: ``demo`` runs the built-in demo
data on a laptop, ``paper`` holds the paper's settings for a user's PAIP 2019 folder) plus
command-line overrides (``-p NAME VALUE``, VALUE read as YAML so ``-p scales "[4, 16]"`` works).
Every parameter name is checked against the notebooks' ``parameters`` cells (papermill itself
only logs a warning for an unknown name). Executed notebooks and ``params.json`` go to
``runs/<run_name>/``; the run stops at the first failing notebook and names it and its cell.

Examples::

    python -m helpers.run                      # the demo profile, all notebooks
    python -m helpers.run --profile paper -p data_dir /data/paip2019
    python -m helpers.run --only 02 -p tissue_threshold 0.3 --run-name tissue03
    python -m helpers.run --list               # notebooks and their parameters
    python -m helpers.run --sweep sweeps/demo_vote_share.yaml   # a parameter sweep

A finished run whose notebook 05 wrote ``report.json`` gets a ``summary.json``: the report's
numbers with every parameter that produced them. A sweep file lists parameter sets; each runs
(all notebooks, or ``only`` some of them on a ``base_run``'s earlier outputs, linked, not copied)
into its own folder, and the summaries are collected into ``runs/<sweep>/sweep.csv`` and a
figure.
"""

import argparse
import contextlib
import datetime as _dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from .core.atomic import atomic_path, remove_stale_temporaries, write_json
from .core.errors import InputError
from .core.params import SPECS, check_parameters
from .core.paths import REPO_ROOT, figures_dir, run_dir, runs_root
from .notebook.figures import STRICT_FIGURES_ENV

NOTEBOOK_DIR = REPO_ROOT / "notebooks"
PROFILE_DIR = REPO_ROOT / "profiles"
#: Parameters that describe the run rather than any result; they may differ on a rerun.
RUN_ONLY = {"workers"}


def notebooks(only=None):
    """The numbered notebooks in order, optionally only those whose number is in ``only``."""
    nbs = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
    if only:
        want = {str(o).zfill(2) for o in only}
        unknown = want - {p.name[:2] for p in nbs}
        if unknown:
            raise InputError(f"--only: no notebook numbered {sorted(unknown)}; have {[p.name[:2] for p in nbs]}")
        nbs = [p for p in nbs if p.name[:2] in want]
    return nbs


def notebook_parameters(path):
    """``{name: default}`` of a notebook's ``parameters`` cell (via papermill's inspection)."""
    import papermill as pm

    params = pm.inspect_notebook(str(path))
    out = {}
    for name, info in params.items():
        try:
            out[name] = yaml.safe_load(info["default"])
        except yaml.YAMLError:
            out[name] = info["default"]
    return out


def load_profile(name):
    """Read ``profiles/<name>.yaml``: ``{"description", "requires", "parameters"}``."""
    path = PROFILE_DIR / f"{name}.yaml"
    if not path.exists():
        have = sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))
        raise InputError(f"unknown profile {name!r}; profiles are {have} (files in {PROFILE_DIR})")
    prof = yaml.safe_load(path.read_text()) or {}
    prof.setdefault("parameters", {})
    prof.setdefault("requires", [])
    return prof


def resolve_parameters(profile, overrides, nbs, check_files=True):
    """Merge the profile and the overrides; check every name against the notebooks and every
    value against :data:`helpers.core.params.SPECS` (types, ranges, the rules tying them), before
    anything runs.

    Returns:
        ``(merged, per_notebook)``: all parameters, and for each notebook the ones it takes.
    """
    declared = {p: notebook_parameters(p) for p in nbs}
    known = {}
    for d in declared.values():
        for k, v in d.items():
            known.setdefault(k, v)
    merged = dict(profile["parameters"])
    merged.update(overrides)
    # Names the profile sets for notebooks not in this run are fine; overrides must exist.
    all_known = set(known)
    for p in notebooks():
        if p not in declared:
            all_known |= set(notebook_parameters(p))
    for k in overrides:
        if k not in all_known:
            raise InputError(
                f"unknown parameter {k!r}: no notebook declares it; known parameters are {sorted(all_known)}"
            )
    for k in profile["parameters"]:
        if k not in all_known:
            raise InputError(f"profile parameter {k!r} is declared by no notebook; known: {sorted(all_known)}")
    for k in profile["requires"]:
        if merged.get(k) in (None, ""):
            raise InputError(f"this profile needs parameter {k!r}: pass -p {k} VALUE")
    unchecked = sorted(k for k in merged if k not in SPECS)
    if unchecked:  # a notebook declares a parameter that helpers.core.params does not know
        raise InputError(f"parameters {unchecked} have no entry in helpers.core.params.SPECS; add them there")
    merged = {**merged, **check_parameters(merged, check_files=check_files)}
    # Each notebook gets all its parameters (its defaults where the profile and the command line
    # say nothing), so params.json records exactly what ran.
    per = {p: {**declared[p], **{k: v for k, v in merged.items() if k in declared[p]}} for p in nbs}
    return merged, per


def _git_commit():
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        return None


#: What each notebook writes into its run folder (``--overwrite`` removes them before a rerun;
#: patch caches, keyed by their content, are kept and reused).
OUTPUTS = {
    "02": ("extraction.json", "split.csv", "split.csv.key.json", "patch_counts.csv"),
    "03": ("segmentation",),
    "04": ("classification",),
    "05": ("voting", "report.json", "summary.json"),
}


def check_run_folder(folder, per_notebook, overwrite=False):
    """Refuse to mix two different runs in one folder (unless ``overwrite``).

    ``params.json`` records, per notebook, the parameters of its last *finished* run; a rerun
    of a notebook with other values of its own parameters is refused. A run that was refused
    or failed records nothing, so a corrected rerun is compared with what actually produced
    the folder's outputs.

    Args:
        folder: the run folder.
        per_notebook: ``{notebook name: {parameter: value}}`` of the notebooks to run.
        overwrite: allow it (the caller then removes their old outputs).
    """
    pf = folder / "params.json"
    if not pf.exists() or overwrite:
        return
    done = json.loads(pf.read_text()).get("finished_notebooks", {})
    diffs = []
    for nb, params in per_notebook.items():
        old = done.get(nb, {}).get("parameters")
        if old is None:
            continue
        diffs += [
            f"{k}: {old.get(k)!r} -> {params.get(k)!r}"
            for k in sorted(set(old) | set(params))
            if k not in RUN_ONLY and old.get(k) != params.get(k)
        ]
    if diffs:
        raise InputError(
            f"run folder {folder} holds results made with other parameters ({', '.join(sorted(set(diffs))[:6])}); "
            "use another --run-name, or --overwrite to replace them"
        )


def clear_outputs(folder, nbs):
    """Remove what the notebooks ``nbs`` wrote into ``folder`` before (for ``--overwrite``)."""
    import shutil

    for nb in nbs:
        for name in OUTPUTS.get(nb.name[:2], ()):
            p = folder / name
            if p.is_symlink() or p.is_file():
                p.unlink()
            elif p.is_dir():
                shutil.rmtree(p)


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m helpers.run",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--profile", default="demo", help="profile name in profiles/ (default: demo)")
    ap.add_argument(
        "-p",
        "--param",
        nargs=2,
        action="append",
        default=[],
        metavar=("NAME", "VALUE"),
        help="override a parameter; VALUE is read as YAML (repeatable)",
    )
    ap.add_argument("--only", nargs="+", help="run only these notebooks (numbers, e.g. 01 02)")
    ap.add_argument("--run-name", help="run folder name under runs/ (default: the profile's name)")
    ap.add_argument("--overwrite", action="store_true", help="replace a run folder holding other parameters")
    ap.add_argument("--list", action="store_true", help="list notebooks and their parameters, then exit")
    ap.add_argument("--no-progress", action="store_true", help="no per-cell progress bar")
    ap.add_argument("--sweep", metavar="FILE", help="run a sweep file (see sweeps/) and collect the summaries")
    ap.add_argument(
        "--strict-figures",
        action="store_true",
        help="a figure cell that fails fails its notebook (default: one line, the run goes on; on under CI)",
    )
    args = ap.parse_args(argv)
    if args.strict_figures:
        os.environ[STRICT_FIGURES_ENV] = "1"  # the notebooks' kernels inherit it
    try:
        if args.sweep:
            run_sweep(args.sweep, progress=not args.no_progress)
            return 0
        return _run(args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _check_resolutions(merged):
    """Say before any notebook runs what notebook 01 says: that the slides' resolutions differ
    while scales are level-0 downsamples (one line), or that a physical-scale run has a slide
    without mpp (the error)."""
    from .notebook.session import resolve_data_dir
    from .wsi.dataset import list_cases, resolution_warning, slide_resolutions

    cases = list_cases(resolve_data_dir(merged["data_dir"], progress=False))
    line = resolution_warning(slide_resolutions(cases), merged.get("scale_reference", 0.0))
    if line:
        print(f"warning: {line}", flush=True)


def _run(args):
    nbs = notebooks(args.only)
    if args.list:
        for p in notebooks():
            print(p.name)
            for k, v in notebook_parameters(p).items():
                print(f"    {k} = {v!r}")
        return 0
    profile = load_profile(args.profile)
    overrides = {}
    for name, raw in args.param:
        try:
            overrides[name] = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise InputError(f"-p {name}: cannot read {raw!r} as a value ({exc})") from None
        if name == "data_dir" and overrides[name]:
            overrides[name] = str(Path(overrides[name]).expanduser().resolve())
    run_name = args.run_name or args.profile
    overrides.setdefault("run_name", run_name)
    merged, per = resolve_parameters(profile, overrides, nbs)
    folder = run_dir(run_name)
    per_name = {nb.name: per[nb] for nb in nbs}
    check_run_folder(folder, per_name, args.overwrite)
    if args.overwrite:
        clear_outputs(folder, nbs)
    if "data_dir" in merged and merged["data_dir"] == "":
        from .demo.synthetic import ensure_demo_dataset

        print("demo data:", ensure_demo_dataset(progress=not args.no_progress), flush=True)
    if "data_dir" in merged:
        _check_resolutions(merged)
    out_dir = folder / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    pf = folder / "params.json"
    record = json.loads(pf.read_text()) if pf.exists() and not args.overwrite else {}
    record.setdefault("finished_notebooks", {})
    record.update(
        {
            "profile": args.profile,
            "parameters": merged,
            "notebooks": [p.name for p in nbs],
            "git_commit": _git_commit(),
            "started": _dt.datetime.now().isoformat(timespec="seconds"),
        }
    )
    record.pop("finished", None)
    write_json(pf, record)
    t_all = time.perf_counter()
    for i, nb in enumerate(nbs, 1):
        print(f"[{i}/{len(nbs)}] {nb.name}", flush=True)
        t = time.perf_counter()
        failure = execute(nb, out_dir, per[nb], folder, progress=not args.no_progress)
        if failure:
            print(failure, file=sys.stderr, flush=True)
            return 1
        record["finished_notebooks"][nb.name] = {
            "parameters": per[nb],
            "seconds": round(time.perf_counter() - t, 1),
            "finished": _dt.datetime.now().isoformat(timespec="seconds"),
        }
        write_json(pf, record)
        out = out_dir / nb.name
        shown = out.relative_to(REPO_ROOT) if out.is_relative_to(REPO_ROOT) else out
        print(f"      done in {time.perf_counter() - t:.0f} s -> {shown}", flush=True)
    record["finished"] = _dt.datetime.now().isoformat(timespec="seconds")
    record["seconds"] = round(time.perf_counter() - t_all, 1)
    write_json(pf, record)
    print(f"All {len(nbs)} notebooks ran in {record['seconds']:.0f} s. Outputs: {folder}", flush=True)
    summary = write_summary(folder, record)
    if summary:
        print(
            f"Summary: {summary}\nReproduction report: {figures_dir(run_name) / '05_reproduction_report.md'}",
            flush=True,
        )
    return 0


class _Interrupted(KeyboardInterrupt):
    """The runner was asked to stop (SIGTERM, SIGHUP, Ctrl-C)."""


def _kernel_manager_class():
    """A kernel manager that remembers its kernel's pid and how the kernel process ended."""
    from jupyter_client.manager import AsyncKernelManager

    class WatchedKernel(AsyncKernelManager):
        pid = None
        exit_code = None

        async def _async_launch_kernel(self, kernel_cmd, **kw):
            await super()._async_launch_kernel(kernel_cmd, **kw)
            WatchedKernel.pid = getattr(self.provisioner, "pid", None)

        async def _async_is_alive(self):
            proc = getattr(self.provisioner, "process", None)
            if proc is not None and proc.poll() is not None:
                WatchedKernel.exit_code = proc.returncode
            return await super()._async_is_alive()

    return WatchedKernel


def _running_cell(path):
    """``(index, first line)`` of the cell papermill marked as running in a partial output."""
    try:
        import nbformat

        nb = nbformat.read(str(path), as_version=4)
    except Exception:
        return None, ""
    # Cells run in order: the first code cell without a reply is the one the kernel died in
    # (papermill saves the partial notebook now and then, so it may not show that it started).
    for i, c in enumerate(nb.cells):
        if c.cell_type == "code" and "shell.execute_reply" not in c.get("metadata", {}).get("execution", {}):
            code = [ln for ln in c.source.strip().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
            return i, (code or c.source.strip().splitlines() or [""])[0][:60]  # its first line of code
    return None, ""


def _death_cause(code, folder):
    """Words for how a kernel ended, with the likely cause and what to do."""
    import shutil
    import signal

    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    low_disk = free is not None and free < 200 * 2**20
    if code is not None and code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
        cause = {
            "SIGKILL": "most often the out-of-memory killer: lower 'workers' or the batch sizes, or use a "
            "machine with more memory",
            "SIGBUS": "most often a full disk under a memory-mapped file: free space",
            "SIGSEGV": "a crash in native code (a damaged slide file?)",
        }.get(name, "")
        what = f"killed by {name}" + (f", {cause}" if cause else "")
    elif code is not None:
        what = f"exited with code {code}"
    else:
        what = "died"
    if low_disk:
        what += f"; the disk holding {folder} has only {free / 2**20:.0f} MB free"
    return what


def execute(nb, out_dir, parameters, folder, progress=True):
    """Execute one notebook with papermill; return ``None``, or the one-line failure message.

    The executed notebook is written under a temporary name and renamed into place only when it
    finishes: a failed rerun keeps the last good executed notebook and writes its own as
    ``<name>.failed.ipynb``. A killed kernel is reported with the cell it was running and the
    likely cause; temporary files it left in the run folder are removed. SIGTERM or Ctrl-C stop
    the kernel (and, with it, its worker processes) before the runner exits.
    """
    import signal

    import papermill as pm
    from nbclient.exceptions import DeadKernelError

    out = out_dir / nb.name
    tmp = out_dir / f".{Path(nb.name).stem}.running.ipynb"
    failed = out_dir / f"{Path(nb.name).stem}.failed.ipynb"
    km = _kernel_manager_class()

    def stop(signum, frame):
        raise _Interrupted(signal.Signals(signum).name)

    # A runner killed outright (SIGKILL, a scheduler) cleaned nothing: its kernel's temporaries
    # (a figure, a cache being written) are removed before this run starts.
    _remove_temporaries(folder)
    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGHUP)}
    message = None
    try:
        pm.execute_notebook(
            str(nb),
            str(tmp),
            parameters=parameters,
            kernel_name="python3",
            cwd=str(NOTEBOOK_DIR),
            progress_bar=progress,
            kernel_manager_class=km,
            extra_arguments=["--IPKernelApp.log_level=ERROR"],
        )  # no transport warnings
        os.replace(tmp, out)
        failed.unlink(missing_ok=True)
        return None
    except pm.PapermillExecutionError as exc:
        message = (
            f"FAILED: {nb.name}, cell {exc.cell_index} (execution count {exc.exec_count}): "
            f"{exc.ename}: {exc.evalue} [the executed notebook, with the traceback: {failed}]"
        )
    except DeadKernelError:
        idx, line = _running_cell(tmp)
        where = f"cell {idx} ({line!r})" if idx is not None else "a cell"
        message = (
            f"FAILED: {nb.name}, {where}: the notebook's kernel {_death_cause(km.exit_code, folder)}. "
            f"Finished results are kept: rerun to resume. Partial notebook: {failed}"
        )
    except KeyboardInterrupt as exc:
        message = f"STOPPED ({exc or 'interrupted'}) during {nb.name}: rerun to resume. Partial notebook: {failed}"
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if message is not None:
            _kill(km.pid)
            if tmp.exists():
                os.replace(tmp, failed)
            _remove_temporaries(folder)
    return message


def _remove_temporaries(folder):
    """Remove the temporaries a killed run left anywhere in its run folder."""
    for d, _, _ in os.walk(folder):  # symlinked inputs (sweeps) are not entered
        remove_stale_temporaries(d)


def _kill(pid):
    """Kill a kernel process that is still alive (its workers die with it)."""
    import signal

    if pid:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def write_summary(folder, record):
    """``summary.json``: notebook 05's report numbers with the parameters that produced them, the
    classifiers it lacks and its notes (counts whose baseline is 100 %: every test slide of one class).

    Returns:
        Its path, or ``None`` when the run has no ``report.json`` (notebook 05 did not run).
    """
    rep = Path(folder) / "report.json"
    if not rep.exists():
        return None
    report = json.loads(rep.read_text())
    out = Path(folder) / "summary.json"
    write_json(
        out,
        {
            "run_name": Path(folder).name,
            "profile": record.get("profile"),
            "parameters": record.get("parameters"),
            "git_commit": record.get("git_commit"),
            "seconds": record.get("seconds"),
            "numbers": report.get("rows", []),
            "missing": report.get("missing", []),
            "notes": report.get("notes", []),
        },
    )
    return out


def link_inputs(base, folder, nbs):
    """Make the outputs of the notebooks *not* in ``nbs`` readable in ``folder`` from run ``base``.

    Files and result folders are linked, never copied; the patch caches are linked one cache
    folder at a time under real per-slide folders, so a cache an entry cuts itself (notebook
    04 with another stride) lands in the entry's own folder. Nothing an entry runs writes into
    ``base``: its own notebooks' outputs are never linked.

    Raises:
        InputError: ``base`` lacks an output that the entry needs.
    """
    running = {nb.name[:2] for nb in nbs}
    first = min(running)
    need = [n for nb, names in OUTPUTS.items() if nb < first for n in names if not n.endswith(".key.json")]
    lacking = [n for n in need if not (base / n).exists()]
    if lacking:
        raise InputError(
            f"base_run {base.name!r} lacks {lacking}: run its notebooks first (python -m helpers.run "
            f"--run-name {base.name})"
        )
    for nb, names in OUTPUTS.items():
        if nb in running:
            continue
        for n in names:
            src, dst = base / n, folder / n
            if src.exists() and not dst.exists() and not dst.is_symlink():
                dst.symlink_to(src.resolve(), target_is_directory=src.is_dir())
    if "02" not in running and (base / "patches").is_dir():
        for case_dir in (base / "patches").iterdir():
            if not case_dir.is_dir():
                continue
            own = folder / "patches" / case_dir.name
            own.mkdir(parents=True, exist_ok=True)
            for item in case_dir.iterdir():
                if not item.name.startswith(".") and not (own / item.name).exists():
                    (own / item.name).symlink_to(item.resolve(), target_is_directory=item.is_dir())


def load_sweep(path):
    """Read a sweep file: ``name``, ``profile``, optional ``base_run``, ``base_entry`` and
    ``only``, ``entries``. ``base_entry`` (a parameter mapping) names what the base run itself
    is, so that its report counts as one more entry of the sweep without being run again."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"sweep file {path}: not found")
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise InputError(f"sweep file {path}: not valid YAML ({exc})") from None
    for key in ("name", "entries"):
        if key not in spec:
            raise InputError(f"sweep file {path}: needs '{key}' (see sweeps/demo_vote_share.yaml)")
    if (
        not isinstance(spec["entries"], list)
        or not spec["entries"]
        or not all(isinstance(e, dict) for e in spec["entries"])
    ):
        raise InputError(f"sweep file {path}: 'entries' must be a non-empty list of parameter mappings")
    unknown = set(spec) - {"name", "profile", "base_run", "base_entry", "only", "entries", "description"}
    if unknown:
        raise InputError(f"sweep file {path}: unknown keys {sorted(unknown)}")
    if "base_entry" in spec and (not spec.get("base_run") or not isinstance(spec["base_entry"], dict)):
        raise InputError(f"sweep file {path}: 'base_entry' needs a 'base_run' and must be a parameter mapping")
    return spec


def run_sweep(path, progress=True):
    """Run every entry of a sweep file into ``runs/<name>-NN`` and collect their summaries.

    Every entry's parameter names and types are checked before the first notebook runs.
    """
    import pandas as pd

    spec = load_sweep(path)
    profile_name = spec.get("profile", "demo")
    profile = load_profile(profile_name)
    only = [str(o).zfill(2) for o in spec.get("only", [])] or None
    nbs = notebooks(only)
    base = spec.get("base_run")
    bdir = runs_root() / base if base else None
    if base and not bdir.is_dir():
        raise InputError(
            f"base_run {base!r}: no such run in {runs_root()}; run it first (python -m helpers.run --run-name {base})"
        )
    names = []
    for i, entry in enumerate(spec["entries"]):
        run_name = f"{spec['name']}-{i:02d}"
        resolve_parameters(profile, {**entry, "run_name": run_name}, nbs)  # fails on a bad name now
        names.append(run_name)
    rows = []

    def collect(run_name, entry, numbers):
        for r in numbers:
            rows.append(
                {
                    "run": run_name,
                    **{f"param:{k}": (json.dumps(v) if isinstance(v, list) else v) for k, v in entry.items()},
                    "quantity": r["quantity"],
                    "paper": r["paper"],
                    "ours": r["ours"],
                    "convention": r["convention"],
                }
            )

    if "base_entry" in spec:
        rep = bdir / "report.json"
        if not rep.exists():
            raise InputError(f"base_run {base!r} has no report.json: run its notebook 05 first")
        collect(base, spec["base_entry"], json.loads(rep.read_text())["rows"])
    for run_name, entry in zip(names, spec["entries"]):
        folder = run_dir(run_name)
        if base:
            link_inputs(bdir, folder, nbs)
        args = argparse.Namespace(
            profile=profile_name,
            param=[[k, yaml.safe_dump(v, default_flow_style=True).strip()] for k, v in entry.items()],
            only=only,
            run_name=run_name,
            overwrite=True,
            list=False,
            no_progress=not progress,
        )
        print(f"== sweep {spec['name']}: {run_name} {entry}", flush=True)
        if _run(args) != 0:
            raise InputError(f"sweep entry {run_name} ({entry}) failed; see its notebooks in {folder / 'notebooks'}")
        summ = json.loads((folder / "summary.json").read_text()) if (folder / "summary.json").exists() else None
        if summ is None:
            raise InputError(
                f"sweep entry {run_name} wrote no summary.json: a sweep needs notebook 05 among its notebooks"
            )
        collect(run_name, entry, summ["numbers"])
    table = pd.DataFrame(rows)
    out = run_dir(spec["name"])

    with atomic_path(out / "sweep.csv") as tmp:
        table.to_csv(tmp, index=False)
    fig_path = sweep_figure(table, out / "sweep.png")
    spread = sweep_spread(table)
    with atomic_path(out / "spread.md") as tmp:
        tmp.write_text(spread_markdown(spread, table["run"].nunique()))
    print(f"Sweep table: {out / 'sweep.csv'}\nSweep figure: {fig_path}\nSpread: {out / 'spread.md'}", flush=True)
    return table


def _as_number(v):
    """A report value as a number: ``"8 of 9"`` is 8/9; anything else non-numeric is NaN."""
    if isinstance(v, str) and " of " in v:
        a, b = v.split(" of ")
        return float(a) / float(b) if float(b) else float("nan")
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def sweep_spread(table):
    """Mean, standard deviation, minimum and maximum of every report number over a sweep's runs.

    Args:
        table: ``sweep.csv``'s rows (``run``, ``quantity``, ``paper``, ``ours``).

    Returns:
        A DataFrame ``quantity, paper, runs, mean, sd, min, max`` in the report's order (counts
        such as ``8 of 9`` as shares).
    """
    import pandas as pd

    t = table.assign(value=table["ours"].map(_as_number))
    rows = []
    for q, g in t.groupby("quantity", sort=False):
        v = g["value"].dropna()
        rows.append(
            {
                "quantity": q,
                "paper": g["paper"].iloc[0],
                "runs": len(v),
                "mean": v.mean() if len(v) else float("nan"),
                "sd": v.std(ddof=1) if len(v) > 1 else float("nan"),
                "min": v.min() if len(v) else float("nan"),
                "max": v.max() if len(v) else float("nan"),
            }
        )
    return pd.DataFrame(rows)


def spread_markdown(spread, n_runs):
    """The spread table as Markdown (for the README)."""
    lines = [
        f"| quantity | paper | mean ± sd over {n_runs} runs | min - max |",
        "| --- | --- | --- | --- |",
    ]
    for r in spread.itertuples():
        paper = "-" if r.paper is None or (isinstance(r.paper, float) and r.paper != r.paper) else r.paper
        if r.runs:
            sd = f" ± {r.sd:.3f}" if r.sd == r.sd else ""
            lines.append(f"| {r.quantity} | {paper} | {r.mean:.3f}{sd} | {r.min:.3f} - {r.max:.3f} |")
        else:
            lines.append(f"| {r.quantity} | {paper} | n/a | - |")
    return "\n".join(lines) + "\n"


def sweep_figure(table, path):
    """One panel per numeric quantity that varies across the sweep's runs."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import pandas as pd

    t = table.assign(value=table["ours"].map(_as_number))
    params = [c for c in t.columns if c.startswith("param:")]
    t["label"] = (
        t[params].apply(lambda r: ", ".join(f"{c[6:]} {v}" for c, v in r.items() if pd.notna(v)), axis=1)
        if params
        else t["run"]
    )
    varying = [q for q, g in t.groupby("quantity", sort=False) if g["value"].notna().any() and g["value"].nunique() > 1]
    qs = varying or [q for q, g in t.groupby("quantity", sort=False) if g["value"].notna().any()][:4]
    fig, axes = plt.subplots(1, max(1, len(qs)), figsize=(3.6 * max(1, len(qs)), 3.2), squeeze=False)
    for ax, q in zip(axes[0], qs):
        g = t[t.quantity == q]
        ax.bar(range(len(g)), g["value"], color="tab:blue")
        ax.set_xticks(range(len(g)), g["label"], rotation=30, ha="right", fontsize=7)
        ax.set_title(q + (" (share)" if g["ours"].astype(str).str.contains(" of ").any() else ""), fontsize=8)
        ax.set_ylim(0, 1.05)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())
