"""`membound doctor` on the CPU path: other processes keeping the cores busy (issue 20).

The verdict is a pure function of a load reading; the process lister and the doctor itself are run
against a real busy child process. The machine may have only 2 cores: every child spins for a few
seconds at most (it stops by itself) and is killed in a `finally`.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time

import pytest

from membound import cpu
from membound.cpu import CpuLoad
from membound.plan import doctor

needs_proc = pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="no /proc")

NAME = "mb spin) x"  # a comm with a space and a ')': the stat parser must take the last ')'


@contextlib.contextmanager
def busy_child(seconds: float):
    """A child process that keeps one core busy for `seconds` (then ends by itself) under the name NAME."""
    code = (
        "import ctypes, sys, time\n"
        "try:\n"
        f"    ctypes.CDLL(None).prctl(15, {NAME.encode()!r}, 0, 0, 0)  # PR_SET_NAME\n"
        "except Exception:\n"
        "    pass\n"
        "print('spinning', flush=True)\n"
        f"end = time.monotonic() + {seconds}\n"
        "while time.monotonic() < end:\n"
        "    pass\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "spinning"  # it is past start-up and in its loop
        yield p
    finally:
        p.kill()
        p.wait()


def load(busy: float, own: float = 0.0, cores: int = 2) -> CpuLoad:
    return CpuLoad(cores=cores, busy=busy, own=own, interval_s=0.5)


# ---------------------------------------------------------------------- the verdict (pure)


def test_quiet_machine_is_ok():
    c = doctor.judge_cpu_load(2, load(busy=0.1), [("sshd", 812, 0.1)])
    assert c.status == doctor.OK and c.fix == ""
    assert "2 threads" in c.detail and c.data["engine_threads"] == 2


def test_one_of_two_cores_busy_warns_names_the_process_and_the_thread_count():
    c = doctor.judge_cpu_load(2, load(busy=1.0), [("ffmpeg", 4242, 0.98), ("bash", 17, 0.06)])
    assert c.status == doctor.WARN
    assert "1.0 of the 2 usable cores" in c.detail
    assert "ffmpeg (pid 4242) 98% of a core" in c.detail and "bash (pid 17)" in c.detail
    assert "will run 1 thread of 2" in c.detail and c.data["engine_threads"] == 1
    assert "renice" in c.fix and "4242" in c.fix and "taskset" in c.fix and "--num-threads" in c.fix
    assert c.data["top"][0] == {"name": "ffmpeg", "pid": 4242, "cores": 0.98}


def test_our_own_time_is_not_contention():
    # Busy 1.9 cores, 1.8 of them this process: the others use 0.1.
    assert doctor.judge_cpu_load(2, load(busy=1.9, own=1.8), []).status == doctor.OK


def test_all_cores_busy_is_worse_than_one():
    c = doctor.judge_cpu_load(2, load(busy=2.0), [("a", 1, 1.0), ("b", 2, 1.0)])
    assert c.status == doctor.FAIL and doctor.worst([c]) == doctor.FAIL
    assert "fraction of its speed" in c.detail and "renice" in c.fix
    assert c.data["engine_threads"] == 1


def test_quota_host_counts_only_the_cpus_the_engine_would_miss():
    # A cgroup quota of 2 cores on a 16-CPU host without a cpuset: others on 3 CPUs leave 13 free.
    assert doctor.judge_cpu_load(2, load(busy=3.0, cores=16), []).status == doctor.OK
    # Others on 15 of the 16 leave one: one of the engine's two cores is taken.
    c = doctor.judge_cpu_load(2, load(busy=15.0, cores=16), [])
    assert c.status == doctor.WARN and c.data["engine_threads"] == 1


def test_unreadable_load_is_said_not_judged():
    c = doctor.judge_cpu_load(2, None, [])
    assert c.status == doctor.INFO and "cannot read" in c.detail and doctor.worst([c]) == doctor.OK


def test_doctor_reports_the_thread_count_the_governor_would_pick():
    g = cpu.ThreadGovernor(4, set_threads=lambda n: None)
    for others in (0.0, 0.2, 0.3, 0.8, 1.0, 1.74, 1.76, 2.5, 3.9, 4.0):
        reading = load(busy=others, cores=4)
        assert doctor.judge_cpu_load(4, reading, []).data["engine_threads"] == g.target(reading), others


# ---------------------------------------------------------------------- the process lister


def test_busiest_processes_on_hand_made_readings():
    before = {10: ("idle", 5, 100), 11: ("busy", 5, 100), 12: ("reused", 5, 1000), 13: ("gone", 5, 0)}
    tick = os.sysconf("SC_CLK_TCK")
    after = {
        10: ("idle", 5, 100),
        11: ("busy", 5, 100 + tick // 2),  # half a second of CPU over 0.5 s: one core
        12: ("newcomer", 9, tick // 10),  # another process on a reused pid: all its time counts
        14: ("new", 7, tick // 4),  # started within the window
    }
    got = cpu.busiest_processes(before, after, 0.5)
    assert [(n, pid) for n, pid, _ in got] == [("busy", 11), ("new", 14), ("newcomer", 12)]
    assert got[0][2] == pytest.approx(1.0) and got[1][2] == pytest.approx(0.5) and got[2][2] == pytest.approx(0.2)
    assert cpu.busiest_processes(before, after, 0.5, top=1) == got[:1]
    assert cpu.busiest_processes(before, after, 0.0) == []


@needs_proc
def test_process_lister_finds_a_busy_child_and_never_lists_itself():
    me = os.getpid()
    with busy_child(3.0) as child:
        before = cpu.process_cpu_times()
        assert before is not None and me not in before and child.pid in before
        t0 = time.monotonic()
        x = 0
        while time.monotonic() - t0 < 0.6:  # keep this process busy too: it must still not be listed
            x += 1
        after = cpu.process_cpu_times()
        interval = time.monotonic() - t0
    assert after is not None and me not in after
    top = cpu.busiest_processes(before, after, interval, top=50, min_cores=0.0)
    assert me not in [pid for _, pid, _ in top]
    mine = [(name, cores) for name, pid, cores in top if pid == child.pid]
    assert mine, top
    name, cores = mine[0]
    assert cores > 0.3, top
    assert name in (NAME, "python", os.path.basename(sys.executable)[:15]), name


@needs_proc
def test_measure_contention_sees_the_child():
    with busy_child(3.0) as child:
        reading, top = cpu.measure_contention(0.5)
    assert reading is not None and reading.others > 0.3
    assert child.pid in [pid for _, pid, _ in top] and os.getpid() not in [pid for _, pid, _ in top]


@needs_proc
def test_doctor_cli_reports_a_busy_neighbour():
    # The child outlasts the doctor's start-up and its 0.5 s window; killed when the doctor is done.
    with busy_child(30.0) as child:
        r = subprocess.run(
            [sys.executable, "-m", "membound.entrypoints.cli", "doctor", "--no-decode"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    load_line = next((line for line in lines if "CPU load:" in line), None)
    assert load_line is not None, r.stdout
    assert load_line.startswith(("[WARN]", "[FAIL]")), load_line
    assert f"(pid {child.pid})" in load_line and "busy" in load_line, load_line
    fix = lines[lines.index(load_line) + 1]
    assert "fix:" in fix and "renice" in fix and str(child.pid) in fix
    # Before the bandwidth measurement, which the neighbour slows as well.
    assert lines.index(load_line) < next(i for i, line in enumerate(lines) if "CPU memory bandwidth" in line)
    assert r.stdout.rstrip().splitlines()[-1] in ("verdict: WARN", "verdict: FAIL")
