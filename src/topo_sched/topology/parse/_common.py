"""Small helpers the parsers share: CPU lists, PCI addresses, ANSI escapes."""

from __future__ import annotations

import re

from topo_sched.topology.model import LinkClass

#: CSI escape sequences (``ESC[4m`` underline, ``ESC[0m`` reset, colours, ...).
ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
#: Kernel cpulist syntax: ``0-47,96-143``; also used for NUMA node lists (``0,3-9,11-17``).
CPULIST_RE = re.compile(r"^\d+(?:-\d+)?(?:,\d+(?:-\d+)?)*$")
_PCI_RE = re.compile(
    r"^(?:(?P<dom>[0-9a-fA-F]{1,8}):)?(?P<bus>[0-9a-fA-F]{1,2}):(?P<dev>[0-9a-fA-F]{1,2})\.(?P<fn>[0-7])$"
)


def strip_ansi(text: str) -> str:
    return ANSI_RE.sub("", text)


def parse_cpulist(text: str) -> list[int]:
    """``"0,3-9"`` -> ``[0, 3, 4, 5, 6, 7, 8, 9]``; raises ValueError on anything else."""
    text = text.strip()
    if not CPULIST_RE.match(text):
        raise ValueError(f"{text!r} is not a list like 0-47,96-143")
    out: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        a, b = int(lo), int(hi or lo)
        if b < a:
            raise ValueError(f"range {part!r} runs backwards")
        out.update(range(a, b + 1))
    return sorted(out)


def format_cpulist(cpus: list[int] | set[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"`` (kernel cpulist syntax, ascending)."""
    ids = sorted(set(cpus))
    parts: list[str] = []
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        parts.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ",".join(parts)


def cpus_from_mask_words(words: list[int | str]) -> list[int]:
    """NVML affinity masks: an array of 64-bit words, bit ``i % 64`` of word ``i // 64``."""
    out: list[int] = []
    for w, word in enumerate(words):
        value = int(word, 0) if isinstance(word, str) else int(word)
        if value < 0:
            raise ValueError(f"negative mask word {word!r}")
        bit = 0
        while value:
            if value & 1:
                out.append(w * 64 + bit)
            value >>= 1
            bit += 1
    return out


def normalize_pci(address: str) -> str:
    """Any PCI address spelling -> the sysfs form ``dddd:bb:dd.f``, lower case.

    NVML and nvidia-smi print an 8-digit domain (``00000000:1B:00.0``); sysfs uses 4 digits.
    Raises ValueError for anything that is not a PCI address.
    """
    m = _PCI_RE.match(address.strip())
    if not m:
        raise ValueError(f"{address!r} is not a PCI address")
    dom = int(m["dom"] or "0", 16)
    return f"{dom:04x}:{int(m['bus'], 16):02x}:{int(m['dev'], 16):02x}.{m['fn']}"


def is_pci_address(text: str) -> bool:
    return bool(_PCI_RE.match(text.strip()))


#: nvidia-smi's legacy name for SYS (drivers before ~384 printed SOC).
LINK_TOKENS: dict[str, LinkClass] = {
    "PIX": LinkClass.PIX,
    "PXB": LinkClass.PXB,
    "PHB": LinkClass.PHB,
    "NODE": LinkClass.NODE,
    "SYS": LinkClass.SYS,
    "SOC": LinkClass.SYS,
}


def numa_cpus_from_gpus(
    numa_of: dict[int, int | None],
    numa_lists: dict[int, list[int] | None],
    cpus_of: dict[int, str | None],
) -> dict[int, str]:
    """CPU list per NUMA node, taken from the GPUs' CPU affinity where it is unambiguous.

    A node gets the CPU list its GPUs print when every GPU of the node names exactly that one
    node as its affinity (not a list of several) and all of them print the same CPU list.
    """
    out: dict[int, str] = {}
    for nid in {n for n in numa_of.values() if n is not None}:
        members = [g for g, n in numa_of.items() if n == nid]
        cpus = {cpus_of.get(g) for g in members}
        if len(cpus) == 1 and all(numa_lists.get(g) == [nid] for g in members):
            only = next(iter(cpus))
            if only is not None:
                out[nid] = only
    return out
