"""Fault injection: kill the runner, the kernel or a worker at random moments, fill a disk, rerun.

What a researcher's run meets on large slides: the out-of-memory killer (SIGKILL of a worker or
of the notebook's kernel), a runner stopped by hand or by a scheduler, a disk that fills up.
For each, this script checks what ``helpers.run`` promises:

- **no hang**: the run ends within ``--hang-seconds`` with one line naming what happened (a
  killed runner: its kernel and workers end within that time too);
- **exact resume**: a rerun of the same command finishes, and its results (patch caches, split,
  training history, final weights, predicted masks, metrics) are byte for byte those of an
  uninterrupted run;
- **no leftovers**: no temporary file is left in the run folder, no process of the run lives on;
- **no stale result**: every prediction and metric records the weights it came from, and they
  are the final weights.

Scenarios: SIGKILL of the runner, the kernel or an extraction worker at a random moment of
notebook 02, and of the runner or the kernel during notebook 03 (03 reads with threads, it has no
worker processes); and a disk full during notebook 02's extraction and during notebook 03's
checkpoints (a small tmpfs, then grown; needs root to mount, skipped otherwise). Each kill
scenario runs ``--trials`` times (0: the disk scenarios alone).

Usage::

    .venv/bin/python bench/fault_injection.py --trials 20     # about an hour on 2 cores
    .venv/bin/python bench/fault_injection.py --trials 3      # a quick look, ~10 minutes

Prints one table and writes it to ``bench/results/fault_injection_<time>.md``.
"""

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

#: The series' first notebooks on a small dataset: extraction with 2 workers, a short training.
ARGS = [
    "--profile",
    "smoke",
    "--only",
    "02",
    "03",
    "--no-progress",
    "-p",
    "workers",
    "2",
    "-p",
    "seg_epochs",
    "3",
    "-p",
    "seg_steps_per_epoch",
    "12",
    "-p",
    "seg_batch_size",
    "8",
]


def sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def fingerprint(run):
    """What must be identical between an interrupted-then-resumed run and an uninterrupted one."""
    import torch

    out = {}
    for p in sorted((run / "patches").rglob("*")):
        if p.is_file() and p.name in ("patches.u8", "masks.bits", "table.csv"):
            out[str(p.relative_to(run))] = sha(p)
        elif p.name == "meta.json":
            meta = json.loads(p.read_text())
            meta.pop("seconds", None)
            out[str(p.relative_to(run))] = json.dumps(meta, sort_keys=True)
    for name in ("split.csv", "patch_counts.csv"):
        if (run / name).exists():
            out[name] = sha(run / name)
    seg = run / "segmentation"
    if (seg / "history.csv").exists():
        import pandas as pd

        h = pd.read_csv(seg / "history.csv").drop(columns=["seconds"], errors="ignore")
        out["history"] = h.to_csv(index=False)
    for name in ("best.pt", "last.pt"):
        if (seg / name).exists():
            state = torch.load(seg / name, map_location="cpu", weights_only=False)["model"]
            h = hashlib.sha256()
            for k in sorted(state):
                h.update(k.encode())
                h.update(state[k].numpy().tobytes())
            out[f"weights {name}"] = h.hexdigest()[:16]
    for p in sorted(seg.glob("*_prob.npy")):
        out[p.name] = sha(p)
    if (seg / "metrics.csv").exists():
        import pandas as pd

        out["metrics.csv"] = pd.read_csv(seg / "metrics.csv").drop(columns=["seconds"]).to_csv(index=False)
    return out


def stale(run):
    """Predictions or metrics whose recorded weights are not the final ``best.pt``'s."""
    from helpers.core.provenance import file_sha256, read_stamp

    seg = run / "segmentation"
    if not (seg / "best.pt").exists():
        return 0
    w = file_sha256(seg / "best.pt")
    bad = 0
    for p in list(seg.glob("*_prob.npy")) + [seg / "metrics.csv"]:
        key = read_stamp(p)
        if p.exists() and (key is None or (key.get("key", key).get("weights") != w)):
            bad += 1
    return bad


def leftovers(run):
    return [str(p) for p in run.rglob("*") if ".tmp" in p.name or p.name.endswith(".running.ipynb")]


def children(pid):
    try:
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    except OSError:
        return []
    return [int(v) for v in out.split()]


def alive(pid):
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().split()[2] != "Z"
    except (OSError, IndexError):
        return False


def start(env, run_name, data):
    cmd = [sys.executable, "-m", "helpers.run", *ARGS, "-p", "data_dir", str(data), "--run-name", run_name]
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def wait_for_notebook(proc, number, deadline):
    """Read the runner's output until notebook ``number`` starts; False when it never does."""
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            return False
        if f"] {number}_" in line:  # the runner's "[2/2] 03_segmentation_training.ipynb"
            return True
    return False


def kernel_of(runner_pid):
    for c in children(runner_pid):
        try:
            if b"ipykernel" in Path(f"/proc/{c}/cmdline").read_bytes():
                return c
        except OSError:
            pass
    return None


def trial(target, number, env, data, run_name, window, hang_seconds, reference):
    """One kill; returns a dict of what happened."""
    proc = start(env, run_name, data)
    t_end = time.monotonic() + 600
    if not wait_for_notebook(proc, number, t_end):
        proc.kill()
        return {"error": f"notebook {number} never started"}
    time.sleep(random.uniform(window[0], window[1]))
    victims = []
    kernel = kernel_of(proc.pid)
    workers = children(kernel) if kernel else []
    deadline = time.monotonic() + window[1]
    while target == "worker" and not workers and kernel and time.monotonic() < deadline:
        time.sleep(0.05)  # a worker exists only while a slide is being cut
        workers = children(kernel)
    if target == "runner":
        victims = [proc.pid]
    elif target == "kernel" and kernel:
        victims = [kernel]
    elif target == "worker" and workers:
        victims = [random.choice(workers)]
    if not victims:
        proc.wait()
        killed = False
    else:
        for v in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(v, signal.SIGKILL)
        killed = True
    t0 = time.monotonic()
    hang = False
    try:
        proc.wait(timeout=hang_seconds)
    except subprocess.TimeoutExpired:
        hang = True
        proc.kill()
    err = proc.stderr.read().strip().splitlines()
    # Everything the run started must be gone soon after it ended.
    others = [p for p in [kernel, *workers] if p and p not in victims]
    deadline = time.monotonic() + hang_seconds
    while any(alive(p) for p in others) and time.monotonic() < deadline:
        time.sleep(0.2)
    left_procs = [p for p in others if alive(p)]
    for p in left_procs:
        os.kill(p, signal.SIGKILL)
    exit_s = time.monotonic() - t0
    # The same command again must finish and give the uninterrupted run's results.
    rerun = subprocess.run(
        [sys.executable, "-m", "helpers.run", *ARGS, "-p", "data_dir", str(data), "--run-name", run_name],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    run = Path(env["PAIP_REPRO_RUNS"]) / run_name
    got = fingerprint(run) if rerun.returncode == 0 else {}
    diff = sorted(k for k in set(got) | set(reference) if got.get(k) != reference.get(k))
    return {
        "killed": killed,
        "hang": hang,
        "exit_s": exit_s,
        "message": err[-1] if err else "",
        # the one line names the cause (a killed runner has nobody left to say anything)
        # (a kill that lands as the kernel shuts down after the last cell leaves a finished run: rc 0)
        "told": None
        if target == "runner" or not killed or proc.returncode == 0
        else ("SIGKILL" in (err[-1] if err else "")),
        "rc": proc.returncode,
        "left_procs": len(left_procs),
        "rerun_ok": rerun.returncode == 0,
        "diff": diff,
        "stale": stale(run) if rerun.returncode == 0 else 0,
        "left_files": len(leftovers(run)),
        "rerun_err": rerun.stderr.strip().splitlines()[-1:] if rerun.returncode else [],
    }


def _series(env, data, *only):
    """The series of :data:`ARGS` (``only``: fewer notebooks) into the run ``full`` of ``env``."""
    args = [*ARGS, "-p", "data_dir", str(data), "--run-name", "full"]
    if only:
        i = args.index("--only")
        args[i + 1 : i + 3] = only
    return subprocess.run(
        [sys.executable, "-m", "helpers.run", *args], cwd=REPO, env=env, capture_output=True, text=True
    )


def disk_full(env, data, root, reference, notebook):
    """The disk fills during ``notebook``: notebook 02's extraction into a 6 MB tmpfs, or notebook
    03's first checkpoints (the tmpfs shrunk to what notebook 02 left plus 30 MB: ``best.pt`` fits,
    ``last.pt`` fills it part way through torch's own writer). One clear line, then the tmpfs is
    grown and a rerun must finish with the results of an uninterrupted run."""
    mnt = root / f"small{notebook}"
    mnt.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        return {"error": f"cannot mount a tmpfs here ({exc}); scenario skipped"}
    try:
        small_env = {**env, "PAIP_REPRO_RUNS": str(mnt)}
        if notebook == "03":
            subprocess.run(["mount", "-o", "remount,size=400m", str(mnt)], check=True, capture_output=True)
            if _series(small_env, data, "02").returncode:
                return {"error": "notebook 02 alone failed in the tmpfs; scenario skipped"}
            room = shutil.disk_usage(mnt).used + 30 * 2**20
            subprocess.run(["mount", "-o", f"remount,size={room}", str(mnt)], check=True, capture_output=True)
        first = _series(small_env, data)
        lines = first.stderr.strip().splitlines()
        message = lines[-1] if lines else ""
        subprocess.run(["mount", "-o", "remount,size=400m", str(mnt)], check=True, capture_output=True)
        again = _series(small_env, data)
        run = mnt / "full"
        got = fingerprint(run) if again.returncode == 0 else {}
        diff = sorted(k for k in set(got) | set(reference) if got.get(k) != reference.get(k))
        return {
            "killed": True,
            "hang": False,
            "exit_s": 0.0,
            "message": message,
            "told": "is full" in message and f"{notebook}_" in message and first.returncode != 0,
            "left_procs": 0,
            "first_failed": first.returncode != 0,
            "one_line": "is full" in message,
            "rerun_ok": again.returncode == 0,
            "diff": diff,
            "stale": stale(run) if again.returncode == 0 else 0,
            "left_files": len(leftovers(run)),
        }
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=3, help="kills per scenario (20 for the issue's table)")
    ap.add_argument("--hang-seconds", type=float, default=60, help="longer than this to end counts as a hang")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    random.seed(args.seed)
    from helpers.demo.synthetic import CaseSpec, ensure_demo_dataset

    root = Path(tempfile.mkdtemp(prefix="paip-faults-"))
    env = {**os.environ, "PAIP_REPRO_RUNS": str(root / "runs"), "TQDM_DISABLE": "1", "MPLBACKEND": "Agg"}
    cases = [CaseSpec(f"f{i}", 2900 + 90 * i, 3100 - 70 * i, i % 2 == 0, 40 + i, patient_id=f"P{i}") for i in range(6)]
    data = ensure_demo_dataset(root / "data", cases=cases, workers=2, progress=False)
    t0 = time.monotonic()
    ref = subprocess.run(
        [sys.executable, "-m", "helpers.run", *ARGS, "-p", "data_dir", str(data), "--run-name", "reference"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    if ref.returncode:
        sys.exit(f"the uninterrupted reference run failed:\n{ref.stderr[-2000:]}")
    t_ref = time.monotonic() - t0
    reference = fingerprint(root / "runs" / "reference")
    took = json.loads((root / "runs" / "reference" / "params.json").read_text())["finished_notebooks"]
    seconds = {name[:2]: v["seconds"] for name, v in took.items()}
    print(f"reference run: {t_ref:.0f} s, {len(reference)} results fingerprinted", flush=True)
    scenarios = [("runner", "02"), ("kernel", "02"), ("worker", "02"), ("runner", "03"), ("kernel", "03")]
    rows = []
    for target, nb in scenarios if args.trials else ():
        res = []
        for k in range(args.trials):
            window = (0.1 * seconds[nb], 0.9 * seconds[nb])  # a moment within the notebook's run
            r = trial(target, nb, env, data, f"{target}-{nb}-{k}", window, args.hang_seconds, reference)
            res.append(r)
            print(
                f"  {target} in {nb} #{k + 1}: {json.dumps({k_: v for k_, v in r.items() if k_ != 'diff'})[:300]}"
                + (f" differs: {r['diff'][:3]}" if r.get("diff") else ""),
                flush=True,
            )
        rows.append((f"SIGKILL {target}, notebook {nb}", res))
    for nb in ("02", "03"):
        r = disk_full(env, data, root, reference, nb)
        print(f"  disk full in {nb}: {json.dumps({k_: v for k_, v in r.items() if k_ != 'diff'})[:300]}", flush=True)
        rows.append((f"disk full in notebook {nb}, then grown", [r]))
    lines = [
        "| scenario | trials | kills landed | hangs | slowest end (s) | one line naming the cause | processes left | "
        "reruns finished | results differing | stale results | temporary files left |",
        "|" + " --- |" * 11,
    ]

    def told(ok):
        asked = [r["told"] for r in ok if r.get("told") is not None]
        return f"{sum(asked)} of {len(asked)}" if asked else "n/a"

    for name, res in rows:
        ok = [r for r in res if "error" not in r]
        if not ok:
            lines.append(f"| {name} | 0 | {res[0].get('error', '')} |" + " |" * 8)
            continue
        lines.append(
            f"| {name} | {len(ok)} | {sum(r['killed'] for r in ok)} | {sum(r['hang'] for r in ok)} | "
            f"{max(r['exit_s'] for r in ok):.1f} | {told(ok)} | {sum(r['left_procs'] for r in ok)} | "
            f"{sum(r['rerun_ok'] for r in ok)} | {sum(bool(r['diff']) for r in ok)} | "
            f"{sum(r['stale'] for r in ok)} | {sum(r['left_files'] for r in ok)} |"
        )
    table = "\n".join(lines)
    print("\n" + table)
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"fault_injection_{time.strftime('%Y%m%d-%H%M%S')}.md"
    path.write_text(f"`python bench/fault_injection.py --trials {args.trials}`\n\n{table}\n")
    print(f"\n{path}")
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
