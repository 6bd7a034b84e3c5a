"""labkit.bench: statistics on known samples, results files, the TCG translation log parser, the
plots; and (integration) a short real run of every workload under TCG."""

from __future__ import annotations

import json
import math
import os
import subprocess

import pytest

from labkit import bench
from labkit.bench import results as br
from labkit.bench import stats
from labkit.bench import workloads as wl
from labkit.bench.translation import parse_info_jit, parse_log
from labkit.errors import InputError


# ------------------------------------------------------------------ statistics
def test_summary_of_known_samples():
    s = stats.summarize([5, 1, 4, 2, 3])
    assert (s.n, s.median, s.q1, s.q3, s.iqr, s.min, s.max) == (5, 3, 2, 4, 2, 1, 5)
    assert s.spread == pytest.approx(2 / 3) and s.noisy


def test_summary_even_count_and_single_value():
    s = stats.summarize([1.0, 2.0, 3.0, 4.0])
    assert s.median == 2.5 and s.q1 == 1.75 and s.q3 == 3.25
    one = stats.summarize([0.5])
    assert one.median == one.q1 == one.q3 == 0.5 and one.iqr == 0 and not one.noisy
    assert stats.summarize([]) is None
    with pytest.raises(ValueError):
        stats.summarize([1.0, float("nan")])


def test_noise_limit_is_ten_percent():
    assert not stats.summarize([100, 100, 105, 110, 110]).noisy  # IQR 10 / 105 < 10 %
    assert stats.summarize([90, 95, 100, 110, 120]).noisy  # IQR 15 / 100


def test_paired_ratios_use_matching_rounds_only():
    guest = {0: 10.0, 1: 12.0, 2: 9.0, 5: 1.0}
    native = {0: 2.0, 1: 3.0, 2: 3.0, 3: 4.0}
    assert stats.paired_ratios(guest, native) == [5.0, 4.0, 3.0]
    assert stats.paired_ratios({0: 1.0}, {0: 0.0}) == []


def test_bootstrap_interval_contains_the_median_and_is_deterministic():
    data = [1.0, 1.1, 0.9, 1.05, 0.95, 1.2, 0.8]
    lo, hi = stats.bootstrap_median(data, seed=1)
    assert lo <= 1.0 <= hi and (lo, hi) == stats.bootstrap_median(data, seed=1)
    assert stats.bootstrap_median([2.0, 2.0]) == (2.0, 2.0)
    assert stats.bootstrap_median([]) is None


# ------------------------------------------------------------------ results
def _configs():
    return [br.Config("native", "nativo", None), br.Config("kvm", "KVM", "kvm", available=False, reason="sin VT-x"),
            br.Config("tcg-1", "TCG", "tcg")]


def _samples():
    out = []
    for r, (n, g) in enumerate([(1.0, 5.0), (2.0, 8.0), (1.0, 6.0)]):
        out += [{"workload": "sha256", "config": "native", "round": r, "warmup": False, "seconds": n},
                {"workload": "sha256", "config": "tcg-1", "round": r, "warmup": False, "seconds": g}]
    out.append({"workload": "sha256", "config": "tcg-1", "round": -1, "warmup": True, "seconds": 99.0})
    out += [{"workload": "boot_vmlinux", "config": "tcg-1", "round": 0, "warmup": False, "seconds": 1.0},
            {"workload": "boot_bzimage", "config": "tcg-1", "round": 0, "warmup": False, "seconds": 3.0}]
    return out


def _results():
    data = {"schema": br.SCHEMA, "label": "prueba", "metadata": {"hostname": "h", "host_cpu": "CPU X"},
            "configs": [c.as_dict() for c in _configs()],
            "workloads": [{"name": "sha256", "label": "CPU: sha256"}], "samples": _samples(),
            "summary": br.summarize_samples(_samples(), _configs())}
    return br.BenchResults(data)


def test_summary_rows_pair_by_round_and_keep_unavailable_configs():
    res = _results()
    tcg = res.row("sha256", "tcg-1")
    assert tcg["stats"]["median"] == 6.0 and tcg["n"] == 3  # the warm-up sample is left out
    assert tcg["ratio"]["median"] == 5.0 and tcg["ratio_to"] == "native"  # ratios 5, 4, 6
    kvm = res.row("sha256", "kvm")
    assert kvm["available"] is False and kvm["reason"] == "sin VT-x" and kvm["stats"] is None
    assert res.ratio("boot_bzimage", "tcg-1") == 3.0 and res.row("boot_bzimage", "tcg-1")["ratio_to"] == "boot_vmlinux"
    assert res.row("boot_vmlinux", "native")["reason"].startswith("no aplica")
    assert "no disponible aquí" in res.table() and "(5.0×)" in res.table()
    assert "medido" in res.table(times=False) and "6.000" not in res.table(times=False)


def test_json_round_trip_and_csv(tmp_path):
    res = _results()
    loaded = bench.load(res.to_json(tmp_path / "r.json"), label="portátil de Ana")
    assert loaded.label == "portátil de Ana" and loaded.ratio("sha256", "tcg-1") == 5.0
    lines = res.csv_text().splitlines()
    assert lines[0].split(",") == list(br.CSV_FIELDS)
    assert any(line.startswith("sha256,tcg-1,3,6.0") for line in lines)


def test_load_refuses_other_files(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"schema": "otra"}))
    (tmp_path / "y.json").write_text("{no")
    for name in ("x.json", "y.json", "no-existe.json"):
        with pytest.raises(InputError):
            bench.load(tmp_path / name)


# ------------------------------------------------------------------ workloads and parsers
def test_timed_script_runs_with_the_host_busybox():
    if not os.access("/proc/timer_list", os.R_OK):
        pytest.skip("/proc/timer_list solo lo lee root")
    out = subprocess.run(["busybox", "sh", "-c", wl.timed_script("true")], check=False, capture_output=True, text=True).stdout
    seconds, status = wl.parse_timed(out)
    assert 0 <= seconds < 0.5 and status == 0
    assert wl.parse_timed("nada") is None


def test_workload_commands_scale_and_name_the_device():
    blk = next(w for w in wl.WORKLOADS if w.name == "blockio")
    assert "if=/dev/vda " in blk.command(1.0, "/dev/vda") and "iflag=direct" in blk.command(1.0, "/dev/vda")
    sha = wl.WORKLOADS[0]
    assert "count=1024" in sha.timed(4.0) and "count=1024" not in sha.command(4.0)


TCG_LOG = """----------------
IN:
0x000f0000:  b8 34 12                 movw     $0x1234, %ax
0x000f0003:  05 42 00                 addw     $0x42, %ax

OP:
 ld_i32 tmp9,env,$0xfffffffffffffff0
 ---- 0000000000000000 0000000000000000
 mov_i64 tmp0,$0x1234

OUT: [size=72]
  -- guest addr 0x0000000000000000 + tb prologue
0x7f2ebc000240:  8b 5d f0                 movl     -0x10(%rbp), %ebx

"""


def test_parse_translation_log():
    (block,) = parse_log(TCG_LOG)
    assert block.address == 0xF0000 and len(block.guest) == 2
    assert block.ops == ("ld_i32 tmp9,env,$0xfffffffffffffff0", "---- 0000000000000000 0000000000000000",
                         "mov_i64 tmp0,$0x1234")
    assert block.host[-1].startswith("0x7f2ebc000240")


def test_parse_info_jit():
    text = "Translation buffer state:\ngen code size       48560691/1073736704\nTB count            89781\n" \
           "TB avg target size  17 max=512 bytes\nTB hash occupancy   52.03% avg chain occ. Histogram: [0,10)%|"
    v = parse_info_jit(text)
    assert v["TB count"] == 89781 and v["gen code size"] == 48560691 and v["TB hash occupancy"] == 52.03


def test_bench_bars_draws_unavailable_configs_and_other_machines():
    from labkit.plots import LiveBenchPlot, bench_bars

    res = _results()
    fig = bench_bars(res, others=[res], log=True)
    assert len(fig.axes) == 2 and fig.axes[0].get_yscale() == "log"
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert "no disponible aquí" in texts and "5.0×" in texts
    live = LiveBenchPlot()
    live.update(res)
    assert live.updates == 1 and live.figure is not None


def test_public_names():
    assert set(bench.__all__) >= {"run", "load", "translate", "configs_here", "BenchResults", "WORKLOADS"}


def test_cli_has_bench():
    from labkit.cli import _parser

    args = _parser().parse_args(["bench", "--mode", "quick", "--workloads", "sha256", "--json", "x.json"])
    assert args.command == "bench" and args.mode == "quick"


# ------------------------------------------------------------------ integration
@pytest.mark.integration
def test_short_real_run_of_every_workload_under_tcg(guest_assets, tmp_path):
    """Every workload (and both boots) once under TCG, 1 vCPU: the file's schema, finite positive ratios,
    progress reported, no guest left behind."""
    seen = []
    res = bench.run(mode="quick", rounds=1, warmup=0, configs=["tcg-1"], boot_rounds=1, assets=guest_assets,
                    progress=lambda d, t, m: seen.append((d, t)))
    assert not res.data["cancelled"]
    loaded = bench.load(res.to_json(tmp_path / "r.json"))
    data = loaded.data
    assert data["schema"] == bench.SCHEMA
    for key in ("host_cpu", "host_kernel", "qemu", "date", "guest_kernel", "wall_seconds", "timer"):
        assert data["metadata"].get(key), key
    assert [c["name"] for c in data["configs"]] == ["native", "kvm", "tcg-1"]
    assert data["guests"][0]["accel"] == "tcg"
    names = [w.name for w in bench.WORKLOADS] + ["boot_bzimage"]
    for name in names:
        ratio = loaded.ratio(name, "tcg-1")
        assert ratio is not None and math.isfinite(ratio) and ratio > 0, (name, ratio)
    assert data["jit"]["after"]["values"]["TB count"] >= data["jit"]["before"]["values"]["TB count"] > 0
    assert seen[-1][0] == seen[-1][1]
    assert all(not os.path.exists(f"/proc/{g['pid']}") for g in data["guests"])  # guests stopped


@pytest.mark.integration
def test_translation_log_shows_the_program():
    t = bench.translate()
    block = t.block(0xF0000)
    assert t.exit_status == 1  # isa-debug-exit: (0 << 1) | 1
    assert block is not None and "movw" in block.guest[0] and any("call outb" in op for op in block.ops)
    assert block.host
