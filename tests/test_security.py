"""Security of a running guest, on both backends (QEMU directly and libvirt), with real QEMU under TCG.

One guest per backend (module scope) with everything that opens a socket or a door to the host: a
VNC display (unix socket), an agent channel, a qemu-vdagent, a USB tablet on an xHCI controller, a
9p share and a virtiofs share (each with symlinks that point outside it). Checked:

- QEMU runs under its seccomp sandbox (``-sandbox on,...``; /proc/<pid>/status ``Seccomp: 2``), and
  labkit adds ``-sandbox`` exactly when this QEMU has it (asked over QMP: query-command-line-options);
- every unix socket of QEMU and virtiofsd is a file in a private directory (owner only; no parent
  writable by others unless sticky), none is abstract;
- nothing QEMU or virtiofsd has open is an inet socket outside 127.0.0.1/::1;
- from inside the guest, neither ``..`` nor a symlink in the shared folder reaches a host file outside it.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from labkit.errors import HostError
from labkit.guest import Guest, GuestSpec
from labkit.guest import argv as qargv
from labkit.guest.runner import runtime_base, sandbox_supported
from labkit.guest.spec import ChannelSpec, ShareSpec, UsbSpec

TOKEN = f"secreto-{uuid.uuid4().hex}"
INET_TABLES = ("tcp", "tcp6", "udp", "udp6", "raw", "raw6", "udplite", "udplite6")
OTHER_TABLES = ("netlink", "packet")


# --------------------------------------------------------------------------- the sandbox option


def _qmp_sandbox_parameters(binary: str = qargv.QEMU) -> set[str] | None:
    """The -sandbox parameters this QEMU knows, asked over QMP (None: it has no -sandbox)."""
    messages = "".join(json.dumps(m) + "\n" for m in (
        {"execute": "qmp_capabilities"},
        {"execute": "query-command-line-options", "arguments": {"option": "sandbox"}},
        {"execute": "quit"}))
    proc = subprocess.run([binary, "-machine", "none", "-nodefaults", "-display", "none", "-qmp", "stdio"],
                          input=messages, capture_output=True, text=True, timeout=120, check=False)
    for line in proc.stdout.splitlines():
        answer = json.loads(line)
        if isinstance(answer.get("return"), list):
            return {p["name"] for opt in answer["return"] if opt["option"] == "sandbox" for p in opt["parameters"]}
        if "error" in answer:
            return None
    raise AssertionError(f"QEMU no contestó por QMP: {proc.stderr}")


def test_argv_adds_the_sandbox_exactly_when_qemu_has_it(tmp_path):
    parameters = _qmp_sandbox_parameters()
    assert sandbox_supported(qargv.QEMU) is (parameters is not None)
    if parameters is not None:
        assert {"obsolete", "elevateprivileges", "spawn", "resourcecontrol"} <= parameters
    spec = GuestSpec(name="sandbox", accel="tcg")
    boot = qargv.BootFiles(tmp_path / "vmlinux", tmp_path / "initrd")
    runtime = qargv.Runtime(tmp_path)
    with_sandbox = qargv.build_argv(spec, "tcg", boot, runtime, sandbox=True)
    assert with_sandbox[-2:] == ["-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]
    assert "-sandbox" not in qargv.build_argv(spec, "tcg", boot, runtime, sandbox=False)
    assert not sandbox_supported(str(tmp_path / "no-such-qemu"))


# --------------------------------------------------------------------------- the runtime base


def test_runtime_base_refuses_a_dir_it_does_not_own(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    base = tmp_path / "labkit"
    base.mkdir(mode=0o777)
    base.chmod(0o777)
    assert runtime_base() == base and stat.S_IMODE(base.stat().st_mode) == 0o700  # own but too open: tightened
    os.chown(base, 65534, 65534)
    with pytest.raises(HostError) as err:
        runtime_base()
    assert "no es una carpeta tuya" in err.value.message and err.value.hint
    base.rmdir()
    elsewhere = tmp_path / "otra"
    elsewhere.mkdir(mode=0o700)
    base.symlink_to(elsewhere)
    with pytest.raises(HostError):
        runtime_base()
    base.unlink()
    base.symlink_to(tmp_path / "no-existe")  # dangling: mkdir cannot make it, the check still refuses it
    with pytest.raises(HostError):
        runtime_base()


# --------------------------------------------------------------------------- the guests


@pytest.fixture(scope="module")
def folders():
    """Two shares (9p, virtiofs) with symlinks that lead out, and a secret beside them."""
    base = Path(tempfile.mkdtemp(prefix="labkit-test-sec-"))
    base.chmod(0o755)
    qemu_user = pwd.getpwnam("libvirt-qemu")
    (base / "secreto.txt").write_text(TOKEN + "\n")
    (base / "vecina").mkdir()
    (base / "vecina" / "secreto2.txt").write_text(TOKEN + "\n")
    made = {}
    for name in ("s9p", "svfs"):
        share = base / name
        share.mkdir()
        share.chmod(0o755)
        os.chown(share, qemu_user.pw_uid, qemu_user.pw_gid)  # libvirt's QEMU opens the 9p files itself
        (share / "dentro.txt").write_text("dentro\n")
        (share / "enlace-abs").symlink_to(base / "secreto.txt")
        (share / "enlace-rel").symlink_to("../secreto.txt")
        (share / "enlace-dir").symlink_to("../vecina")
        (share / "enlace-raiz").symlink_to("/")
        made[name] = share
    made["base"] = base
    yield made
    shutil.rmtree(base)


@pytest.fixture(params=["qemu", "libvirt"], scope="module")
def guest(request, folders, guest_assets):
    backend = request.param
    spec = GuestSpec(name=f"labkit-test-sec-{backend}", machine="pc", accel="tcg", vnc=True, vdagent=True,
                     usb_controller=True, usb=(UsbSpec("tablet"),), channels=(ChannelSpec("org.labkit.sec.0"),),
                     shares=(ShareSpec(str(folders["s9p"]), tag="s9p", allow_symlinks=True),
                             ShareSpec(str(folders["svfs"]), tag="svfs", kind="virtiofs", allow_symlinks=True)))
    if backend == "qemu":
        cls = Guest
    else:
        from labkit.guest.libvirt import LibvirtGuest as cls
    with cls(spec, assets=guest_assets, boot_timeout=180) as g:
        g.mounted = {s.tag: g.mount_share(s) for s in g.shares()}
        yield g
    assert not g.running


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "stat").read_text().rpartition(")")[2].split()[1] == str(pid):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def _virtiofsd_pids(guest) -> list[int]:
    """The virtiofsd processes serving this guest (the daemon and the child it forks)."""
    if guest.backend == "qemu":
        roots = [d.process.pid for d in guest._daemons]
    else:  # libvirt starts them: their command line names the shared folder
        roots = []
        for entry in Path("/proc").iterdir():
            try:
                cmd = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmd and cmd[0].endswith(b"virtiofsd") and any(str(s.path).encode() in a for a in cmd
                                                                 for s in guest.shares()):
                roots.append(int(entry.name))
    pids = set(roots)
    for pid in roots:
        pids.update(_children(pid))
    return sorted(pids)


def _guest_pids(guest) -> dict[int, str]:
    pids = {guest.pid: "qemu"}
    pids.update({pid: "virtiofsd" for pid in _virtiofsd_pids(guest)})
    assert len(pids) >= 2, "no se encontró virtiofsd"
    return pids


def _status(pid: int, field: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"/proc/{pid}/status sin {field}")


def test_qemu_runs_in_its_seccomp_sandbox(guest):
    if not sandbox_supported(qargv.QEMU):
        pytest.skip("este QEMU no tiene -sandbox (compilado sin seccomp)")
    cmdline = Path(f"/proc/{guest.pid}/cmdline").read_bytes().split(b"\0")
    assert b"-sandbox" in cmdline
    option = cmdline[cmdline.index(b"-sandbox") + 1].decode()
    assert option.startswith("on,") and all(f"{k}=deny" in option for k in
                                             ("obsolete", "elevateprivileges", "spawn", "resourcecontrol"))
    assert _status(guest.pid, "Seccomp") == "2"  # filter mode, on every thread
    # virtiofsd: the process that serves the guest filters its system calls too
    assert "2" in {_status(pid, "Seccomp") for pid in _virtiofsd_pids(guest)}


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def _socket_tables(pids) -> dict[str, tuple[str, list[str]]]:
    """inode -> (table, fields), from the network namespace of this process and of each pid
    (virtiofsd runs in a namespace of its own)."""
    found: dict[str, tuple[str, list[str]]] = {}
    for who in ["self", *map(str, pids)]:
        for table in ("unix", *INET_TABLES, *OTHER_TABLES):
            try:
                lines = Path(f"/proc/{who}/net/{table}").read_text().splitlines()[1:]
            except OSError:
                continue
            column = {"unix": 6, "netlink": 9, "packet": 8}.get(table, 9)
            for line in lines:
                fields = line.split()
                if len(fields) > column:
                    found.setdefault(fields[column], (table, fields))
    return found


def _address(hex_addr: str) -> str:
    host, port = hex_addr.split(":")
    raw = bytes.fromhex(host)
    if len(raw) == 4:
        return ".".join(str(b) for b in raw[::-1]) + f":{int(port, 16)}"
    words = [raw[i:i + 4][::-1] for i in range(0, 16, 4)]  # four little-endian 32-bit words
    import ipaddress

    return f"[{ipaddress.IPv6Address(b''.join(words))}]:{int(port, 16)}"


def _is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    return host.startswith("127.") or host in ("::1", "::ffff:127.0.0.1")


def _network_problems(pids: dict[int, str]) -> tuple[list[str], list[str]]:
    """(problems, kinds of socket seen): only unix, netlink and loopback inet sockets are allowed."""
    tables = _socket_tables(pids)
    problems, kinds = [], []
    for pid, who in pids.items():
        for inode in _socket_inodes(pid):
            if inode not in tables:
                problems.append(f"{who} ({pid}) tiene un socket {inode} de tipo desconocido")
                continue
            table, fields = tables[inode]
            kinds.append(table)
            if table in INET_TABLES:
                local = _address(fields[1])
                if not _is_loopback(local):
                    problems.append(f"{who} ({pid}) abre {table} en {local}: se ve desde la red")
            elif table not in ("unix", "netlink"):
                problems.append(f"{who} ({pid}) tiene un socket {table}")
    return problems, kinds


def test_the_network_check_sees_a_socket_open_to_the_network():
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as open_to_all, \
            socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as local:
        open_to_all.bind(("0.0.0.0", 0))
        open_to_all.listen()
        local.bind(("::1", 0))
        port = open_to_all.getsockname()[1]
        problems, kinds = _network_problems({os.getpid(): "pytest"})
    assert f"pytest ({os.getpid()}) abre tcp en 0.0.0.0:{port}: se ve desde la red" in problems
    assert not [p for p in problems if "::1" in p]
    assert {"tcp", "udp6"} <= set(kinds)


def test_nothing_listens_outside_localhost(guest):
    problems, kinds = _network_problems(_guest_pids(guest))
    assert not problems
    assert "unix" in kinds  # the check saw the guest's sockets


def _is_private(directory: Path, owners: set[int], strict: bool) -> str | None:
    st = directory.lstat()
    mode = stat.S_IMODE(st.st_mode)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid not in owners:
        return f"{directory} es de uid {st.st_uid}, no de {sorted(owners)}"
    if (mode & 0o077) if strict else (mode & 0o027):
        return f"{directory} tiene permisos {stat.filemode(st.st_mode)}"
    for parent in directory.parents:
        pst = parent.stat()
        if pst.st_mode & 0o022 and not pst.st_mode & stat.S_ISVTX:
            return f"{parent}, por encima, la puede cambiar cualquiera ({stat.filemode(pst.st_mode)})"
    return None


def test_the_privacy_check_sees_an_open_directory(tmp_path):
    shared = tmp_path / "abierta"
    shared.mkdir(mode=0o750)
    shared.chmod(0o750)
    assert "permisos" in _is_private(shared, {os.getuid()}, strict=True)
    assert _is_private(shared, {os.getuid()}, strict=False) is None
    assert "uid" in _is_private(shared, {12345}, strict=False)
    tmp_path.chmod(0o777)  # a parent anyone can change (no sticky bit)
    try:
        assert "cualquiera" in _is_private(shared, {os.getuid()}, strict=False)
    finally:
        tmp_path.chmod(0o700)


def test_every_socket_is_in_a_private_directory(guest):
    pids = _guest_pids(guest)
    tables = _socket_tables(pids)
    qemu_uid = os.getuid() if guest.backend == "qemu" else pwd.getpwnam("libvirt-qemu").pw_uid
    runtime = guest._runtime.directory if guest.backend == "qemu" else guest._directory
    # labkit's own dir: owner only (0700), owned by the user QEMU runs as
    assert _is_private(runtime, {qemu_uid}, strict=True) is None, _is_private(runtime, {qemu_uid}, strict=True)
    paths = set()
    for pid in pids:
        for inode in _socket_inodes(pid):
            table, fields = tables.get(inode, ("", []))
            if table == "unix" and len(fields) > 7:
                paths.add(fields[7])
    assert not [p for p in paths if p.startswith("@")], f"sockets abstractos (sin permisos de fichero): {paths}"
    names = {Path(p).name for p in paths if Path(p).parent == runtime}
    assert {"qga.sock", "vnc.sock", "chan-org.labkit.sec.0.sock"} <= names, names
    for path in paths:
        directory = Path(path).parent
        # labkit's dirs strictly private; libvirt's own domain dirs (monitor, vhost-user) owner+group, read-only
        strict = directory == runtime or directory.parent == runtime_base()
        problem = _is_private(directory, {qemu_uid, 0}, strict=strict)
        assert problem is None, f"socket {path}: {problem}"


def test_a_share_exposes_only_its_own_directory(guest, folders):
    base = folders["base"]
    assert TOKEN in (folders["s9p"] / "enlace-abs").read_text()  # on the host the links do lead out
    before = sorted(p.name for p in base.iterdir())
    for tag, mounted in guest.mounted.items():
        m = mounted.mountpoint
        assert guest.run(["cat", f"{m}/dentro.txt"]).stdout == "dentro\n"  # the share itself works
        tries = [f"{m}/../secreto.txt", f"{m}/../../secreto.txt", f"{m}/enlace-abs", f"{m}/enlace-rel",
                 f"{m}/enlace-dir/secreto2.txt", f"{m}/enlace-raiz{base}/secreto.txt", f"{base}/secreto.txt"]
        script = "; ".join(f"cat '{p}'" for p in tries) + f"; grep -rs {TOKEN[:12]} {m}; ls -la {m} {m}/.."
        result = guest.run(script, timeout=60)
        assert TOKEN not in result.stdout + result.stderr, f"{tag}: el invitado leyó un fichero de fuera"
        # writing through .. lands in the guest's own /mnt, never next to the share on the host
        guest.run(f"echo fuera > {m}/../escrito-fuera-{tag}.txt; mkdir -p {m}/enlace-dir/nueva", timeout=30)
    assert sorted(p.name for p in base.iterdir()) == before
    assert sorted(p.name for p in (base / "vecina").iterdir()) == ["secreto2.txt"]
