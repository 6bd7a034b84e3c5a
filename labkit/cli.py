"""The ``labkit`` command line: ``labkit doctor`` (more subcommands come with the guest engine).

Exit status: 0 on success (for doctor: a guest can run here, with KVM or TCG),
1 when it cannot be done (doctor: QEMU missing; guest: it did not build or
boot; course handouts: some notebook failed), 2 for bad arguments or input
(course handouts: 130 when stopped with Ctrl-C).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .errors import InputError, LabkitError

__all__ = ["main"]


#: argparse's English words (Python 3.11), most specific first.
_ARGPARSE_ES = (("the following arguments are required", "faltan los argumentos"),
                ("unrecognized arguments", "argumentos no reconocidos"),
                ("invalid choice", "opción no válida"), ("choose from", "elige entre"),
                ("expected one argument", "se esperaba un valor"),
                ("expected at least one argument", "se esperaba al menos un valor"),
                ("invalid int value", "no es un número entero"), ("invalid float value", "no es un número"),
                ("ambiguous option", "opción ambigua"), ("could match", "puede ser"),
                ("not allowed with argument", "no se puede usar con"),
                ("ignored explicit argument", "sobra el valor"), ("argument ", "argumento "),
                ("usage: ", "uso: "), ("positional arguments:", "argumentos:"), ("options:", "opciones:"),
                ("show this help message and exit", "muestra esta ayuda y termina"))


def _spanish(text: str) -> str:
    for english, spanish in _ARGPARSE_ES:
        text = text.replace(english, spanish)
    return text


class _Parser(argparse.ArgumentParser):
    """argparse with its messages in Spanish and exit status 2 on bad arguments."""

    def format_usage(self) -> str:
        return _spanish(super().format_usage())

    def format_help(self) -> str:
        return _spanish(super().format_help())

    def error(self, message: str) -> None:  # type: ignore[override]
        message = _spanish(message)
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\nPrueba «{self.prog} --help».\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="labkit", description="Herramientas del curso Lab KVM.")
    sub = p.add_subparsers(dest="command", metavar="ORDEN", parser_class=_Parser)
    d = sub.add_parser("doctor", help="diagnostica si este equipo puede usar KVM y por qué",
                       description="Comprueba la virtualización del equipo (como virt-host-validate y kvm-ok, "
                                   "y más) y dice qué acelerador usará el curso.")
    d.add_argument("--json", action="store_true", help="salida en JSON")
    d.add_argument("--root", metavar="DIR|FICHERO.tar.gz", default="/",
                   help="diagnostica lo guardado con --save (una carpeta o un .tar.gz)")
    d.add_argument("--save", metavar="DIR|FICHERO.tar.gz",
                   help="guarda los ficheros que lee el diagnóstico en una carpeta, o en un solo archivo "
                        "si el nombre acaba en .tar.gz (nunca sobrescribe)")
    d.add_argument("--functional", action="store_true",
                   help="ejecuta además unas instrucciones reales con KVM_RUN y las cronometra")
    g = sub.add_parser("guest", help="construye y arranca el invitado mínimo del curso")
    gsub = g.add_subparsers(dest="guest_command", metavar="ACCIÓN", parser_class=_Parser)
    b = gsub.add_parser("build", help="prepara (o reconstruye) el kernel y el initramfs del invitado")
    b.add_argument("--kernel", metavar="RUTA", help="usa este kernel (bzImage) en vez de buscarlo")
    b.add_argument("--rebuild", action="store_true", help="reconstruye aunque esté en caché")
    r = gsub.add_parser("boot", help="arranca un invitado, ejecuta una orden y lo para",
                        description="Arranca el invitado, ejecuta ORDEN (o abre una shell si estás en un "
                                    "terminal), imprime la salida y el acelerador usado, y lo para.")
    r.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto", help="acelerador (auto por defecto)")
    r.add_argument("--machine", choices=("microvm", "q35", "pc"), default="microvm", help="tipo de máquina")
    r.add_argument("--memory", default="256M", help="memoria, p. ej. 256M o 1G")
    r.add_argument("--timeout", type=float, default=60.0, help="segundos para la orden")
    r.add_argument("--show-command", action="store_true", help="imprime la línea de QEMU")
    r.add_argument("guest_argv", nargs=argparse.REMAINDER, metavar="-- ORDEN", help="orden para el invitado")
    be = sub.add_parser("bench", help="mide el mismo trabajo en nativo, con KVM y con TCG",
                        description="Ejecuta las mismas órdenes de busybox en el anfitrión y en invitados (KVM si "
                                    "funciona aquí, TCG de 1 hilo y TCG multihilo con 2 vCPU), ronda a ronda, y da "
                                    "la mediana, el IQR y el cociente frente a nativo. Ctrl-C para los invitados "
                                    "y guarda lo medido.")
    be.add_argument("--mode", choices=("quick", "full"), default="full", help="tamaño de las cargas (full por defecto)")
    be.add_argument("--rounds", type=int, help="repeticiones medidas (3 en quick, 7 en full)")
    be.add_argument("--warmup", type=int, default=1, help="rondas de calentamiento, no cuentan (1)")
    be.add_argument("--boot-rounds", type=int, help="arranques por núcleo y configuración (2 en quick, 5 en full)")
    be.add_argument("--workloads", help="lista separada por comas: sha256,syscalls,memcopy,blockio,boot")
    be.add_argument("--configs", help="lista separada por comas: kvm,tcg-1,tcg-2 (nativo siempre)")
    be.add_argument("--json", metavar="FICHERO", help="guarda los resultados (con metadatos) en JSON")
    be.add_argument("--csv", metavar="FICHERO", help="guarda el resumen en CSV")
    be.add_argument("--plot", metavar="FICHERO.png", help="guarda el gráfico de barras")
    be.add_argument("--compare", metavar="FICHERO", action="append", default=[],
                    help="resultados de otro equipo para dibujarlos al lado (repetible)")
    be.add_argument("--log", action="store_true", help="eje de tiempos logarítmico en el gráfico")
    be.add_argument("--label", help="nombre de este equipo en los gráficos")
    c = sub.add_parser("cleanup", help="elimina los invitados, dominios y ficheros que dejó un fallo",
                       description="Busca invitados de labkit (dominios libvirt «labkit-*», procesos QEMU y "
                                   "directorios temporales) cuyo dueño ya no existe, los elimina y dice qué ha "
                                   "eliminado.")
    c.add_argument("--all", action="store_true", help="elimina también los invitados cuyo dueño sigue vivo")
    c.add_argument("--uri", default="qemu:///system", help="conexión de libvirt (qemu:///system por defecto)")
    _course_parser(sub)
    return p


def _course_parser(sub: argparse._SubParsersAction) -> None:
    co = sub.add_parser("course", help="herramientas para el profesor: apuntes en HTML y copia para el alumnado")
    cosub = co.add_subparsers(dest="course_command", metavar="ACCIÓN", parser_class=_Parser)
    h = cosub.add_parser("handouts", help="ejecuta todo el curso sin intervención y escribe apuntes en HTML",
                         description="Ejecuta cada cuaderno en orden (en una copia: los cuadernos del curso no se "
                                     "tocan), escribe un HTML por cuaderno y un index.html con qué falló, cuánto "
                                     "tardó cada uno y con qué acelerador. Sale con 1 si falló alguno.")
    h.add_argument("--timeout", metavar="S", type=float, default=600.0, help="segundos máximos por celda (600)")
    h.add_argument("--with-notes", action="store_true", help="incluye las notas para el profesor en el HTML")
    s = cosub.add_parser("student-copy", help="copia los cuadernos sin notas del profesor, salidas ni respuestas",
                         description="Escribe los cuadernos sin las celdas «Nota para el profesor» (etiqueta "
                                     "instructor), sin salidas ni estado de los widgets (donde se verían las "
                                     "respuestas corregidas de la autoevaluación).")
    for q, out in ((h, "build/handouts"), (s, "build/student-copy")):
        q.add_argument("--out", metavar="DIR", default=out, help=f"carpeta de salida ({out} por defecto)")
        q.add_argument("--notebooks", metavar="00,03", help="solo estos cuadernos (números separados por comas)")
        q.add_argument("--source", metavar="DIR", help="carpeta de los cuadernos (notebooks/ del curso por defecto)")
        q.add_argument("--force", action="store_true", help="escribe aunque la carpeta de salida no esté vacía")


def _course(args: argparse.Namespace) -> int:
    if args.course_command == "handouts":
        from .course import run_handouts

        result = run_handouts(args.out, source=args.source, select=args.notebooks, timeout=args.timeout,
                              force=args.force, with_notes=args.with_notes)
        print(result.summary())
        if result.interrupted:
            return 130
        return 1 if result.failed else 0
    if args.course_command == "student-copy":
        from .student import student_copy

        written = student_copy(args.out, source=args.source, select=args.notebooks, force=args.force)
        print(f"Copia para el alumnado: {len(written)} cuadernos en {written[0].parent}")
        return 0
    _parser().parse_args(["course", "--help"])
    return 2


def _cleanup(args: argparse.Namespace) -> int:
    from .cleanup import NOTHING, cleanup

    lines = cleanup(everything=args.all, uri=args.uri)
    print("\n".join(lines) if lines else NOTHING)
    return 0


def _bench(args: argparse.Namespace) -> int:
    from . import bench
    from .bench.cli import main as bench_main

    return bench_main(args, bench)


def _guest(args: argparse.Namespace) -> int:
    from . import guest_cli

    if args.guest_command == "build":
        return guest_cli.build(args)
    if args.guest_command == "boot":
        return guest_cli.boot(args)
    print("labkit guest: falta la ACCIÓN (build o boot).\nPrueba «labkit guest --help».", file=sys.stderr)
    return 2


def _doctor(args: argparse.Namespace) -> int:
    from . import doctor, host, snapshot

    with snapshot.opened(args.root) as root:
        if args.save:
            out = snapshot.save(args.save, root=root)
            print(f"Diagnóstico guardado en {out}. Para verlo en otro equipo: labkit doctor --root {out}")
            return 0
        report = host.probe(root, functional=args.functional)
    doctor.print_report(report, as_json=args.json)
    return 0 if report.can_run_guests else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command is None:
        _parser().print_help()
        return 2
    try:
        if args.command == "doctor":
            return _doctor(args)
        if args.command == "guest":
            return _guest(args)
        if args.command == "cleanup":
            return _cleanup(args)
        if args.command == "bench":
            return _bench(args)
        if args.command == "course":
            return _course(args)
    except LabkitError as err:
        print(f"labkit: {err}", file=sys.stderr)
        return 2 if isinstance(err, InputError) else 1
    return 2  # pragma: no cover - argparse refuses unknown commands first


if __name__ == "__main__":
    raise SystemExit(main())
