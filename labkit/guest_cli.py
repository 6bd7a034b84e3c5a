"""``labkit guest build`` and ``labkit guest boot``: the guest engine from a terminal."""

from __future__ import annotations

import argparse
import shlex
import sys

from .guest import Guest, GuestSpec

__all__ = ["build", "boot"]


def _say(message: str) -> None:
    print(f"[labkit] {message}", file=sys.stderr, flush=True)


def build(args: argparse.Namespace) -> int:
    from .guest.assets import ensure_assets

    assets = ensure_assets(args.kernel, progress=_say, rebuild=args.rebuild, verify=True)
    print(f"kernel {assets.kernel_version}")
    print(f"  bzImage:   {assets.bzimage}")
    print(f"  vmlinux:   {assets.vmlinux or '(no se pudo extraer: se arrancará el bzImage)'}")
    print(f"  initramfs: {assets.initramfs}")
    print(f"  módulos al arrancar: {' '.join(assets.modules) or '(ninguno)'}")
    return 0


def boot(args: argparse.Namespace) -> int:
    command = list(args.guest_argv)
    if command and command[0] == "--":
        command = command[1:]
    interactive = not command and sys.stdin.isatty() and sys.stdout.isatty()
    spec = GuestSpec(name="labkit-boot", memory=args.memory, accel=args.accel, machine=args.machine,
                     cmdline="labkit.shell=1" if interactive else "")
    guest = Guest(spec, console="stdio" if interactive else "file", progress=_say)
    with guest:
        _say(f"acelerador: {guest.accel} ({guest.accel_reason})")
        if guest.fallback:
            _say(f"aviso: {guest.fallback}")
        _say(f"arrancado en {guest.boot_seconds:.2f} s")
        if args.show_command:
            print(guest.command_line())
        if interactive:
            _say("shell del invitado en este terminal; sal con «exit» (el invitado se apaga)")
            assert guest._proc is not None
            guest._proc.wait()
            return 0
        if not command:
            command = ["uname", "-a"]
        result = guest.run(shlex.join(command), timeout=args.timeout)
        sys.stdout.write(result.stdout)
        sys.stderr.write(result.stderr)
        _say(f"estado de salida {result.exit_status}, {result.duration * 1000:.0f} ms")
        return result.exit_status if result.exit_status is not None else 1
