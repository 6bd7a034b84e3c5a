"""Tests for labkit.cpuflags (data, classify, search, virt_summary) and its widget."""

from __future__ import annotations

import json
import pathlib
import random
import re
from importlib import resources

import pytest

from labkit import cpuflags
from labkit.cpuflags import (
    ALL,
    CATEGORIES,
    NO_DESCRIPTION,
    classify,
    explain,
    flags_table,
    format_summary,
    search,
    virt_summary,
)

# --------------------------------------------------------------------------- fixtures
# Real-world style /proc/cpuinfo lines (one CPU each).

INTEL_LAPTOP = """fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush
dts acpi mmx fxsr sse sse2 ss ht tm pbe syscall nx pdpe1gb rdtscp lm constant_tsc art arch_perfmon
pebs bts rep_good nopl xtopology nonstop_tsc cpuid aperfmperf pni pclmulqdq dtes64 monitor ds_cpl
vmx est tm2 ssse3 sdbg fma cx16 xtpr pdcm pcid sse4_1 sse4_2 x2apic movbe popcnt tsc_deadline_timer
aes xsave avx f16c rdrand lahf_lm abm 3dnowprefetch cpuid_fault epb invpcid_single pti ssbd ibrs ibpb
stibp tpr_shadow flexpriority ept vpid ept_ad fsgsbase tsc_adjust bmi1 avx2 smep bmi2 erms invpcid
mpx rdseed adx smap clflushopt intel_pt xsaveopt xsavec xgetbv1 xsaves dtherm ida arat pln pts hwp
hwp_notify hwp_act_window hwp_epp md_clear flush_l1d arch_capabilities""".split()
# Client Intel: no posted interrupts, hence no APICv.
INTEL_LAPTOP_VMX = """vnmi preemption_timer invvpid ept_x_only ept_ad ept_1gb flexpriority tsc_offset
vtpr mtf vapic ept vpid unrestricted_guest ple shadow_vmcs pml ept_mode_based_exec""".split()
INTEL_SERVER_VMX = """vnmi preemption_timer posted_intr invvpid ept_x_only ept_ad ept_1gb ept_5level
flexpriority apicv tsc_offset vtpr mtf vapic ept vpid unrestricted_guest vapic_reg vid ple
shadow_vmcs pml ept_mode_based_exec tsc_scaling usr_wait_pause notify_vm_exiting ipi_virt""".split()

AMD_ZEN3 = """fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx
fxsr sse sse2 ht syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl nonstop_tsc
cpuid extd_apicid aperfmperf rapl pni pclmulqdq monitor ssse3 fma cx16 sse4_1 sse4_2 x2apic movbe
popcnt aes xsave avx f16c rdrand lahf_lm cmp_legacy svm extapic cr8_legacy abm sse4a misalignsse
3dnowprefetch osvw ibs skinit wdt tce topoext perfctr_core perfctr_nb bpext perfctr_llc mwaitx cpb
cat_l3 cdp_l3 hw_pstate ssbd mba ibrs ibpb stibp vmmcall fsgsbase bmi1 avx2 smep bmi2 erms invpcid cqm
rdt_a rdseed adx smap clflushopt clwb sha_ni xsaveopt xsavec xgetbv1 xsaves cqm_llc cqm_occup_llc
cqm_mbm_total cqm_mbm_local clzero irperf xsaveerptr rdpru wbnoinvd arat npt lbrv svm_lock nrip_save
tsc_scale vmcb_clean flushbyasid decodeassists pausefilter pfthreshold avic v_vmsave_vmload vgif
v_spec_ctrl umip pku ospke vaes vpclmulqdq rdpid overflow_recov succor smca fsrm""".split()

# A cloud VM on an AMD EPYC host: "hypervisor" set, no svm exposed (no nesting).
CLOUD_VM = """fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx
fxsr sse sse2 ht syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology
nonstop_tsc cpuid extd_apicid tsc_known_freq pni pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic
movbe popcnt tsc_deadline_timer aes xsave avx f16c rdrand hypervisor lahf_lm cmp_legacy cr8_legacy abm
sse4a misalignsse 3dnowprefetch osvw topoext vmmcall fsgsbase tsc_adjust bmi1 avx2 smep bmi2 erms
invpcid avx512f avx512dq rdseed adx smap avx512ifma clflushopt clwb avx512cd sha_ni avx512bw avx512vl
xsaveopt xsavec xgetbv1 xsaves avx512_bf16 clzero xsaveerptr arat avx512vbmi umip avx512_vbmi2 gfni
vaes vpclmulqdq avx512_vnni avx512_bitalg avx512_vpopcntdq rdpid fsrm""".split()

ARM_FEATURES = "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs".split()

MUST_COVER = """vmx svm ept npt vpid unrestricted_guest flexpriority vnmi tpr_shadow ept_ad ept_1gb
ept_5level ept_mode_based_exec pml shadow_vmcs preemption_timer posted_intr tsc_scaling usr_wait_pause
ple pausefilter pfthreshold avic x2avic decodeassists flushbyasid nrip_save lbrv svm_lock tsc_scale
vmcb_clean vgif v_vmsave_vmload sev sev_es sev_snp tdx_guest hypervisor vmmcall nested""".split()
MUST_COVER_OTHER = """sse sse2 pni ssse3 sse4_1 sse4_2 avx avx2 avx512f avx512dq avx512bw avx512vl
avx512cd aes sha_ni rdrand rdseed nx lm pae pdpe1gb smep smap pcid invpcid tsc constant_tsc
nonstop_tsc x2apic""".split()
MUST_COVER_ARM = "fp asimd aes sha1 sha2 crc32 atomics sve sve2 pmull".split()


def _data() -> dict:
    text = resources.files("labkit").joinpath("data/cpu_flags.json").read_text("utf-8")
    return json.loads(text)


# --------------------------------------------------------------------------- data file


def test_data_file_is_well_formed():
    doc = _data()
    assert tuple(doc["categories"]) == CATEGORIES
    seen = set()
    for e in doc["flags"]:
        key = (e["arch"], e["name"])
        assert key not in seen, f"duplicate entry {key}"
        seen.add(key)
        assert e["arch"] in {"x86", "arm64"}
        assert re.fullmatch(r"[a-z0-9_]+", e["name"]), e["name"]
        assert e["category"] in CATEGORIES, e
        assert len(e["text"].strip()) > 20 and e["text"].rstrip().endswith("."), e["name"]
        assert isinstance(e["virt"], bool)
        assert set(e["lines"]) <= {"flags", "vmx flags", "Features"}
        if e["category"].startswith("virtualización") or e["category"] == "indica un hipervisor":
            assert e["virt"], f"{e['name']} is in {e['category']!r} but virt is false"
        if "vmx flags" in e["lines"]:
            assert e["virt"], e["name"]
        if e["arch"] == "arm64" and e["lines"]:
            assert e["lines"] == ["Features"], e["name"]


def test_must_cover_flags_are_explained():
    for name in MUST_COVER + MUST_COVER_OTHER:
        info = explain(name, "x86_64")
        assert info is not None, name
        assert info.text and info.category in CATEGORIES
    for name in MUST_COVER:
        assert explain(name).virt, name
    for name in MUST_COVER_ARM:
        info = explain(name, "aarch64")
        assert info is not None and info.arch == "arm64", name


def test_coverage_numbers():
    infos = cpuflags.all_flags()
    non_virt_x86 = [i for i in infos if i.arch == "x86" and not i.virt]
    assert len(non_virt_x86) >= 60
    assert sum(i.arch == "arm64" for i in infos) >= 20
    assert len(infos) > 250


@pytest.mark.parametrize("flag_set", [INTEL_LAPTOP, INTEL_LAPTOP_VMX, INTEL_SERVER_VMX, AMD_ZEN3,
                                      CLOUD_VM])
def test_every_flag_of_real_cpus_is_known(flag_set):
    unknown = [f for f in flag_set if explain(f, "x86") is None]
    assert unknown == []


def _cpuinfo_lines(path):
    """The flag lines of one cpuinfo file: {"flags"|"vmx flags"|"Features": [names]}."""
    out = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in {"flags", "vmx flags", "Features"} and key not in out:
            out[key] = value.split()
    return out


def test_every_flag_of_the_host_fixtures_is_known():
    root = pathlib.Path(__file__).parent / "fixtures" / "hosts"
    files = sorted(root.glob("*/proc/cpuinfo"))
    if not files:
        pytest.skip("no host fixtures")
    unknown = set()
    for path in files:
        lines = _cpuinfo_lines(path)
        arch = "aarch64" if "Features" in lines else "x86_64"
        for names in lines.values():
            unknown |= {f"{path.parent.parent.name}: {n}" for n in names if explain(n, arch) is None}
    assert sorted(unknown) == []


def test_explain_aliases_arch_and_misses():
    assert explain("pause_filter").name == "pausefilter"
    assert explain("sse3").name == "pni"
    assert explain("VT-x").name == "vmx"
    assert explain("  EPT ").name == "ept"
    assert explain("aes").arch == "x86"
    assert "ARMv8" in explain("aes", "aarch64").text
    assert explain("sme", "aarch64").category == "SIMD"
    assert explain("sme", "x86_64").category == "seguridad"
    assert explain("sve", "x86_64") is None
    assert explain("no_such_flag") is None
    assert explain("vme").virt is False  # a classic confusion with hardware virtualization
    assert "no" in explain("nested").text.lower() and explain("nested").lines == ()


# --------------------------------------------------------------------------- classify


def test_classify_intel_with_vmx_flags():
    rows = classify(INTEL_LAPTOP, INTEL_LAPTOP_VMX)
    assert len(rows) == len(set(INTEL_LAPTOP)) + len(set(INTEL_LAPTOP_VMX))
    by_key = {(r.name, r.source): r for r in rows}
    assert ("ept", "flags") in by_key and ("ept", "vmx flags") in by_key
    assert by_key[("ept", "vmx flags")].category == "virtualización: memoria"
    assert by_key[("vmx", "flags")].virt
    assert not by_key[("avx2", "flags")].virt
    assert by_key[("avx2", "flags")].category == "SIMD"
    # flags line first, then vmx flags; each block sorted by name
    sources = [r.source for r in rows]
    assert sources == sorted(sources, key=lambda s: s != "flags")
    flag_names = [r.name for r in rows if r.source == "flags"]
    assert flag_names == sorted(flag_names)
    assert all(r.known for r in rows)


def test_classify_unknown_flags():
    rows = classify(["fpu", "zz_future_flag"], ["zz_future_vmx"])
    by_name = {r.name: r for r in rows}
    assert by_name["zz_future_flag"].explanation == NO_DESCRIPTION
    assert by_name["zz_future_flag"].category == "otros" and not by_name["zz_future_flag"].virt
    assert not by_name["zz_future_flag"].known
    # everything in «vmx flags» is a VT-x capability, known or not
    assert by_name["zz_future_vmx"].virt and by_name["zz_future_vmx"].category == "virtualización"


def test_classify_is_deterministic_and_accepts_sets_and_none():
    shuffled = INTEL_LAPTOP[:]
    random.Random(4).shuffle(shuffled)
    assert classify(frozenset(shuffled), None) == classify(INTEL_LAPTOP)


def test_classify_aarch64_features():
    rows = classify(ARM_FEATURES)
    assert {r.source for r in rows} == {"Features"}
    aes = next(r for r in rows if r.name == "aes")
    assert "ARMv8" in aes.explanation
    assert all(r.known for r in rows)
    # an explicit architecture wins over guessing
    assert classify(["aes"], arch="aarch64")[0].source == "Features"
    assert classify(["aes"], arch="x86_64")[0].source == "flags"


# --------------------------------------------------------------------------- search


def test_search_is_accent_and_case_insensitive():
    rows = classify(INTEL_LAPTOP, INTEL_LAPTOP_VMX)
    plain = search(rows, "virtualizacion")
    accented = search(rows, "VIRTUALIZACIÓN")
    assert plain == accented and plain
    assert {r.name for r in plain} >= {"vmx", "ept", "vpid"}
    assert "avx2" not in {r.name for r in plain}


def test_search_words_category_and_virt():
    rows = classify(AMD_ZEN3)
    # every word must match somewhere (name, title, category or text)
    assert "npt" in {r.name for r in search(rows, "tablas paginas anidadas")}
    mem = search(rows, category="virtualización: memoria")
    assert {r.name for r in mem} == {"npt", "flushbyasid"}
    assert search(rows, category=ALL) == rows == search(rows)
    virt = search(rows, only_virt=True)
    assert virt and all(r.virt for r in virt)
    assert {"svm", "avic", "vgif", "vmmcall"} <= {r.name for r in virt}
    assert "sse2" not in {r.name for r in virt}
    combo = search(rows, "avic", category="virtualización: interrupciones", only_virt=True)
    assert [r.name for r in combo] == ["avic"]
    assert search(rows, "no-existe-nada") == []


# --------------------------------------------------------------------------- virt_summary


def test_summary_intel_laptop_lacks_apicv():
    s = virt_summary(INTEL_LAPTOP, INTEL_LAPTOP_VMX)
    assert (s["arch"], s["vendor"], s["technology"]) == ("x86", "Intel", "Intel VT-x")
    assert s["hardware_virt"] is True and s["in_vm"] is False and s["nested"] is False
    feats = {f["key"]: f["present"] for f in s["features"]}
    assert feats == {"hw": True, "slat": True, "tlb": True, "real_mode": True, "apic": False}
    assert len(s["missing"]) == 1 and "APICv" in s["missing"][0]
    assert "FlexPriority" in s["missing"][0]
    assert s["unknown"] == []


def test_summary_intel_server_has_everything():
    s = virt_summary(INTEL_LAPTOP, INTEL_SERVER_VMX)
    assert s["missing"] == [] and s["unknown"] == []
    assert any("APICv" in line for line in s["present"])


def test_summary_intel_old_kernel_without_vmx_line():
    old = [f for f in INTEL_LAPTOP] + ["vnmi"]
    s = virt_summary(old, None)
    feats = {f["key"]: f["present"] for f in s["features"]}
    assert feats["slat"] is True and feats["tlb"] is True
    assert feats["real_mode"] is None and feats["apic"] is None
    assert len(s["unknown"]) == 2
    assert any("vmx flags" in n for n in s["notes"])


def test_summary_amd_host():
    s = virt_summary(AMD_ZEN3)
    assert (s["vendor"], s["technology"], s["hardware_virt"]) == ("AMD", "AMD-V", True)
    assert s["missing"] == []
    assert any("AVIC" in line for line in s["present"])
    assert any("VM_CR" in n for n in s["notes"])  # svm visible does not mean enabled
    no_avic = virt_summary([f for f in AMD_ZEN3 if f not in {"avic", "flushbyasid"}])
    assert len(no_avic["missing"]) == 2
    assert any("AVIC" in line for line in no_avic["missing"])


def test_summary_cloud_vm_without_nesting():
    s = virt_summary(CLOUD_VM)
    assert s["hardware_virt"] is False and s["in_vm"] is True and s["nested"] is False
    assert s["vendor"] is None
    assert "TCG" in s["verdict"] and "máquina virtual" in s["verdict"]
    assert any("PVM" in n for n in s["notes"])
    assert any("nested" in n for n in s["notes"])
    assert [f["key"] for f in s["features"]] == ["hw"]


def test_summary_nested_intel_guest():
    guest = [f for f in INTEL_LAPTOP] + ["hypervisor"]
    s = virt_summary(guest, ["ept", "vpid", "unrestricted_guest"])
    assert s["nested"] is True and s["hardware_virt"] is True
    assert "anidada" in s["verdict"]


def test_summary_bare_metal_without_vmx_points_at_firmware():
    s = virt_summary([f for f in INTEL_LAPTOP if f != "vmx"])
    assert s["hardware_virt"] is False and s["in_vm"] is False
    assert "firmware" in s["verdict"]
    assert any("disabled by BIOS" in n and "MSR_VM_CR" in n for n in s["notes"])


def test_summary_aarch64():
    s = virt_summary(ARM_FEATURES, arch="aarch64")
    assert s["arch"] == "arm64" and s["hardware_virt"] is None
    assert "EL2" in s["verdict"]
    assert virt_summary(ARM_FEATURES)["arch"] == "arm64"  # guessed from the names


def test_format_summary_marks():
    text = format_summary(virt_summary(INTEL_LAPTOP, INTEL_LAPTOP_VMX))
    assert text.splitlines()[0].startswith("Este procesador tiene Intel VT-x")
    assert "[sí] Paginación anidada (EPT)" in text
    assert "[no] Virtualización del APIC (APICv)" in text


# --------------------------------------------------------------------------- text table


def test_flags_table_plain_text():
    rows = classify(["vmx", "avx2", "aes"])
    table = flags_table(rows, max_text=30)
    lines = table.splitlines()
    assert lines[0].split() == ["flag", "línea", "categoría", "explicación"]
    assert lines[1].startswith("  aes") and lines[-1].startswith("* vmx")
    assert all(len(line.split("  ")[-1]) <= 30 for line in lines[1:])
    assert "…" in table
    assert flags_table([]) == "(ningún flag)"
    full = flags_table(rows, max_text=None)
    assert explain("vmx").text in full


# --------------------------------------------------------------------------- widget


def test_widget_filters_live():
    from labkit.widgets.flags import flag_explorer

    w = flag_explorer(INTEL_LAPTOP, INTEL_LAPTOP_VMX, title="Mi CPU")
    total = len(INTEL_LAPTOP) + len(INTEL_LAPTOP_VMX)
    assert w.count.value == f"{total} de {total} flags"
    assert w.category.options[0] == ALL
    assert set(w.category.options[1:]) <= set(CATEGORIES)
    assert "criptografía" in w.category.options

    w.search_box.value = "ept"
    names = {r.name for r in w.visible}
    assert {"ept", "ept_ad", "ept_1gb"} <= names
    assert w.count.value == f"{len(w.visible)} de {total} flags"
    assert "<code><b>ept</b>" in w.table.value  # virtualization rows are highlighted
    assert 'class="virt"' in w.table.value

    w.search_box.value = ""
    w.only_virt.value = True
    assert w.visible and all(r.virt for r in w.visible)
    assert "avx2" not in w.table.value

    w.only_virt.value = False
    w.category.value = "criptografía"
    assert {r.name for r in w.visible} == {"aes", "pclmulqdq", "rdrand", "rdseed", "adx"}
    assert w.count.value == f"5 de {total} flags"

    w.search_box.value = "nada-de-nada"
    assert w.count.value == f"0 de {total} flags"
    assert "Ningún flag" in w.table.value
    assert "nada-de-nada" not in w.as_text()


def test_widget_repr_is_short_and_deterministic():
    from labkit.widgets.flags import flag_explorer

    a = flag_explorer(CLOUD_VM)
    b = flag_explorer(list(reversed(CLOUD_VM)))
    assert repr(a) == repr(b)
    assert len(repr(a)) < 110  # ipywidgets cuts text/plain at 110 characters
    assert f"{len(CLOUD_VM)} de {len(CLOUD_VM)} flags (2 de virtualización)" in repr(a)
    assert a._repr_mimebundle_()["text/plain"] == repr(a)
    assert a.table.value == b.table.value


def test_widget_escapes_html():
    from labkit.widgets.flags import flag_explorer, rows_html

    evil = '<script>alert("x")</script>'
    w = flag_explorer(["fpu", evil, "a&b"], [f"<img src=x onerror={evil}>"], title="<b>t</b>")
    html_out = w.table.value
    assert "<script>" not in html_out and "<img" not in html_out
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in html_out
    assert "a&amp;b" in html_out
    assert "&lt;b&gt;t&lt;/b&gt;" in w.children[0].value
    assert rows_html([]).startswith("<p>")
