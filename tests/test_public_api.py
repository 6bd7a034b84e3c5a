"""The public face of labkit is exactly what it should be."""

import labkit


def test_public_names():
    assert labkit.__all__ == [
        "probe", "parse_cpuinfo", "save_tree", "HostReport", "Check", "CpuInfo",
        "Guest", "GuestSpec", "CommandResult",
        "LabkitError", "InputError", "HostError", "ProbeError", "ToolMissingError", "SetupError",
    ]
    for name in labkit.__all__:
        assert getattr(labkit, name) is not None


def test_errors_carry_message_and_hint():
    err = labkit.InputError("Tamaño no válido.", "Usa por ejemplo 512M o 5G.")
    assert isinstance(err, labkit.LabkitError) and isinstance(err, ValueError)
    assert "Qué hacer: Usa por ejemplo 512M" in str(err)
    assert "**Qué hacer:**" in err._repr_markdown_()
